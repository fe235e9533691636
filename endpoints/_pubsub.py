"""Publishing and subscribing, the endpoint's part: subjects checked once, subscriptions kept
in one table (rebuilt when it shrinks, so memory comes back), many at once in few frames.

`Endpoint` inherits `PubSub`; what it needs of the endpoint is its hub link and its table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Literal

import anyio

from multikernel.endpoints._direct import Mirroring
from multikernel.endpoints._hublink import HubLink
from multikernel.endpoints._streams import Stream, StreamReaders, open_stream, start_stream
from multikernel.endpoints._subscription import DEFAULT_PATIENCE, Subscription
from multikernel.endpoints.wire import close_fds
from multikernel.protocol import (
    Feature,
    Kind,
    ProtocolError,
    StreamClose,
    StreamReady,
    Subscribe,
    SubscribedMany,
    SubscribeMany,
    Unsubscribe,
    UnsubscribeMany,
    encode,
    validate_pattern,
    validate_subject,
)

#: Subscriptions per SubscribeMany frame at most (and at most half of max_body in patterns): the
#: hub makes them in one go (~5-10 us each), so a batch holds it up for a few milliseconds.
BATCH = 512
UNSUBSCRIBE_BATCH = 4096  # sids per UnsubscribeMany (~9 bytes each)
#: Subjects `publish` remembers as valid: a cache, so 1M distinct subjects do not grow the client.
VALID_SUBJECTS = 4096


def _batches(subs: list[Subscription], max_body: int) -> Iterator[list[Subscription]]:
    """`subs` in runs of at most BATCH whose patterns take at most half of `max_body`."""
    chunk: list[Subscription] = []
    size = 0
    for sub in subs:
        cost = len(sub.pattern) + len(sub.queue_group or "") + 16
        if chunk and (len(chunk) >= BATCH or size + cost > max_body // 2):
            yield chunk
            chunk, size = [], 0
        chunk.append(sub)
        size += cost
    if chunk:
        yield chunk


class PubSub:
    """`publish`, `subscribe`, `subscribe_many`, `unsubscribe_many` and `stream` of an
    endpoint, and reading the streams the hub hands it for its subscriptions."""

    _link: HubLink
    _mirror: Mirroring
    _writing: dict[int, Stream]  # the streams this endpoint writes, by token
    _stream_readers: StreamReaders
    _subs: dict[int, Subscription]
    _subs_peak: int  # the table's largest size since rebuilt: see `_compact_subs`
    _next_sid: int
    _valid_subjects: set[str]

    @property
    def max_body(self) -> int:
        """The largest body the hub accepts, as it said at attach."""
        return self._link.max_body

    async def publish(self, subject: str, body: object = None) -> None:
        """Publish `body` (any msgspec-encodable value) on `subject` to every subscriber."""
        if self._writing:  # a stream of ours on this subject carries it (its readers hear it)
            for stream in self._writing.values():
                if stream.subject == subject and not stream.closed:
                    await stream.publish(body)
                    return
        if subject not in self._valid_subjects:
            validate_subject(subject)
            if len(self._valid_subjects) >= VALID_SUBJECTS:
                self._valid_subjects.clear()  # a publisher of endless subjects starts over
            self._valid_subjects.add(subject)
        await self._link.to_hub(encode(Kind.PUBLISH, body, subject=subject, max_body=self.max_body))

    @asynccontextmanager
    async def stream(
        self, subject: str, *, slow: Literal["block", "drop"] | None = None
    ) -> AsyncIterator[Stream]:
        """A broadcast stream on the literal `subject`: `await stream.publish(body)` writes
        straight into memory every matching subscriber reads (docs/bus.md, "Streams"), instead
        of a frame through the hub. `slow` is what happens to a reader that falls a whole ring
        behind: "block" waits for it (up to the hub's `block_patience`, then it is told its gap),
        "drop" overwrites (it is told its gap); default: the hub's slow-consumer policy."""
        stream = await open_stream(self._link, self._mirror, subject, slow)
        self._writing[stream.token] = stream
        try:
            self._link.spawn(stream.run_flusher)
            await start_stream(self._link, stream)
            yield stream
        finally:
            self._writing.pop(stream.token, None)
            stream.close()
            if not self._link.closing:
                with (
                    anyio.move_on_after(2, shield=True),
                    suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
                ):
                    await self._link.to_hub(encode(Kind.CONTROL, StreamClose(stream.token)))

    def _on_stream(self, body: object, fds: list[int]) -> None:
        if isinstance(body, StreamReady) and body.role == "reader":
            self._stream_readers.on_ready(body, fds)
            return
        stream = self._writing.get(getattr(body, "token", 0))
        if stream is None:
            close_fds(fds)  # a stream closed meanwhile
        else:
            stream.on_socket(body, fds)

    def _streams_lost(self) -> None:
        """After re-attaching to a (new) hub, which knows none of our streams: they publish
        through the hub from now on; their readers see them closed."""
        for stream in self._writing.values():
            stream.on_socket(StreamClose(stream.token, "the hub restarted"), [])

    async def subscribe(
        self,
        pattern: str,
        *,
        queue_group: str | None = None,
        max_pending: int = 1024,
        patience: float = DEFAULT_PATIENCE,
    ) -> Subscription:
        """Subscribe to `pattern` (`*` one token, `>` the rest); use as `async with`.

        Up to `max_pending` messages wait for the application; when that many do, this endpoint
        reads nothing more from the hub for up to `patience` seconds (the hub holds the
        publishers meanwhile), then drops, counts and tells the gap (`Message.missed`).
        """
        validate_pattern(pattern)
        sid = self._next_sid
        self._next_sid += 1
        sub = Subscription(sid, pattern, queue_group, max_pending, self._unsubscribe, patience)
        self._subs[sid] = sub
        try:
            ok = await self._link.control(Subscribe(pattern, queue_group, sid))
        except BaseException:
            del self._subs[sid]
            sub.discard()
            raise
        sub.cross_instance = bool(getattr(ok, "value", 0))
        self._subs_peak = max(self._subs_peak, len(self._subs))
        return sub

    async def subscribe_many(
        self,
        patterns: Sequence[str],
        *,
        queue_group: str | None = None,
        max_pending: int = 1024,
        patience: float = DEFAULT_PATIENCE,
    ) -> list[Subscription]:
        """`subscribe` to each of `patterns`, all or none, in few frames: one `SubscribeMany`
        per `BATCH` subscriptions (one round trip to the hub instead of one each), or one
        `Subscribe` each from a hub that does not speak it. Close them with `unsubscribe_many`
        (or each with its own `aclose`)."""
        for pattern in patterns:
            validate_pattern(pattern)
        subs = []
        for pattern in patterns:
            sid, self._next_sid = self._next_sid, self._next_sid + 1
            sub = Subscription(sid, pattern, queue_group, max_pending, self._unsubscribe, patience)
            self._subs[sid] = sub
            subs.append(sub)
        made = 0
        try:
            if self._link.features & Feature.SUBSCRIBE_MANY:
                for chunk in _batches(subs, self.max_body):
                    await self._subscribe_batch(chunk)
                    made += len(chunk)
            else:
                for sub in subs:
                    ok = await self._link.control(Subscribe(sub.pattern, queue_group, sub.sid))
                    sub.cross_instance = bool(getattr(ok, "value", 0))
                    made += 1
        except BaseException:
            for sub in subs[made:]:
                del self._subs[sub.sid]
                sub.discard()
            await self.unsubscribe_many(subs[:made])  # all or none
            raise
        self._subs_peak = max(self._subs_peak, len(self._subs))
        return subs

    async def _subscribe_batch(self, chunk: list[Subscription]) -> None:
        items = tuple(Subscribe(s.pattern, s.queue_group, s.sid) for s in chunk)
        answer = await self._link.control(SubscribeMany(items))
        if not isinstance(answer, SubscribedMany):
            raise ProtocolError(f"the hub answered SubscribeMany with {answer!r}")
        for sub, across in zip(chunk, answer.across, strict=True):
            sub.cross_instance = bool(across)

    async def unsubscribe_many(self, subscriptions: Iterable[Subscription]) -> None:
        """Close each of `subscriptions` (as its `aclose` does), telling the hub in few frames
        (`UnsubscribeMany`); bounded and shielded like `aclose`."""
        sids = []
        for sub in subscriptions:
            if sub.active and self._subs.pop(sub.sid, None) is not None:
                sub.discard()
                sids.append(sub.sid)
        self._compact_subs()
        if not sids or self._link.closing:
            return
        with (
            anyio.move_on_after(2, shield=True),
            suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
        ):
            if self._link.features & Feature.SUBSCRIBE_MANY:
                for start in range(0, len(sids), UNSUBSCRIBE_BATCH):
                    chunk = tuple(sids[start : start + UNSUBSCRIBE_BATCH])
                    await self._link.control(UnsubscribeMany(chunk))
            else:
                for sid in sids:
                    await self._link.control(Unsubscribe(sid=sid))

    def _compact_subs(self) -> None:
        if self._subs_peak >= 256 and len(self._subs) * 4 <= self._subs_peak:
            # A dict never gives back its table: rebuild it at a quarter of its peak, as the
            # bus does with its own tables (multikernel.bus._compact), so memory comes back.
            self._subs = dict(self._subs)
            self._subs_peak = len(self._subs)

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is None:
            return
        self._compact_subs()
        if not self._link.closing:
            # If the hub is gone, it forgot the subscription with the session.
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._link.control(Unsubscribe(sid=sub.sid))

    async def _resubscribe(self) -> None:
        """After re-attaching to a (new) hub: every subscription again, with its sid."""
        subs = list(self._subs.values())
        if self._link.features & Feature.SUBSCRIBE_MANY:
            for chunk in _batches(subs, self.max_body):
                await self._subscribe_batch(chunk)
        else:
            for sub in subs:
                await self._link.control(Subscribe(sub.pattern, sub.queue_group, sub.sid))
