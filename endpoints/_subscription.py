"""Subscriptions: the messages published on matching subjects, as an async iterator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


class Message(msgspec.Struct, frozen=True, gc=False):
    """One publication: its subject, who published it (as the hub stamped it) and its body.

    ``missed`` is its subscription's gap: how many publications were dropped just before this
    one (by the hub for a stalled subscriber, or by this endpoint for a full buffer); 0 when
    nothing was lost.
    """

    subject: str
    source: int
    data: bytes
    missed: int = 0

    def decode(self, kind: type[T]) -> T:
        """The body as a `kind` (a msgspec type): raises msgspec.ValidationError if it is not."""
        return msgspec.msgpack.decode(self.data, type=kind)

    def value(self) -> Any:
        """The body decoded without a schema."""
        return msgspec.msgpack.decode(self.data)


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    delivered: int
    dropped: int  # by this endpoint (its buffer full past `patience`)
    buffered: int
    missed: int = 0  # every gap told so far: this endpoint's drops and the hub's


#: One generic alias for every buffer (subscripting per call made a new one for each stream).
_new_buffer = anyio.create_memory_object_stream[Message]

#: How long a full subscription buffer holds up the endpoint's reading, by default (seconds).
DEFAULT_PATIENCE = 2.0


class Subscription:
    """Messages on subjects matching `pattern`: `async with endpoint.subscribe(...) as sub`.

    Messages wait in a bounded buffer (`max_pending`). When the application falls that far
    behind, the endpoint stops reading from the hub until there is room, for at most `patience`
    seconds: the hub then holds (and, by its slow-consumer policy, slows) the publishers. Past
    `patience` the subscription is stalled: newer messages are dropped and counted until the
    application catches up, and the next message it gets says how many it missed
    (`Message.missed`). `patience=0` drops at once and never holds anything up.
    """

    __slots__ = (
        "__weakref__", "_max_pending", "_streak", "_streams", "_unreported", "_unsubscribe",
        "active", "cross_instance", "delivered", "dropped", "missed", "patience", "pattern",
        "queue_group", "sid", "stalled",
    )  # fmt: skip

    def __init__(
        self,
        sid: int,
        pattern: str,
        queue_group: str | None,
        max_pending: int,
        unsubscribe: Callable[[Subscription], Awaitable[None]],
        patience: float = 0.0,
    ) -> None:
        self.sid = sid
        self.pattern = pattern
        self.queue_group = queue_group
        self.cross_instance = False
        # The buffer is made when first needed (a message arrives or someone reads): an idle
        # subscription, as most of a large table are, then costs this object alone (the pair of
        # streams is ~1.5 KB).
        self._max_pending = max_pending
        self._streams: (
            tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]] | None
        ) = None
        self._unsubscribe = unsubscribe
        self.delivered = self.dropped = self.missed = 0
        self.patience = patience
        self.stalled = False  # patience ran out: drop until the application catches up
        self._unreported = 0  # dropped here since the last message handed over
        self.active = True
        self._streak = 0

    def try_push(self, message: Message) -> bool:
        """Hand `message` over without waiting; False when the buffer is full and the caller
        should `await offer(message)` instead (nothing was counted then).

        `_now` inlined: this runs for every message a subscription gets."""
        if self._unreported:
            message = self._gap(message)
        try:
            (self._streams or self._buffer())[0].send_nowait(message)
        except anyio.WouldBlock:
            if self.patience and not self.stalled:
                return False
            self._drop(message)
            return True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return True  # closed while a delivery was on its way
        self.delivered += 1
        if message.missed:
            self.missed += message.missed
        self._unreported = 0
        self.stalled = False  # it had room again: the next full buffer waits again
        return True

    def push(self, message: Message) -> None:
        """Hand `message` over, or drop it (counted, told as a gap) when the buffer is full."""
        self._now(message, may_wait=False)

    @property
    def _send(self) -> MemoryObjectSendStream[Message]:
        return self._buffer()[0]

    @property
    def _receive(self) -> MemoryObjectReceiveStream[Message]:
        return self._buffer()[1]

    def _buffer(
        self,
    ) -> tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]]:
        if self._streams is None:
            self._streams = _new_buffer(self._max_pending)
            if not self.active:  # closed before anything needed it: reads end at once
                self._streams[0].close()
                self._streams[1].close()
        return self._streams

    def _now(self, message: Message, *, may_wait: bool) -> bool:
        told = self._gap(message)
        try:
            (self._streams or self._buffer())[0].send_nowait(told)
        except anyio.WouldBlock:
            if may_wait:
                return False
            self._drop(told)
            return True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return True  # closed while a delivery was on its way
        self._handed(told)
        self.stalled = False  # it had room again: the next full buffer waits again
        return True

    async def offer(self, message: Message) -> None:
        """Wait up to `patience` for room (the caller reads nothing meanwhile), then hand it
        over; past `patience`, drop it and stall until the application catches up."""
        told = self._gap(message)
        with anyio.move_on_after(self.patience):
            try:
                await self._send.send(told)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self._handed(told)
            return
        self.stalled = True
        self._drop(told)

    def _gap(self, message: Message) -> Message:
        """`message` carrying every publication missed before it (here and at the hub)."""
        if not self._unreported:
            return message
        missed = message.missed + self._unreported
        return Message(message.subject, message.source, message.data, missed)

    def _handed(self, told: Message) -> None:
        self.delivered += 1
        self.missed += told.missed
        self._unreported = 0

    def _drop(self, told: Message) -> None:
        self.dropped += 1
        self._unreported = told.missed + 1  # its own gap, and itself, go to the next one

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        # Messages already buffered are handed out without a trip through the event loop (a
        # checkpoint costs ~2 µs, more than the rest of a delivery); every 64th still yields,
        # so a subscriber that never waits cannot starve the other tasks.
        self._streak += 1
        if self._streak < 64:
            try:
                return (self._streams or self._buffer())[1].receive_nowait()
            except anyio.WouldBlock:
                pass
            except anyio.EndOfStream:
                raise StopAsyncIteration from None
        self._streak = 0
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next message (EndOfStream once the subscription is closed)."""
        return await self._receive.receive()

    def statistics(self) -> SubscriptionStatistics:
        buffered = 0 if self._streams is None else self._receive.statistics().current_buffer_used
        return SubscriptionStatistics(self.delivered, self.dropped, buffered, self.missed)

    def discard(self) -> None:
        """Close the buffer without telling the hub (it never accepted the subscription, or
        the caller tells it for many at once: `unsubscribe_many`)."""
        self.active = False
        self._close_buffer()

    def _close_buffer(self) -> None:
        if self._streams is not None:
            self._streams[0].close()
            self._streams[1].close()

    async def aclose(self) -> None:
        if self.active:
            self.active = False
            self._close_buffer()
            # Shielded, so a cancelled owner still tells the hub; bounded, so a hub that is going
            # away too cannot hold us (it forgets the subscription with the session anyway).
            with anyio.move_on_after(2, shield=True):
                await self._unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
