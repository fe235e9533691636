"""Broadcast streams, the endpoint's part: writing one (`Stream`) and reading the ones the hub
hands this endpoint for its subscriptions (`StreamReaders`). docs/bus.md, "Streams".

A writer publishes straight into the stream's memory: no frame to the hub, no copy per
subscriber. A reader is a task per stream that reads frames in batches and hands each to every
subscription of this endpoint the hub said the stream feeds (`StreamSids`), as the same
`Message` a hub-routed publication makes (the source is the writer as the hub named it, never
what the frames say). A full subscription buffer holds the reader up (`Subscription.offer`), so
the writer waits for it under `block`, as the hub does for a slow subscriber.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import msgspec

from multikernel.endpoints._direct import Mirroring
from multikernel.endpoints._hublink import HubLink
from multikernel.endpoints._subscription import Message, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import close_fds
from multikernel.protocol import (
    Kind,
    ProtocolError,
    StreamClose,
    StreamOpen,
    StreamReaderGone,
    StreamReady,
    StreamRoute,
    StreamStart,
    TooLargeError,
    encode,
    validate_subject,
)
from multikernel.shm import (
    RingCorruptedError,
    ShmError,
    StreamReader,
    StreamReaderStatistics,
    StreamWriter,
    StreamWriterStatistics,
)

log = get_logger("multikernel.endpoints")
_encode = msgspec.msgpack.Encoder().encode
#: A reader spins this long (yielding to the event loop) before it sleeps on its doorbell.
READER_SPIN = 50e-6
#: Publishes between two trips through the event loop (so the socket task hears of readers).
CHECKPOINT_EVERY = 64


class Stream:
    """A broadcast stream this endpoint writes: `async with bus.stream(subject) as stream`."""

    def __init__(self, link: HubLink, mirror: Mirroring, ready: StreamReady, writer: StreamWriter):
        self._link = link
        self._mirror = mirror
        self.token = ready.token
        self.subject = ready.subject
        self._writer = writer
        self.hub_routed = ready.hub_routed
        self._max_body = link.max_body
        self._lock = anyio.Lock()
        self._flush = anyio.Event()
        self._count = 0
        self.closed = False
        self.added = 0  # readers the hub handed us so far
        self._added = anyio.Event()

    async def publish(self, body: object = None) -> None:
        """Publish `body` to every subscriber the stream reaches (and, while some take it
        only that way, through the hub). Waits while the slowest reader is a ring behind.
        Raises `anyio.ClosedResourceError` once the stream is closed."""
        if self.closed:
            raise anyio.ClosedResourceError
        data = _encode(body)
        if len(data) > self._max_body:
            raise TooLargeError(f"a {len(data)}-byte body exceeds the bus's {self._max_body}")
        writer = self._writer
        if not writer.closed:
            if not writer.try_write(data):
                async with self._lock:
                    await writer.write(data)
            if writer.unwoken == 1:
                self._flush.set()  # the flusher looks at the sleepers once we yield
            if writer.bad or writer.gone:  # readers it dropped: the hub forgets them too
                for frame in self.report_dropped():
                    await self._link.to_hub(frame)
        if self.hub_routed:
            frame = encode(Kind.PUBLISH, body, subject=self.subject, max_body=self._link.max_body)
            await self._link.to_hub(frame)
        if self._mirror.on:
            self._mirror.copy_frame(
                "stream", self.token, encode(Kind.PUBLISH, body, subject=self.subject)
            )
        self._count += 1
        if self._count >= CHECKPOINT_EVERY:
            self._count = 0
            await anyio.lowlevel.checkpoint()

    async def run_flusher(self) -> None:
        """Rings the readers that sleep after a burst (the writer looks only every 16 frames)."""
        while not self.closed:
            await self._flush.wait()
            self._flush = anyio.Event()
            if not self.closed and self._writer.unwoken:
                self._writer.wake_sleepers()

    def statistics(self) -> StreamWriterStatistics:
        return self._writer.statistics()

    def on_socket(self, body: object, fds: list[int]) -> None:
        match body:
            case StreamReady(role="add") if self._writer.closed:
                close_fds(fds)
            case StreamReady(role="add", reader=reader):
                try:
                    self._writer.add_reader(reader, fds[0], fds[1], fds[2])
                except (ShmError, OSError) as exc:
                    log.warning("refused a stream reader", subject=self.subject, error=str(exc))
                self.added += 1
                self._added.set()
            case StreamReaderGone(reader=reader):
                self._writer.remove_reader(reader)
            case StreamRoute(hub_routed=on):
                self.hub_routed = on
            case StreamClose(reason=reason):
                log.warning("stream withdrawn", subject=self.subject, reason=reason)
                self.hub_routed = True  # what is published goes through the hub, as checked
                self._writer.close()

    async def readers_added(self, count: int) -> None:
        """Until the hub's first `count` readers are ours (StreamStart's answer says how many)."""
        while self.added < count:
            await self._added.wait()
            self._added = anyio.Event()

    def report_dropped(self) -> list[bytes]:
        """Frames for the hub about readers the writer dropped on its own (dead, bad cursor)."""
        out = []
        writer = self._writer
        for reader, why in writer.bad:
            out.append(encode(Kind.CONTROL, StreamReaderGone(self.token, reader, why)))
        for reader in writer.gone:
            out.append(encode(Kind.CONTROL, StreamReaderGone(self.token, reader, "gone")))
        writer.bad.clear()
        writer.gone.clear()
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
            self._flush.set()


@dataclass(eq=False)
class _Reading:
    token: int
    reader_id: int
    subject: str
    source: int
    reader: StreamReader
    sids: tuple[int, ...] = ()
    told: anyio.Event = field(default_factory=anyio.Event)  # the hub said which sids
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    writer_gone: bool = False


class StreamReaders:
    """The streams this endpoint reads, by (token, reader), and the sids each feeds."""

    def __init__(
        self, subs: Callable[[], dict[int, Subscription]], spawn: Callable[..., None]
    ) -> None:
        self._subs = subs
        self._spawn = spawn
        self._reading: dict[tuple[int, int], _Reading] = {}
        self._sids: dict[tuple[int, int], tuple[int, ...]] = {}  # told before the reader came
        self.ended = anyio.Event()  # set (and replaced) whenever a reader ends

    def on_ready(self, ready: StreamReady, fds: list[int]) -> None:
        """A reader the hub made for us (over the socket)."""
        if len(fds) != 4:
            close_fds(fds)
            return
        key = (ready.token, ready.reader)
        try:
            reader = StreamReader(*fds)
        except (ShmError, OSError, ValueError) as exc:
            log.warning("refused a stream", subject=ready.subject, error=str(exc))
            return
        reading = _Reading(ready.token, ready.reader, ready.subject, ready.peer_id, reader)
        told = self._sids.pop(key, None)
        if told is not None:
            reading.sids = told
            reading.told.set()
            if not told:  # removed before it came
                reader.close()
                return
        self._reading[key] = reading
        self._spawn(self._run, reading)

    def on_sids(self, token: int, reader: int, sids: tuple[int, ...]) -> None:
        """Which subscriptions a reader feeds (on the session channel, in order with the
        answers to Subscribe); none: that reader is done."""
        reading = self._reading.get((token, reader))
        if reading is None:
            if len(self._sids) < 4096:
                self._sids[(token, reader)] = sids
            return
        reading.sids = sids
        reading.told.set()
        if not sids:
            reading.scope.cancel()

    async def _run(self, reading: _Reading) -> None:
        reader = reading.reader
        try:
            with reading.scope:
                await reading.told.wait()  # frames read before would reach no subscription
                await self._read(reading)
        except RingCorruptedError as exc:
            log.warning("stream reader stopped", subject=reading.subject, error=str(exc))
        finally:
            self._reading.pop((reading.token, reading.reader_id), None)
            reader.close()
            self.ended.set()
            self.ended = anyio.Event()

    async def _read(self, reading: _Reading) -> None:
        reader, subject, source = reading.reader, reading.subject, reading.source
        subs = self._subs()
        checkpoint = anyio.lowlevel.checkpoint
        while True:
            gap, bodies = reader.read(256)
            if bodies:
                sids = reading.sids
                if len(sids) == 1:  # the common case, without the inner loop
                    sub = subs.get(sids[0])
                    push = sub.try_push if sub is not None else None
                    for body in bodies:
                        message = Message(subject, source, body, gap)
                        gap = 0
                        if push is not None and not push(message):
                            await sub.offer(message)  # type: ignore[union-attr]
                else:
                    for body in bodies:
                        message = Message(subject, source, body, gap)
                        gap = 0
                        for sid in sids:
                            sub = subs.get(sid)
                            if sub is not None and not sub.try_push(message):
                                await sub.offer(message)
                await checkpoint()
                subs = self._subs()  # rebuilt when it shrinks (`PubSub._compact_subs`)
                continue
            if reading.writer_gone or reader.writer_closed():
                if not reader.pending():
                    return
                continue
            await self._wait(reading)
            subs = self._subs()

    async def _wait(self, reading: _Reading) -> None:
        reader = reading.reader
        deadline = time.perf_counter() + READER_SPIN
        while time.perf_counter() < deadline:
            await anyio.lowlevel.checkpoint()
            if reader.pending():
                return
            os.sched_yield()
        if reader.announce():
            try:
                await anyio.wait_readable(reader.bell)
            finally:
                if not reader.woken():
                    reading.writer_gone = True

    def statistics(self) -> dict[str, StreamReaderStatistics]:
        return {r.subject: r.reader.statistics() for r in self._reading.values()}

    def close_all(self) -> None:
        for reading in list(self._reading.values()):
            reading.scope.cancel()


async def open_stream(
    link: HubLink, mirror: Mirroring, subject: str, slow: Literal["block", "drop"] | None
) -> Stream:
    """Ask the hub for a stream, map and seal it, start it; the hub's readers are ours when
    this returns (so a subscription made before is fed from the first frame)."""
    validate_subject(subject)
    answer = await link.control(StreamOpen(subject, slow or ""))
    if not isinstance(answer, tuple) or not isinstance(answer[0], StreamReady):
        raise ProtocolError(f"the hub answered StreamOpen with {answer!r}")
    ready, fds = answer
    if len(fds) != 1:
        close_fds(fds)
        raise ProtocolError("the hub's stream came without its memory")
    writer = StreamWriter(fds[0], slow="drop" if ready.slow == "drop" else "block",
                          patience=ready.patience_ms / 1000)  # fmt: skip
    return Stream(link, mirror, ready, writer)


async def start_stream(link: HubLink, stream: Stream) -> None:
    try:
        started = await link.control(StreamStart(stream.token))
        await stream.readers_added(int(getattr(started, "value", 0)))
    except BaseException:
        stream.close()
        raise
