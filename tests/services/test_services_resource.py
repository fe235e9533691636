"""The resource actor on an in-memory bus: grants as transactions, refusals, rollbacks, restarts."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.bus.testing import MemoryBus
from multikernel.endpoints import Bus
from multikernel.protocol import (
    AccessDeniedError,
    CpuAdd,
    CpuRemove,
    CpuSpec,
    DeviceAdd,
    Grant,
    GrantList,
    GrantRequest,
    GrantsQuery,
    History,
    HistoryQuery,
    InstanceRef,
    MemAdd,
    MemRemove,
    NotFoundError,
    PoolInfo,
    PoolQuery,
    Reconcile,
    RefusedError,
    Release,
    ResourceTransaction,
    ResourceTransactionAck,
    TxRecord,
)
from multikernel.services._agent import AgentState, _serve
from multikernel.services._agent_resources import InstanceResources
from multikernel.services._enforce import HostSideError, LocalHostSide
from multikernel.services._local import LocalPlatform
from multikernel.services._placement import Holding
from multikernel.services._pool import Cpu, MemoryBlock, Pool, discover_pool
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_ops import ops_for, undo
from multikernel.services._resource_store import ResourceStore
from multikernel.services.testing import FakeAgent, FakeSysfs

pytestmark = pytest.mark.anyio
MiB = 1 << 20
BLOCK = 128 * MiB
#: A machine for the pure tests: 8 CPUs, 32 blocks of 128 MiB, on 2 nodes.
POOL = Pool(
    cpus={c: Cpu(c, node=c % 2, siblings=frozenset({c})) for c in range(8)},
    block_size=BLOCK,
    blocks={b: MemoryBlock(b, node=b // 16) for b in range(32)},
)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    fake = FakeSysfs(tmp_path / "machine").cpus(8, nodes=2, threads_per_core=2)
    fake.memory(4 << 30, block_size=BLOCK, nodes=2).nic("eth0", queues=2, pci="0000:00:03.0")
    return fake.root


@dataclass
class Host:
    bus: MemoryBus
    client: Bus
    actor: ResourceActor
    store: Path

    async def call(self, method: str, body: object, response: type = Grant) -> object:
        return await self.client.request("resource", method, body, response=response)

    async def grant(self, method: str, request: GrantRequest) -> Grant:
        grant = await self.call(method, request)
        assert isinstance(grant, Grant)
        return grant

    async def grants(self, instance: str = "") -> tuple[Grant, ...]:
        found = await self.call("grants", GrantsQuery(instance), GrantList)
        assert isinstance(found, GrantList)
        return found.grants

    async def history(self, instance: str = "") -> tuple[TxRecord, ...]:
        found = await self.call("history", HistoryQuery(instance), History)
        assert isinstance(found, History)
        return found.transactions

    async def pool(self) -> PoolInfo:
        info = await self.call("pool", PoolQuery(), PoolInfo)
        assert isinstance(info, PoolInfo)
        return info


@asynccontextmanager
async def resource_host(
    machine: Path, store: Path, bus: MemoryBus | None = None, *, ack_timeout: float = 5.0
) -> AsyncIterator[Host]:
    bus = bus or MemoryBus()
    async with (
        bus.connect("resource") as ep,
        bus.connect("test") as client,
        anyio.create_task_group() as tg,
    ):
        actor = ResourceActor(ep, discover_pool(machine), ResourceStore(store),
                              ack_timeout=ack_timeout)  # fmt: skip
        await tg.start(actor.run)
        try:
            yield Host(bus, client, actor, store)
        finally:
            tg.cancel_scope.cancel()
            actor.store.close()


@pytest.fixture
async def host(machine: Path, tmp_path: Path) -> AsyncIterator[Host]:
    async with resource_host(machine, tmp_path / "state" / "resource.db", ack_timeout=0.5) as h:
        yield h


@asynccontextmanager
async def agent_of(host: Host, instance: int, **kwargs: object) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(instance, **kwargs)  # type: ignore[arg-type]
    async with host.bus.connect(f"agent-{instance}", instance=instance) as ep:
        await agent.serve(ep)
        yield agent


def web(cpus: CpuSpec | None = None, memory: int = 0, **kw: object) -> GrantRequest:
    return GrantRequest("web", 1, cpus=cpus, memory=memory, **kw)  # type: ignore[arg-type]


async def test_a_grant_for_an_instance_that_is_not_running_is_applied_by_the_host(
    host: Host,
) -> None:
    async with await host.client.subscribe("mk.resource.1.tx") as events:
        grant = await host.grant("allocate", web(CpuSpec(count=2), 200 * MiB))
        states = [msgspec.msgpack.decode((await events.receive()).data, type=TxRecord).state
                  for _ in range(2)]  # fmt: skip
    assert states == ["pending", "committed"]
    assert (len(grant.cpus), grant.memory, grant.applied_by, grant.tx) == (2, 2 * BLOCK, "host", 1)
    assert len(grant.memory_blocks) == 2
    assert await host.grants() == (grant,)
    pool = await host.pool()
    assert {c.id: c.holders for c in pool.cpus if c.holders} == dict.fromkeys(grant.cpus, ("web",))
    assert pool.memory_free == pool.memory_total - 2 * BLOCK


async def test_a_running_instance_acknowledges_each_kernel_op_in_the_kernels_order(
    host: Host,
) -> None:
    await host.grant("allocate", web(CpuSpec(ids=(0, 4)), 2 * BLOCK))
    async with agent_of(host, 1, cpus=frozenset({0, 4}), memory=2 * BLOCK) as agent:
        grant = await host.grant(
            "update", web(CpuSpec(ids=(1, 4)), BLOCK, queues=("net/eth0/rx-0",))
        )
    (tx,) = agent.transactions
    kinds = [type(op) for op in tx.ops]
    assert kinds == [MemRemove, CpuRemove, CpuAdd, DeviceAdd]
    assert (tx.cpus, tx.memory, tx.queues) == ((1, 4), BLOCK, ("net/eth0/rx-0",))
    assert tx.ops[1] == CpuRemove(1, cpu_id=0)
    assert tx.ops[3] == DeviceAdd(1, domain=0, bus=0, devfn=3 << 3)
    assert (grant.applied_by, grant.cpus, agent.cpus) == ("instance", (1, 4), frozenset({1, 4}))
    (record, _) = await host.history("web")
    assert (record.state, len(record.acks), {a.result for a in record.acks}) == (
        "committed",
        4,
        {0},
    )


async def test_memory_comes_in_blocks_and_a_memadd_names_their_page_frames(host: Host) -> None:
    grant = await host.grant("allocate", web(CpuSpec(count=1), 100 * MiB))
    assert grant.memory == BLOCK  # rounded up to a whole block
    (record,) = await host.history()
    (add,) = [op for op in record.ops if isinstance(op, MemAdd)]
    assert (add.start_pfn, add.nr_pages) == (grant.memory_blocks[0] * BLOCK // 4096, BLOCK // 4096)


async def test_an_instance_that_refuses_keeps_what_it_had(host: Host) -> None:
    before = await host.grant("allocate", web(CpuSpec(count=1), 2 * BLOCK))
    async with agent_of(host, 1, cpus=frozenset(before.cpus), memory=2 * BLOCK) as agent:
        agent.used = 200 * MiB
        with pytest.raises(RefusedError) as refused:
            await host.grant("update", web(memory=BLOCK))
        assert refused.value.remote_type == "GrantFailedError"
        assert str(refused.value).startswith(
            "'web' did not get its new grant: the instance refused it: the instance uses 200 MiB "
            "of memory, more than the 128 MiB asked: free memory inside it or ask for more; "
            "nothing changed (tx 2 rolled back)"
        )
        assert [t.rollback_of for t in agent.transactions] == [0, 2]
        assert agent.memory == 2 * BLOCK
    assert await host.grants() == (before,)
    record = (await host.history())[0]
    assert (record.tx, record.state) == (2, "rolled-back")
    assert {a.result for a in record.acks} == {-16}  # -EBUSY


async def test_an_unacknowledged_grant_times_out_and_is_rolled_back_on_both_sides(
    host: Host,
) -> None:
    before = await host.grant("allocate", web(CpuSpec(count=1), BLOCK))
    async with agent_of(host, 1, cpus=frozenset(before.cpus), memory=BLOCK) as agent:
        agent.hang = True
        with pytest.raises(RefusedError, match=r"did not acknowledge it within 0\.5 s"):
            await host.grant("update", web(CpuSpec(count=3)))
        rollback = agent.transactions[-1]
        assert (rollback.rollback_of, rollback.cpus) == (2, before.cpus)
        agent.release_hang()
        assert agent.cpus == frozenset(before.cpus)  # the late transaction was never applied
    assert await host.grants() == (before,)
    assert (await host.pool()).pending == 0


async def test_a_late_transaction_after_its_rollback_is_refused_by_the_agent() -> None:
    agent = FakeAgent(1, cpus=frozenset({0}))
    undo = ResourceTransaction(tx=5, instance=1, cpus=(0,), rollback_of=5)
    late = ResourceTransaction(tx=5, instance=1, ops=(CpuAdd(1, cpu_id=2),), cpus=(0, 2))
    assert (await agent.resource(undo)).error == ""
    answer = await agent.resource(late)
    assert (answer.error, answer.acks[0].result) == ("it was rolled back before it came", -125)
    assert agent.cpus == {0}


async def test_the_real_agent_refuses_a_transaction_rolled_back_before_it_came() -> None:
    """What FakeAgent does above is what the agent does (docs/resources.md, rollbacks)."""
    cpus = frozenset(os.sched_getaffinity(0))
    agent = InstanceResources(1, cpus)
    undo = ResourceTransaction(tx=5, instance=1, cpus=tuple(sorted(cpus)), rollback_of=5)
    late = ResourceTransaction(tx=5, instance=1, ops=(CpuAdd(1, cpu_id=2),), cpus=(0, 2))
    assert (await agent.handle(undo)).error == ""
    answer = await agent.handle(late)
    assert (answer.error, answer.acks[0].result) == ("it was rolled back before it came", -125)
    assert (agent.cpus, agent.tx) == (cpus, 0)  # nothing applied: not even our affinity


async def test_another_instances_cpu_is_refused_naming_the_holder_and_what_is_free(
    host: Host,
) -> None:
    await host.grant("allocate", web(CpuSpec(ids=(0, 1)), BLOCK))
    with pytest.raises(RefusedError) as refused:
        await host.grant("allocate", GrantRequest("db", 2, cpus=CpuSpec(ids=(1, 2)), memory=BLOCK))
    assert refused.value.remote_type == "ResourceUnavailableError"
    assert str(refused.value).startswith(
        "CPU 1 for 'db' is held by 'web'; free: CPUs 2-7 and 3.9 GiB"
    )
    assert [g.instance for g in await host.grants()] == ["web"]


@pytest.mark.parametrize(
    ("method", "request_", "error", "message"),
    [
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(count=1)), "InvalidResourceRequestError",
         "a new grant for 'web' needs CPUs and memory (--cpus N --memory SIZE)"),
        ("allocate", GrantRequest("web", 1, memory=BLOCK), "InvalidResourceRequestError",
         "a new grant for 'web' needs CPUs and memory"),
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(count=1), memory=8 * MiB),
         "InvalidResourceRequestError", "8 MiB of memory is below the 16 MiB an instance needs"),
        ("allocate", GrantRequest("Web!", 1, cpus=CpuSpec(count=1), memory=BLOCK),
         "InvalidResourceRequestError", "bad instance name 'Web!'"),
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(ids=(9,)), memory=BLOCK),
         "InvalidResourceRequestError",
         "CPU 9 is not an online CPU of this host's pool (the pool has 0-7)"),
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(count=9), memory=BLOCK),
         "ResourceUnavailableError", "9 CPUs asked for 'web', 8 free"),
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(count=1), memory=int(41.5 * 2**30)),
         "ResourceUnavailableError", "41.5 GiB of memory asked for 'web', 4 GiB free"),
        ("allocate", GrantRequest("web", 1, cpus=CpuSpec(count=1), memory=BLOCK,
                                  queues=("net/eth9/rx-0",)),
         "InvalidResourceRequestError", "there is no I/O queue 'net/eth9/rx-0'"),
        ("update", GrantRequest("web", 1, memory=BLOCK), "UnknownGrantError",
         "'web' holds nothing to update: allocate a grant first"),
        ("release", Release("web"), "UnknownGrantError", "'web' holds nothing to release"),
    ],
)  # fmt: skip
async def test_every_bad_request_gets_a_clear_error_and_leaves_nothing_behind(
    host: Host, method: str, request_: object, error: str, message: str
) -> None:
    # Resource errors travel as refusals, an unknown grant as "not found" (mkctl exits 4 or 3).
    travels_as = NotFoundError if error == "UnknownGrantError" else RefusedError
    with pytest.raises(travels_as) as refused:
        await host.call(method, request_)
    assert refused.value.remote_type == error
    assert str(refused.value).startswith(message)
    assert await host.grants() == ()
    assert await host.history() == ()
    assert (await host.pool()).free_cpus == tuple(range(8))


async def test_an_update_that_changes_nothing_is_no_transaction(host: Host) -> None:
    grant = await host.grant("allocate", web(CpuSpec(ids=(2,)), BLOCK))
    assert await host.grant("update", web(CpuSpec(ids=(2,)))) == grant
    assert len(await host.history()) == 1


async def test_release_and_reconcile_give_back_everything(host: Host) -> None:
    await host.grant("allocate", web(CpuSpec(count=2), BLOCK))
    await host.grant("allocate", GrantRequest("db", 2, cpus=CpuSpec(count=2), memory=BLOCK))
    await host.grant("allocate", GrantRequest("old", 3, cpus=CpuSpec(count=1), memory=BLOCK))
    released = await host.grant("release", Release("db"))
    assert (released.instance, len(released.cpus)) == ("db", 2)
    gone = await host.call("reconcile", Reconcile((InstanceRef("web", 1),)), GrantList)
    assert isinstance(gone, GrantList)
    assert [g.instance for g in gone.grants] == ["old"]
    assert [g.instance for g in await host.grants()] == ["web"]
    kinds = [(r.instance, r.kind) for r in await host.history()]
    assert kinds[:2] == [("old", "reconcile"), ("db", "release")]
    assert len((await host.pool()).free_cpus) == 6


async def test_history_pages_from_the_newest(host: Host) -> None:
    await host.grant("allocate", web(CpuSpec(count=1), BLOCK))
    for memory in (2, 3, 4, 5):
        await host.grant("update", web(memory=memory * BLOCK))
    first = await host.call("history", HistoryQuery(limit=2), History)
    assert isinstance(first, History)
    assert [r.tx for r in first.transactions] == [5, 4]
    rest = await host.call("history", HistoryQuery(limit=10, before=first.next_before), History)
    assert isinstance(rest, History)
    assert ([r.tx for r in rest.transactions], rest.next_before) == ([3, 2, 1], 0)


async def test_a_restarted_actor_keeps_its_grants_and_rolls_back_what_was_pending(
    machine: Path, tmp_path: Path
) -> None:
    path = tmp_path / "resource.db"
    bus = MemoryBus()
    async with resource_host(machine, path, bus) as first:
        kept = await first.grant("allocate", web(CpuSpec(count=2), BLOCK))
    # As if the actor had crashed mid-transaction: tx 2 written as pending, and already applied
    # by the instance, when the process died.
    more = msgspec.structs.replace(kept, cpus=(*kept.cpus, 7), tx=2)
    pending = TxRecord(2, "web", 1, "update", "pending", ops=(CpuAdd(1, cpu_id=7),),
                       before=kept, after=more)  # fmt: skip
    store = ResourceStore(path)
    await store.begin(pending)
    store.close()
    agent = FakeAgent(1, cpus=frozenset(kept.cpus), memory=BLOCK)
    await agent.handle(ResourceTransaction(2, 1, pending.ops, cpus=more.cpus, memory=BLOCK))
    assert agent.cpus == set(more.cpus)
    async with bus.connect("agent-1", instance=1) as ep:
        await agent.serve(ep)
        async with resource_host(machine, path, bus) as second:
            assert await second.grants() == (kept,)
            assert agent.transactions[-1].rollback_of == 2  # rolled back on its side too
            assert agent.cpus == set(kept.cpus)
            (record, *_) = await second.history()
            assert (record.tx, record.state) == (2, "rolled-back")
            assert record.reason == "the resource actor stopped during it"
            db = GrantRequest("db", 2, cpus=CpuSpec(count=6), memory=BLOCK)
            grant = await second.grant("allocate", db)
            assert not set(grant.cpus) & set(kept.cpus)  # nothing granted twice
            assert grant.tx == 3  # ids go on where they were


async def test_only_the_host_may_change_an_instances_resources() -> None:
    bus = MemoryBus()
    agent = FakeAgent(3, cpus=frozenset({0}))
    tx = ResourceTransaction(tx=1, instance=3, ops=(CpuAdd(3, cpu_id=1),), cpus=(0, 1))
    async with bus.connect("agent", instance=3) as ep, bus.connect("workload", instance=3) as app:
        await _serve(ep, AgentState(3, "x", agent)).start()
        with pytest.raises(AccessDeniedError, match="only the host changes"):
            await app.request("instance.3.agent", "resource", tx)
        async with bus.connect("resource") as host:
            answer = await host.request(
                "instance.3.agent", "resource", tx, response=ResourceTransactionAck
            )
    assert [ack.result for ack in answer.acks] == [0]
    assert agent.cpus == {0, 1}


def test_the_actor_serves_exactly_the_methods_of_the_contract() -> None:
    import typing

    from multikernel.protocol import RESOURCE_METHODS

    for method, (request, response) in RESOURCE_METHODS.items():
        hints = typing.get_type_hints(getattr(ResourceActor, f"serve_{method}"))
        assert (hints["request"], hints["return"]) == (request, response), method
    served = {name[6:] for name in dir(ResourceActor) if name.startswith("serve_")}
    assert served == set(RESOURCE_METHODS)


@settings(max_examples=200, deadline=None)
@given(
    before=st.tuples(st.frozensets(st.integers(0, 7)), st.frozensets(st.integers(0, 31))),
    after=st.tuples(st.frozensets(st.integers(0, 7)), st.frozensets(st.integers(0, 31))),
)
def test_a_transactions_ops_take_one_holding_to_the_other_and_undo_takes_it_back(
    before: tuple[frozenset[int], frozenset[int]], after: tuple[frozenset[int], frozenset[int]]
) -> None:
    pool = POOL
    old, new = Holding(*before), Holding(*after)
    ops = ops_for(pool, 1, old, new)
    assert _apply(pool, old, ops) == new
    assert _apply(pool, new, undo(pool, ops)) == old
    kinds = [type(op).__name__ for op in ops]
    order = ["MemRemove", "MemAdd", "CpuRemove", "CpuAdd"]
    assert kinds == sorted(kinds, key=order.index)  # the kernel's overlay order


def _apply(pool: Pool, holding: Holding, ops: tuple[object, ...]) -> Holding:
    cpus, blocks = set(holding.cpus), set(holding.blocks)
    pages = pool.block_size // 4096
    for op in ops:
        match op:
            case CpuAdd():
                cpus.add(op.cpu_id)
            case CpuRemove():
                cpus.discard(op.cpu_id)
            case MemAdd():
                blocks |= set(range(op.start_pfn // pages, (op.start_pfn + op.nr_pages) // pages))
            case MemRemove():
                blocks -= set(range(op.start_pfn // pages, (op.start_pfn + op.nr_pages) // pages))
    return Holding(frozenset(cpus), frozenset(blocks))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gets cgroups: nothing to miss without")
async def test_a_running_instance_whose_cgroups_are_not_found_is_an_error_not_a_silent_grant() -> (
    None
):
    elsewhere = LocalHostSide(LocalPlatform(group=f"multikernel-nowhere-{os.getpid()}"))
    await elsewhere.apply("web", frozenset({0}), None)  # not running: nothing to do
    with pytest.raises(HostSideError, match="the resource actor and the host must use the same"):
        await elsewhere.apply("web", frozenset({0}), None, running=True)
