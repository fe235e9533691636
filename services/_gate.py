"""The gate: a workload's interpreter, started ahead for a standby, becoming the workload on cue.

`python -m multikernel.services._gate -- ARGV...` (started by a standby agent, `_takeover`)
imports what a Python workload on the bus imports (anyio and its asyncio backend, msgspec,
structlog, uvloop, the endpoint library), says `ready` on the socket it inherited
($MULTIKERNEL_GATE_FD) and blocks until the agent sends `go` with the workload's bus socket
(SCM_RIGHTS). Then it becomes the workload: `{python} SCRIPT ARGS` runs the script in this
interpreter as `__main__` (runpy), as `python SCRIPT` would, and `{python} -m MODULE ARGS` the
module; the agent starts no gate for other command lines. EOF instead of `go` (the standby was
discarded, or its agent died) ends it quietly. It is a process of the instance like any other:
same namespaces, cgroups and CPUs, and the agent stops it as it stops a workload.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys

ENV_GATE = "MULTIKERNEL_GATE_FD"


def _preload() -> None:
    import importlib

    for module in (
        "asyncio",
        "anyio",
        "anyio._backends._asyncio",
        "msgspec",
        "structlog",
        "uvloop",
        "multikernel.protocol",
        "multikernel.shm",
        "multikernel.endpoints",
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            continue


def gated(argv: list[str]) -> bool:
    """Whether the gate can run `argv` in its own interpreter (else it would exec it)."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return False
    return (argv[1] == "-m" and len(argv) >= 3) or not argv[1].startswith("-")


def _become(argv: list[str]) -> None:
    if not gated(argv):
        os.execvp(argv[0], argv)
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[1])
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1 :]
    control = socket.socket(fileno=int(os.environ.pop(ENV_GATE)))
    _preload()
    control.sendall(b"ready\n")
    try:
        message, fds, _, _ = socket.recv_fds(control, 16, 1)
    except OSError:
        message, fds = b"", []
    control.close()
    if not message.startswith(b"go") or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        sys.exit(0)
    os.set_inheritable(fds[0], True)  # for a workload that is exec'd
    os.environ["MULTIKERNEL_BUS_FD"] = str(fds[0])
    _become(argv)


if __name__ == "__main__":
    main()
