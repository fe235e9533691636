"""A peer cannot resize a channel's region under us, and a region it could resize is refused."""

from __future__ import annotations

import fcntl
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.shm import (
    Channel,
    ChannelHandle,
    LayoutError,
    Region,
    UnsafeHandleError,
    channel_size,
    create_channel_handles,
    format_channel,
)

from ._util import hostile

CAPACITY = 1 << 12


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def ours_and_theirs(hostile_side: int) -> Iterator[tuple[Channel, ChannelHandle]]:
    handles = create_channel_handles(CAPACITY)
    theirs = handles[hostile_side]
    try:
        with Channel.attach(handles[1 - hostile_side]) as ours:
            yield ours, theirs
    finally:
        theirs.close()


@pytest.mark.anyio
@pytest.mark.parametrize("hostile_side", [0, 1], ids=["hostile-side-0", "hostile-side-1"])
async def test_a_peer_cannot_shrink_grow_or_unseal_the_region(hostile_side: int) -> None:
    """The attack that used to kill the hub with SIGBUS: every attempt is refused by the kernel."""
    with ours_and_theirs(hostile_side) as (ours, theirs):
        argument, fds = theirs.to_argument(), [fd for fd in theirs.fds if fd >= 0]
        with hostile("resize", argument, fds) as peer:
            theirs.close()
            outcome = await peer.report()
            assert outcome == {
                "shrink": "EPERM",
                "grow": "EPERM",
                "fallocate past the end": "EPERM",
                "shrink a reopened fd": "EPERM",
                "seal writes": "EPERM",
                "seal future writes": "EPERM",
                "size after": str(channel_size(CAPACITY)),
            }
            # Round trips that wrap the ring many times: every page of both rings is touched.
            with anyio.fail_after(20):
                for i in range(500):
                    frame = i.to_bytes(4, "little") * 64
                    await ours.send(frame)
                    assert await ours.receive() == frame
            await ours.send_eof()
            await peer.exit()


def _unsealed_channel_fd(seals: int | None) -> int:
    """A memfd holding a valid channel, with `seals` added (None: sealing not even allowed)."""
    size = channel_size(CAPACITY)
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seals is not None else 0)
    fd = os.memfd_create("not-a-safe-region", flags)
    os.ftruncate(fd, size)
    with Region(os.dup(fd), size) as region:
        format_channel(region, CAPACITY)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _handle_with_region(fd: int) -> ChannelHandle:
    handle, other = create_channel_handles(CAPACITY)
    other.close()
    os.close(handle.fds[0])
    handle.fds[0] = fd
    return handle


@pytest.mark.parametrize(
    ("seals", "missing"),
    [
        (None, "F_SEAL_SHRINK | F_SEAL_GROW"),  # reports F_SEAL_SEAL: sealing was never allowed
        (0, "F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL"),
        (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, "F_SEAL_SEAL"),
        (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL, "F_SEAL_GROW"),
    ],
    ids=["sealing-not-allowed", "no-seals", "seals-can-change", "can-grow"],
)
def test_a_handle_whose_region_lacks_a_seal_is_refused_and_closed(
    seals: int | None, missing: str
) -> None:
    handle = _handle_with_region(_unsealed_channel_fd(seals))
    with pytest.raises(UnsafeHandleError) as caught:
        Channel.attach(handle)
    assert f"lacks {missing} " in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert handle.fds == [-1] * ChannelHandle.FDS  # nothing leaks (the suite's guard checks)


def test_a_named_region_cannot_be_attached_from_a_handle() -> None:
    """A /dev/shm file cannot be sealed: handed over as an fd, it is refused."""
    with Region.create(channel_size(CAPACITY), backing="shm") as region:
        format_channel(region, CAPACITY)
        handle = _handle_with_region(os.dup(region.fd))
        with pytest.raises(
            UnsafeHandleError, match=re.escape("lacks F_SEAL_SHRINK | F_SEAL_GROW ")
        ):
            Channel.attach(handle)


def test_a_region_fd_that_is_not_a_memfd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(bytes(channel_size(CAPACITY)))
    handle = _handle_with_region(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    with pytest.raises(UnsafeHandleError, match="is not a memfd"):
        Channel.attach(handle)


def test_a_region_sealed_against_writing_is_refused() -> None:
    handle = _handle_with_region(
        _unsealed_channel_fd(
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        )
    )
    with pytest.raises(UnsafeHandleError, match="sealed against writing"):
        Channel.attach(handle)


def test_mapping_past_the_end_of_a_sealed_region_is_refused() -> None:
    with (
        Region.create(4096) as region,
        pytest.raises(UnsafeHandleError, match="asked to map 8192 bytes"),
    ):
        Region.from_fd(os.dup(region.fd), 8192)


def test_a_handle_received_over_a_socket_is_checked_before_use() -> None:
    handle = _handle_with_region(_unsealed_channel_fd(None))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        handle.send_over(left)
        handle.close()
        with pytest.raises(UnsafeHandleError, match="lacks F_SEAL_SHRINK"):
            ChannelHandle.receive_from(right)


def test_a_file_other_users_could_truncate_is_refused_by_path(tmp_path: Path) -> None:
    path = tmp_path / "shared-region"
    path.write_bytes(bytes(channel_size(CAPACITY)))
    with Region.open(path) as region:
        format_channel(region, CAPACITY)
    path.chmod(0o666)
    with pytest.raises(UnsafeHandleError, match=r"mode 0o666\) could be truncated by other"):
        Channel.open_path(path, 0)
    path.chmod(0o600)
    Channel.open_path(path, 0).close()


def test_a_region_too_small_for_its_layout_is_still_a_layout_error() -> None:
    with Region.create(4096) as region, pytest.raises(LayoutError, match="holds no channel"):
        Channel.attach(_handle_with_region(os.dup(region.fd)))
