"""Loss is a decision: a publisher faster than its subscribers is held (`block`, the default),
and a subscriber that fell behind anyway is told how much it missed (`Message.missed`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import anyio
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.bus._hub_sessions import Sessions
from multikernel.bus._session import Session
from multikernel.endpoints import Message, Subscription, connect
from multikernel.endpoints._endpoint import Endpoint

pytestmark = pytest.mark.anyio
BODY = 8 << 10  # big enough that a few hundred fill a session ring
COUNT = 1500


@asynccontextmanager
async def serving(
    socket_path: Path, policy: Literal["block", "drop", "disconnect"] = "block", patience: float = 2
) -> AsyncIterator[Hub]:
    limits = Limits(max_pending=32, slow_consumer=policy, block_patience=patience)
    hub = Hub(socket_path, policy=Policy.default(), limits=limits)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()


async def publish_all(pub: Endpoint, count: int = COUNT, subject: str = "flow") -> None:
    for i in range(count):
        await pub.publish(subject, [i, bytes(BODY)])


async def received(sub: Subscription, until: int) -> list[Message]:
    """Messages until the one numbered `until` (the last a test publishes)."""
    got = []
    with anyio.fail_after(60):
        while True:
            message = await sub.receive()
            got.append(message)
            if message.value()[0] == until:
                return got


async def test_a_fast_publisher_is_held_and_nothing_is_lost(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = anyio.Event()
    wait_for = Sessions._wait_for

    async def watched(self: Sessions, publisher: Session, congested: list[Session]) -> None:
        held.set()  # the hub holds the publisher: the subscriber has fallen behind
        await wait_for(self, publisher, congested)

    monkeypatch.setattr(Sessions, "_wait_for", watched)
    async with (
        serving(socket_path, patience=60) as hub,
        connect(socket_path, name="sub") as subscriber,
        connect(socket_path, name="pub") as pub,
        await subscriber.subscribe("flow", max_pending=16, patience=60) as sub,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(publish_all, pub)
        with anyio.fail_after(60):
            await held.wait()  # the subscriber has read nothing yet: its queues are full
        got = await received(sub, COUNT - 1)
        assert [m.value()[0] for m in got] == list(range(COUNT))  # all of them, in order
        assert {m.missed for m in got} == {0}
        assert sub.statistics().dropped == 0
        assert hub.snapshot().counters["dropped"] == 0
        assert hub.snapshot().counters["stalled"] == 0


@pytest.mark.parametrize(
    ("policy", "hub_patience", "patience"),
    [("block", 0.2, 60.0), ("block", 60.0, 0.2), ("drop", 0.0, 0.0)],
    ids=["the-hub-stops-waiting", "the-endpoint-stops-waiting", "drop"],
)
async def test_a_subscriber_that_falls_behind_is_told_exactly_what_it_missed(
    socket_path: Path, policy: Literal["block", "drop"], hub_patience: float, patience: float
) -> None:
    async with (
        serving(socket_path, policy, hub_patience) as hub,
        connect(socket_path, name="sub") as subscriber,
        connect(socket_path, name="pub") as pub,
        await subscriber.subscribe("flow", max_pending=16, patience=patience) as sub,
    ):
        with anyio.fail_after(60):
            await publish_all(pub)  # finishes: a stuck subscriber holds it up for `patience` only
        seen = []
        while sub.statistics().buffered:
            seen.append(await sub.receive())
        await pub.publish("flow", [COUNT, b""])  # after the backlog: it carries the last gap
        seen += await received(sub, COUNT)
    numbers = [m.value()[0] for m in seen]
    assert numbers == sorted(numbers)  # order kept across the gaps
    previous = -1
    for message, number in zip(seen, numbers, strict=True):
        assert message.missed == number - previous - 1, (number, previous)  # the exact gap
        previous = number
    assert sum(m.missed for m in seen) > 0  # it did fall behind
    assert len(seen) + sum(m.missed for m in seen) == COUNT + 1
    stats = sub.statistics()
    assert stats.missed == sum(m.missed for m in seen)
    dropped_at_hub = hub.snapshot().counters["dropped"]
    assert stats.dropped + dropped_at_hub == stats.missed  # every drop is told, none twice
    if hub_patience < patience:  # the hub gave up first: it dropped, and logged the stall
        assert hub.snapshot().counters["stalled"] >= 1
        assert dropped_at_hub > 0
    else:  # the endpoint gave up first (or the policy drops): the hub never had to
        assert stats.dropped > 0


async def test_the_in_memory_bus_holds_a_publisher_the_same_way() -> None:
    from multikernel.bus.testing import MemoryBus

    bus = MemoryBus()
    async with bus.connect("sub") as subscriber, bus.connect("pub") as pub:
        async with (
            await subscriber.subscribe("flow", max_pending=4, patience=60) as sub,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(publish_all, pub, 100)
            got = await received(sub, 99)
        assert [m.value()[0] for m in got] == list(range(100))
        assert sub.statistics().dropped == 0
        async with await subscriber.subscribe("gap", max_pending=4, patience=0) as sub:
            await publish_all(pub, 10, "gap")  # nobody reads: 6 dropped, told with the next
            seen = [await sub.receive() for _ in range(4)]
            await pub.publish("gap", [10, b""])
            seen.append(await sub.receive())
        assert [(m.value()[0], m.missed) for m in seen] == [(0, 0), (1, 0), (2, 0), (3, 0), (10, 6)]
