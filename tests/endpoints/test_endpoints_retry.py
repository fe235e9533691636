"""`retrying`: idempotent calls retried across a replacement, within a deadline, nothing else."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from multikernel.endpoints import HubUnavailableError, retrying
from multikernel.protocol import (
    AccessDeniedError,
    BusyError,
    DeadlineExceededError,
    NoRespondersError,
    RemoteError,
)

pytestmark = pytest.mark.anyio


class FlakyBus:
    """Answers with `failures` (one per call, in order) before it answers `value`."""

    def __init__(self, failures: list[BaseException | None], value: Any = "ok") -> None:
        self.failures = list(failures)
        self.value = value
        self.calls = 0

    async def request(
        self, target: str, method: str, body: object = None, *, response: Any = Any
    ) -> Any:
        self.calls += 1
        if self.failures:
            failure = self.failures.pop(0)
            if failure is None:
                await anyio.sleep_forever()  # an attempt that never answers
            raise failure
        return self.value


@pytest.mark.parametrize(
    "error",
    [NoRespondersError("gone"), BusyError("full"), HubUnavailableError("restarting")],
    ids=lambda e: type(e).__name__,
)
async def test_what_a_retry_may_cure_is_retried_until_it_answers(error: Exception) -> None:
    bus = FlakyBus([error, error, error])
    assert await retrying(bus, within=30).request("kv", "get") == "ok"  # type: ignore[arg-type]
    assert bus.calls == 4


@pytest.mark.parametrize(
    "error",
    [AccessDeniedError("no"), RemoteError("the method failed"), ValueError("bug")],
    ids=lambda e: type(e).__name__,
)
async def test_other_errors_are_raised_at_once(error: Exception) -> None:
    bus = FlakyBus([error])
    with pytest.raises(type(error)):
        await retrying(bus, within=30).request("kv", "get")  # type: ignore[arg-type]
    assert bus.calls == 1


async def test_past_the_deadline_the_last_error_is_raised() -> None:
    bus = FlakyBus([NoRespondersError("gone")] * 10_000)
    with pytest.raises(NoRespondersError):
        await retrying(bus, within=0.05).request("kv", "get")  # type: ignore[arg-type]
    assert 1 < bus.calls < 10_000


async def test_an_attempt_that_never_answers_ends_at_the_deadline() -> None:
    bus = FlakyBus([None])
    with pytest.raises(DeadlineExceededError, match=r"no answer within 0\.05 s"):
        await retrying(bus, within=0.05).request("kv", "get")  # type: ignore[arg-type]


async def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        retrying(FlakyBus([]), within=0)  # type: ignore[arg-type]
