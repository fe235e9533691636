"""Fixtures for the bus tests: an embedded hub, and endpoint processes that talk JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.shm import Channel, Region, channel_size, format_channel
from tests._children import end
from tests.bus.region_peer import POLLING

PEER = Path(__file__).with_name("peer.py")
REGION_PEER = Path(__file__).with_name("region_peer.py")
#: A region's session channel carries the hub's largest frame (Limits.session_capacity).
REGION_CAPACITY = 1 << 20
#: How long a peer may stay silent before a test fails instead of hanging.
PATIENCE = 20.0


class Peer:
    """An endpoint process: its JSON-line events, read without blocking the event loop."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._buffer = b""

    async def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with anyio.fail_after(PATIENCE):  # fail fast instead of hanging the suite
            while b"\n" not in self._buffer:
                await anyio.wait_readable(fd)
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"peer {self.proc.args[2]} exited with {self.proc.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    async def expect(self, kind: str) -> dict[str, Any]:
        event = await self.event()
        assert event["event"] == kind, event
        return event

    async def stop(self) -> int:
        """Close its stdin (the peer then exits cleanly) and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.exited()
        return self.proc.returncode

    async def exited(self) -> int:
        """Wait for the process to end (a pidfd: no polling)."""
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            with anyio.fail_after(PATIENCE):
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self.proc.wait()


@contextmanager
def spawn(
    role: str,
    socket: str | os.PathLike[str],
    *args: str,
    fd: int | None = None,
    script: Path = PEER,
) -> Iterator[Peer]:
    """A peer process (`script ROLE SOCKET ARGS...`), killed if still running at the end."""
    env = dict(os.environ)
    pass_fds: tuple[int, ...] = ()
    if fd is not None:
        env["MULTIKERNEL_BUS_FD"] = str(fd)
        pass_fds = (fd,)
    proc = subprocess.Popen(
        [sys.executable, str(script), role, str(socket), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=pass_fds, bufsize=0,
    )  # fmt: skip
    try:
        yield Peer(proc)
    finally:
        end(proc)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


@contextmanager
def region_peer(role: str) -> Iterator[tuple[Channel, Peer]]:
    """The hub's end of a fresh region's channel (a memfd standing in for a guest's ivshmem
    memory) and the process on the other end (tests/bus/region_peer.py ROLE)."""
    with Region.create(channel_size(REGION_CAPACITY)) as region:
        format_channel(region, REGION_CAPACITY)
        ours = Channel.open_region(region, 0, POLLING)
        proc = subprocess.Popen(
            [sys.executable, str(REGION_PEER), str(region.fd), str(region.size), role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(region.fd,),
            bufsize=0,
        )
        try:
            yield ours, Peer(proc)
        finally:
            ours.close()
            end(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()


@asynccontextmanager
async def hub_serving(
    tmp_path: Path, policy: Policy | None = None
) -> AsyncIterator[tuple[Hub, anyio.abc.TaskGroup]]:
    hub = Hub(tmp_path / "bus.sock", policy=policy)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub, tg
        tg.cancel_scope.cancel()


def tell(peer: Peer, line: str) -> None:
    assert peer.proc.stdin is not None
    peer.proc.stdin.write(line.encode() + b"\n")


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.sock"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """Cross-process bus tests run under uvloop; the client API's trio support is tested apart."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
async def hub(socket_path: Path) -> AsyncIterator[Hub]:
    """A hub serving on a temporary socket, in this test's event loop."""
    hub = Hub(socket_path, policy=Policy.default())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()
