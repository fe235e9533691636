"""Monitor, introspection, statistics, and endpoints that misbehave."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.bus import Hub
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import Kind, decode_header

from .conftest import PATIENCE, spawn

pytestmark = pytest.mark.anyio


class Grant(msgspec.Struct, frozen=True):
    cpus: int


async def test_monitor_sees_routed_and_direct_frames_with_timestamps(
    hub: Hub, socket_path: Path
) -> None:
    with spawn("serve", socket_path, "svc") as server:
        await server.expect("ready")
        async with (
            connect(socket_path, name="monitor") as monitor,
            connect(socket_path) as app,
            monitor.monitor(">") as records,
        ):
            await app.publish("app.event", 1)
            assert await app.request("svc", "echo", b"watched") == b"watched"
            seen = []
            with anyio.fail_after(20):
                async for record in records:
                    header = decode_header(record.frame)
                    seen.append((record.path, header.kind, header.subject))
                    if len(seen) == 3:
                        break
            assert seen[0] == ("hub", Kind.PUBLISH, "app.event")
            assert {s[:2] for s in seen[1:]} == {
                ("direct", Kind.REQUEST),
                ("direct", Kind.REPLY),
            }
            assert record.ts_ns > 0


async def test_monitor_sees_the_calls_of_a_caller_that_exits_at_once(
    hub: Hub, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short-lived caller (mkctl) hands its mirror copies over before it detaches, even when
    its copier task never got to run before it was done (its reply came while it spun)."""

    async def starved_copier(self: Endpoint) -> None:
        await anyio.sleep_forever()  # it never gets to run before its endpoint is gone

    monkeypatch.setattr(Endpoint, "_flush_mirror", starved_copier)
    with spawn("serve", socket_path, "svc") as server:
        await server.expect("ready")
        async with connect(socket_path, name="monitor") as monitor, monitor.monitor(">") as records:
            async with connect(socket_path) as app:
                assert await app.request("svc", "echo", b"once") == b"once"
            with anyio.fail_after(20):
                async for record in records:
                    if decode_header(record.frame).kind == Kind.REQUEST:
                        break  # the caller's copy of its request reached the monitor


async def test_introspection_lists_services_with_schemas(hub: Hub, socket_path: Path) -> None:
    async with connect(socket_path, name="resource-actor") as actor, connect(socket_path) as app:
        svc = actor.service("resource", concurrency=8)

        @svc.method
        async def grant(request: Grant) -> Grant:
            return request

        await svc.start()
        assert await app.request("resource", "grant", Grant(2), response=Grant) == Grant(2)
        snapshot = await app.introspect()
        (service,) = snapshot.services
        assert (service.name, service.concurrency) == ("resource", 8)
        (method,) = service.methods
        assert method.name == "grant"
        assert "cpus" in method.request_schema
        actor_info = next(e for e in snapshot.endpoints if e.name == "resource-actor")
        assert actor_info.names == ("resource",)
        assert snapshot.counters["channels"] == 1
        stats = app.statistics()
        assert stats["direct"]["resource"].sent.frames == 1
        assert actor.statistics()["services"]["resource"]["served"] == 1


async def test_an_endpoint_writing_garbage_is_cut_off_alone(hub: Hub, socket_path: Path) -> None:
    from multikernel.protocol import NameOwnerChanged

    async with connect(socket_path, name="bystander") as bystander:
        async with await bystander.subscribe("mk.bus.names.>") as names:
            with spawn("serve", socket_path, "victim-name") as server:
                await server.expect("ready")
                await names.receive()  # it owns its name
                with spawn("garbage", socket_path, "vandal") as garbage:
                    first_id = (await garbage.expect("ready"))["id"]
                    with anyio.fail_after(PATIENCE):
                        owned = (await names.receive()).decode(NameOwnerChanged)
                        released = (await names.receive()).decode(NameOwnerChanged)
                    assert owned == NameOwnerChanged("vandal", 0, first_id)
                    assert released == NameOwnerChanged("vandal", first_id, 0)  # cut off
                    # (it re-attaches under a new id afterwards)
                    snapshot = await bystander.introspect()
                    assert first_id not in {e.endpoint_id for e in snapshot.endpoints}
                assert await bystander.request("victim-name", "echo", b"ok") == b"ok"
        assert hub.counters["errors"] >= 1
        assert hub.counters["cut_off"] >= 1


async def test_a_killed_endpoint_releases_its_names(hub: Hub, socket_path: Path) -> None:
    import signal

    from multikernel.protocol import NameOwnerChanged

    async with (
        connect(socket_path) as watcher,
        await watcher.subscribe("mk.bus.names.svc") as names,
    ):
        with spawn("serve", socket_path, "svc") as server:
            ready = await server.expect("ready")
            await names.receive()
            server.proc.send_signal(signal.SIGKILL)
            change = (await names.receive()).decode(NameOwnerChanged)
        assert change == NameOwnerChanged("svc", ready["id"], 0)


def test_the_hub_stamps_the_header_fields_the_protocol_defines() -> None:
    import struct

    from multikernel.bus import _hub_pubsub
    from multikernel.protocol._envelope import HEADER_FIELDS

    offsets, offset = {}, 0
    for field, code in HEADER_FIELDS:
        offsets[field] = offset
        offset += struct.calcsize("<" + code)
    assert (
        offsets["source"],
        offsets["destination"],
    ) == (_hub_pubsub._SOURCE_OFFSET, _hub_pubsub._DESTINATION_OFFSET)
