"""Well-known names across processes: queueing, hand-off, and direct channels that follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from multikernel.bus import Hub
from multikernel.endpoints import connect
from multikernel.protocol import NameFlag, NameOwnerChanged, RequestNameResult

from .conftest import PATIENCE, spawn

pytestmark = pytest.mark.anyio


async def test_calls_follow_the_name_to_the_next_owner_in_order(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path) as client, await client.subscribe("mk.bus.names.svc") as events:
        with spawn("serve", socket_path, "svc") as first:
            a = await first.expect("ready")
            assert a["result"] == RequestNameResult.PRIMARY_OWNER
            assert (await events.receive()).decode(NameOwnerChanged) == NameOwnerChanged(
                "svc", 0, a["id"]
            )
            with spawn("serve", socket_path, "svc") as second:
                b = await second.expect("ready")
                assert b["result"] == RequestNameResult.IN_QUEUE
                assert (await client.request("svc", "whoami", None))["server"] == a["id"]

                assert await first.stop() == 0  # the owner leaves; the next in line gets it
                change = (await events.receive()).decode(NameOwnerChanged)
                assert change == NameOwnerChanged("svc", a["id"], b["id"])
                assert (await client.request("svc", "whoami", None))["server"] == b["id"]
                snapshot = await client.introspect()
                assert snapshot.names == {"svc": (b["id"],)}
                assert [c.server for c in snapshot.channels] == [b["id"]]  # old one retired


async def test_replacement_takes_the_name_and_queues_the_old_owner(
    hub: Hub, socket_path: Path
) -> None:
    allow = str(int(NameFlag.ALLOW_REPLACEMENT))
    replace = str(int(NameFlag.REPLACE_EXISTING))
    async with connect(socket_path) as client:
        with spawn("serve", socket_path, "svc", allow) as old:
            a = await old.expect("ready")
            assert (await client.request("svc", "whoami", None))["server"] == a["id"]
            with spawn("serve", socket_path, "svc", replace) as new:
                b = await new.expect("ready")
                assert b["result"] == RequestNameResult.PRIMARY_OWNER
                assert (await client.request("svc", "whoami", None))["server"] == b["id"]
                assert (await client.introspect()).names == {"svc": (b["id"], a["id"])}
                assert await new.stop() == 0
                assert (await client.request("svc", "whoami", None))["server"] == a["id"]


async def test_draining_service_hands_over_and_finishes_in_flight_work(
    hub: Hub, socket_path: Path
) -> None:
    import anyio

    async with connect(socket_path, name="old") as old_ep, connect(socket_path) as client:
        old = old_ep.service("svc")
        started, release = anyio.Event(), anyio.Event()

        @old.method
        async def work(_: None) -> str:
            started.set()
            await release.wait()
            return "old finished"

        await old.start()
        with spawn("serve", socket_path, "svc") as successor:
            b = await successor.expect("ready")
            async with anyio.create_task_group() as tg:
                results: list[str] = []

                async def call_old() -> None:
                    results.append(await client.request("svc", "work", None))

                tg.start_soon(call_old)
                await started.wait()  # the call is running at the old owner
                async with (
                    await client.subscribe("mk.bus.names.svc") as names,
                    anyio.create_task_group() as drain_group,
                ):
                    drain_group.start_soon(old.drain)
                    with anyio.fail_after(PATIENCE):  # the drain hands the name over at once
                        change = (await names.receive()).decode(NameOwnerChanged)
                    assert change == NameOwnerChanged("svc", old_ep.id, b["id"])
                    assert (await client.introspect()).names == {"svc": (b["id"],)}
                    release.set()
            assert results == ["old finished"]
            assert (await client.request("svc", "whoami", None))["server"] == b["id"]
