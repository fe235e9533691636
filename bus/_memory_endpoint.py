"""The endpoint's half of the in-memory bus: `Endpoint`'s methods over a `MemoryBus`.

A `MemoryEndpoint` has the methods of `Endpoint` and hands out the real `Subscription`, `Message`
and `Service` objects, so a plugin's code runs unchanged: bodies are encoded into envelope frames
with `encode` (an unencodable or oversized body fails here as it would there), services are the
real `Service` (same annotations, schemas, worker pool and concurrency limit, the caller's deadline
on the handler, `current_caller()`), and replies and errors are decoded from the frames the
service wrote. Between caller and service, a `Link` plays the direct channel: to the `Service` it
looks like a `DirectChannel`; to the caller each call is a bounded stream of reply frames.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import (
    AsyncGenerator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from multikernel.bus._compact import compacted
from multikernel.bus._memory_link import REPLY_BUFFER, Call, Link
from multikernel.bus._policy import Identity
from multikernel.endpoints import (
    DEFAULT_PATIENCE,
    Bus,
    HubUnavailableError,
    Service,
    Subscription,
)
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import request_frame
from multikernel.protocol import (
    BusSnapshot,
    Flag,
    Kind,
    MultikernelError,
    NameMove,
    RequestNameResult,
    deadline_after,
    decode_body,
    decode_header,
    encode,
    validate_pattern,
    validate_subject,
)

if TYPE_CHECKING:
    from multikernel.bus._memory_bus import MemoryBus

T = TypeVar("T")
log = get_logger("multikernel.bus.testing")


class MemoryEndpoint:
    """One attachment to a `MemoryBus`, with `Endpoint`'s methods. Create it with
    `MemoryBus.connect()`."""

    def __init__(self, bus: MemoryBus, identity: Identity) -> None:
        self.name = identity.name
        self.id = identity.endpoint_id
        self.identity = identity  # as bound at connect; the bus's copy also lists owned names
        self.max_body = bus.limits.max_body
        self.drain_requested = anyio.Event()
        self.async_errors = 0
        self._bus = bus
        self._subs: dict[int, Subscription] = {}
        self._subs_peak = 0  # its largest size since rebuilt (compacted)
        self._next_sid = 1
        self._services: dict[str, Service] = {}
        self._links: dict[str, Link] = {}  # client side: the current channel to each name
        self._served: set[Link] = set()  # server side: channels whose callers we serve
        self._correlations = itertools.count(1)
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self._valid_subjects: set[str] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False

    def _check_open(self) -> None:
        if self._closing:
            raise HubUnavailableError(f"endpoint {self.name!r} has left the bus")

    # -- publish / subscribe ------------------------------------------------------------------

    async def publish(self, subject: str, body: object = None) -> None:
        """Publish `body` (any msgspec-encodable value) on `subject` to every subscriber."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if subject not in self._valid_subjects:
            validate_subject(subject)
            self._valid_subjects.add(subject)
        frame = encode(Kind.PUBLISH, body, subject=subject, max_body=self.max_body)
        for subscription, message in self._bus._publish(
            self.id, subject, frame[decode_header(frame).body_offset :]
        ):
            await subscription.offer(message)  # a full buffer holds the publisher (patience)

    async def subscribe(
        self,
        pattern: str,
        *,
        queue_group: str | None = None,
        max_pending: int = 1024,
        patience: float = DEFAULT_PATIENCE,
    ) -> Subscription:
        """Subscribe to `pattern` (`*` one token, `>` the rest); use as `async with`."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        validate_pattern(pattern)
        sid = self._next_sid
        self._next_sid += 1
        sub = Subscription(sid, pattern, queue_group, max_pending, self._unsubscribe, patience)
        try:
            sub.cross_instance = self._bus._subscribe(self.id, sub)
        except BaseException:
            sub.discard()
            raise
        self._subs[sid] = sub
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
        """`subscribe` to each of `patterns`, all or none (as `Endpoint.subscribe_many`)."""
        for pattern in patterns:
            validate_pattern(pattern)
        subs: list[Subscription] = []
        try:
            for pattern in patterns:
                subs.append(
                    await self.subscribe(
                        pattern, queue_group=queue_group, max_pending=max_pending,
                        patience=patience,
                    )
                )  # fmt: skip
        except BaseException:
            await self.unsubscribe_many(subs)
            raise
        return subs

    async def unsubscribe_many(self, subscriptions: Iterable[Subscription]) -> None:
        """Close each of `subscriptions`, as its `aclose` does."""
        for sub in subscriptions:
            if sub.active and self._subs.pop(sub.sid, None) is not None:
                sub.discard()
                self._bus._unsubscribe(self.id, sub.sid)
        self._subs, self._subs_peak = compacted(self._subs, self._subs_peak)

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is not None:
            self._subs, self._subs_peak = compacted(self._subs, self._subs_peak)
            self._bus._unsubscribe(self.id, sub.sid)

    # -- requests -----------------------------------------------------------------------------

    def _decoder(self, kind: Any) -> msgspec.msgpack.Decoder[Any]:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.msgpack.Decoder(kind)
        return decoder

    @typing.overload
    async def request(self, target: str, method: str, body: object = None) -> Any: ...

    @typing.overload
    async def request(
        self, target: str, method: str, body: object = None, *, response: type[T]
    ) -> T: ...

    async def request(
        self, target: str, method: str, body: object = None, *, response: Any = Any
    ) -> Any:
        """Call `method` of the service `target`; the caller's cancel scope is the deadline.

        Raises NoRespondersError at once if nobody owns `target`, AccessDeniedError if the
        policy forbids the call, and the service's own error (same class, remote message) if the
        method failed.
        """
        call = await self._call(target, method, body)
        try:
            answer = await call.next()
        finally:
            call.close()
        assert answer is not None  # the first answer is a reply or an error, never nothing
        header, frame = answer
        return decode_body(header, frame, self._decoder(response))

    def request_stream(
        self, target: str, method: str, body: object = None, *, response: type[T] | Any = Any
    ) -> AsyncGenerator[T, None]:
        """Call a streaming method: yields each reply until the service ends the stream."""
        return self._stream(target, method, body, response)

    async def _stream(
        self, target: str, method: str, body: object, response: Any
    ) -> AsyncGenerator[Any, None]:
        decoder = self._decoder(response)
        call = await self._call(target, method, body)
        try:
            while (answer := await call.next()) is not None:
                header, frame = answer
                if header.flags & Flag.MORE:
                    yield decoder.decode(frame[header.body_offset :])
        finally:
            call.close()

    async def _call(self, target: str, method: str, body: object) -> Call:
        await anyio.lowlevel.checkpoint()
        self._check_open()
        await self._bus._wait_if_held(self.id, target)
        link = self._links.get(target)
        if link is None or link.stale or link.closed:
            old = link
            link = self._bus._open_link(self, target)
            if old is not None:
                old.retire()
        correlation = next(self._correlations)
        frame = request_frame(method, body, correlation, self.max_body)
        replies, frames = anyio.create_memory_object_stream[bytes](REPLY_BUFFER)
        link.calls[correlation] = replies
        link.service.submit(link, decode_header(frame), frame)
        return Call(link, correlation, frames)

    # -- services -----------------------------------------------------------------------------

    def service(self, name: str, *, concurrency: int = 64, flags: int = 0) -> Service:
        """A service to serve under the well-known `name`; add methods, then `await start()`."""
        if name in self._services:
            raise ValueError(f"this endpoint already serves {name!r}")
        service = Service(self, name, concurrency=concurrency, flags=flags)
        self._services[name] = service
        return service

    async def _start_service(self, service: Service) -> RequestNameResult:
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return self._bus._request_name(self.id, service)

    async def _release_service(self, service: Service) -> None:
        await anyio.lowlevel.checkpoint()
        service.primary = False
        self._bus._release_name(self.id, service.name)

    def _encode_reply(self, body: object, correlation: int, flags: int) -> bytes:
        return encode(
            Kind.REPLY, body, correlation=correlation, flags=flags, max_body=self.max_body
        )

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the endpoint is not connected")
        self._tg.start_soon(func, *args)

    async def drain(self) -> None:
        """Lame duck: hand every service's name to the next owner, finish requests in flight."""
        async with anyio.create_task_group() as tg:
            for service in self._services.values():
                tg.start_soon(service.drain)

    # -- holding and switching names (for the upgrade actor) ----------------------------------

    async def hold_names(self, names: Collection[str], *, hold_for: float) -> None:
        """Hold new calls to `names` for a switch, for at most `hold_for` seconds (as the hub)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._bus._hold_names(self, tuple(names), deadline_after(hold_for))

    async def switch_names(self, moves: Mapping[str, int]) -> None:
        """Give each name its new owner (an endpoint id), all or none, then end their holds."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._bus._switch_names(self.id, tuple(NameMove(n, o) for n, o in moves.items()))

    async def release_names(self, names: Collection[str]) -> None:
        """End the holds on `names` without moving them (roll back): the owners keep them."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._bus._release_names(self.id, tuple(names))

    # -- introspection ------------------------------------------------------------------------

    async def introspect(self) -> BusSnapshot:
        """What the bus knows: endpoints, names, services, subscriptions, counters."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return self._bus.snapshot()

    def statistics(self) -> dict[str, Any]:
        """Counters of this endpoint, shaped like `Endpoint.statistics()` (no channels here)."""
        return {
            "id": self.id,
            "session": None,
            "direct": {},
            "subscriptions": {s.pattern: s.statistics() for s in self._subs.values()},
            "services": {
                n: {"served": s.served, "failed": s.failed, "in_flight": s.in_flight}
                for n, s in self._services.items()
            },
            "async_errors": self.async_errors,
            "mirror_dropped": 0,
        }

    # -- from the bus -------------------------------------------------------------------------

    def _async_error(self, error: MultikernelError) -> None:
        """An error the hub reports unasked (a publication the policy kept from someone)."""
        self.async_errors += 1
        log.warning("hub reported an error", code=error.code, message=error.message)

    async def _close(self) -> None:
        """Leaving the bus: end subscriptions and every channel, ours and our callers'."""
        for link in [*self._links.values(), *self._served]:
            link.close()
        for sub in list(self._subs.values()):
            await sub.aclose()


def _is_a_bus(endpoint: MemoryEndpoint) -> Bus:
    return endpoint  # mypy checks here that `MemoryEndpoint` satisfies `Bus`
