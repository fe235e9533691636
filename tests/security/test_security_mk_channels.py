"""What a hostile instance can do to the host through a direct channel's shared region.

A direct channel crosses kernels as a region both map (`services/_mk_channels.py`): the host lays
it out, names it in the shared directory, and the instance opens it by that name. The instance
can write anything into it. Here it is the attacker, in this process: it opens the region as the
init would, then tries to resize it (which would kill the host with SIGBUS) and writes a counter
no honest peer writes. The host keeps its mapping whole (the region is a sealed memfd, mode
0600), ends that one channel (its reader checks every counter), closes the hub's end (the
process at the other end sees its channel end) and removes the region's name.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import stat
import struct
from pathlib import Path

import anyio
import pytest

from multikernel.protocol import ChannelReady, Kind, encode
from multikernel.services import _mk_channels
from multikernel.shm import Channel, Region, create_channel_handles

pytestmark = pytest.mark.anyio

_SLOT_TAIL = 16


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _line(sock: socket.socket) -> dict[str, str]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "the host closed before announcing the region"
        data += chunk
    found: dict[str, str] = json.loads(data)
    return found


async def _end_of(channel: Channel) -> BaseException:
    """What ends `channel` for its reader."""
    try:
        while True:
            await channel.receive()
    except Exception as error:  # the test checks which
        return error


async def test_a_hostile_instance_cannot_resize_the_region_and_garbage_ends_only_its_channel(
    tmp_path: Path,
) -> None:
    # The hub's channel between a caller on the host (`caller`) and a server in the instance.
    handles = create_channel_handles()
    frame = encode(Kind.CONTROL, ChannelReady(token=7, role="server", target="svc", peer_id=1))
    host_side, init_side = socket.socketpair()
    with init_side, Channel.attach(handles[0]) as caller:
        async with anyio.create_task_group() as tg:
            server_fds = list(handles[1].fds)
            handles[1].fds[:] = [-1] * len(server_fds)
            tg.start_soon(
                lambda: _mk_channels.share(
                    frame, server_fds, shared=tmp_path, stream=host_side, key="0"
                )
            )
            announced = await anyio.to_thread.run_sync(_line, init_side)
            assert announced["channel"] == frame.hex()
            assert announced["key"] == "0"
            name = announced["path"]
            assert "/" not in name
            path = tmp_path / name

            # The instance opens it as the init does; it is ours, 0600, and cannot be resized.
            region = Region.open(path)
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, region.size * 2)

            # Honest traffic first: the caller's frame reaches the instance's ring.
            far = Channel.open_path(path, 1)
            await caller.send(b"hello")
            with anyio.fail_after(10):
                assert await far.receive() == b"hello"
            far.close()

            # Garbage: ring B's tail (written by the instance) far past anything it could hold.
            (ring_b,) = struct.unpack_from("<Q", region.mmap, 24)
            tail = ctypes.c_uint64.from_buffer(region.mmap, ring_b + 8 * _SLOT_TAIL)
            tail.value = 1 << 62
            del tail
            region.close()

            # The host ends that channel alone: the caller sees it end.
            with anyio.fail_after(10):
                assert isinstance(
                    await _end_of(caller), (anyio.EndOfStream, anyio.BrokenResourceError)
                )
        # The host's task ended by itself (the group did not wait forever): the name is gone.
        assert not path.is_symlink()
        assert init_side.recv(1) == b""  # the host closed the announcing stream too
