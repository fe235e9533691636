"""The transports `bench_transport.py` compares, each with a driver side and a peer side.

Every transport offers the same small surface to the measuring loops in `_transport_loops.py`:
`send(bytes)`, `recv() -> bytes` and, where the transport has a natural batch form,
`send_batch(list[bytes])` and `recv_batch() -> list[bytes]`; async ones have the same methods as
coroutines. Setting up is split in two: `Kind.create()` makes the resources in the driver process
and says which fds the peer inherits and what string it gets on its command line;
`Kind.attach(argument)` opens the other end in the peer.

Only the standard library is imported at module level: a peer imports the one library its
transport needs, so starting a peer costs little.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec

ENDPOINT_BATCH = 256  # most frames one batched receive returns

_LEN = struct.Struct("<I")
_pack_len = _LEN.pack
_unpack_len = _LEN.unpack_from


class Sample(msgspec.Struct, frozen=True, array_like=True):
    """The typed message of variant (b): ~64 bytes encoded at the 64-byte size."""

    id: int
    ts: float
    payload: bytes


SAMPLE_ID0 = 1 << 20  # ids stay 5-byte msgpack ints, so every message encodes to the same size


def sample_body(size: int) -> bytes:
    """A payload that makes `Sample(SAMPLE_ID0 + i, ts, payload)` encode to exactly `size` bytes."""
    encode = msgspec.msgpack.Encoder().encode
    for n in range(size, -1, -1):
        if len(encode(Sample(SAMPLE_ID0, 0.5, b"x" * n))) <= size:
            return b"x" * n
    raise ValueError(f"no Sample encodes to {size} bytes")


# -- helpers ---------------------------------------------------------------------------------


class FrameParser:
    """Length-prefixed frames (u32 little-endian length, then payload) out of a byte stream."""

    __slots__ = ("_buf", "frames")

    def __init__(self) -> None:
        self._buf = b""
        self.frames: deque[bytes] = deque()

    def feed(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        append = self.frames.append
        while pos + 4 <= n:
            end = pos + 4 + _unpack_len(buf, pos)[0]
            if end > n:
                break
            append(buf[pos + 4 : end])
            pos = end
        self._buf = buf[pos:]


def frame(data: bytes) -> bytes:
    return _pack_len(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- transports ------------------------------------------------------------------------------


class RingSync:
    """(a)/(b): our channel, synchronous API (spin, then sleep on the doorbell)."""

    def __init__(self, ch: Any) -> None:
        self.ch = ch
        self.send = ch.writer.send_blocking  # waits are bounded by the phase alarm
        self.recv = ch.reader.receive_blocking
        self._try_send_many = ch.writer.try_send_many
        self._try_receive_many = ch.reader.try_receive_many

    def send_batch(self, frames: list[bytes]) -> None:
        done = self._try_send_many(frames)
        while done < len(frames):
            self.send(frames[done])  # waits for room
            done += 1
            done += self._try_send_many(frames, done)

    def recv_batch(self) -> list[bytes]:
        frames: list[bytes] = self._try_receive_many(ENDPOINT_BATCH)
        if frames:
            return frames
        first = self.recv()
        return [first, *self._try_receive_many(ENDPOINT_BATCH - 1)]

    def stats(self) -> dict[str, int]:
        return ring_stats(self.ch)

    def close(self) -> None:
        self.ch.close()


class RingAsync:
    """(c): our channel, anyio API (run under uvloop)."""

    def __init__(self, ch: Any) -> None:
        self.ch = ch
        self.send = ch.send
        self.recv = ch.receive
        self.send_batch = ch.send_many

    async def recv_batch(self) -> list[bytes]:
        frames: list[bytes] = await self.ch.receive_many(ENDPOINT_BATCH)
        return frames

    def stats(self) -> dict[str, int]:
        return ring_stats(self.ch)

    def close(self) -> None:
        self.ch.close()


def ring_stats(ch: Any) -> dict[str, int]:
    s = ch.statistics()
    return {
        "sent_frames": s.sent.frames,
        "wakeups_sent": s.sent.wakeups_sent + s.received.wakeups_sent,
        "recv_waits": s.received.waits,
        "recv_spins": s.received.spins,
        "full_events": s.sent.full_events,
        "send_waits": s.sent.waits,
    }


class EventfdPair:
    """The doorbell reference: two blocking eventfds, no payload (counter values stand for it)."""

    _CODES: ClassVar[dict[bytes, int]] = {b"M": 2, b"E": 3, b"A": 4}
    _NAMES: ClassVar[dict[int, bytes]] = {v: k for k, v in _CODES.items()}

    def __init__(self, out_fd: int, in_fd: int, size: int = 64) -> None:
        self._out, self._in = out_fd, in_fd
        self._data = b"x" * size

    def send(self, data: bytes) -> None:
        os.eventfd_write(self._out, self._CODES.get(data, 1) if len(data) == 1 else 1)

    def recv(self) -> bytes:
        value = os.eventfd_read(self._in)
        return self._NAMES.get(value, self._data)

    def close(self) -> None:
        fds, self._out, self._in = (self._out, self._in), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class EventfdAsync(EventfdPair):
    """The reference for (c)'s doorbell path: the same eventfd ping-pong, awaited under uvloop.

    Each side's eventfd is watched by the loop (`add_reader` once; a future per wait): the
    mechanism our async ring side sleeps on, with nothing of ours around it.
    """

    def __init__(self, out_fd: int, in_fd: int, size: int = 64) -> None:
        super().__init__(out_fd, in_fd, size)
        os.set_blocking(in_fd, False)  # our own eventfd: nobody else reads it
        self._loop: Any = None
        self._waiter: Any = None
        self._values: deque[int] = deque()

    def _readable(self) -> None:
        try:
            self._values.append(os.eventfd_read(self._in))
        except BlockingIOError:
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, data: bytes) -> None:  # type: ignore[override]
        super().send(data)

    async def recv(self) -> bytes:  # type: ignore[override]
        import asyncio

        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._in, self._readable)
        while not self._values:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._NAMES.get(self._values.popleft(), self._data)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._in)
        super().close()


class MpPipe:
    """multiprocessing.Pipe(): a Connection over a socketpair (send_bytes / recv_bytes)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.send = conn.send_bytes
        self.recv = conn.recv_bytes

    def close(self) -> None:
        self.conn.close()


class MpQueue:
    """multiprocessing.Queue, one per direction (spawn context)."""

    def __init__(self, out_q: Any, in_q: Any) -> None:
        self._out, self._in = out_q, in_q
        self.send = out_q.put
        self.recv = in_q.get

    def close(self) -> None:
        for q in (self._out, self._in):
            q.close()
        self._out.join_thread()


class OsPipe:
    """Two os.pipe()s with a u32 length prefix; the reader parses 64 KiB buffered reads."""

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self._out, self._in = out_fd, in_fd
        self._parser = FrameParser()
        self._frames = self._parser.frames

    def send(self, data: bytes) -> None:
        write_all(self._out, _pack_len(len(data)) + data)

    def send_batch(self, frames: list[bytes]) -> None:
        write_all(self._out, b"".join([_pack_len(len(f)) + f for f in frames]))

    def _fill(self) -> None:
        while not self._frames:
            data = os.read(self._in, 1 << 16)
            if not data:
                raise EOFError("the peer closed its pipe")
            self._parser.feed(data)

    def recv(self) -> bytes:
        if not self._frames:
            self._fill()
        return self._frames.popleft()

    def recv_batch(self) -> list[bytes]:
        if not self._frames:
            self._fill()
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def close(self) -> None:
        fds, self._out, self._in = (self._out, self._in), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class UnixStream:
    """An asyncio Unix stream socket (uvloop) with a u32 length prefix, buffered parsing."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader, self._writer = reader, writer
        self._parser = FrameParser()
        self._frames = self._parser.frames

    async def send(self, data: bytes) -> None:
        self._writer.write(_pack_len(len(data)) + data)
        await self._writer.drain()

    async def send_batch(self, frames: list[bytes]) -> None:
        self._writer.write(b"".join([_pack_len(len(f)) + f for f in frames]))
        await self._writer.drain()

    async def _fill(self) -> None:
        while not self._frames:
            data = await self._reader.read(1 << 16)
            if not data:
                raise EOFError("the peer closed its socket")
            self._parser.feed(data)

    async def recv(self) -> bytes:
        if not self._frames:
            await self._fill()
        return self._frames.popleft()

    async def recv_batch(self) -> list[bytes]:
        if not self._frames:
            await self._fill()
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def close(self) -> None:
        self._writer.close()


class ZmqPair:
    """pyzmq PAIR over ipc://."""

    def __init__(self, ctx: Any, sock: Any) -> None:
        self._ctx, self._sock = ctx, sock
        self.send = sock.send
        self.recv = sock.recv

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class Iceoryx2:
    """iceoryx2 publish/subscribe, one service per direction, busy polling with sched_yield."""

    def __init__(self, node: Any, pub: Any, sub: Any) -> None:
        import ctypes

        self._node, self._pub, self._sub = node, pub, sub
        self._memmove = ctypes.memmove
        self._string_at = ctypes.string_at

    def send(self, data: bytes) -> None:
        sample = self._pub.loan_slice_uninit(len(data))
        self._memmove(sample.payload_ptr, data, len(data))
        sample.assume_init().send()

    def recv(self) -> bytes:
        receive = self._sub.receive
        spin = os.sched_yield
        while True:
            sample = receive()
            if sample is not None:
                return self._string_at(sample.payload_ptr, sample.header.number_of_elements)
            spin()

    def close(self) -> None:
        ports, self._pub, self._sub = (self._pub, self._sub), None, None
        for port in ports:
            if port is not None:
                port.delete()
        self._node = None


# -- kinds: how each transport is set up across two processes -----------------------------------


@dataclass
class Created:
    """What `Kind.create` made in the driver: its transport opener, what the peer inherits."""

    open: Callable[[], Any]  # returns the driver's transport (called in the driver's loop)
    pass_fds: list[int] = field(default_factory=list)
    argument: str = ""
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # after the peer is gone
    after_spawn: list[Callable[[], None]] = field(default_factory=list)  # close inherited fds


@dataclass(frozen=True)
class Kind:
    key: str  # for --only
    label: str
    ours: bool = False
    reference: bool = False  # a yardstick (eventfd), not an alternative a user would pick
    is_async: bool = False
    typed: bool = False
    batch: bool = False  # has a natural batch form
    rtt_only: bool = False
    kernel_wake: bool = False  # wakes through the kernel on every message
    idle: bool = False  # measure the idle CPU of a waiting endpoint
    spawn_mp: bool = False  # the peer must be a multiprocessing spawn child
    never_sleeps: bool = False  # busy-polls even when idle: not a doorbell-path alternative
    note: str = ""


KINDS = [
    Kind("ring", "(a) ring, raw bytes, sync", ours=True, batch=True, idle=True),
    Kind("ring-msgspec", "(b) ring + msgspec Struct", ours=True, typed=True, batch=True),
    Kind("ring-async", "(c) ring, async, uvloop", ours=True, is_async=True, batch=True, idle=True),
    Kind("eventfd", "eventfd ping-pong (ref.)", reference=True, rtt_only=True, kernel_wake=True),
    Kind(
        "eventfd-async",
        "eventfd ping-pong, uvloop (ref.)",
        reference=True,
        is_async=True,
        rtt_only=True,
        kernel_wake=True,
    ),
    Kind("mp-pipe", "multiprocessing.Pipe", kernel_wake=True),
    Kind("mp-queue", "multiprocessing.Queue", kernel_wake=True, spawn_mp=True),
    Kind("os-pipe", "os.pipe + length prefix", batch=True, kernel_wake=True),
    Kind("zmq", "pyzmq PAIR ipc://", kernel_wake=True),
    Kind("unix", "asyncio Unix socket, uvloop", is_async=True, batch=True, kernel_wake=True),
    Kind("iceoryx2", "iceoryx2 pub/sub, busy poll", never_sleeps=True),
]
KIND_BY_KEY = {k.key: k for k in KINDS}

RING_CAPACITY = 1 << 20


def create(kind: Kind, workdir: Path) -> Created:
    """Make the driver's side of `kind`'s transport; see `Created`."""
    key = kind.key
    if key.startswith("ring"):
        from multikernel.shm import create_channel

        ch, handle = create_channel(RING_CAPACITY, policy=_policy(kind))
        opener = RingAsync if kind.is_async else RingSync
        return Created(
            open=lambda: opener(ch),
            pass_fds=[fd for fd in handle.fds if fd >= 0],
            argument=handle.to_argument(),
            after_spawn=[handle.close],
            cleanup=[ch.close, handle.close],
        )
    if key in ("eventfd", "eventfd-async"):
        to_peer, to_us = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        pair = (EventfdAsync if kind.is_async else EventfdPair)(to_peer, to_us)
        return Created(
            open=lambda: pair,
            pass_fds=[to_peer, to_us],
            argument=f"{to_us},{to_peer}",
            cleanup=[pair.close],
        )
    if key == "mp-pipe":
        import multiprocessing

        ours, theirs = multiprocessing.Pipe()
        return Created(
            open=lambda: MpPipe(ours),
            pass_fds=[theirs.fileno()],
            argument=str(theirs.fileno()),
            after_spawn=[theirs.close],
            cleanup=[ours.close, theirs.close],
        )
    if key == "os-pipe":
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pipe = OsPipe(down_w, up_r)

        theirs_open = [up_w, down_r]

        def close_theirs() -> None:
            while theirs_open:
                os.close(theirs_open.pop())

        return Created(
            open=lambda: pipe,
            pass_fds=[up_w, down_r],
            argument=f"{up_w},{down_r}",
            after_spawn=[close_theirs],
            cleanup=[pipe.close, close_theirs],
        )
    if key == "unix":
        import socket

        ours_s, theirs_s = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        async def open_unix() -> UnixStream:
            import asyncio

            reader, writer = await asyncio.open_unix_connection(sock=ours_s)
            return UnixStream(reader, writer)

        return Created(
            open=open_unix,
            pass_fds=[theirs_s.fileno()],
            argument=str(theirs_s.fileno()),
            after_spawn=[theirs_s.close],
            cleanup=[ours_s.close, theirs_s.close],
        )
    if key == "zmq":
        import zmq

        path = workdir / "zmq.ipc"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.bind(f"ipc://{path}")
        pair = ZmqPair(ctx, sock)

        def close_zmq() -> None:
            if not sock.closed:
                pair.close()
            path.unlink(missing_ok=True)

        return Created(open=lambda: pair, argument=f"ipc://{path}", cleanup=[close_zmq])
    if key == "iceoryx2":
        tag = f"{os.getpid()}x{os.urandom(3).hex()}"
        root = workdir / f"iox-{tag}"
        prefix = f"mkbench{tag}_"
        try:
            iox = open_iceoryx2(prefix, str(root), driver=True)
        except BaseException:
            remove_iceoryx2_files(prefix, root)
            raise

        def close_iox() -> None:
            iox.close()
            remove_iceoryx2_files(prefix, root)

        return Created(open=lambda: iox, argument=f"{prefix}|{root}", cleanup=[close_iox])
    raise ValueError(f"{key} has no driver-side setup here")  # mp-queue: see bench_transport


def attach(kind: Kind, argument: str) -> Any:
    """Open the peer's end of `kind`'s transport from the driver's `argument`."""
    key = kind.key
    if key.startswith("ring"):
        from multikernel.shm import Channel, ChannelHandle

        ch = Channel.attach(ChannelHandle.from_argument(argument), _policy(kind))
        return RingAsync(ch) if kind.is_async else RingSync(ch)
    if key in ("eventfd", "eventfd-async"):
        out_fd, in_fd = (int(x) for x in argument.split(","))
        return (EventfdAsync if kind.is_async else EventfdPair)(out_fd, in_fd)
    if key == "mp-pipe":
        from multiprocessing.connection import Connection

        return MpPipe(Connection(int(argument)))
    if key == "os-pipe":
        out_fd, in_fd = (int(x) for x in argument.split(","))
        return OsPipe(out_fd, in_fd)
    if key == "zmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.connect(argument)
        return ZmqPair(ctx, sock)
    if key == "iceoryx2":
        prefix, root = argument.split("|", 1)
        return open_iceoryx2(prefix, root, driver=False)
    raise ValueError(f"{key} has no peer-side attach here")


async def attach_unix(argument: str) -> UnixStream:
    import asyncio
    import socket

    sock = socket.socket(fileno=int(argument))
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return UnixStream(reader, writer)


def open_iceoryx2(prefix: str, root: str, *, driver: bool) -> Iceoryx2:
    """A node in a private namespace (file prefix and root dir), so cleaning up is exact."""
    import ctypes

    import iceoryx2 as iox2

    iox2.set_log_level(iox2.LogLevel.Error)
    config = iox2.config.default()
    config.global_cfg.prefix = iox2.FileName.new(prefix)
    config.global_cfg.root_path = iox2.Path.new(root.rstrip("/") + "/")
    node = iox2.NodeBuilder.new().config(config).create(iox2.ServiceType.Ipc)

    def service(name: str) -> Any:
        return (
            node.service_builder(iox2.ServiceName.new(f"bench/{name}"))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(256)
            .history_size(0)
            .enable_safe_overflow(False)  # else a full buffer drops the oldest sample
            .open_or_create()
        )

    down, up = service("down"), service("up")
    out_service, in_service = (down, up) if driver else (up, down)
    pub = (
        out_service.publisher_builder()
        .initial_max_slice_len(4096)
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .create()
    )
    sub = in_service.subscriber_builder().buffer_size(256).create()
    return Iceoryx2(node, pub, sub)


def remove_iceoryx2_files(prefix: str, root: Path | str) -> None:
    """Everything iceoryx2 made under our private prefix (in /dev/shm) and root dir."""
    for entry in Path("/dev/shm").glob(f"{prefix}*"):
        entry.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mkbench-"))


def _policy(kind: Kind) -> Any:
    """Each side of the benchmark is a process whose only job is its channel: the async variant
    spins without a round trip through the event loop (WaitPolicy.cooperative=False)."""
    from multikernel.shm import WaitPolicy

    return WaitPolicy(cooperative=False) if kind.is_async else WaitPolicy()
