"""The init of a multikernel instance's userspace: takes its launch over vsock, runs the agent.

Run as `python -I -S -m multikernel.services._mk_init <listen-path>|vsock` (stdlib only, so it
can live in an instance's initrd). It listens on `AGENT_PORT`, then takes connections from the
host: the first carries the launch as one JSON line (`argv`, `env`, `cwd`, and `fds`: for each fd
number the agent expects, `"rw"` (a stream relayed both ways: its bus socket), `"w"` (written by
the instance, read on the host: its output) or `"hold"` (an fd the agent holds and never uses)),
then one connection per `"rw"`/`"w"` fd, each opened by a JSON line `{"fd": N}`. Each stream is
put under its number, a `"hold"` fd is the read end of a pipe of its own, and the agent runs as
the init's child. When it ends, the init writes `exit <status>` on the launch connection and
exits (on a real instance, the instance would then halt itself; the fake kernel sees the process
end and returns the instance to `loaded`). SIGTERM is passed on to the agent.

Only a host on a reserved port (< 1024: root) is trusted over real AF_VSOCK; the Unix stand-in
has no ports, so its directory's mode is the trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys

AGENT_PORT = 1022  # _mk_vsock.AGENT_PORT (this module imports nothing of the package)


def _listen(where: str) -> socket.socket:
    if where == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, AGENT_PORT))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)
    sock.listen(8)
    return sock


def _accept(listener: socket.socket) -> tuple[socket.socket, dict[str, object]]:
    while True:
        conn, peer = listener.accept()
        if listener.family == socket.AF_VSOCK and peer[1] >= 1024:
            conn.close()  # not root on the host
            continue
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                raise EOFError("the host closed before saying what it wants")
            line += chunk
        return conn, json.loads(line)


def _fd(source: socket.socket | int) -> int:
    return source if isinstance(source, int) else source.fileno()


def main(where: str) -> int:
    listener = _listen(where)
    control, launch = _accept(listener)
    fds: dict[str, str] = launch["fds"]  # type: ignore[assignment]
    streams = [int(fd) for fd, mode in fds.items() if mode in ("rw", "w")]
    held: dict[int, socket.socket | int] = {}
    for _ in streams:
        conn, header = _accept(listener)
        held[int(header["fd"])] = conn  # type: ignore[call-overload]
    listener.close()
    for fd, mode in fds.items():
        if mode == "hold":
            r, w = os.pipe()
            held[int(fd)] = r
            os.close(w)
    pid = os.fork()
    if pid == 0:
        # Out of the way first (a source may sit on another's number), then into place; the
        # rest is close-on-exec.
        staged = {
            number: fcntl.fcntl(
                s if isinstance(s, int) else s.fileno(), fcntl.F_DUPFD_CLOEXEC, 1000
            )
            for number, s in held.items()
        }
        for number, source in staged.items():
            os.dup2(source, number)
        os.chdir(str(launch.get("cwd") or "/"))
        argv: list[str] = launch["argv"]  # type: ignore[assignment]
        os.execve(argv[0], argv, launch["env"])  # type: ignore[arg-type]
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    for held_fd in held.values():
        os.close(held_fd) if isinstance(held_fd, int) else held_fd.close()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):  # the host is gone: nobody to tell
        control.sendall(f"exit {code}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
