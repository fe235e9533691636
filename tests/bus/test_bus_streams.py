"""Broadcast streams: a publisher writes once into memory its subscribers read, the hub only
sets it up (docs/bus.md, "Streams")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import AccessDeniedError, BusSnapshot, BusyError, InvalidSubjectError

from .conftest import hub_serving, spawn, tell

pytestmark = pytest.mark.anyio

HOST_STREAMS_TO_GUESTS = """
[[rule]]
who = "instance:0"
publish = ["db.events.>"]

[[rule]]
who = "instance:2"
subscribe = ["db.events.>"]
"""


async def _until(ep: Endpoint, check: Callable[[BusSnapshot], bool]) -> BusSnapshot:
    """Introspect until `check(snapshot)` holds (each round trip waits on the hub, no sleep)."""
    with anyio.fail_after(10):
        while not check(snapshot := await ep.introspect()):
            pass
    return snapshot


async def _readers_ended(ep: Endpoint) -> None:
    """Until the endpoint reads no stream (each reader's end sets an event)."""
    with anyio.fail_after(10):
        while ep.statistics()["stream_readers"]:
            await ep._stream_readers.ended.wait()


async def test_a_stream_reaches_subscribers_in_other_processes_without_the_hub(
    hub: Hub, socket_path: Path
) -> None:
    with (
        spawn("subscribe", socket_path, "prices.eu") as literal,
        spawn("subscribe", socket_path, "prices.*") as wildcard,
    ):
        await literal.expect("ready")
        await wildcard.expect("ready")
        with spawn("stream", socket_path, "prices.eu", "500") as writer:
            writer_id = (await writer.expect("ready"))["id"]
            assert (await writer.expect("done"))["readers"] == 2
            for peer in (literal, wildcard):
                got = [await peer.expect("message") for _ in range(500)]
                assert [m["value"] for m in got] == list(range(500))  # all, in order
                assert {m["source"] for m in got} == {writer_id}  # as the hub named it
                assert {m["subject"] for m in got} == {"prices.eu"}
    assert hub.snapshot().counters["published"] == 0  # nothing went through the hub


async def test_a_subscription_made_while_the_stream_runs_gets_what_follows(
    hub: Hub, socket_path: Path
) -> None:
    async with (
        connect(socket_path, name="writer") as writer,
        connect(socket_path, name="reader") as reader,
        writer.stream("ticks") as stream,
    ):
        await stream.publish("before")
        async with await reader.subscribe("ticks") as sub:
            await stream.publish("after")
            message = await sub.receive()
            assert (message.value(), message.source, message.missed) == ("after", writer.id, 0)
            snapshot = await reader.introspect()
            (info,) = snapshot.streams
            assert (info.subject, info.writer, info.readers) == ("ticks", writer.id, (reader.id,))
        await _until(reader, lambda s: not s.streams[0].readers)  # unsubscribed: reader gone
        await stream.publish("unheard")
        assert stream.statistics().readers <= 1


async def test_many_subscriptions_of_one_endpoint_share_one_reader(
    hub: Hub, socket_path: Path
) -> None:
    async with (
        connect(socket_path, name="writer") as writer,
        connect(socket_path, name="reader") as reader,
    ):
        subs = [await reader.subscribe(p) for p in ("a.b", "a.*", "a.>", "x.y")]
        async with writer.stream("a.b") as stream:
            assert stream.statistics().readers == 1
            await stream.publish(7)
            for sub in subs[:3]:
                assert (await sub.receive()).value() == 7
            assert subs[3].statistics().delivered == 0
        await reader.unsubscribe_many(subs)


async def test_queue_groups_and_plain_subscriptions_each_get_every_message_once(
    hub: Hub, socket_path: Path
) -> None:
    async with (
        connect(socket_path, name="writer") as writer,
        connect(socket_path, name="plain") as plain,
        connect(socket_path, name="worker") as worker,
    ):
        direct = await plain.subscribe("jobs.new")
        grouped = await worker.subscribe("jobs.new", queue_group="workers")
        async with writer.stream("jobs.new") as stream:
            assert stream.hub_routed  # the queue group takes it through the hub
            for i in range(20):
                await stream.publish(i)
            assert [(await direct.receive()).value() for _ in range(20)] == list(range(20))
            assert [(await grouped.receive()).value() for _ in range(20)] == list(range(20))
            assert direct.statistics().buffered == grouped.statistics().buffered == 0
        await direct.aclose()
        await grouped.aclose()


async def test_a_stream_subject_is_literal_and_one_per_writer(hub: Hub, socket_path: Path) -> None:
    async with connect(socket_path) as ep:
        with pytest.raises(InvalidSubjectError, match="wildcard"):
            async with ep.stream("a.*"):
                pass
        async with ep.stream("a.b") as stream:
            with pytest.raises(BusyError, match="already writes a stream"):
                async with ep.stream("a.b"):
                    pass
        with pytest.raises(anyio.ClosedResourceError):
            await stream.publish("after its block")


async def test_a_reader_the_policy_does_not_allow_gets_nothing_and_reload_revokes(
    tmp_path: Path,
) -> None:
    async with hub_serving(tmp_path, Policy.from_toml(HOST_STREAMS_TO_GUESTS)) as (hub, _):
        path = tmp_path / "bus.sock"
        guest_socket = hub.open_instance_socket(instance=2)
        other_socket = hub.open_instance_socket(instance=3)
        with (
            guest_socket,
            other_socket,
            spawn("subscribe", "-", "db.events.>", fd=guest_socket.fileno()) as guest,
            spawn("subscribe", "-", "db.events.>", fd=other_socket.fileno()) as other,
        ):
            await guest.expect("ready")
            await other.expect("ready")  # within its own instance only: nothing from the host
            async with connect(path, name="db") as db, db.stream("db.events.put") as stream:
                assert stream.statistics().readers == 1  # the guest, not instance 3
                await stream.publish("one")
                assert (await guest.expect("message"))["value"] == "one"
                hub.reload_policy(Policy.default())
                await _until(db, lambda s: s.streams == () or not s.streams[0].readers)
                await stream.publish("two")  # revoked: reaches nobody
                tell(guest, "")  # a line on stdin changes nothing; no message may be pending
            assert other.proc.poll() is None
            assert guest.proc.poll() is None
        guest_socket.close()


async def test_a_stream_refused_by_policy_is_access_denied(tmp_path: Path) -> None:
    async with hub_serving(tmp_path) as (hub, _):
        guest_socket = hub.open_instance_socket(instance=2)
        async with connect(fd=guest_socket.detach(), reconnect=False) as guest:
            with pytest.raises(AccessDeniedError, match=r"stream on 'mk\.upgrade\.x' refused"):
                async with guest.stream("mk.upgrade.x"):  # the host's subject
                    pass


async def test_the_monitor_sees_stream_traffic(hub: Hub, socket_path: Path) -> None:
    async with (
        connect(socket_path, name="monitor") as monitor,
        connect(socket_path, name="writer") as writer,
        connect(socket_path, name="reader") as reader,
        monitor.monitor("prices.>") as records,
    ):
        sub = await reader.subscribe("prices.eu")
        async with writer.stream("prices.eu") as stream:
            await stream.publish({"p": 1})
            record = await records.__anext__()
            assert (record.path, record.source, record.channel) == ("stream", writer.id, 1)
            assert (await sub.receive()).value() == {"p": 1}
        await sub.aclose()


async def test_the_writer_going_away_ends_its_readers_and_the_stream(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path, name="reader") as reader:
        sub = await reader.subscribe("gone.soon")
        with spawn("stream", socket_path, "gone.soon", "3") as writer:
            await writer.expect("ready")
            await writer.expect("done")
            assert [(await sub.receive()).value() for _ in range(3)] == [0, 1, 2]
            writer.proc.kill()
            await writer.exited()
        await _until(reader, lambda s: not s.streams)
        await _readers_ended(reader)  # the reader task sees its writer gone and ends
        await sub.aclose()


async def test_a_dead_reader_does_not_hold_the_writer_up(hub: Hub, socket_path: Path) -> None:
    async with connect(socket_path, name="writer") as writer:
        with spawn("subscribe", socket_path, "fast.path") as doomed:
            await doomed.expect("ready")
            async with writer.stream("fast.path") as stream:
                doomed.proc.kill()
                await doomed.exited()
                with anyio.fail_after(10):  # a ring's worth and more: it must not block
                    for i in range(40_000):
                        await stream.publish(i)


async def test_a_reader_that_stops_reading_is_stalled_and_told_its_gap(tmp_path: Path) -> None:
    limits = Limits(block_patience=0.2, channel_capacity=1 << 16, session_capacity=1 << 20,
                    max_body=8 << 10)  # fmt: skip
    hub = Hub(tmp_path / "bus.sock", limits=limits)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with (
            connect(tmp_path / "bus.sock", name="writer") as writer,
            connect(tmp_path / "bus.sock", name="reader") as reader,
        ):
            sub = await reader.subscribe("slow.one", max_pending=8, patience=60)
            async with writer.stream("slow.one") as stream:
                with anyio.fail_after(30):
                    for i in range(5_000):  # far more than the ring and the buffer hold
                        await stream.publish(i)
                assert stream.statistics().stalls >= 1
                values, missed = [], 0
                with anyio.fail_after(10):
                    while not values or values[-1] != 4_999:
                        message = await sub.receive()
                        values.append(message.value())
                        missed += message.missed
                assert values == sorted(values)  # in order across the gap
                assert missed == 5_000 - len(values)  # every lost one told
            await sub.aclose()
        tg.cancel_scope.cancel()


async def test_drop_never_waits_and_a_lapped_reader_counts_what_it_missed(
    tmp_path: Path,
) -> None:
    limits = Limits(channel_capacity=1 << 16, session_capacity=1 << 20, max_body=8 << 10)
    hub = Hub(tmp_path / "bus.sock", limits=limits)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with (
            connect(tmp_path / "bus.sock", name="writer") as writer,
            connect(tmp_path / "bus.sock", name="reader") as reader,
        ):
            sub = await reader.subscribe("lossy", max_pending=1 << 16, patience=0)
            async with writer.stream("lossy", slow="drop") as stream:
                for _ in range(20_000):
                    stream._writer.try_write(b"\x00")  # never waits (no event loop turn either)
                    assert stream.statistics().full == 0
                await stream.publish("last")
                values, missed = [], 0
                with anyio.fail_after(10):
                    while not values or values[-1] != "last":
                        message = await sub.receive()
                        values.append(message.value())
                        missed += message.missed
                assert missed > 0
                assert len(values) + missed == 20_001
            await sub.aclose()
        tg.cancel_scope.cancel()


async def test_plain_publish_on_a_subject_the_endpoint_streams_goes_through_its_stream(
    hub: Hub, socket_path: Path
) -> None:
    async with (
        connect(socket_path, name="writer") as writer,
        connect(socket_path, name="reader") as reader,
    ):
        sub = await reader.subscribe("both.ways")
        async with writer.stream("both.ways") as stream:
            await stream.publish(1)
            await writer.publish("both.ways", 2)  # in order with the stream's frames
            assert [(await sub.receive()).value() for _ in range(2)] == [1, 2]
        await sub.aclose()
