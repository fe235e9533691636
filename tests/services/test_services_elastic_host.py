"""Elastic grants on this machine: real instances, their real agents, the real hub and policy.

An instance's workload asks its agent to grow; a spinning instance is grown by the rebalancer
from the load its agent measured. The cpuset, the affinity of every process and the lifecycle
actor's view are read back.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CreateInstance,
    Grant,
    InstanceInfo,
    InstanceList,
    LoadImage,
    LoadReport,
    ShowInstances,
    StartInstance,
    TxRecord,
)
from multikernel.services._elastic import AGENT_RULE, ElasticBounds
from multikernel.services._enforce import LocalHostSide
from multikernel.services._host import host_rule
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._pool import discover_pool
from multikernel.services._rebalance import PressureRebalancer
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from tests._run import CGROUP_GROUP, cgroups_under
from tests.services.test_services_lifecycle import make_image

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="cpusets are read back: only root gets them"),
    pytest.mark.skipif(len(discover_pool().cpus) < 2, reason="growing needs a second CPU"),
]
MB = 1 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    from multikernel.services._signature import make_signing_key

    return make_signing_key("elastic tests", algorithm="ec-p256")


@dataclass
class Host:
    actor: LifecycleActor
    bus: Endpoint
    root: Path
    keys: tuple[bytes, bytes]

    async def call(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.bus.request(
            "lifecycle", method, body, response=InstanceInfo
        )
        return info

    async def start(self, name: str, body: str, subject: str) -> tuple[int, msgspec.Raw]:
        """Create `name` with one CPU, start it, return its id and the first message its
        workload publishes on mk.instance.<id>.`subject`."""
        (self.root / name).mkdir()
        info = await self.call("create", CreateInstance(name, cpu_count=1, memory=128 * MB))
        image = make_image(self.root / name, self.keys, body=body)
        await self.call("load", LoadImage(name, str(image)))
        async with await self.bus.subscribe(f"mk.instance.{info.id}.{subject}") as said:
            await self.call("start", StartInstance(name))
            with anyio.fail_after(30):
                message = await said.receive()
        return info.id, msgspec.Raw(message.data)


@asynccontextmanager
async def real_host(
    root: Path, keys: tuple[bytes, bytes], *, rebalance: bool
) -> AsyncIterator[Host]:
    """Hub (the host's policy: its user and the agents' rule), resource actor (instances may
    grow to 2 CPUs; with the rebalancer if asked) and lifecycle actor, in this process."""
    hub = Hub(root / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid()) + AGENT_RULE))
    platform = LocalPlatform(group=CGROUP_GROUP)
    store = ResourceStore(root / "state" / "resource.db")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            async with (
                connect(hub.path, name="resource") as resource_ep,
                connect(hub.path, name="lifecycle") as ep,
                connect(hub.path, name="test") as bus,
                anyio.create_task_group() as actors,
            ):
                resource = ResourceActor(
                    resource_ep, discover_pool(), store, host=LocalHostSide(platform),
                    elastic=ElasticBounds(max_cpus=2),
                    rebalancer=PressureRebalancer(window=2) if rebalance else None,
                )  # fmt: skip
                await actors.start(resource.run)
                lifecycle = LifecycleActor(
                    ep, platform, open_instance_socket=hub.open_instance_socket,
                    state_dir=root / "state", trusted_certs=[keys[1]], hello_timeout=20,
                )  # fmt: skip
                await actors.start(lifecycle.run)
                yield Host(lifecycle, bus, root, keys)
                actors.cancel_scope.cancel()
            tg.cancel_scope.cancel()
    finally:
        store.close()
    assert not cgroups_under(CGROUP_GROUP)


#: Asks its agent for one more CPU, publishes the grant it got on mk.instance.<id>.grown, stays.
GROWS = """
import os, anyio
from multikernel.endpoints import connect
from multikernel.protocol import ElasticRequest, Grant
async def main():
    me = os.environ["MULTIKERNEL_INSTANCE"]
    async with connect(name="workload", reconnect=False) as ep:
        asked = ElasticRequest(cpu_change=1, reason="warming a cache")
        grant = await ep.request(f"instance.{me}.agent", "elastic", asked, response=Grant)
        await ep.publish(f"mk.instance.{me}.grown", grant)
        await anyio.sleep_forever()
anyio.run(main)
"""

#: Two processes spinning on whatever CPUs the instance has; says so on mk.instance.<id>.ready.
SPINS = """
import os, anyio, multiprocessing
from multikernel.endpoints import connect
def spin():
    while True:
        pass
async def main():
    for _ in range(2):
        multiprocessing.Process(target=spin, daemon=True).start()
    async with connect(name="workload", reconnect=False) as ep:
        await ep.publish(f"mk.instance.{os.environ['MULTIKERNEL_INSTANCE']}.ready")
        await anyio.sleep_forever()
anyio.run(main)
"""


async def test_a_workload_grows_its_instance_and_its_agent_reports_the_load_under_the_new_grant(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    async with (
        real_host(tmp_path, keys, rebalance=False) as host,
        await host.bus.subscribe("mk.instance.*.load") as loads,
    ):
        id, raw = await host.start("web", GROWS, "grown")
        grant = msgspec.msgpack.decode(raw, type=Grant)
        proc = host.actor.instances["web"].proc
        assert proc is not None
        report = host.actor.platform.inspect(proc)
        affinities = {frozenset(os.sched_getaffinity(pid)) for pid in report.processes}
        listed = await host.bus.request(
            "lifecycle", "show", ShowInstances("web"), response=InstanceList
        )
        with anyio.fail_after(30):  # the agent reports every 2 s; the grant changed in one
            while (load := (await loads.receive()).decode(LoadReport)).tx != grant.tx:
                pass
    assert (len(grant.cpus), grant.applied_by) == (2, "instance")
    assert report.cpuset_cpus == set(grant.cpus)
    assert affinities == {frozenset(grant.cpus)}  # every thread of every process
    assert listed.instances[0].cpus == grant.cpus  # the lifecycle actor followed it
    assert (load.instance, load.cpus, load.memory) == (id, 2, 128 * MB)
    assert load.period > 0
    assert load.sources == ("schedstat", "memcg")  # its own memory cgroup; no PSI of its own
    assert 0 < load.memory_used <= 128 * MB


async def test_the_rebalancer_gives_a_spinning_instance_the_free_cpu(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    async with (
        real_host(tmp_path, keys, rebalance=True) as host,
        await host.bus.subscribe("mk.resource.*.tx") as records,
    ):
        id, _ = await host.start("spin", SPINS, "ready")
        with anyio.fail_after(60):
            async for message in records:
                record = message.decode(TxRecord)
                if record.kind == "rebalance" and record.state != "pending":
                    break
        proc = host.actor.instances["spin"].proc
        assert proc is not None
        report = host.actor.platform.inspect(proc)
        affinities = {frozenset(os.sched_getaffinity(pid)) for pid in report.processes}
    assert record.after is not None
    assert (record.instance_id, record.state, len(record.after.cpus)) == (id, "committed", 2)
    assert record.reason.startswith("CPU pressure: threads waited at least ")
    assert report.cpuset_cpus == set(record.after.cpus)
    assert affinities == {frozenset(record.after.cpus)}
    assert len(report.processes) >= 4  # the agent, the workload and its two spinners
