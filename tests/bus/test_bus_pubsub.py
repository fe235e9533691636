"""Publications through the hub: wildcards, queue groups, identity, slow consumers."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub
from multikernel.endpoints import connect
from multikernel.protocol import Feature, InvalidSubjectError, Kind, encode

from .conftest import spawn

pytestmark = pytest.mark.anyio


async def test_wildcards_select_subjects_across_processes(hub: Hub, socket_path: Path) -> None:
    with (
        spawn("subscribe", socket_path, "mk.instance.*.state") as one,
        spawn("subscribe", socket_path, "mk.>") as rest,
    ):
        await one.expect("ready")
        await rest.expect("ready")
        async with connect(socket_path) as ep:
            await ep.publish("mk.instance.3.state", "active")
            await ep.publish("mk.instance.3.cpu.added", 4)
            await ep.publish("other.thing", 0)  # matches neither
            await ep.publish("mk.instance.4.state", "loaded")
        assert [(await one.expect("message"))["value"] for _ in range(2)] == ["active", "loaded"]
        got = [(await rest.expect("message"))["subject"] for _ in range(3)]
        assert got == ["mk.instance.3.state", "mk.instance.3.cpu.added", "mk.instance.4.state"]


async def test_queue_group_delivers_each_message_to_exactly_one_member(
    hub: Hub, socket_path: Path
) -> None:
    with (
        spawn("subscribe", socket_path, "jobs.>", "workers") as a,
        spawn("subscribe", socket_path, "jobs.>", "workers") as b,
    ):
        await a.expect("ready")
        await b.expect("ready")
        async with connect(socket_path) as ep:
            for i in range(100):
                await ep.publish("jobs.build", i)
            await ep.publish("jobs.stop", -1)
            await ep.publish("jobs.stop", -1)
        shares: list[list[int]] = []
        for member in (a, b):
            shares.append([])
            while (value := (await member.expect("message"))["value"]) != -1:
                shares[-1].append(value)
        assert sorted(shares[0] + shares[1]) == list(range(100))  # none lost, none twice
        assert [len(share) for share in shares] == [50, 50]  # the group takes turns


async def test_the_hub_stamps_the_publisher_so_a_forged_source_changes_nothing(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path) as victim, connect(socket_path) as forger:
        async with await victim.subscribe("audit.>") as sub:
            frame = encode(Kind.PUBLISH, "i am the victim", subject="audit.log", source=victim.id)
            await forger._link.to_hub(frame)
            message = await sub.receive()
        assert message.source == forger.id != victim.id


async def test_invalid_subject_is_refused_before_anything_is_sent(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path) as ep:
        with pytest.raises(InvalidSubjectError):
            await ep.publish("bad..subject", 1)
        with pytest.raises(InvalidSubjectError):
            await ep.subscribe("a.>.b")


async def test_slow_subscriber_loses_only_its_own_messages(socket_path: Path) -> None:
    from multikernel.bus import Limits, Policy

    hub = Hub(
        socket_path,
        policy=Policy.default(),
        limits=Limits(max_pending=8, session_capacity=4096, max_body=512, slow_consumer="drop"),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with (
            connect(socket_path, name="slow") as slow,
            connect(socket_path, name="fast") as fast,
            connect(socket_path, name="pub") as pub,
        ):
            slow_sub = await slow.subscribe("flood", max_pending=4, patience=0)  # drop at once
            async with await fast.subscribe("flood", max_pending=100_000) as fast_sub:
                for i in range(2000):
                    await pub.publish("flood", i)
                await pub.publish("flood", "end")
                got = []
                while (value := (await fast_sub.receive()).value()) != "end":
                    got.append(value)
            assert got == list(range(2000))  # the fast one lost nothing
            snapshot = await pub.introspect()
            slow_info = next(e for e in snapshot.endpoints if e.name == "slow")
            # Every publication is accounted for: buffered (4), or dropped by the hub or by the
            # endpoint's subscription buffer; the hub's own drops are tested in tests/security.
            stats = slow_sub.statistics()
            assert stats.dropped > 0
            assert stats.buffered == 4
            assert stats.buffered + stats.dropped + slow_info.dropped == 2001
            assert snapshot.counters["dropped"] == slow_info.dropped
            await slow_sub.aclose()
        tg.cancel_scope.cancel()


async def test_unsubscribe_stops_delivery(hub: Hub, socket_path: Path) -> None:
    async with connect(socket_path) as ep:
        sub = await ep.subscribe("x.y")
        await ep.publish("x.y", 1)
        assert (await sub.receive()).value() == 1
        await sub.aclose()
        assert not (await ep.introspect()).subscriptions


async def test_trio_client_publishes_and_subscribes(hub: Hub, socket_path: Path) -> None:
    """The client API is anyio-based: a trio application uses it unchanged.

    The hub keeps running in this test's (uvloop) event loop; the client runs trio in a thread.
    """

    async def client() -> list[object]:
        with anyio.fail_after(20):
            async with connect(socket_path) as ep, await ep.subscribe("t.*") as sub:
                await ep.publish("t.one", 1)
                await ep.publish("t.two", [2])
                return [(await sub.receive()).value() for _ in range(2)]

    def run_trio() -> list[object]:
        return anyio.run(client, backend="trio")

    assert await anyio.to_thread.run_sync(run_trio) == [1, [2]]


async def test_bodies_over_the_hubs_limit_are_refused_before_sending(
    hub: Hub, socket_path: Path
) -> None:
    from multikernel.protocol import TooLargeError

    async with connect(socket_path) as ep:
        assert ep.max_body == hub.limits.max_body  # learned at attach
        with pytest.raises(TooLargeError, match="over the limit"):
            await ep.publish("big.thing", b"x" * (hub.limits.max_body + 1))
        async with await ep.subscribe("big.thing") as sub:
            await ep.publish("big.thing", b"x" * (hub.limits.max_body - 64))  # just fits
            assert len((await sub.receive()).value()) == hub.limits.max_body - 64


@pytest.mark.parametrize("batched", [True, False], ids=["SubscribeMany", "one by one"])
async def test_subscribe_many_delivers_as_subscribe_does(
    hub: Hub, socket_path: Path, batched: bool
) -> None:
    """With the hub's SUBSCRIBE_MANY feature in few frames, without it (an older hub) one
    Subscribe each: the same subscriptions either way."""
    async with connect(socket_path) as ep:
        if not batched:
            ep._link.features &= ~Feature.SUBSCRIBE_MANY
        subs = await ep.subscribe_many([f"many.{n}" for n in range(1500)] + ["many.*"])
        assert [s.pattern for s in subs[:2]] == ["many.0", "many.1"]
        await ep.publish("many.1499", "last")
        assert (await subs[1499].receive()).value() == "last"
        assert (await subs[-1].receive()).subject == "many.1499"
        assert len((await ep.introspect()).subscriptions) == 1501
        await ep.unsubscribe_many(subs[:1000])
        await subs[1000].aclose()
        assert len((await ep.introspect()).subscriptions) == 500
