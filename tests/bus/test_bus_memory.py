"""The in-memory bus (`multikernel.bus.testing`) behaves as the real bus does."""

from __future__ import annotations

import gc
import inspect
import os
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.bus._policy import SUBSCRIBE_CACHE_LIMIT
from multikernel.bus.testing import MemoryBus, MemoryEndpoint
from multikernel.endpoints import Bus, Endpoint, Service, connect, current_caller
from multikernel.protocol import (
    AccessDeniedError,
    BusyError,
    InvalidSubjectError,
    MalformedFrameError,
    NameFlag,
    NameHoldEnded,
    NameOwnerChanged,
    NoRespondersError,
    NotFoundError,
    ProtocolError,
    RemoteError,
    RequestNameResult,
    TooLargeError,
)
from tests.conftest import ALL_BACKENDS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=ALL_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """The double promises what the client API does: asyncio, uvloop and trio."""
    return request.param  # type: ignore[no-any-return]


#: An ordinary (not root) uid: the built-in policy lets root on the host do everything.
USER = 1000


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


def serve_math(endpoint: Bus, name: str = "math", flags: int = 0) -> Service:
    svc = endpoint.service(name, flags=flags)

    @svc.method
    async def double(x: int) -> int:
        return 2 * x

    @svc.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @svc.method
    async def who(_: None) -> str:
        return endpoint.name

    @svc.method
    async def nap(seconds: float) -> None:
        await anyio.sleep(seconds)

    return svc


# -- publish / subscribe -------------------------------------------------------------------------


async def test_publications_reach_subscribers_whose_pattern_matches() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("pub") as pub,
        bus.connect("sub") as sub,
        await sub.subscribe("a.*") as one,
        await sub.subscribe("a.>") as rest,
        await sub.subscribe("b.*") as other,
    ):
        for subject in ("a.x", "a.x.y", "b.x", "c"):
            await pub.publish(subject, subject)
        assert (await one.receive()).subject == "a.x"
        assert [(await rest.receive()).subject for _ in range(2)] == ["a.x", "a.x.y"]
        assert (await other.receive()).value() == "b.x"
        assert [s.statistics().buffered for s in (one, rest, other)] == [0, 0, 0]


async def test_message_source_is_the_publishers_endpoint_id() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("pub") as pub,
        bus.connect("sub") as sub,
        await sub.subscribe("x") as subscription,
    ):
        await pub.publish("x", {"n": 1})
        message = await subscription.receive()
    assert (message.source, message.value()) == (pub.id, {"n": 1})


async def test_a_queue_group_gives_each_message_to_one_member() -> None:
    bus = MemoryBus()
    async with bus.connect("pub") as pub, bus.connect("workers") as workers:
        first = await workers.subscribe("jobs.*", queue_group="w")
        second = await workers.subscribe("jobs.>", queue_group="w")
        everything = await workers.subscribe("jobs.*")
        async with first, second, everything:
            for i in range(10):
                await pub.publish("jobs.run", i)
            counts = [s.statistics().buffered for s in (first, second, everything)]
    assert counts == [5, 5, 10]


async def test_an_unencodable_body_fails_in_the_publisher() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        with pytest.raises(ProtocolError, match="cannot encode a object body"):
            await endpoint.publish("x", object())


async def test_a_body_over_max_body_is_too_large() -> None:
    bus = MemoryBus(limits=Limits(max_body=16))
    async with bus.connect() as endpoint:
        with pytest.raises(TooLargeError):
            await endpoint.publish("x", b"y" * 100)


async def test_a_slow_subscriber_drops_beyond_max_pending_and_counts() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("pub") as pub,
        bus.connect("sub") as sub,
        await sub.subscribe("x", max_pending=3) as slow,
        await sub.subscribe("x") as fast,
    ):
        for i in range(5):
            await pub.publish("x", i)
        assert [(await slow.receive()).value() for _ in range(3)] == [0, 1, 2]
        assert (slow.statistics().dropped, fast.statistics().buffered) == (2, 5)


async def test_invalid_subjects_and_patterns_are_refused() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        with pytest.raises(InvalidSubjectError):
            await endpoint.publish("a.*")
        with pytest.raises(InvalidSubjectError):
            await endpoint.subscribe("a.>.b")
        with pytest.raises(InvalidSubjectError, match="queue group"):
            await endpoint.subscribe("a", queue_group="two.tokens")


async def test_name_owner_changes_are_published_on_mk_bus_names() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("watcher") as watcher,
        bus.connect("owner") as owner,
        await watcher.subscribe("mk.bus.names.>") as events,
    ):
        await serve_math(owner).start()
        message = await events.receive()
    assert message.subject == "mk.bus.names.math"
    assert message.decode(NameOwnerChanged) == NameOwnerChanged("math", 0, owner.id)


# -- access control ------------------------------------------------------------------------------


async def test_a_subscription_the_policy_denies_raises_with_the_decisions_reason() -> None:
    policy = Policy.from_toml('[[deny]]\nwho = "*"\nsubscribe = ["secret.>"]\n')
    bus = MemoryBus(policy)
    async with bus.connect(uid=USER) as endpoint:
        with pytest.raises(AccessDeniedError) as caught:
            await endpoint.subscribe("secret.>")
    reason = policy.may_subscribe(endpoint.identity, "secret.>").reason
    assert caught.value.message == f"subscribe to 'secret.>' refused: {reason}"
    assert bus.snapshot().counters["denied"] == 1


async def test_publications_reach_other_instances_only_where_the_policy_allows() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("pub", instance=1, uid=USER) as pub,
        bus.connect("near", instance=1, uid=USER) as near,
        bus.connect("far", instance=2, uid=USER) as far,
        await near.subscribe("data.>") as mine,
        await far.subscribe("data.>") as theirs,
    ):
        assert (mine.cross_instance, theirs.cross_instance) == (False, False)
        await pub.publish("data.x", 1)
        await pub.publish("data.x", 2)
        assert (mine.statistics().buffered, theirs.statistics().buffered) == (2, 0)
    assert pub.async_errors == 1  # reported once per subject, as the hub does


async def test_calls_across_instances_are_denied_by_default() -> None:
    bus = MemoryBus()
    async with bus.connect("host") as host, bus.connect("guest", instance=1, uid=USER) as guest:
        await serve_math(host).start()
        with pytest.raises(AccessDeniedError, match="calling 'math' refused: no rule in"):
            await guest.request("math", "double", 1)


async def test_owning_a_name_needs_the_policys_leave() -> None:
    bus = MemoryBus()
    async with bus.connect("guest", instance=1, uid=USER) as guest:
        with pytest.raises(AccessDeniedError, match="owning 'math' refused"):
            await serve_math(guest).start()
        result = await serve_math(guest, "instance.1.math").start()
    assert result == RequestNameResult.PRIMARY_OWNER


async def test_name_selectors_look_at_the_names_an_endpoint_owns_now() -> None:
    policy = Policy.from_toml(
        '[[rule]]\nwho = "*"\nown = ["boss"]\n\n[[rule]]\nwho = "name:boss"\ncall = ["math"]\n'
    )
    bus = MemoryBus(policy)
    async with bus.connect("host") as host, bus.connect("guest", instance=1, uid=USER) as guest:
        await serve_math(host).start()
        with pytest.raises(AccessDeniedError):
            await guest.request("math", "double", 1)
        boss = guest.service("boss")
        await boss.start()
        assert await guest.request("math", "double", 1) == 2


async def test_reloading_the_policy_withdraws_channels_it_no_longer_allows() -> None:
    bus = MemoryBus()
    async with bus.connect("host") as host, bus.connect("guest", uid=USER) as guest:
        await serve_math(host).start()
        assert await guest.request("math", "double", 2) == 4
        bus.reload_policy(Policy.from_toml('[defaults]\nsame_instance = "deny"\n'))
        assert bus.snapshot().channels == ()
        with pytest.raises(AccessDeniedError):
            await guest.request("math", "double", 2)


# -- requests ------------------------------------------------------------------------------------


async def test_a_request_to_a_name_nobody_owns_fails_at_once() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        with pytest.raises(NoRespondersError, match="nobody owns 'math'"):
            await endpoint.request("math", "double", 1)
        await serve_math(endpoint).start()
        with pytest.raises(NoRespondersError, match="has no method 'triple'"):
            await endpoint.request("math", "triple", 1)


async def test_typed_requests_and_responses_go_through_msgspec() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        svc = endpoint.service("geo")

        @svc.method
        async def mirror(p: Point) -> Point:
            return Point(p.y, p.x)

        await svc.start()
        assert await endpoint.request("geo", "mirror", {"x": 1, "y": 2}, response=Point) == Point(
            2, 1
        )
        with pytest.raises(MalformedFrameError) as caught:
            await endpoint.request("geo", "mirror", "not a point")
        assert caught.value.is_remote  # the service could not decode it
        with pytest.raises(MalformedFrameError):
            await endpoint.request("geo", "mirror", Point(1, 2), response=int)


async def test_a_streaming_method_delivers_many_replies() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        await serve_math(endpoint).start()
        replies = [i async for i in endpoint.request_stream("math", "count", 100, response=int)]
    assert replies == list(range(100))


async def test_a_handlers_exception_arrives_as_the_same_class() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        svc = endpoint.service("fails")

        @svc.method
        async def busy(_: None) -> None:
            raise BusyError("come back later")

        @svc.method
        async def broken(_: None) -> None:
            raise ValueError("bad value")

        @svc.method
        async def unencodable(_: None) -> object:
            return object()

        await svc.start()
        with pytest.raises(BusyError, match="come back later") as busy_error:
            await endpoint.request("fails", "busy")
        with pytest.raises(RemoteError, match="bad value") as remote:
            await endpoint.request("fails", "broken")
        with pytest.raises(ProtocolError, match="cannot encode"):
            await endpoint.request("fails", "unencodable")
    assert busy_error.value.is_remote
    assert remote.value.remote_type == "ValueError"


async def test_current_caller_is_the_caller_as_the_bus_bound_it() -> None:
    bus = MemoryBus()
    async with bus.connect("server") as server, bus.connect("client", uid=USER, pid=7) as client:
        svc = server.service("whoami")

        @svc.method
        async def whoami(_: None) -> list[object]:
            peer = current_caller()
            return [peer.endpoint_id, peer.name, peer.instance, peer.uid, peer.pid]

        await svc.start()
        assert await client.request("whoami", "whoami") == [client.id, "client", 0, USER, 7]


async def test_the_callers_deadline_is_the_handlers() -> None:
    bus = MemoryBus()
    async with bus.connect() as endpoint:
        svc = endpoint.service("clock")

        @svc.method
        async def left(_: None) -> float:
            return anyio.current_effective_deadline() - anyio.current_time()

        await svc.start()
        with anyio.fail_after(5):
            assert 4 < await endpoint.request("clock", "left", response=float) <= 5
        assert await endpoint.request("clock", "left", response=float) == float("inf")


async def test_a_handler_past_the_callers_deadline_is_cancelled() -> None:
    bus = MemoryBus()
    cancelled = anyio.Event()
    async with bus.connect() as endpoint:
        svc = endpoint.service("slow")

        @svc.method
        async def forever(_: None) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        await svc.start()
        with pytest.raises(TimeoutError), anyio.fail_after(0.05):  # or DeadlineExceededError
            await endpoint.request("slow", "forever")
        with anyio.fail_after(5):
            await cancelled.wait()
        assert endpoint.statistics()["services"]["slow"]["failed"] == 1


async def test_a_service_runs_at_most_concurrency_requests_at_once() -> None:
    bus = MemoryBus()
    running, peak = 0, 0
    saturated, release = anyio.Event(), anyio.Event()
    async with bus.connect() as endpoint:
        svc = endpoint.service("narrow", concurrency=2)

        @svc.method
        async def work(_: None) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == 2:
                saturated.set()
            await release.wait()
            running -= 1

        await svc.start()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(endpoint.request, "narrow", "work")
                await saturated.wait()
                await anyio.wait_all_tasks_blocked()
                assert (running, svc.in_flight) == (2, 5)
                release.set()
    assert peak == 2


async def test_a_caller_whose_service_goes_away_gets_no_responders() -> None:
    bus = MemoryBus()
    ready, called = anyio.Event(), anyio.Event()

    async def serve() -> None:
        async with bus.connect("server") as server:
            svc = server.service("doomed")

            @svc.method
            async def hang(_: None) -> None:
                called.set()
                await anyio.sleep_forever()

            await svc.start()
            ready.set()
            await called.wait()

    async with bus.connect("client") as client, anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await ready.wait()
        with anyio.fail_after(5), pytest.raises(NoRespondersError, match="went away"):
            await client.request("doomed", "hang")


# -- names ---------------------------------------------------------------------------------------


async def test_the_next_in_line_serves_once_the_owner_releases_the_name() -> None:
    bus = MemoryBus()
    async with bus.connect("first") as first, bus.connect("second") as second:
        owner, waiter = serve_math(first), serve_math(second)
        assert await owner.start() == RequestNameResult.PRIMARY_OWNER
        assert await waiter.start() == RequestNameResult.IN_QUEUE
        assert await first.request("math", "who") == "first"
        await owner.drain()
        assert await first.request("math", "who") == "second"
        assert (owner.primary, waiter.primary) == (False, True)
        assert bus.snapshot().names == {"math": (second.id,)}


async def test_the_next_in_line_serves_once_the_owner_goes_away() -> None:
    bus = MemoryBus()
    async with bus.connect("client") as client, bus.connect("second") as second:
        async with bus.connect("first") as first:
            await serve_math(first).start()
            await serve_math(second).start()
            assert await client.request("math", "who") == "first"
        assert await client.request("math", "who") == "second"


async def test_an_owner_that_allows_replacement_is_replaced_and_queues() -> None:
    bus = MemoryBus()
    async with bus.connect("first") as first, bus.connect("second") as second:
        yielding = serve_math(first, flags=NameFlag.ALLOW_REPLACEMENT)
        taking = serve_math(second, flags=NameFlag.REPLACE_EXISTING)
        await yielding.start()
        assert await first.request("math", "who") == "first"
        assert await taking.start() == RequestNameResult.PRIMARY_OWNER
        assert bus.snapshot().names["math"] == (second.id, first.id)
        assert await first.request("math", "who") == "second"
        assert (yielding.primary, taking.primary) == (False, True)


# -- introspection and the API -------------------------------------------------------------------


async def test_the_snapshot_shows_endpoints_names_services_and_subscriptions() -> None:
    bus = MemoryBus()
    async with bus.connect("server") as server, bus.connect("client", uid=USER) as client:
        await serve_math(server).start()
        async with await client.subscribe("jobs.*", queue_group="w"):
            await client.request("math", "double", 1)
            snapshot = await client.introspect()
    by_name = {e.name: e for e in snapshot.endpoints}
    assert (by_name["server"].names, by_name["client"].uid) == (("math",), USER)
    assert [(s.pattern, s.queue_group) for s in snapshot.subscriptions] == [("jobs.*", "w")]
    assert [m.name for m in snapshot.services[0].methods] == ["double", "count", "who", "nap"]
    assert [(c.target, c.client, c.server) for c in snapshot.channels] == [
        ("math", client.id, server.id)
    ]
    assert snapshot.counters["sessions"] == 2


async def test_draining_the_bus_asks_every_endpoint_to_drain() -> None:
    bus = MemoryBus()
    serving = anyio.Event()

    async def plugin() -> None:
        async with bus.connect("plugin") as endpoint:
            await serve_math(endpoint).start()
            serving.set()
            await endpoint.drain_requested.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(plugin)
        await serving.wait()
        with anyio.fail_after(5):
            await bus.drain()
    assert bus.snapshot().endpoints == ()
    with pytest.raises(ConnectionRefusedError):
        async with bus.connect():
            pass


async def test_a_memory_endpoint_has_the_methods_of_an_endpoint() -> None:
    def api(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    real, memory = api(Endpoint), api(MemoryEndpoint)
    # Nothing to watch in memory, and no process to hand a bus socket to.
    assert set(real) - set(memory) == {"monitor", "attachment"}
    assert {name: memory[name] for name in real if name in memory} == {
        name: sig for name, sig in real.items() if name in memory
    }


# -- parity with the real bus --------------------------------------------------------------------

PARITY_POLICY = """
[[rule]]
who = "*"
own = ["par.>"]

[[deny]]
who = "*"
subscribe = ["secret.>"]
"""

Connect = Callable[[str], AbstractAsyncContextManager[Any]]


async def scenario(connect: Connect) -> list[object]:
    """The same steps on either bus; returns what an application could observe."""
    seen: list[object] = []

    async def attempt(call: Awaitable[object]) -> None:
        try:
            seen.append(await call)
        except Exception as exc:
            seen.append((type(exc).__name__, str(exc)))

    async with connect("first") as first, connect("second") as second, connect("client") as client:
        one, two = serve_math(first, "par.math"), serve_math(second, "par.math")
        seen += [await one.start(), await two.start()]
        await attempt(client.request("par.math", "double", 21, response=int))
        seen.append([i async for i in client.request_stream("par.math", "count", 3)])
        await attempt(client.request("par.math", "double", "x"))
        await attempt(client.request("par.math", "triple", 1))
        await attempt(client.request("par.nobody", "x"))
        await attempt(client.publish("par.x", object()))
        await attempt(client.publish("par.*"))
        await attempt(client.subscribe("secret.>"))
        with anyio.fail_after(5):
            async with (
                await client.subscribe("par.*") as plain,
                await client.subscribe("par.>", queue_group="g") as group,
                await client.subscribe("mk.bus.names.par.math") as names,
            ):
                for subject in ("par.a", "par.b.c", "other", "par.d"):
                    await first.publish(subject, subject)
                seen.append([(await plain.receive()).subject for _ in range(2)])
                seen.append([(await group.receive()).subject for _ in range(3)])
                seen.append(await client.request("par.math", "who"))
                await one.drain()
                change = (await names.receive()).decode(NameOwnerChanged)
                seen.append((change.old_owner == first.id, change.new_owner == second.id))
                seen.append(await client.request("par.math", "who"))
        try:
            with anyio.fail_after(0.05):
                await client.request("par.math", "nap", 10)
        except TimeoutError:
            seen.append("timed out")
    return seen


async def test_the_memory_bus_and_the_real_bus_agree() -> None:
    policy = Policy.from_toml(PARITY_POLICY)
    bus = MemoryBus(policy)
    in_memory = await scenario(lambda name: bus.connect(name, uid=os.getuid()))
    with tempfile.TemporaryDirectory(prefix="mk-") as tmp:
        path = Path(tmp) / "bus.sock"
        async with anyio.create_task_group() as tg:
            await tg.start(Hub(path, policy=policy).serve)
            on_the_bus = await scenario(lambda name: connect(path, name=name, reconnect=False))
            tg.cancel_scope.cancel()
    assert in_memory == on_the_bus


async def serve_whoami(endpoint: MemoryEndpoint) -> None:
    service = endpoint.service("svc")

    @service.method
    async def whoami(_: None) -> int:
        return endpoint.id

    await service.start()


async def test_the_memory_bus_holds_and_switches_names_as_the_hub_does() -> None:
    bus = MemoryBus()
    async with (
        bus.connect("old") as old,
        bus.connect("new") as new,
        bus.connect("upgrade") as actor,
        bus.connect("caller") as caller,
        await caller.subscribe("mk.bus.holds.svc") as holds,
    ):
        await serve_whoami(old)
        await serve_whoami(new)
        assert await caller.request("svc", "whoami") == old.id
        await actor.hold_names(["svc"], hold_for=30)
        await holds.receive()  # NameHeld
        answers: list[int] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                answers.append(await caller.request("svc", "whoami"))

            tg.start_soon(call)
            with anyio.fail_after(5):
                while bus.counters["held"] < 1:
                    await anyio.lowlevel.checkpoint()
            with pytest.raises(NotFoundError, match="nothing moved"):
                await actor.switch_names({"svc": 10_000})
            await actor.switch_names({"svc": new.id})
        assert answers == [new.id]
        assert (await holds.receive()).decode(NameHoldEnded) == NameHoldEnded("svc", "switched")
        assert (await caller.introspect()).names == {"svc": (new.id, old.id)}


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes held, leaving out the event loops' own (each unsubscribe's bounded wait leaves a
    timer in the loop until its deadline passes)."""
    loops = [tracemalloc.Filter(False, f"*/{name}/*") for name in ("asyncio", "anyio", "trio")]
    return sum(stat.size for stat in snapshot.filter_traces(loops).statistics("filename"))


async def test_ten_thousand_subscriptions_cost_under_a_kilobyte_each_and_come_back() -> None:
    """Bus and client side together (the double runs both in this process): each idle
    subscription is small, and unsubscribing all of them gives the memory back, but for the
    policy's bounded cache of subscribe decisions."""
    count = 10_000
    bus = MemoryBus(limits=Limits(max_subscriptions=count))
    patterns = [f"app.s{n}.state" for n in range(count)]
    async with bus.connect("many") as endpoint:
        await (await endpoint.subscribe("warm.up")).aclose()
        gc.collect()
        tracemalloc.start()
        try:
            before = _ours(tracemalloc.take_snapshot())
            subscriptions = [await endpoint.subscribe(p) for p in patterns]
            gc.collect()
            held = _ours(tracemalloc.take_snapshot()) - before
            for subscription in subscriptions:
                await subscription.aclose()
            del subscriptions
            gc.collect()
            kept = _ours(tracemalloc.take_snapshot()) - before
        finally:
            tracemalloc.stop()
    assert held / count < 1024, f"{held / count:.0f} bytes per subscription"
    assert kept < SUBSCRIBE_CACHE_LIMIT * 320, f"{kept} bytes kept after unsubscribing all"
