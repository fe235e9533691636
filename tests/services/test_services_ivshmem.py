"""The ivshmem server speaks QEMU's protocol (docs/specs/ivshmem-spec.rst) to a fake client: the
handshake in order, peers announced to each other and their leaving, doorbells both ways, and
nothing left behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from multikernel.services._ivshmem import IvshmemServer
from multikernel.shm import Region
from tests.ivshmem_client import FakeClient, readable_count

pytestmark = pytest.mark.anyio
VECTORS = 2


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket paths fit AF_UNIX's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mk-ivsh-"))
    yield path
    os.rmdir(path)


@pytest.fixture
def region() -> Iterator[Region]:
    with Region.create(1 << 20) as region:
        yield region


async def test_handshake_then_doorbells_both_ways(short_dir: Path, region: Region) -> None:
    """Version 0, id 1, -1 with the memory, the host's eventfds, then its own; a write to the
    host's eventfd reaches the host, and `ring` reaches the client."""
    async with IvshmemServer(short_dir / "s", region.fd, vectors=VECTORS) as server:
        client = FakeClient(short_dir / "s")
        try:
            shake = await anyio.to_thread.run_sync(client.handshake, VECTORS)
            assert (shake.version, shake.peer_id) == (0, 1)
            assert os.fstat(shake.memory_fd).st_ino == os.fstat(region.fd).st_ino
            assert list(shake.peers) == [0]
            assert len(shake.own) == VECTORS
            assert (await server.wait_for_peer()).id == 1
            os.eventfd_write(shake.peers[0][1], 1)  # the guest rings the host on vector 1
            assert readable_count(server.host.vectors[1]) == 1
            assert readable_count(server.host.vectors[0]) == 0
            server.ring(1, 0)
            assert readable_count(shake.own[0]) == 1
            with pytest.raises(LookupError):
                server.ring(7, 0)
        finally:
            client.close()
    assert not (short_dir / "s").exists()


async def test_peers_are_announced_and_their_leaving_too(short_dir: Path, region: Region) -> None:
    async with IvshmemServer(short_dir / "s", region.fd, vectors=VECTORS) as server:
        first, second = FakeClient(short_dir / "s"), None
        try:
            one = await anyio.to_thread.run_sync(first.handshake, VECTORS)
            second = FakeClient(short_dir / "s")
            two = await anyio.to_thread.run_sync(second.handshake, VECTORS)
            assert two.peer_id == 2
            assert sorted(two.peers) == [0, 1]
            for _ in range(VECTORS):  # the first hears of the second, with its eventfds
                number, fd = await anyio.to_thread.run_sync(first.message)
                assert number == 2
                assert fd is not None
            os.eventfd_write(first.fds[-1], 1)  # the first rings the second on its last vector
            assert readable_count(two.own[-1]) == 1
            second.close()
            assert await anyio.to_thread.run_sync(first.message) == (2, None)
            await server.wait_until_gone(2)
            assert list(server.peers) == [one.peer_id]
        finally:
            first.close()
            if second is not None:
                second.close()


async def test_ids_are_reused_lowest_first(short_dir: Path, region: Region) -> None:
    async with IvshmemServer(short_dir / "s", region.fd) as server:
        clients = [FakeClient(short_dir / "s") for _ in range(3)]
        try:
            ids = []
            for client in clients:
                ids.append((await anyio.to_thread.run_sync(client.handshake, 1)).peer_id)
            assert ids == [1, 2, 3]
            clients[0].close()
            await server.wait_until_gone(1)
            again = FakeClient(short_dir / "s")
            clients.append(again)
            assert (await anyio.to_thread.run_sync(again.handshake, 1)).peer_id == 1
        finally:
            for client in clients:
                client.close()
