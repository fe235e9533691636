"""What actors, plugins and services are written against: the `Bus` protocol and its two helpers.

An actor (lifecycle, resource, fault, a user's plugin) needs the bus's operations, not the class
that performs them: the real `Endpoint` (shared memory, a hub process) and the in-memory double
(`multikernel.bus.testing.MemoryEndpoint`) both satisfy `Bus` structurally, and mypy checks that
they do, so one actor runs on either without a cast. `ServiceHost` and `ReplyChannel` are the two
seams a `Service` needs: the endpoint that owns its name, and the channel a request arrived on
(a shared-memory `DirectChannel`, or the double's in-memory link).
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import anyio

from multikernel.protocol import BusSnapshot, RequestNameResult

if TYPE_CHECKING:
    from multikernel.endpoints._direct import Peer
    from multikernel.endpoints._service import Service
    from multikernel.endpoints._subscription import Subscription

T = TypeVar("T")


class Bus(Protocol):
    """The operations of an attachment to the bus, whichever bus it is."""

    @property
    def name(self) -> str:
        """The name this endpoint gave at attach (shown by the inspector)."""

    @property
    def id(self) -> int:
        """The endpoint's unique id on the bus, bound by the hub (never reused)."""

    @property
    def drain_requested(self) -> anyio.Event:
        """Set when the hub asks this endpoint to drain (lame-duck shutdown)."""

    async def publish(self, subject: str, body: object = None) -> None: ...

    async def subscribe(
        self,
        pattern: str,
        *,
        queue_group: str | None = None,
        max_pending: int = 1024,
        patience: float = ...,
    ) -> Subscription: ...

    async def subscribe_many(
        self,
        patterns: Sequence[str],
        *,
        queue_group: str | None = None,
        max_pending: int = 1024,
        patience: float = ...,
    ) -> list[Subscription]:
        """`subscribe` to each of `patterns` in few frames, all or none."""

    async def unsubscribe_many(self, subscriptions: Iterable[Subscription]) -> None:
        """Close each of `subscriptions` (as its `aclose`), telling the hub in few frames."""

    @overload
    async def request(self, target: str, method: str, body: object = None) -> Any: ...

    @overload
    async def request(
        self, target: str, method: str, body: object = None, *, response: type[T]
    ) -> T: ...

    def request_stream(
        self, target: str, method: str, body: object = None, *, response: type[T] | Any = Any
    ) -> AsyncGenerator[T, None]: ...

    def service(self, name: str, *, concurrency: int = 64, flags: int = 0) -> Service: ...

    async def drain(self) -> None: ...

    async def hold_names(self, names: Collection[str], *, hold_for: float) -> None:
        """Hold new calls to `names` for a switch (the upgrade actor's first step)."""

    async def switch_names(self, moves: Mapping[str, int]) -> None:
        """Give each name its new owner, all or none, and end their holds."""

    async def release_names(self, names: Collection[str]) -> None:
        """End the holds on `names` without moving them (roll back)."""

    async def introspect(self) -> BusSnapshot: ...

    def statistics(self) -> dict[str, Any]: ...


class ServiceHost(Protocol):
    """What a `Service` needs from the endpoint that serves it."""

    @property
    def id(self) -> int: ...

    async def _start_service(self, service: Service) -> RequestNameResult: ...

    async def _release_service(self, service: Service) -> None: ...

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None: ...

    def _encode_reply(self, body: object, correlation: int, flags: int) -> bytes: ...


class ReplyChannel(Protocol):
    """What a `Service` needs from the channel a request came on, to answer it."""

    @property
    def peer(self) -> Peer:
        """The caller, as the hub bound it."""

    @property
    def closed(self) -> bool: ...

    @property
    def handlers(self) -> dict[int, anyio.CancelScope]:
        """The cancel scopes of the requests running now, by correlation id."""

    @property
    def abandoned(self) -> set[int]:
        """Requests the caller gave up on before a worker picked them up."""

    async def send(self, frame: bytes) -> None: ...

    def send_nowait(self, frame: bytes) -> bool: ...

    def nudge(self) -> None:
        """A reply just went out: the caller often calls again, so watch for it briefly."""
