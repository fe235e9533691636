"""Holding names during a switch: new calls wait, names move together, none is lost or doubled.

Every endpoint runs in this process beside a real hub: the old and new owners of a service count
the calls they answer, so a test can add them up against the calls made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.endpoints import Endpoint, Message, Subscription, connect
from multikernel.protocol import (
    BusyError,
    NameHeld,
    NameHoldEnded,
    NotFoundError,
    RequestNameResult,
)

pytestmark = pytest.mark.anyio
WORKERS = 4  # callers in the steady stream, each one call at a time


async def serve(endpoint: Endpoint, counts: Counter[int], *names: str) -> list[RequestNameResult]:
    """Serve `whoami` under each name, counting the calls this endpoint answers."""
    results = []
    for name in names:
        service = endpoint.service(name)

        @service.method
        async def whoami(_: None) -> int:
            counts[endpoint.id] += 1
            return endpoint.id

        results.append(await service.start())
    return results


async def next_event(sub: Subscription) -> object:
    """The next hold event published on mk.bus.holds.<name>."""
    with anyio.fail_after(20):
        message: Message = await sub.receive()
    return message.decode(NameHeld | NameHoldEnded)


async def wait_for_held(hub: Hub, asker: Endpoint, count: int) -> None:
    """Until `count` ChannelOpens have waited for a hold at the hub (each look a round trip)."""
    with anyio.fail_after(20):
        while hub.counters["held"] < count:
            await asker.introspect()


@asynccontextmanager
async def serving(socket_path: Path, limits: Limits | None = None) -> AsyncIterator[Hub]:
    hub = Hub(socket_path, policy=Policy.default(), limits=limits)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()


async def test_a_stream_of_calls_survives_a_hold_and_switch_each_answered_once(
    hub: Hub, socket_path: Path
) -> None:
    counts: Counter[int] = Counter()
    answers: dict[int, int] = {}  # call number -> who answered it
    pending: set[int] = set()
    numbers = iter(range(1_000_000))
    switched = anyio.Event()
    after_switch = 0
    async with (
        connect(socket_path, name="old") as old,
        connect(socket_path, name="new") as new,
        connect(socket_path, name="upgrade") as actor,
        connect(socket_path, name="caller") as caller,
        connect(socket_path, name="late") as late,
        await caller.subscribe("mk.bus.holds.svc") as holds,
    ):
        assert await serve(old, counts, "svc") == [RequestNameResult.PRIMARY_OWNER]
        assert await serve(new, counts, "svc") == [RequestNameResult.IN_QUEUE]

        async def call(endpoint: Endpoint) -> None:
            nonlocal after_switch
            number = next(numbers)
            pending.add(number)
            answers[number] = await endpoint.request("svc", "whoami", None)
            pending.remove(number)
            after_switch += switched.is_set()

        async def stream() -> None:
            while after_switch < 50:
                await call(caller)

        async with anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(stream)
            with anyio.fail_after(20):
                while len(answers) < 50:  # the stream flows to the old owner
                    await anyio.lowlevel.checkpoint()
            await actor.hold_names(["svc"], hold_for=30)
            assert await next_event(holds) == NameHeld("svc", hub_deadline(hub, "svc"), actor.id)
            tg.start_soon(call, late)  # no channel yet: its ChannelOpen waits at the hub
            await wait_for_held(hub, actor, 1)
            with anyio.fail_after(20):  # every worker's next call waits in the caller
                while caller.statistics()["held"] != {"svc": WORKERS}:
                    await actor.introspect()
            held = set(pending)  # the calls made during the hold, none of them answered
            assert len(held) == WORKERS + 1
            assert not held & answers.keys()
            await actor.switch_names({"svc": new.id})
            switched.set()
            assert await next_event(holds) == NameHoldEnded("svc", "switched")
        assert not pending
        assert sum(counts.values()) == len(answers)  # every call answered once, by one server
        assert {answers[number] for number in held} == {new.id}
        assert counts[old.id] >= 50
        assert counts[new.id] >= WORKERS + 1
        snapshot = await actor.introspect()
        assert snapshot.names == {"svc": (new.id, old.id)}  # the old one waits behind it
        assert snapshot.counters["held"] == 1
        assert caller.statistics()["held"] == {}


def hub_deadline(hub: Hub, name: str) -> int:
    return hub._holds.held[name].deadline_ns


async def test_names_switch_together_or_not_at_all(hub: Hub, socket_path: Path) -> None:
    counts: Counter[int] = Counter()
    async with (
        connect(socket_path, name="old") as old,
        connect(socket_path, name="new") as new,
        connect(socket_path, name="upgrade") as actor,
        connect(socket_path, name="caller") as caller,
    ):
        await serve(old, counts, "alpha", "beta")
        await serve(new, counts, "alpha", "beta")
        async with connect(socket_path, name="gone") as gone:
            gone_id = gone.id
        await actor.hold_names(["alpha", "beta"], hold_for=30)
        with pytest.raises(NotFoundError, match="nothing moved"):
            await actor.switch_names({"alpha": new.id, "beta": gone_id})
        assert (await actor.introspect()).names == {
            "alpha": (old.id, new.id),
            "beta": (old.id, new.id),
        }
        await actor.switch_names({"alpha": new.id, "beta": new.id})
        assert (await actor.introspect()).names == {
            "alpha": (new.id, old.id),
            "beta": (new.id, old.id),
        }
        assert await caller.request("alpha", "whoami", None) == new.id
        assert await caller.request("beta", "whoami", None) == new.id


async def test_a_hold_that_reaches_its_deadline_leaves_the_old_owner_serving(
    hub: Hub, socket_path: Path
) -> None:
    counts: Counter[int] = Counter()
    async with (
        connect(socket_path, name="old") as old,
        connect(socket_path, name="new") as new,
        connect(socket_path, name="upgrade") as actor,
        connect(socket_path, name="caller") as caller,
        await caller.subscribe("mk.bus.holds.svc") as holds,
    ):
        await serve(old, counts, "svc")
        await serve(new, counts, "svc")
        assert await caller.request("svc", "whoami", None) == old.id  # a channel to the owner
        await actor.hold_names(["svc"], hold_for=3)
        assert isinstance(await next_event(holds), NameHeld)
        answers: list[int] = []
        async with anyio.create_task_group() as tg:
            for endpoint in (caller, actor):  # one with a channel, one whose ChannelOpen waits

                async def call(endpoint: Endpoint = endpoint) -> None:
                    answers.append(await endpoint.request("svc", "whoami", None))

                tg.start_soon(call)
            await wait_for_held(hub, actor, 1)
            assert await next_event(holds) == NameHoldEnded("svc", "deadline")
        assert answers == [old.id, old.id]
        assert counts == {old.id: 3}
        assert (await actor.introspect()).names == {"svc": (old.id, new.id)}


async def test_channel_opens_beyond_the_held_queue_get_busy(socket_path: Path) -> None:
    counts: Counter[int] = Counter()
    async with (
        serving(socket_path, Limits(max_held_requests=1)) as hub,
        connect(socket_path, name="old") as old,
        connect(socket_path, name="upgrade") as actor,
        connect(socket_path, name="first") as first,
        connect(socket_path, name="second") as second,
    ):
        await serve(old, counts, "svc")
        await actor.hold_names(["svc"], hold_for=30)
        answers: list[int] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                answers.append(await first.request("svc", "whoami", None))

            tg.start_soon(call)
            await wait_for_held(hub, actor, 1)
            with pytest.raises(BusyError, match="max_held_requests"):
                await second.request("svc", "whoami", None)
            await actor.release_names(["svc"])  # a rollback: the owner keeps the name
        assert answers == [old.id]
        assert await second.request("svc", "whoami", None) == old.id
        assert counts == {old.id: 2}


async def test_a_hold_ends_when_its_holder_goes_away(hub: Hub, socket_path: Path) -> None:
    counts: Counter[int] = Counter()
    async with (
        connect(socket_path, name="old") as old,
        connect(socket_path, name="caller") as caller,
        await caller.subscribe("mk.bus.holds.svc") as holds,
    ):
        await serve(old, counts, "svc")
        async with connect(socket_path, name="upgrade") as actor:
            await actor.hold_names(["svc"], hold_for=30)
            assert isinstance(await next_event(holds), NameHeld)
        assert await next_event(holds) == NameHoldEnded("svc", "holder left")
        assert await caller.request("svc", "whoami", None) == old.id
