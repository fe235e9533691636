"""A hostile ivshmem client cannot hurt the server or the other peers: garbage, fds sent to the
server, hanging up mid-handshake, not reading, flooding it with connections."""

from __future__ import annotations

import array
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from multikernel.services._ivshmem import IvshmemServer
from multikernel.shm import Region
from tests.ivshmem_client import FakeClient

pytestmark = pytest.mark.anyio


@pytest.fixture
def sock_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mk-ivsh-"))
    yield directory / "s"
    os.rmdir(directory)


@pytest.fixture
def region() -> Iterator[Region]:
    with Region.create(1 << 20) as region:
        yield region


async def _handshake(path: Path) -> tuple[FakeClient, int]:
    client = FakeClient(path)
    try:
        return client, (await anyio.to_thread.run_sync(client.handshake, 1)).peer_id
    except BaseException:
        client.close()
        raise


async def test_garbage_ends_only_its_sender(sock_path: Path, region: Region) -> None:
    """A client that talks (with fds, even) is cut off; the others hear it left and go on."""
    async with IvshmemServer(sock_path, region.fd) as server:
        good, good_id = await _handshake(sock_path)
        bad, bad_id = await _handshake(sock_path)
        try:
            await anyio.to_thread.run_sync(good.message)  # the bad one joined
            junk = os.eventfd(0)
            try:
                bad.sock.sendmsg(
                    [b"\xff" * 4096],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [junk] * 8))],
                )
            finally:
                os.close(junk)
            await anyio.to_thread.run_sync(bad.until_closed)  # the server hangs up on it
            assert await anyio.to_thread.run_sync(good.message) == (bad_id, None)
            await server.wait_until_gone(bad_id)
            assert list(server.peers) == [good_id]
            late, _ = await _handshake(sock_path)
            late.close()
        finally:
            good.close()
            bad.close()


async def test_hanging_up_mid_handshake_leaves_nothing(sock_path: Path, region: Region) -> None:
    """Twenty clients that connect and go at once: no peer is left, no eventfd leaks (the
    suite's fd check), and the next client gets a whole handshake."""
    async with IvshmemServer(sock_path, region.fd) as server:
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(sock_path))
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # linger 0: a reset, not a clean close
        half = FakeClient(sock_path)
        await anyio.to_thread.run_sync(half.message)  # reads the version, then goes
        half.close()
        for peer_id in range(1, 22):
            await server.wait_until_gone(peer_id)
        assert not server.peers
        client, _ = await _handshake(sock_path)
        client.close()


async def test_a_client_that_never_reads_holds_nobody(sock_path: Path, region: Region) -> None:
    async with IvshmemServer(sock_path, region.fd):
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.connect(str(sock_path))
        try:
            clients = [await _handshake(sock_path) for _ in range(3)]
            for client, _ in clients:
                client.close()
        finally:
            mute.close()


async def test_connections_past_the_limit_are_refused(sock_path: Path, region: Region) -> None:
    async with IvshmemServer(sock_path, region.fd, max_peers=2) as server:
        first, _ = await _handshake(sock_path)
        second, second_id = await _handshake(sock_path)
        third = FakeClient(sock_path)
        try:
            with pytest.raises(EOFError):
                await anyio.to_thread.run_sync(third.message)
            second.close()
            await server.wait_until_gone(second_id)
            again, _ = await _handshake(sock_path)
            again.close()
        finally:
            first.close()
            second.close()
            third.close()


async def test_the_socket_is_ours_alone(sock_path: Path, region: Region) -> None:
    async with IvshmemServer(sock_path, region.fd):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
