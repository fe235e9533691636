"""The public client API against the real hub, under asyncio, uvloop and trio.

The hub is the real `Hub`, serving its socket from a task in the test's own event loop (so it
runs under each backend too) or, to be restarted, as `python -m multikernel.bus`; a service in
another process is tests/bus/peer.py under uvloop. Each test is one promise of docs/bus.md that
an application written against anyio gets whichever event loop it runs.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import Endpoint, Subscription, connect, current_caller
from multikernel.protocol import NameOwnerChanged, NoRespondersError, RemoteError
from tests.bus.conftest import PATIENCE, spawn
from tests.bus.test_bus_restart import hub_process, listening

pytestmark = pytest.mark.anyio


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Path]:
    """The real hub, in this test's event loop (whichever backend); yields its socket."""
    hub = Hub(tmp_path / "bus.sock", policy=Policy.default())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub.path
        tg.cancel_scope.cancel()


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


async def serve_geometry(ep: Endpoint) -> None:
    svc = ep.service("geometry")

    @svc.method
    async def mirror(point: Point) -> Point:
        return Point(point.y, point.x)

    @svc.method
    async def caller(_: None) -> int:
        return current_caller().endpoint_id

    @svc.method
    async def deadline(_: None) -> float:
        await anyio.lowlevel.checkpoint()  # (a handler that waits: it runs in a cancel scope)
        return anyio.current_effective_deadline() - anyio.current_time()

    @svc.method
    async def fail(message: str) -> None:
        raise ValueError(message)

    @svc.method
    async def countdown(n: int) -> AsyncIterator[int]:
        for i in range(n, 0, -1):
            yield i

    await svc.start()


async def test_subscribers_get_what_is_published(hub: Path) -> None:
    async with (
        connect(hub, name="pub") as pub,
        connect(hub, name="sub") as sub,
        await sub.subscribe("orders.*") as one_token,
        await sub.subscribe("orders.>") as the_rest,
    ):
        await pub.publish("orders.new", {"id": 1})
        await pub.publish("orders.eu.new", {"id": 2})
        with anyio.fail_after(PATIENCE):
            first = await one_token.receive()
            assert (first.subject, first.source, first.value()) == ("orders.new", pub.id, {"id": 1})
            assert [(await the_rest.receive()).value() for _ in range(2)] == [{"id": 1}, {"id": 2}]


async def test_a_queue_group_shares_the_work(hub: Path) -> None:
    async with (
        connect(hub, name="pub") as pub,
        connect(hub, name="a") as a,
        connect(hub, name="b") as b,
        await a.subscribe("jobs", queue_group="workers") as on_a,
        await b.subscribe("jobs", queue_group="workers") as on_b,
    ):
        for i in range(10):
            await pub.publish("jobs", i)
        got: list[int] = []
        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:

                async def work(member: Subscription) -> None:
                    async for message in member:
                        got.append(message.value())
                        if len(got) == 10:
                            tg.cancel_scope.cancel()

                tg.start_soon(work, on_a)
                tg.start_soon(work, on_b)
        assert sorted(got) == list(range(10))  # each job once
        snapshot = await pub.introspect()
        delivered = [s.delivered for s in snapshot.subscriptions if s.queue_group == "workers"]
        assert delivered == [5, 5]  # one member at a time, in turn


async def test_requests_and_typed_replies(hub: Path) -> None:
    async with connect(hub, name="server") as server, connect(hub, name="client") as client:
        await serve_geometry(server)
        assert await client.request("geometry", "mirror", Point(1, 2), response=Point) == Point(
            2, 1
        )
        assert await client.request("geometry", "caller", response=int) == client.id
        with pytest.raises(RemoteError, match="bad input") as caught:
            await client.request("geometry", "fail", "bad input")
        assert caught.value.remote_type == "ValueError"
        with pytest.raises(NoRespondersError, match="no method 'nope'"):
            await client.request("geometry", "nope")
        with pytest.raises(NoRespondersError, match="nobody owns"):
            await client.request("absent", "anything")


async def test_the_callers_deadline_reaches_the_handler(hub: Path) -> None:
    async with connect(hub, name="server") as server, connect(hub, name="client") as client:
        await serve_geometry(server)
        assert await client.request("geometry", "deadline", response=float) == math.inf
        with anyio.fail_after(PATIENCE):
            left = await client.request("geometry", "deadline", response=float)
        assert 0 < left <= PATIENCE


async def test_a_stream_of_replies_and_a_caller_that_stops_early(hub: Path) -> None:
    async with connect(hub, name="server") as server, connect(hub, name="client") as client:
        await serve_geometry(server)
        stream = client.request_stream("geometry", "countdown", 100, response=int)
        assert [i async for i in stream] == list(range(100, 0, -1))
        seen = []
        countdown = client.request_stream("geometry", "countdown", 100, response=int)
        async with aclosing(countdown):  # stopping early: closed now, not when collected
            async for i in countdown:
                seen.append(i)
                if i == 98:
                    break
        assert seen == [100, 99, 98]
        assert await client.request("geometry", "mirror", Point(3, 4), response=Point) == Point(
            4, 3
        )


async def test_a_service_in_another_process(hub: Path) -> None:
    with spawn("serve", hub, "demo") as server:
        await server.expect("ready")
        async with connect(hub, name="client") as client:
            assert await client.request("demo", "echo", b"ping") == b"ping"
            assert [i async for i in client.request_stream("demo", "count", 50)] == list(range(50))
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.request, "demo", "sleep", 30.0)
                await server.expect("sleeping")
                tg.cancel_scope.cancel()  # the caller gives up: the handler is cancelled
            await server.expect("cancelled")
        assert await server.stop() == 0


async def test_a_monitor_sees_what_the_hub_routes(hub: Path) -> None:
    async with (
        connect(hub, name="watcher") as watcher,
        connect(hub, name="talker") as talker,
        watcher.monitor("watched.>") as records,
    ):
        await talker.publish("unwatched", 0)
        await talker.publish("watched.x", "hello")
        with anyio.fail_after(PATIENCE):
            record = await anext(records)
        assert (record.path, record.source, record.source_name) == ("hub", talker.id, "talker")


async def test_introspection_shows_the_bus(hub: Path) -> None:
    async with (
        connect(hub, name="server") as server,
        connect(hub, name="client") as client,
        await client.subscribe("news.>", queue_group="readers"),
    ):
        await serve_geometry(server)
        snapshot = await client.introspect()
        assert snapshot.names == {"geometry": (server.id,)}
        assert {e.name for e in snapshot.endpoints} == {"server", "client"}
        (service,) = snapshot.services
        assert {m.name for m in service.methods} == {
            "mirror", "caller", "deadline", "fail", "countdown",
        }  # fmt: skip
        (subscription,) = snapshot.subscriptions
        assert (subscription.endpoint_id, subscription.pattern) == (client.id, "news.>")
        assert subscription.queue_group == "readers"


async def test_an_endpoint_re_attaches_to_a_restarted_hub(tmp_path: Path) -> None:
    """Subscriptions, names and services come back on their own; the hub runs as a process."""
    socket_path = tmp_path / "bus.sock"
    with hub_process(socket_path) as first:
        await listening(first)
        async with connect(socket_path, name="server") as server:
            await serve_geometry(server)
            async with await server.subscribe("after.>") as news:
                first.kill()
                first.wait(timeout=20)
                with hub_process(socket_path) as second:
                    await listening(second)
                    async with (
                        connect(socket_path, name="client") as client,
                        await client.subscribe("mk.bus.names.geometry") as names,
                    ):
                        if "geometry" not in (await client.introspect()).names:
                            with anyio.fail_after(PATIENCE):
                                change = (await names.receive()).decode(NameOwnerChanged)
                            assert change.new_owner == server.id  # its new id on the new hub
                        mirrored = await client.request(
                            "geometry", "mirror", Point(5, 6), response=Point
                        )
                        assert mirrored == Point(6, 5)
                        # Its subscription came back before its name (the endpoint restores
                        # them in that order, on its session), so this publication reaches it.
                        await client.publish("after.restart", "back")
                        with anyio.fail_after(PATIENCE):
                            assert (await news.receive()).value() == "back"
