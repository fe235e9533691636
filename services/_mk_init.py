"""The init of a multikernel instance's userspace: takes its launch over vsock, runs the agent.

Run as `python -m multikernel.services._mk_init <listen-path>|vsock` (on a real instance, from
its initrd, where the package is too). It listens on `AGENT_PORT` and takes connections from the
host: the first carries the launch as one JSON line (`argv`, `env`, `cwd`, and `fds`: for each fd
number the agent expects, how it crosses: `session` (its hub session, carried by
`_mk_session.instance_bridge`), `rw` (a stream both ways), `w` (written here, read on the host:
its output) or `hold` (an fd the agent holds and never uses: a pipe of its own here)), then one
connection per `session`/`rw`/`w` fd, each opened by a JSON line `{"fd": N}`. The agent runs as
the init's child with each fd under its number (its output through a pipe of the init's, so a
workload that prints does not fail once the host is gone). When it ends, the init writes
`exit <status>` on the host's control connection and exits (a real instance would then halt; the
fake kernel sees the process end and returns the instance to `loaded`). SIGTERM is passed on to
the agent.

Re-attach: the agent's $MULTIKERNEL_BUS is a Unix socket of the init's (`REATTACH_PATH`, or
`<listen-path>.bus` beside the stand-in), not the host's path, which is on another kernel. When
the host's end of a session dies (the host process was killed), the agent and its workload
re-attach there; for each, the init writes `session` on the control connection and bridges the
next stream the host opens with `{"resume": true}` (`instance_bridge`, the hub's hand-over played
again). A restarted host that adopts the instance opens a new control connection with
`{"reattach": true}`; the init then asks it for a stream for each process still waiting.

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
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from multikernel.services import _mk_channels
from multikernel.services._mk_session import attach_for_agent, instance_bridge
from multikernel.services._mk_vsock import AGENT_PORT

#: Where the agent re-attaches inside a real instance (its $MULTIKERNEL_BUS there).
REATTACH_PATH = "/run/multikernel/bus.sock"
#: Where memory shared with the host is mounted in a real instance (its DAXFS); beside the
#: stand-in's sockets in tests. Direct channels' regions are named there (`_mk_channels`).
SHARED_MOUNT = "/run/multikernel/shared"


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


class _Host:
    """The host as the init knows it: its control connection (the launch's, or the newest
    host's after a restart) and the agent-side processes waiting for a session stream."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.waiting: list[socket.socket] = []

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # no host now: the next one is told again
            self.control.setblocking(True)
            self.control.sendall(line.encode() + b"\n")

    def ask_sessions(self) -> None:
        for _ in self.waiting:
            self.tell("session")


class _Output:
    """Where the agent's output goes: the host's stream (the launch's, or the one a restarted
    host opens with `{"output": true}`), else the init's stderr, the instance's console."""

    def __init__(self, stream: socket.socket) -> None:
        self.stream: socket.socket | None = stream

    def to(self, stream: socket.socket) -> None:
        old, self.stream = self.stream, stream
        if old is not None:
            anyio.notify_closing(old)  # the pump may wait on it
            old.close()

    async def pump(self, read: int) -> None:
        """Copy the pipe `read` until it ends; a workload that prints never fails on a broken
        stream, and what it says is not lost."""
        os.set_blocking(read, False)
        while True:
            await anyio.wait_readable(read)
            try:
                data = os.read(read, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            view = memoryview(data)
            while view and self.stream is not None:
                stream = self.stream
                stream.setblocking(False)
                try:
                    await anyio.wait_writable(stream)
                    view = view[stream.send(view) :]
                except BlockingIOError:
                    continue
                except (OSError, anyio.ClosedResourceError):
                    if self.stream is stream:
                        self.stream = None
            if view:
                with contextlib.suppress(OSError):
                    os.write(2, view)


async def _run(listener: socket.socket, bus_path: str, shared: Path) -> None:
    control, launch = _accept(listener)
    host = _Host(control)
    modes: dict[str, str] = launch["fds"]
    env: dict[str, str] = launch["env"]
    held: dict[int, int] = {}  # number in the agent -> our fd
    keep: list[socket.socket] = []
    bridges: list[tuple[socket.socket, socket.socket]] = []
    outputs: list[tuple[int, _Output]] = []
    for _ in [m for m in modes.values() if m != "hold"]:
        conn, header = _accept(listener)
        number = int(header["fd"])
        if modes[str(number)] == "session":
            ours, agents = socket.socketpair()
            bridges.append((ours, conn))
            held[number] = agents.fileno()
            keep.append(agents)
        elif modes[str(number)] == "w":
            r, w = os.pipe()
            held[number] = w
            outputs.append((r, _Output(conn)))
        else:
            held[number] = conn.fileno()
            keep.append(conn)
    for fd_number, mode in modes.items():
        if mode == "hold":
            r, w = os.pipe()
            held[int(fd_number)] = r
            os.close(w)
    bus = None
    if env.get("MULTIKERNEL_BUS"):  # the agent re-attaches here, not at the host's path
        bus = _listen(bus_path)
        env["MULTIKERNEL_BUS"] = bus_path
    pid = _spawn(launch, held)
    for fd in held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    for sock in keep:
        sock.detach()  # closed just above, by number
    pidfd = os.pidfd_open(pid)
    # The init's end of each process's session, by the host's key for it: where the hub's
    # attach sockets and direct channels for that process are handed.
    sockets: dict[str, socket.socket] = {"0": bridges[0][0]} if bridges else {}
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def forward_signals() -> None:
                async for signum in signals:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signum)

            async def from_host() -> None:
                # Streams the host opens later: an attach socket the hub hands the agent for a
                # process it starts; a restarted host (`reattach`: its control connection); a
                # session stream for a process waiting to re-attach (`resume`).
                listener.setblocking(False)
                while True:
                    await anyio.wait_readable(listener)
                    with contextlib.suppress(BlockingIOError):
                        conn, header = _accept(listener)
                        if header.get("reattach"):
                            host.control.close()
                            host.control = conn
                            host.ask_sessions()
                        elif header.get("output") and outputs:
                            outputs[0][1].to(conn)  # a restarted host collects it again
                        elif header.get("resume") and host.waiting:
                            waiting = sockets[str(header["key"])] = host.waiting.pop(0)
                            tg.start_soon(instance_bridge, waiting, conn)
                        elif "attach" in header and str(header.get("via")) in sockets:
                            frame = bytes.fromhex(header["attach"])
                            key = str(header["key"])
                            keep = partial(sockets.__setitem__, key)
                            via = sockets[str(header["via"])]
                            tg.start_soon(attach_for_agent, via, frame, conn, keep)
                        elif "channel" in header and str(header.get("key")) in sockets:
                            frame = bytes.fromhex(header["channel"])
                            path = shared / os.path.basename(str(header["path"]))
                            process = sockets[str(header["key"])]
                            tg.start_soon(_mk_channels.receive, process, frame, path, conn)
                        else:
                            conn.close()

            async def reattaches(bus: socket.socket) -> None:
                # The agent and its workload, their session gone with the host, attach here;
                # each waits for a stream the host opens when told (`session`).
                bus.setblocking(False)
                while True:
                    await anyio.wait_readable(bus)
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = bus.accept()
                        host.waiting.append(conn)
                        host.tell("session")

            tg.start_soon(forward_signals)
            tg.start_soon(from_host)
            if bus is not None:
                tg.start_soon(reattaches, bus)
            for ours, stream in bridges:
                tg.start_soon(instance_bridge, ours, stream)
            for read, output in outputs:
                tg.start_soon(output.pump, read)
            await anyio.wait_readable(pidfd)
            tg.cancel_scope.cancel()
    # It has ended (the pidfd said so): reaping it does not block.
    _, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222
    os.close(pidfd)
    host.tell(f"exit {os.waitstatus_to_exitcode(status)}")


def main(where: str) -> int:
    bus_path = REATTACH_PATH if where == "vsock" else f"{where}.bus"
    shared = Path(SHARED_MOUNT if where == "vsock" else os.path.dirname(where))
    anyio.run(_run, _listen(where), bus_path, shared)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
