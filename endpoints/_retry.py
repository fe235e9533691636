"""Opt-in transparent retry of idempotent calls, bounded by a deadline.

A request to an instance that has just failed ends at once with a typed error: the hub answers
`NoRespondersError` while nobody owns the name, and a request in flight when the owner died fails
with `NoRespondersError` too (its direct channel closed), never hangs. While the fault actor
replaces the instance, a caller sees that short window of errors. A caller whose calls are safe
to repeat (idempotent: a read, a put of the same value, a call with its own request id) can let
`retrying` hide the window instead:

    caller = retrying(endpoint, within=2.0)
    value = await caller.request("instance.3.kv", "get", "key", response=str)

Each call is retried on `NoRespondersError`, `BusyError` and a lost hub (`HubUnavailableError`),
with exponential back-off from 1 ms to 50 ms, until it succeeds or `within` seconds have passed
since it began; then the last error is raised (`DeadlineExceededError` if an attempt was still
running). Other errors (the service's own, `AccessDeniedError`) are raised at once: retrying would
not change them. A call that is not idempotent must not go through it: an attempt that failed
with the owner's death may have been carried out before the owner died.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import anyio

from multikernel.endpoints._contracts import Bus
from multikernel.endpoints._hublink import HubUnavailableError
from multikernel.protocol import BusyError, DeadlineExceededError, NoRespondersError

T = TypeVar("T")

#: What a retry may cure: nobody serves the name right now, it is saturated, the hub is away.
RETRYABLE = (NoRespondersError, BusyError, HubUnavailableError)


class Retrying:
    """A `Bus` caller that retries idempotent requests until `within` seconds have passed."""

    def __init__(
        self, bus: Bus, *, within: float, backoff: float = 0.001, backoff_max: float = 0.05
    ) -> None:
        if within <= 0:
            raise ValueError(f"within must be a positive number of seconds, not {within}")
        self.bus = bus
        self.within = within
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retries = 0  # attempts that failed and were tried again, over all calls

    @overload
    async def request(self, target: str, method: str, body: object = None) -> Any: ...

    @overload
    async def request(
        self, target: str, method: str, body: object = None, *, response: type[T]
    ) -> T: ...

    async def request(
        self, target: str, method: str, body: object = None, *, response: Any = Any
    ) -> Any:
        """`bus.request(...)`, retried while the error is one a retry may cure."""
        deadline = anyio.current_time() + self.within
        backoff = self.backoff
        while True:
            left = deadline - anyio.current_time()
            try:
                with anyio.fail_after(max(left, 0.0)):
                    return await self.bus.request(target, method, body, response=response)
            except RETRYABLE:
                if anyio.current_time() + backoff >= deadline:
                    raise
            except TimeoutError as exc:
                if isinstance(exc, DeadlineExceededError):
                    raise
                raise DeadlineExceededError(
                    f"{target}.{method}: no answer within {self.within:g} s (retried "
                    f"{self.retries} times in all)"
                ) from None
            self.retries += 1
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)


def retrying(bus: Bus, *, within: float) -> Retrying:
    """A caller on `bus` that retries idempotent calls for up to `within` seconds each."""
    return Retrying(bus, within=within)
