"""Channels: two rings (one per direction) in one region, with a doorbell per ring direction.

Region layout: a 256-byte channel header, then ring A (side 0 writes, side 1 reads), then ring B
(side 1 writes, side 0 reads). The header makes a region self-describing, so a peer that maps the
same file by path needs nothing else to attach:

    offset 0   u64 magic b"MKCHAN\\0\\0"     offset 16  u64 offset of ring A
    offset 8   u64 version (1)               offset 24  u64 offset of ring B

Setting up a channel between two processes: `create_channel` returns our end, open, and a
`ChannelHandle` holding the fds the other side needs (the region, its ends of the four doorbell
pipes, and its end of a socketpair that tells each side when the other process is gone). Hand it
over by inheritance (`handle.fds` in `pass_fds`, `handle.to_argument()` on the command line) or
over a Unix socket (`handle.send_over(sock)`), then `handle.close()` our copies. The other side
calls `Channel.attach(handle)`.

Nothing in a handle lets one side hurt the other: the region is a memfd sealed against resizing,
and each doorbell pipe's write end goes to the side that rings it and its read end to the side
that sleeps on it, so the two sides never share an open file description. `Channel.attach`
checks both and refuses anything else (`UnsafeHandleError`). The creator must keep no copies: a
broker (the hub) closes both handles once they are handed over.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import Doorbell, check_doorbell_fd, doorbell_fds
from multikernel.shm._errors import LayoutError
from multikernel.shm._reader import RingReader
from multikernel.shm._region import Region, check_sealed
from multikernel.shm._ring import Buffer, RingStatistics, format_ring
from multikernel.shm._wait import WaitPolicy
from multikernel.shm._writer import RingWriter

CHANNEL_MAGIC = int.from_bytes(b"MKCHAN\x00\x00", "little")
CHANNEL_VERSION = 1
CHANNEL_HEADER = 256
DEFAULT_CAPACITY = 1 << 20
#: Which side rings each doorbell (in handle order: ring A data, ring A space, ring B data, ring
#: B space): a ring's writer rings its data doorbell, its reader its space doorbell. The other
#: side sleeps on it and holds the read end.
RINGER = (0, 1, 1, 0)


def format_channel(region: Region, capacity: int) -> None:
    """Lay out an empty channel with two rings of `capacity` bytes each in `region`."""
    ring_a = CHANNEL_HEADER
    ring_b = ring_a + L.ring_size(capacity)
    if ring_b + L.ring_size(capacity) > region.size:
        raise LayoutError(f"a channel of capacity {capacity} needs {channel_size(capacity)} bytes")
    format_ring(region, ring_a, capacity)
    format_ring(region, ring_b, capacity)
    with memoryview(region.mmap) as whole, whole[:32].cast("Q") as q:
        q[1], q[2], q[3] = CHANNEL_VERSION, ring_a, ring_b
        q[0] = CHANNEL_MAGIC


def channel_size(capacity: int) -> int:
    """Bytes a region needs for a channel whose rings hold `capacity` bytes each."""
    return CHANNEL_HEADER + 2 * L.ring_size(capacity)


def _ring_offsets(region: Region) -> tuple[int, int]:
    if region.size < CHANNEL_HEADER:
        raise LayoutError(f"{region} is too small to hold a channel")
    with memoryview(region.mmap) as whole, whole[:32].cast("Q") as q:
        magic, version, ring_a, ring_b = q[0], q[1], q[2], q[3]
    if magic != CHANNEL_MAGIC:
        raise LayoutError(f"{region} holds no channel (magic {magic:#x})")
    if version != CHANNEL_VERSION:
        raise LayoutError(f"channel version {version}; this build speaks {CHANNEL_VERSION}")
    return ring_a, ring_b


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """The two directions of a channel, as seen from this end."""

    sent: RingStatistics
    received: RingStatistics


@dataclass(slots=True)
class ChannelHandle:
    """The fds one end of a channel needs, owned until handed over and closed (or attached).

    fds: region, then this side's ends of the doorbells of ring A (data, space) and ring B
    (data, space), then the liveness fd; a missing doorbell or liveness fd is -1. A doorbell's
    end is the write end if this side rings it (`RINGER`), else the read end.
    """

    FDS: ClassVar[int] = 6

    side: int
    fds: list[int]

    def to_argument(self) -> str:
        """A string for a child that inherits `self.fds` unchanged (e.g. via `pass_fds`)."""
        return json.dumps({"side": self.side, "fds": self.fds})

    @classmethod
    def from_argument(cls, text: str) -> Self:
        try:
            data = json.loads(text)
            side, fds = int(data["side"]), [int(fd) for fd in data["fds"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a channel handle argument: {text!r}") from exc
        if side not in (0, 1) or len(fds) != cls.FDS:
            raise ValueError(f"not a channel handle argument: {text!r}")
        return cls(side, fds)

    def send_over(self, sock: socket.socket) -> None:
        """Pass the handle to the process at the other end of a Unix socket (SCM_RIGHTS)."""
        present = [fd for fd in self.fds if fd >= 0]
        mask = [fd >= 0 for fd in self.fds]
        socket.send_fds(sock, [json.dumps({"side": self.side, "mask": mask}).encode()], present)

    @classmethod
    def receive_from(cls, sock: socket.socket) -> Self:
        """Receive a handle `send_over` sent, and `check` it; on any problem its fds are closed."""
        data, fds, flags, _addr = socket.recv_fds(sock, 4096, cls.FDS)
        handle = None
        try:
            meta = json.loads(data)
            mask = [bool(m) for m in meta["mask"]]
            if not flags & socket.MSG_CTRUNC and len(mask) == cls.FDS and sum(mask) == len(fds):
                received = iter(fds)
                handle = cls(int(meta["side"]), [next(received) if m else -1 for m in mask])
        except (ValueError, KeyError, TypeError):
            pass
        if handle is None:
            _close_all(fds)
            raise ValueError("the peer sent something that is not a channel handle")
        try:
            handle.check()
        except BaseException:
            handle.close()
            raise
        return handle

    def check(self) -> None:
        """Raise `UnsafeHandleError` if attaching this handle would let a peer hurt us.

        The region must be a memfd sealed against resizing, every doorbell fd the end of a pipe
        that this side should hold. `Channel.attach` checks the same; this closes nothing.
        """
        if self.side not in (0, 1) or len(self.fds) != self.FDS:
            raise ValueError(f"a channel handle has side 0 or 1 and {self.FDS} fds: {self}")
        check_sealed(self.fds[0])
        for slot, fd in enumerate(self.fds[1:5]):
            if fd >= 0:
                check_doorbell_fd(fd, sleeper=RINGER[slot] != self.side)

    def close(self) -> None:
        """Close our copies of the fds (after handing them over). Idempotent."""
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                os.close(fd)
                self.fds[i] = -1


class Channel(ObjectStream[bytes]):
    """One end of a bidirectional, message-oriented channel over shared memory.

    An anyio `ObjectStream[bytes]`: `send`, `receive`, `send_eof`, `aclose`, async iteration; plus
    batch (`send_many`, `receive_many`), non-blocking (`try_send`, `try_receive`) and blocking
    (`send_blocking`, `receive_blocking`) forms, and `statistics()`.
    """

    def __init__(
        self,
        region: Region,
        writer: RingWriter,
        reader: RingReader,
        owned: list[Doorbell],
        liveness: int | None,
    ) -> None:
        self.region = region
        self.writer = writer
        self.reader = reader
        self._owned = owned
        self._liveness = liveness
        self._closed = False

    @classmethod
    def _open(
        cls,
        region: Region,
        side: int,
        bells: list[Doorbell | None],
        liveness: int | None,
        policy: WaitPolicy | None,
    ) -> Self:
        try:
            ring_a, ring_b = _ring_offsets(region)
            a_data, a_space, b_data, b_space = bells
            if side == 0:
                writer = RingWriter(
                    region,
                    ring_a,
                    bell=a_space,
                    peer_bell=a_data,
                    liveness_fd=liveness,
                    policy=policy,
                )
                try:
                    reader = RingReader(
                        region,
                        ring_b,
                        bell=b_data,
                        peer_bell=b_space,
                        liveness_fd=liveness,
                        policy=policy,
                    )
                except BaseException:
                    writer.close()
                    raise
            else:
                writer = RingWriter(
                    region,
                    ring_b,
                    bell=b_space,
                    peer_bell=b_data,
                    liveness_fd=liveness,
                    policy=policy,
                )
                try:
                    reader = RingReader(
                        region,
                        ring_a,
                        bell=a_data,
                        peer_bell=a_space,
                        liveness_fd=liveness,
                        policy=policy,
                    )
                except BaseException:
                    writer.close()
                    raise
        except BaseException:
            for bell in bells:
                if bell is not None:
                    bell.close()
            if liveness is not None:
                os.close(liveness)
            region.close()
            raise
        return cls(region, writer, reader, [b for b in bells if b is not None], liveness)

    @classmethod
    def attach(cls, handle: ChannelHandle, policy: WaitPolicy | None = None) -> Self:
        """Open the end a `ChannelHandle` describes; the channel takes ownership of its fds.

        A handle whose region or doorbells could let the peer hurt us raises
        `UnsafeHandleError` (see `ChannelHandle.check`), with every fd closed.
        """
        fds = list(handle.fds)
        handle.fds[:] = [-1] * len(fds)
        side = handle.side
        if side not in (0, 1) or len(fds) != ChannelHandle.FDS:
            _close_all(fds)
            raise ValueError(f"not a channel handle: side {side}, fds {fds}")
        region_fd, fds[0] = fds[0], -1
        try:
            region = Region.from_fd(region_fd)  # checks the seals; closes the fd if refused
        except BaseException:
            _close_all(fds)
            raise
        bells: list[Doorbell | None] = []
        try:
            for slot in range(4):
                fd = fds[1 + slot]
                bells.append(Doorbell.adopt(fd, sleeper=RINGER[slot] != side) if fd >= 0 else None)
                fds[1 + slot] = -1
        except BaseException:
            for bell in bells:
                if bell is not None:
                    bell.close()
            _close_all(fds)
            region.close()
            raise
        return cls._open(region, side, bells, fds[5] if fds[5] >= 0 else None, policy)

    @classmethod
    def open_path(
        cls, path: str | os.PathLike[str], side: int, policy: WaitPolicy | None = None
    ) -> Self:
        """Open one end of a channel laid out in a file, with no doorbells (polling with back-off).

        For regions with no interrupt userspace can see: a DAX-backed file, a PCI BAR. The
        file must already hold a channel (`format_channel`), e.g. made with `Region.create(size,
        backing="shm")` and `format_channel` by the peer. Only for peers we trust: a file cannot
        be sealed, so whoever can write it can truncate it under us (SIGBUS); `Region.open`
        refuses a file that users other than us and root could write.
        """
        if side not in (0, 1):
            raise ValueError(f"a channel has sides 0 and 1, not {side}")
        return cls._open(Region.open(path), side, [None] * 4, None, policy)

    @classmethod
    def open_region(cls, region: Region, side: int, policy: WaitPolicy | None = None) -> Self:
        """Open one end of a channel laid out in `region`, with no doorbells (polling).

        For a region we made and share through something other than a channel handle (a
        memfd QEMU maps as an ivshmem device's memory). The channel maps it again through a
        duplicate of its fd, so `region` stays the caller's to close, before or after.
        """
        if side not in (0, 1):
            raise ValueError(f"a channel has sides 0 and 1, not {side}")
        fd = os.dup(region.fd)
        try:
            own = Region(fd, region.size)
        except BaseException:
            os.close(fd)
            raise
        return cls._open(own, side, [None] * 4, None, policy)

    # -- anyio ObjectStream -------------------------------------------------------------------

    async def send(self, item: Buffer) -> None:
        await self.writer.send(item)

    async def receive(self) -> bytes:
        return await self.reader.receive()

    async def send_eof(self) -> None:
        self.writer.close()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    # -- batch, non-blocking and blocking forms -----------------------------------------------

    async def send_many(self, items: list[Buffer]) -> None:
        await self.writer.send_many(items)

    async def receive_many(self, max_frames: int = 256) -> list[bytes]:
        return await self.reader.receive_many(max_frames)

    def try_send(self, item: Buffer) -> bool:
        return self.writer.try_send(item)

    def try_receive(self) -> bytes | None:
        return self.reader.try_receive()

    def send_blocking(self, item: Buffer, timeout: float | None = None) -> None:
        self.writer.send_blocking(item, timeout)

    def receive_blocking(self, timeout: float | None = None) -> bytes:
        return self.reader.receive_blocking(timeout)

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(self.writer.statistics(), self.reader.statistics())

    def close(self) -> None:
        """Close both directions (the peer sees end-of-stream), release everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
            self.reader.close()
        finally:
            for bell in self._owned:
                bell.close()
            if self._liveness is not None:
                os.close(self._liveness)
            self.region.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def extra_attributes(self) -> Any:
        return {}


def _close_all(fds: list[int]) -> None:
    for i, fd in enumerate(fds):
        if fd >= 0:
            os.close(fd)
            fds[i] = -1


def create_channel_handles(
    capacity: int = DEFAULT_CAPACITY, *, doorbells: bool = True
) -> tuple[ChannelHandle, ChannelHandle]:
    """Create a channel and return the handles of both ends, keeping nothing open ourselves.

    For a broker (the hub) that sets up a channel between two other processes: hand each
    handle to its process, then close both. The region is a sealed memfd. With doorbells, each
    doorbell pipe's write end goes to the side that rings it and its read end to the other,
    and each end's liveness fd is its end of a socketpair whose other end only the other
    process holds.
    """
    L.check_capacity(capacity)
    region = Region.create(channel_size(capacity))
    blank = [-1] * ChannelHandle.FDS
    handles = (ChannelHandle(0, list(blank)), ChannelHandle(1, list(blank)))
    try:
        format_channel(region, capacity)
        for handle in handles:
            handle.fds[0] = os.dup(region.fd)
        if doorbells:
            for slot, ringer in enumerate(RINGER):
                sleeper_end, ringer_end = doorbell_fds()
                handles[ringer].fds[1 + slot] = ringer_end
                handles[1 - ringer].fds[1 + slot] = sleeper_end
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            handles[0].fds[5], handles[1].fds[5] = pair[0].detach(), pair[1].detach()
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    finally:
        region.close()
    return handles


def create_channel(
    capacity: int = DEFAULT_CAPACITY,
    *,
    doorbells: bool = True,
    policy: WaitPolicy | None = None,
) -> tuple[Channel, ChannelHandle]:
    """Create a channel; returns our end (side 0, open) and the handle for the other end."""
    ours, theirs = create_channel_handles(capacity, doorbells=doorbells)
    try:
        return Channel.attach(ours, policy), theirs
    except BaseException:
        theirs.close()
        raise
