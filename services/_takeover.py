"""The standby agent's side of a takeover (the lifecycle's side is `_standby`).

An agent started with $MULTIKERNEL_STANDBY_FD is a standby: attached to the bus but silent, it
starts its workload's interpreter through the gate (`_gate`) when the workload is a Python
command line, says `ready` on its control socket, and waits there for `go`. Then it carries on as
any agent does; its workload is the gate, which gets its bus attachment and runs the image's
entry. EOF on the control socket instead of `go` (the lifecycle discarded the standby, or the
host died) ends the standby, gate included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping

import anyio
import anyio.abc

from multikernel.services._gate import ENV_GATE, gated

ENV_STANDBY = "MULTIKERNEL_STANDBY_FD"


class Gate:
    """A workload interpreter started ahead, waiting for its bus socket."""

    def __init__(self, process: anyio.abc.Process, control: socket.socket) -> None:
        self.process = process
        self.control = control

    @classmethod
    async def start(
        cls, argv: list[str], cwd: str, env: Mapping[str, str], output: int | None = None
    ) -> Gate:
        """Start the interpreter, its stdout and stderr on `output` (the instance's output pipe,
        which the caller still owns), and wait until it is ready."""
        ours, theirs = socket.socketpair()
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", "multikernel.services._gate", "--", *argv],
                cwd=cwd or None, env={**env, ENV_GATE: str(theirs.fileno())},
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=output,
                stderr=output,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        gate = cls(process, ours)
        try:
            await _read_line(ours, b"ready")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await gate.discard()
            raise
        return gate

    async def open(self, bus: socket.socket) -> anyio.abc.Process:
        """Hand the gate its bus socket: it runs the workload from here on."""
        await _send_all(self.control, b"go\n", [bus.fileno()])
        self.control.close()
        return self.process

    async def discard(self) -> None:
        self.control.close()
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


class Takeover:
    """The control socket a standby agent inherited."""

    def __init__(self, fd: int) -> None:
        self.control = socket.socket(fileno=fd)
        self.control.setblocking(False)

    @classmethod
    def from_env(cls) -> Takeover | None:
        fd = os.environ.pop(ENV_STANDBY, None)
        return cls(int(fd)) if fd else None

    async def warm(self, argv: list[str], cwd: str, output: int | None = None) -> Gate | None:
        """Start the workload's interpreter if the gate can run it (writing to `output`, the
        instance's output pipe); say ready either way."""
        gate = None
        if gated(argv):
            env = dict(os.environ)
            env.pop("MULTIKERNEL_WORKLOAD", None)
            env.update(json.loads(os.environ.get("MULTIKERNEL_WORKLOAD_ENV", "{}")))
            env.setdefault("PYTHONUNBUFFERED", "1")  # its output in the order it was written
            gate = await Gate.start(argv, cwd, env, output)
        await _send_all(self.control, b"ready\n", [])
        return gate

    async def wait_go(self) -> bool:
        """True once the lifecycle says go; False if it closed the socket instead."""
        try:
            await _read_line(self.control, b"go")
        except (anyio.EndOfStream, OSError):
            return False
        finally:
            self.control.close()
        return True


async def _read_line(sock: socket.socket, expected: bytes) -> None:
    buffer = b""
    while b"\n" not in buffer:
        await anyio.wait_readable(sock)
        try:
            chunk = sock.recv(64)
        except BlockingIOError:
            continue
        if not chunk:
            raise anyio.EndOfStream
        buffer += chunk
    if not buffer.startswith(expected):
        raise OSError(f"expected {expected!r} on the control socket, got {buffer[:40]!r}")


async def _send_all(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    while True:
        try:
            sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        if sent != len(data):
            raise OSError("the control socket took part of a message")
        return
