"""Elastic grants on an in-memory bus: an application asks its agent, the agent asks as its
instance, the resource actor changes that instance's grant alone and within the host's bounds."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Policy
from multikernel.bus.testing import MemoryBus
from multikernel.endpoints import Bus
from multikernel.protocol import (
    AccessDeniedError,
    CpuSpec,
    ElasticRequest,
    Grant,
    GrantList,
    GrantRequest,
    GrantsQuery,
    History,
    HistoryQuery,
    NoRespondersError,
    NotFoundError,
    PoolInfo,
    PoolQuery,
    RefusedError,
    TxRecord,
    format_cpu_list,
)
from multikernel.services._agent import AgentState, _serve
from multikernel.services._elastic import AGENT_RULE, ElasticBounds
from multikernel.services._host import host_rule
from multikernel.services._placement import Holding
from multikernel.services._pool import discover_pool
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services.testing import FakeAgent, FakeSysfs

pytestmark = pytest.mark.anyio
MiB = 1 << 20
BLOCK = 128 * MiB


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    return FakeSysfs(tmp_path / "machine").cpus(8, nodes=2).memory(4 << 30, nodes=2).root


def policy() -> Policy:
    """What the host's policy adds to the defaults: its own user, and the agents' rule."""
    return Policy.from_toml(host_rule(0) + AGENT_RULE)


@dataclass
class Host:
    bus: MemoryBus
    client: Bus
    actor: ResourceActor

    async def allocate(self, name: str, id: int, cpus: int, memory: int) -> Grant:
        asked = GrantRequest(name, id, cpus=CpuSpec(count=cpus), memory=memory)
        grant: Grant = await self.client.request("resource", "allocate", asked, response=Grant)
        return grant

    async def history(self, instance: str = "") -> tuple[TxRecord, ...]:
        found = await self.client.request(
            "resource", "history", HistoryQuery(instance), response=History
        )
        return found.transactions


@asynccontextmanager
async def elastic_host(
    machine: Path, store: Path, bounds: ElasticBounds | None = None
) -> AsyncIterator[Host]:
    bus = MemoryBus(policy())
    async with (
        bus.connect("resource") as ep,
        bus.connect("test") as client,
        anyio.create_task_group() as tg,
    ):
        actor = ResourceActor(ep, discover_pool(machine), ResourceStore(store), elastic=bounds,
                              ack_timeout=2.0)  # fmt: skip
        await tg.start(actor.run)
        try:
            yield Host(bus, client, actor)
        finally:
            tg.cancel_scope.cancel()
            actor.store.close()


@dataclass
class Instance:
    fake: FakeAgent  # what the instance holds, as its agent applied it
    agent: Bus  # the agent's own attachment
    app: Bus  # an application in the instance


@asynccontextmanager
async def instance(
    bus: MemoryBus, id: int, name: str, grant: Grant | None
) -> AsyncIterator[Instance]:
    """Instance `id`'s agent (the real agent's methods, over a fake of its processes) and an
    application in it."""
    fake = FakeAgent(
        id, cpus=frozenset(grant.cpus if grant else ()), memory=grant.memory if grant else 0
    )
    fake.tx = grant.tx if grant else 0
    async with (
        bus.connect(f"agent-{name}", instance=id) as agent,
        bus.connect(f"app-{name}", instance=id) as app,
    ):
        await _serve(agent, AgentState(id, name, fake)).start()
        yield Instance(fake, agent, app)


async def ask(app: Bus, id: int, **asked: object) -> Grant:
    """What an application in instance `id` does: ask its agent."""
    request = ElasticRequest(**asked)  # type: ignore[arg-type]
    grant: Grant = await app.request(f"instance.{id}.agent", "elastic", request, response=Grant)
    return grant


async def test_an_application_grows_its_instance_through_its_agent_within_the_hosts_bound(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db", ElasticBounds(max_cpus=3)) as host:
        first = await host.allocate("web", 1, cpus=1, memory=BLOCK)
        async with (
            instance(host.bus, 1, "web", first) as web,
            await host.client.subscribe("mk.resource.1.tx") as records,
        ):
            grant = await ask(web.app, 1, cpu_change=2, reason="a batch is coming")
            states = [(await records.receive()).decode(TxRecord).state for _ in range(2)]
        (record, _) = await host.history()
    assert (len(grant.cpus), grant.memory, grant.applied_by) == (3, BLOCK, "instance")
    assert web.fake.cpus == set(grant.cpus)  # the agent applied it before the answer came
    assert states == ["pending", "committed"]  # what the lifecycle actor follows
    assert (record.kind, record.state, record.instance) == ("elastic", "committed", "web")
    assert record.reason == "the instance asked: a batch is coming"


async def test_growing_beyond_the_bound_is_refused_naming_the_bound_and_what_is_free(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db", ElasticBounds(max_cpus=2)) as host:
        web = await host.allocate("web", 1, cpus=1, memory=BLOCK)
        db = await host.allocate("db", 2, cpus=3, memory=BLOCK)
        async with instance(host.bus, 1, "web", web) as inside:
            with pytest.raises(RefusedError) as refused:
                await ask(inside.app, 1, cpus=4)
            with pytest.raises(RefusedError) as too_much:
                await ask(inside.app, 1, memory_change=BLOCK)
        assert len(await host.history()) == 2  # nothing but the two allocations
    free = format_cpu_list(set(range(8)) - set(web.cpus) - set(db.cpus))
    assert refused.value.remote_type == "ResourceUnavailableError"
    assert str(refused.value).startswith(
        "'web' may hold at most 2 CPUs by asking, not 4 (it holds 1; the host lets an instance "
        "grow to 2 (--elastic-max-cpus) or to what its operator granted, 1); "
        f"free: CPUs {free} and 3.75 GiB; for more, the host's operator runs mkctl update"
    )
    assert str(too_much.value).startswith(
        "'web' may hold at most 128 MiB of memory by asking, not 256 MiB (it holds 128 MiB; the "
        "host lets an instance grow to 0 B (--elastic-max-memory) or to what its operator "
        "granted, 128 MiB)"
    )


async def test_with_no_bound_an_instance_gives_back_and_takes_back_up_to_its_operators_grant(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db") as host:
        first = await host.allocate("web", 1, cpus=3, memory=3 * BLOCK)
        async with instance(host.bus, 1, "web", first) as web:
            less = await ask(web.app, 1, cpu_change=-2, memory=BLOCK)
            back = await ask(web.app, 1, cpus=3, memory_change=2 * BLOCK)
            with pytest.raises(RefusedError, match="'web' may hold at most 3 CPUs by asking"):
                await ask(web.app, 1, cpu_change=1)
            same = await ask(web.app, 1, memory_change=-(BLOCK - 1))  # rounds up: no change
        assert [r.kind for r in await host.history()] == ["elastic", "elastic", "allocate"]
    assert (len(less.cpus), less.memory) == (1, BLOCK)
    assert (len(back.cpus), back.memory) == (3, 3 * BLOCK)
    assert set(less.cpus) < set(back.cpus)  # it kept the CPU it had
    assert same == back


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ({"cpu_change": -5}, "'web' holds 1 CPU and cannot go below 1 (asked for -4)"),
        ({"memory_change": -BLOCK}, "'web' holds 128 MiB of memory and cannot go below one block"),
    ],
)
async def test_an_instance_keeps_at_least_one_cpu_and_one_memory_block(
    machine: Path, tmp_path: Path, asked: dict[str, int], message: str
) -> None:
    async with elastic_host(machine, tmp_path / "r.db") as host:
        first = await host.allocate("web", 1, cpus=1, memory=BLOCK)
        async with instance(host.bus, 1, "web", first) as web:
            with pytest.raises(RefusedError) as refused:
                await ask(web.app, 1, **asked)
    assert refused.value.remote_type == "InvalidResourceRequestError"
    assert str(refused.value).startswith(message)


async def test_a_shrink_the_instance_refuses_is_rolled_back_and_says_why_it_was_asked(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db") as host:
        first = await host.allocate("web", 1, cpus=1, memory=2 * BLOCK)
        async with instance(host.bus, 1, "web", first) as web:
            web.fake.used = 200 * MiB
            with pytest.raises(RefusedError) as refused:
                await ask(web.app, 1, memory=BLOCK, reason="idle at night")
        (record, _) = await host.history()
    assert refused.value.remote_type == "GrantFailedError"
    assert web.fake.memory == 2 * BLOCK
    assert (record.kind, record.state) == ("elastic", "rolled-back")
    assert record.reason.startswith("the instance refused it: the instance uses 200 MiB")
    assert record.reason.endswith("(asked because the instance asked: idle at night)")


async def test_an_instance_changes_its_own_grant_and_nothing_else_of_the_pool(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db", ElasticBounds(max_cpus=4)) as host:
        web_grant = await host.allocate("web", 1, cpus=1, memory=BLOCK)
        db_grant = await host.allocate("db", 2, cpus=1, memory=BLOCK)
        async with (
            instance(host.bus, 1, "web", web_grant),
            instance(host.bus, 2, "db", db_grant) as db,
        ):
            # Another instance's agent is out of reach (the hub: no cross-instance call) ...
            with pytest.raises(AccessDeniedError):
                await ask(db.app, 1, cpus=4)
            # ... an agent's own request changes its own instance, whatever it would name ...
            grown = await db.agent.request(
                "resource", "elastic", ElasticRequest(cpus=2), response=Grant
            )
            # ... and the rest of `resource` is the host's.
            web_update = GrantRequest("web", 1, cpus=CpuSpec(count=4))
            for method, body, response in (
                ("update", web_update, Grant),
                ("grants", GrantsQuery(), GrantList),
                ("pool", PoolQuery(), PoolInfo),
            ):
                with pytest.raises(AccessDeniedError) as denied:
                    await db.agent.request("resource", method, body, response=response)
                assert str(denied.value).startswith(
                    "instance 2 may only call resource.elastic (for itself, through its agent)"
                )
            # An application reaches `resource` only through its agent.
            with pytest.raises(
                AccessDeniedError, match=r"allows instance 2 \(uid 0\) to call 'resource'"
            ):
                await db.app.request("resource", "elastic", ElasticRequest(cpus=3))
        grants = {g.instance: len(g.cpus) for g in (await host.client.request(
            "resource", "grants", GrantsQuery(), response=GrantList)).grants}  # fmt: skip
    assert (grown.instance, len(grown.cpus)) == ("db", 2)
    assert grants == {"web": 1, "db": 2}


async def test_an_agent_refuses_to_forward_for_another_instance_even_if_the_policy_lets_it_in(
    tmp_path: Path,
) -> None:
    bus = MemoryBus(Policy.from_toml('[[rule]]\nwho = "instance:2"\ncall = ["instance.*.agent"]'))
    async with instance(bus, 1, "web", None), bus.connect("intruder", instance=2) as intruder:
        with pytest.raises(AccessDeniedError) as denied:
            await ask(intruder, 1, cpus=4)
    assert str(denied.value).startswith(
        "instance 2 may not grow or shrink instance 1: only its own applications ask"
    )


async def test_the_host_changes_grants_with_update_and_an_instance_without_one_is_told_so(
    machine: Path, tmp_path: Path
) -> None:
    async with elastic_host(machine, tmp_path / "r.db") as host:
        with pytest.raises(RefusedError, match="elastic is for an instance asking for itself"):
            await host.client.request("resource", "elastic", ElasticRequest(cpus=2))
        async with instance(host.bus, 5, "new", None) as new:
            with pytest.raises(NotFoundError) as unknown:
                await ask(new.app, 5, cpus=2)
    assert unknown.value.remote_type == "UnknownGrantError"
    assert str(unknown.value).startswith("instance 5 holds no grant to grow or shrink")


async def test_without_a_resource_actor_the_application_is_told_to_ask_again_later() -> None:
    bus = MemoryBus(policy())
    async with instance(bus, 1, "web", None) as web:
        with pytest.raises(NoRespondersError) as none:
            await ask(web.app, 1, cpus=2)
    assert str(none.value).startswith("the resource actor is not running")


async def test_what_the_operator_granted_stays_the_base_across_a_restart(
    machine: Path, tmp_path: Path
) -> None:
    store = tmp_path / "r.db"
    async with elastic_host(machine, store) as host:
        first = await host.allocate("web", 1, cpus=2, memory=BLOCK)
        async with instance(host.bus, 1, "web", first) as web:
            await ask(web.app, 1, cpus=1)  # gives one back: its base stays 2
    async with elastic_host(machine, store) as host:
        account = host.actor.ledger.accounts["web"]
        assert (account.base_cpus, len(account.held.cpus)) == (2, 1)
        update = GrantRequest("web", 1, cpus=CpuSpec(count=3))
        await host.client.request("resource", "update", update, response=Grant)  # base: 3
        grant = await host.client.request(
            "resource", "grants", GrantsQuery("web"), response=GrantList
        )
        async with instance(host.bus, 1, "web", grant.grants[0]) as web:
            assert len((await ask(web.app, 1, cpu_change=-2)).cpus) == 1
            assert len((await ask(web.app, 1, cpus=3)).cpus) == 3
            with pytest.raises(RefusedError, match="at most 3 CPUs"):
                await ask(web.app, 1, cpus=4)


def test_a_store_written_before_bases_were_kept_reads_the_holding_as_the_base(
    tmp_path: Path,
) -> None:
    path = tmp_path / "resource.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE accounts (name TEXT PRIMARY KEY, id INTEGER NOT NULL, tx INTEGER NOT NULL,
                               applied_by TEXT NOT NULL);
        CREATE TABLE holdings (instance TEXT NOT NULL, kind TEXT NOT NULL, item TEXT NOT NULL,
                               PRIMARY KEY (kind, item, instance));
        INSERT INTO accounts VALUES ('web', 1, 4, 'instance');
        INSERT INTO holdings VALUES ('web', 'cpu', '0'), ('web', 'cpu', '1'), ('web', 'block', '9');
        """
    )
    old.close()
    store = ResourceStore(path)
    try:
        (stored,), pending, _ = anyio.run(store.load)
    finally:
        store.close()
    assert (stored.held, stored.base, pending) == (
        Holding(frozenset({0, 1}), frozenset({9})),
        (2, 1),
        [],
    )


def test_the_docs_show_the_rule_the_host_adds_for_agents() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    for page in ("access-control.md", "resources.md"):
        assert AGENT_RULE.strip() in (docs / page).read_text(), page
