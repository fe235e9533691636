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
    """One publication: its subject, who published it (as the hub stamped it) and its body."""

    subject: str
    source: int
    data: bytes

    def decode(self, kind: type[T]) -> T:
        """The body as a `kind` (a msgspec type): raises msgspec.ValidationError if it is not."""
        return msgspec.msgpack.decode(self.data, type=kind)

    def value(self) -> Any:
        """The body decoded without a schema."""
        return msgspec.msgpack.decode(self.data)


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    delivered: int
    dropped: int
    buffered: int


class Subscription:
    """Messages on subjects matching `pattern`: `async with endpoint.subscribe(...) as sub`.

    Messages wait in a bounded buffer (`max_pending`); when the application falls that far behind,
    newer messages are dropped and counted (`statistics().dropped`) rather than buffered without
    bound or slowing the publisher.
    """

    def __init__(
        self,
        sid: int,
        pattern: str,
        queue_group: str | None,
        max_pending: int,
        unsubscribe: Callable[[Subscription], Awaitable[None]],
    ) -> None:
        self.sid = sid
        self.pattern = pattern
        self.queue_group = queue_group
        self.cross_instance = False
        self._send: MemoryObjectSendStream[Message]
        self._receive: MemoryObjectReceiveStream[Message]
        self._send, self._receive = anyio.create_memory_object_stream[Message](max_pending)
        self._unsubscribe = unsubscribe
        self.delivered = self.dropped = 0
        self.active = True
        self._streak = 0

    def push(self, message: Message) -> None:
        try:
            self._send.send_nowait(message)
            self.delivered += 1
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # closed while a delivery was on its way

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        # Messages already buffered are handed out without a trip through the event loop (a
        # checkpoint costs ~2 µs, more than the rest of a delivery); every 64th still yields,
        # so a subscriber that never waits cannot starve the other tasks.
        self._streak += 1
        if self._streak < 64:
            try:
                return self._receive.receive_nowait()
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
        buffered = self._receive.statistics().current_buffer_used
        return SubscriptionStatistics(self.delivered, self.dropped, buffered)

    def discard(self) -> None:
        """Close the buffer without telling the hub (it never accepted the subscription)."""
        self.active = False
        self._send.close()
        self._receive.close()

    async def aclose(self) -> None:
        if self.active:
            self.active = False
            self._send.close()
            self._receive.close()
            # Shielded, so a cancelled owner still tells the hub; bounded, so a hub that is going
            # away too cannot hold us (it forgets the subscription with the session anyway).
            with anyio.move_on_after(2, shield=True):
                await self._unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
