"""The init of a multikernel instance's userspace: takes its launch over vsock, runs the agent.

Run as `python -m multikernel.services._mk_init <listen-path>|vsock` (on a real instance, from
its initrd, where the package is too). It listens on `AGENT_PORT` and takes connections from the
host: the first carries the launch as one JSON line (`argv`, `env`, `cwd`, and `fds`: for each fd
number the agent expects, how it crosses: `session` (its hub session, carried by
`_mk_session.instance_bridge`), `rw` (a stream both ways), `w` (written here, read on the host:
its output) or `hold` (an fd the agent holds and never uses: a pipe of its own here)), then one
connection per `session`/`rw`/`w` fd, each opened by a JSON line `{"fd": N}`. The agent runs as
the init's child with each fd under its number. When it ends, the init writes `exit <status>` on
the launch connection and exits (a real instance would then halt; the fake kernel sees the
process end and returns the instance to `loaded`). SIGTERM is passed on to the agent.

Over real AF_VSOCK only a host bound to a reserved port (< 1024: root) is served; the Unix
stand-in has no ports, and its directory's mode is the trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
from typing import Any

import anyio

from multikernel.services._mk_session import attach_for_agent, instance_bridge
from multikernel.services._mk_vsock import AGENT_PORT


def _listen(where: str) -> socket.socket:
    if where == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, AGENT_PORT))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)
    sock.listen(8)
    return sock


def _accept(listener: socket.socket) -> tuple[socket.socket, dict[str, Any]]:
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


def _spawn(launch: dict[str, Any], fds: dict[int, int]) -> int:
    """Fork and exec the agent with `fds` under their numbers; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            # Out of the way first (a source may sit on another's number), then into place;
            # everything else is close-on-exec.
            staged = {n: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for n, fd in fds.items()}
            for number, fd in staged.items():
                os.dup2(fd, number)
            os.chdir(launch.get("cwd") or "/")
            os.execve(launch["argv"][0], launch["argv"], launch["env"])
        finally:
            os._exit(127)
    return pid


async def _run(listener: socket.socket) -> None:
    control, launch = _accept(listener)
    modes: dict[str, str] = launch["fds"]
    held: dict[int, int] = {}  # number in the agent -> our fd
    keep: list[socket.socket] = []
    bridges: list[tuple[socket.socket, socket.socket]] = []
    for _ in [m for m in modes.values() if m != "hold"]:
        conn, header = _accept(listener)
        number = int(header["fd"])
        if modes[str(number)] == "session":
            ours, agents = socket.socketpair()
            bridges.append((ours, conn))
            held[number] = agents.fileno()
            keep.append(agents)
        else:
            held[number] = conn.fileno()
            keep.append(conn)
    for fd_number, mode in modes.items():
        if mode == "hold":
            r, w = os.pipe()
            held[int(fd_number)] = r
            os.close(w)
    pid = _spawn(launch, held)
    for fd in held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    for sock in keep:
        sock.detach()  # closed just above, by number
    pidfd = os.pidfd_open(pid)
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def forward_signals() -> None:
                async for signum in signals:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signum)

            async def attaches(agent_bus: socket.socket) -> None:
                # Sockets the hub hands the agent for processes it starts, one stream each.
                listener.setblocking(False)
                while True:
                    await anyio.wait_readable(listener)
                    with contextlib.suppress(BlockingIOError):
                        conn, header = _accept(listener)
                        frame = bytes.fromhex(header["attach"])
                        tg.start_soon(attach_for_agent, agent_bus, frame, conn)

            tg.start_soon(forward_signals)
            for ours, stream in bridges:
                tg.start_soon(instance_bridge, ours, stream)
                tg.start_soon(attaches, ours)
            await anyio.wait_readable(pidfd)
            tg.cancel_scope.cancel()
    # It has ended (the pidfd said so): reaping it does not block.
    _, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222
    os.close(pidfd)
    with contextlib.suppress(OSError):  # the host is gone: nobody to tell
        control.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())


def main(where: str) -> int:
    anyio.run(_run, _listen(where))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
