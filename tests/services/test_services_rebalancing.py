"""The rebalancer's loop in the resource actor: load reports in, transactions out (fake agents)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Policy
from multikernel.bus.testing import MemoryBus
from multikernel.endpoints import Bus, Subscription
from multikernel.protocol import (
    LOAD_SUBJECT,
    CpuSpec,
    Grant,
    GrantRequest,
    LoadReport,
    TxRecord,
)
from multikernel.services._elastic import AGENT_RULE, ElasticBounds
from multikernel.services._host import host_rule
from multikernel.services._pool import discover_pool
from multikernel.services._rebalance import PressureRebalancer, RebalancePolicy
from multikernel.services._rebalancing import RebalanceStatistics, Rebalancing
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services.testing import FakeAgent, FakeSysfs

from .conftest import mkctl

pytestmark = pytest.mark.anyio
BLOCK = 128 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@dataclass
class Host:
    bus: MemoryBus
    client: Bus
    actor: ResourceActor
    loop: Rebalancing

    async def allocate(self, name: str, id: int, cpus: int, memory: int = BLOCK) -> Grant:
        asked = GrantRequest(name, id, cpus=CpuSpec(count=cpus), memory=memory)
        grant: Grant = await self.client.request("resource", "allocate", asked, response=Grant)
        return grant

    async def until(self, done: Callable[[RebalanceStatistics], bool]) -> RebalanceStatistics:
        """Wait for the loop's counters to say `done` (woken by the loop, never by a timer)."""
        with anyio.fail_after(10):
            while not done(self.loop.statistics()):
                await self.loop.changed.wait()
        return self.loop.statistics()


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    machine = FakeSysfs(tmp_path / "machine").cpus(4).memory(2 << 30).root
    bus = MemoryBus(Policy.from_toml(host_rule(0) + AGENT_RULE))
    policy: RebalancePolicy = PressureRebalancer(window=2)
    async with (
        bus.connect("resource") as ep,
        bus.connect("test") as client,
        anyio.create_task_group() as tg,
    ):
        store = ResourceStore(tmp_path / "resource.db")
        bounds = ElasticBounds(max_cpus=3, max_memory=3 * BLOCK)
        actor = ResourceActor(
            ep, discover_pool(machine), store, elastic=bounds, rebalancer=policy, ack_timeout=2.0
        )
        assert actor.rebalancing is not None
        actor.rebalancing.min_interval = 0  # every report counts: the test sends them
        await tg.start(actor.run)
        try:
            yield Host(bus, client, actor, actor.rebalancing)
        finally:
            tg.cancel_scope.cancel()
            store.close()


@asynccontextmanager
async def agent(host: Host, grant: Grant) -> AsyncIterator[tuple[FakeAgent, Bus]]:
    """A fake agent for the instance of `grant`, and its attachment to publish reports on."""
    fake = FakeAgent(grant.instance_id, cpus=frozenset(grant.cpus), memory=grant.memory)
    async with host.bus.connect(f"agent-{grant.instance}", instance=grant.instance_id) as ep:
        await fake.serve(ep)
        yield fake, ep


async def report(ep: Bus, grant: Grant, *, busy: float, waiting: float = 0.0, **more: int) -> None:
    body = LoadReport(
        instance=grant.instance_id, period=2.0, tx=grant.tx, cpus=len(grant.cpus),
        cpu_busy=busy, cpu_waiting=waiting, memory=grant.memory,
        memory_used=more.get("used", grant.memory // 2 + 1),
    )  # fmt: skip
    await ep.publish(LOAD_SUBJECT.format(id=grant.instance_id), body)


async def committed(records: Subscription, kind: str = "rebalance") -> TxRecord:
    """The next transaction of `kind` that ended (committed or rolled back)."""
    with anyio.fail_after(10):
        async for message in records:
            record = message.decode(TxRecord)
            if record.kind == kind and record.state != "pending":
                return record
    raise AssertionError("the subscription ended")


async def test_sustained_cpu_pressure_grows_a_grant_and_idleness_gives_it_back(
    host: Host,
) -> None:
    first = await host.allocate("web", 1, cpus=1)
    async with (
        agent(host, first) as (fake, ep),
        await host.client.subscribe("mk.resource.1.tx") as records,
    ):
        await report(ep, first, busy=1.0, waiting=0.9)
        await host.until(lambda s: s.reports == 1)
        assert host.loop.statistics().decisions == 0  # one report is not sustained
        await report(ep, first, busy=1.0, waiting=0.9)
        grown = await committed(records)
        assert grown.after is not None
        assert (grown.state, len(grown.after.cpus)) == ("committed", 2)
        assert grown.reason.startswith("CPU pressure: threads waited at least 90% of the time")
        assert fake.cpus == set(grown.after.cpus)  # applied by the instance, acknowledged
        # Under its new grant it is mostly idle: after two fresh reports, back to its base.
        for _ in range(2):
            await report(ep, grown.after, busy=0.2)
        shrunk = await committed(records)
    assert shrunk.after is not None
    assert (shrunk.state, len(shrunk.after.cpus)) == ("committed", 1)
    assert shrunk.reason == "CPU idle: at most 0.20 of 2 CPUs busy over 2 reports"
    assert fake.cpus == set(shrunk.after.cpus)
    stats = await host.until(lambda s: s.applied == 2)
    assert (stats.decisions, stats.failed, stats.dropped) == (2, 0, 0)


async def test_reports_that_are_stale_forged_or_malformed_change_nothing(host: Host) -> None:
    web = await host.allocate("web", 1, cpus=1)
    db = await host.allocate("db", 2, cpus=1)
    async with agent(host, web) as (_, web_ep), agent(host, db) as (_, db_ep):
        stale = LoadReport(instance=1, tx=web.tx - 1 if web.tx > 1 else 99, cpu_waiting=0.9)
        await web_ep.publish("mk.instance.1.load", stale)  # measured under another grant
        await db_ep.publish("mk.instance.2.load", LoadReport(instance=1, cpu_waiting=0.9))
        await web_ep.publish("mk.instance.1.load", {"instance": "one"})  # not a LoadReport
        await host.client.publish("mk.instance.7.load", LoadReport(instance=7))  # holds nothing
        stats = await host.until(lambda s: s.ignored == 4)
        await report(web_ep, web, busy=1.0, waiting=0.9)  # one good one: not yet a window
        stats = await host.until(lambda s: s.reports == 1)
    assert (stats.decisions, stats.ignored) == (0, 4)
    assert len(host.actor.ledger.holding("web").cpus) == 1


async def test_a_change_the_instance_refuses_is_rolled_back_and_waits_for_a_fresh_window(
    host: Host,
) -> None:
    first = await host.allocate("web", 1, cpus=1)
    async with (
        agent(host, first) as (fake, ep),
        await host.client.subscribe("mk.resource.1.tx") as records,
    ):
        fake.refuse = "no more CPUs for this instance, thank you"
        for _ in range(2):
            await report(ep, first, busy=1.0, waiting=0.9)
        refused = await committed(records)
        stats = await host.until(lambda s: s.failed == 1)
        await report(ep, first, busy=1.0, waiting=0.9)  # the window starts over
        stats = await host.until(lambda s: s.reports == 3)
    assert refused.state == "rolled-back"
    assert refused.reason.startswith("the instance refused it: no more CPUs for this instance")
    assert "(asked because CPU pressure: " in refused.reason
    assert (stats.decisions, stats.failed) == (1, 1)
    assert fake.cpus == set(first.cpus)


async def test_memory_grows_a_block_at_a_time_to_the_hosts_bound_and_gives_back_what_is_spare(
    host: Host,
) -> None:
    first = await host.allocate("web", 1, cpus=1, memory=BLOCK)
    async with (
        agent(host, first) as (_, ep),
        await host.client.subscribe("mk.resource.1.tx") as records,
    ):
        grant, sizes = first, []
        for used in (0.95, 0.95, 0.95, 0.1):  # full, full, full at the bound, then spare
            for _ in range(2):
                await report(ep, grant, busy=0.5, used=int(used * grant.memory))
            if used == 0.95 and grant.memory == 3 * BLOCK:
                await host.until(lambda s: s.reports == 6)
                continue  # --elastic-max-memory 384M: no further
            record = await committed(records)
            assert record.after is not None
            grant = record.after
            sizes.append(grant.memory // BLOCK)
        stats = await host.until(lambda s: s.applied == 3)
    assert sizes == [2, 3, 2]
    assert stats.decisions == 3


async def test_the_rebalancer_is_off_unless_the_host_asks_for_it(tmp_path: Path) -> None:
    from multikernel.services._host import HostConfig
    from multikernel.services.host import config_from, parser

    machine = FakeSysfs(tmp_path / "machine").cpus(2).memory(1 << 30).root
    bus = MemoryBus()
    async with bus.connect("resource") as ep:
        actor = ResourceActor(ep, discover_pool(machine), ResourceStore(tmp_path / "r.db"))
        assert actor.rebalancing is None
        actor.store.close()
    config = HostConfig(tmp_path / "bus.sock", tmp_path / "state")
    assert (config.rebalance, config.resource_config().rebalance) == ("", "")
    args = parser().parse_args(
        ["--rebalance", "--elastic-max-cpus", "4", "--elastic-max-memory", "2G"]
    )
    resource = config_from(args).resource_config()
    assert (resource.rebalance, resource.elastic_max_cpus, resource.elastic_max_memory) == (
        "pressure", 4, 2 << 30,
    )  # fmt: skip


async def test_mkctl_host_up_turns_the_rebalancer_on_and_bounds_what_instances_ask_for(
    tmp_path: Path,
) -> None:
    code, _, err = await mkctl(tmp_path, "host", "up", "--elastic-max-memory", "lots")
    assert code == 2
    assert "Invalid value for '--elastic-max-memory'" in err
    env = {**os.environ, "MULTIKERNEL_BUS": str(tmp_path / "bus.sock")}
    up = [sys.executable, "-m", "multikernel.endpoints.mkctl", "--state-dir", str(tmp_path),
          "host", "up", "--foreground", "--metrics", "off", "--elastic-max-cpus", "2",
          "--elastic-max-memory", "1G", "--rebalance"]  # fmt: skip
    async with await anyio.open_process(up, env=env) as proc:
        assert proc.stderr is not None
        seen = b""
        with anyio.fail_after(30):
            while b'"host ready"' not in seen:
                seen += await proc.stderr.receive()
        code, out, _ = await mkctl(tmp_path, "resources", "pool", "--json")
        assert (await mkctl(tmp_path, "--state-dir", str(tmp_path), "host", "down"))[0] == 0
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    pool = json.loads(out)
    assert (pool["rebalancer"], pool["elastic_max_cpus"], pool["elastic_max_memory"]) == (
        "pressure", 2, 1 << 30,
    )  # fmt: skip
