"""A hypothesis state machine over the resource actor: grants, revokes, instance deaths, refusals,
timeouts and actor restarts (clean, and with a transaction left pending as after a crash).

After every step: no CPU, memory block or queue is held twice (no overlap), nothing held is
outside the pool and what is free plus what is held is the pool (no leak, no over-commit), the
grants are exactly what the requests that succeeded asked for (a failed one changes nothing, a
restart forgets nothing), and every running instance's agent holds what its grant says.

The actor runs on an in-memory bus in an event loop of its own (a blocking portal), driven by
the machine's synchronous rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio
import anyio.from_thread
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from multikernel.bus.testing import MemoryBus
from multikernel.protocol import (
    CpuSpec,
    Grant,
    GrantList,
    GrantRequest,
    GrantsQuery,
    MultikernelError,
    PoolInfo,
    PoolQuery,
    Release,
)
from multikernel.services._pool import Pool, discover_pool
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services.testing import FakeAgent, FakeSysfs

BLOCK = 128 << 20
NAMES = ("a", "b", "c")
IDS = {"a": 1, "b": 2, "c": 3}
QUEUES = ("net/eth0/rx-0", "net/eth0/tx-0", "net/eth9/rx-0")  # the last is not on the machine
#: What a request may fail with; anything else is a bug.
REFUSALS = {
    "InvalidResourceRequestError",
    "ResourceUnavailableError",
    "UnknownGrantError",
    "GrantFailedError",
}

cpu_specs = st.one_of(
    st.none(),
    st.integers(1, 5).map(lambda n: CpuSpec(count=n)),
    st.frozensets(st.integers(0, 4), min_size=1, max_size=3).map(
        lambda ids: CpuSpec(ids=tuple(sorted(ids)))
    ),
)
memories = st.sampled_from([0, 100 << 20, BLOCK, 2 * BLOCK, 3 * BLOCK, 9 * BLOCK])
queue_sets = st.one_of(st.none(), st.frozensets(st.sampled_from(QUEUES), max_size=2))


@asynccontextmanager
async def running_actor(bus: MemoryBus, pool: Pool, store: Path) -> AsyncIterator[ResourceActor]:
    async with bus.connect("resource") as ep, anyio.create_task_group() as tg:
        actor = ResourceActor(ep, pool, ResourceStore(store), ack_timeout=0.05)
        try:
            await tg.start(actor.run)
            yield actor
        finally:
            tg.cancel_scope.cancel()
            actor.store.close()


@asynccontextmanager
async def running_agent(bus: MemoryBus, agent: FakeAgent) -> AsyncIterator[FakeAgent]:
    async with bus.connect(f"agent-{agent.instance}", instance=agent.instance) as ep:
        await agent.serve(ep)
        yield agent


def key(grant: Grant) -> tuple[object, ...]:
    return (grant.instance, grant.cpus, grant.memory, grant.memory_blocks, grant.queues)


class ResourceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.dir = Path(self.stack.enter_context(TemporaryDirectory()))
        fake = FakeSysfs(self.dir / "machine").cpus(4, nodes=2)
        fake.memory(8 * BLOCK, block_size=BLOCK, nodes=2).nic("eth0")
        self.pool = discover_pool(fake.root)
        self.portal = self.stack.enter_context(
            anyio.from_thread.start_blocking_portal("asyncio", {"use_uvloop": True})
        )
        self.bus = MemoryBus()
        self.client = self.stack.enter_context(
            self.portal.wrap_async_context_manager(self.bus.connect("test"))
        )
        self.actor_context: ExitStack | None = None
        self.start_actor()
        self.expected: dict[str, Grant] = {}
        self.agents: dict[str, tuple[FakeAgent, ExitStack]] = {}

    def start_actor(self) -> None:
        context = ExitStack()
        self.actor = context.enter_context(
            self.portal.wrap_async_context_manager(
                running_actor(self.bus, self.pool, self.dir / "resource.db")
            )
        )
        self.actor_context = context

    def teardown(self) -> None:
        for _, context in self.agents.values():
            context.close()
        if self.actor_context is not None:
            self.actor_context.close()
        self.stack.close()

    def call(self, method: str, body: object, response: type = Grant) -> object:
        return self.portal.call(
            lambda: self.client.request("resource", method, body, response=response)
        )

    def attempt(self, method: str, body: object) -> Grant | MultikernelError:
        """The grant, or the error the actor answered."""
        try:
            grant = self.call(method, body)
        except MultikernelError as error:
            return error
        assert isinstance(grant, Grant)
        return grant

    def change(self, name: str, cpus: CpuSpec | None, memory: int, queues: frozenset[str] | None,
               *, fault: bool = False) -> None:  # fmt: skip
        method = "update" if name in self.expected else "allocate"
        request = GrantRequest(
            name, IDS[name], cpus, memory, tuple(sorted(queues)) if queues is not None else None
        )
        grant = self.attempt(method, request)
        if isinstance(grant, MultikernelError):
            assert grant.remote_type in REFUSALS, str(grant)
            if grant.remote_type == "GrantFailedError":
                agent = self.agents.get(name)
                assert fault or (agent is not None and agent[0].used > 0), str(grant)
            return
        self.expected[name] = grant
        if name in self.agents and grant.applied_by == "instance":
            agent = self.agents[name][0]
            assert agent.cpus == set(grant.cpus)

    # -- rules ---------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), cpus=cpu_specs, memory=memories, queues=queue_sets)
    def grant_or_revoke(
        self, name: str, cpus: CpuSpec | None, memory: int, queues: frozenset[str] | None
    ) -> None:
        self.change(name, cpus, memory, queues)

    @rule(name=st.sampled_from(NAMES))
    def release(self, name: str) -> None:
        if name in self.agents:
            return  # the lifecycle actor releases only stopped instances
        released = self.attempt("release", Release(name))
        if isinstance(released, MultikernelError):
            assert released.remote_type == "UnknownGrantError"
            assert name not in self.expected
            return
        del self.expected[name]

    @rule(name=st.sampled_from(NAMES))
    def start_instance(self, name: str) -> None:
        if name in self.agents:
            return
        grant = self.expected.get(name)
        agent = FakeAgent(
            IDS[name],
            cpus=frozenset(grant.cpus) if grant else frozenset(),
            memory=grant.memory if grant else 0,
        )
        agent.queues = grant.queues if grant else ()
        context = ExitStack()
        context.enter_context(
            self.portal.wrap_async_context_manager(running_agent(self.bus, agent))
        )
        self.agents[name] = (agent, context)

    @rule(name=st.sampled_from(NAMES))
    def instance_dies(self, name: str) -> None:
        if name in self.agents:
            self.agents.pop(name)[1].close()

    @rule(name=st.sampled_from(NAMES), used=st.sampled_from([0, 150 << 20]))
    def instance_uses_memory(self, name: str, used: int) -> None:
        if name in self.agents:
            self.agents[name][0].used = used

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), cpus=cpu_specs, memory=memories, hang=st.booleans())
    def instance_refuses_or_hangs(
        self, data: st.DataObject, cpus: CpuSpec | None, memory: int, hang: bool
    ) -> None:
        name = data.draw(st.sampled_from(sorted(self.agents)))
        agent = self.agents[name][0]
        if hang:
            agent.hang = True  # the actor's 0.05 s acknowledgement timeout rolls it back
        else:
            agent.refuse = "no"
        try:
            self.change(name, cpus, memory, None, fault=True)
        finally:
            agent.refuse = None
            agent.release_hang()

    @rule()
    def actor_restarts(self) -> None:
        assert self.actor_context is not None
        self.actor_context.close()
        self.start_actor()

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), cpus=cpu_specs, applied=st.booleans())
    def actor_crashes_mid_transaction(
        self, data: st.DataObject, cpus: CpuSpec | None, applied: bool
    ) -> None:
        """The actor dies with a transaction pending: before the instance answered (`applied`
        False: it never does), or after it applied it but before the commit was written. The
        store says pending, and the next actor rolls it back on both sides."""
        name = data.draw(st.sampled_from(sorted(self.agents)))
        agent = self.agents[name][0]
        agent.hang = not applied

        async def dies(*args: object) -> None:
            raise RuntimeError("the actor's process is killed here")

        if applied:
            self.actor.store.commit = dies  # type: ignore[method-assign]
        self.actor.applier.roll_back = dies  # type: ignore[method-assign]
        held = self.expected.get(name)
        if held is None:
            cpus = cpus or CpuSpec(count=1)
        memory = BLOCK if held is None or held.memory != BLOCK else 2 * BLOCK  # a change
        request = GrantRequest(name, IDS[name], cpus, memory)
        try:
            outcome = self.attempt("update" if held else "allocate", request)
        finally:
            agent.release_hang()
        if isinstance(outcome, Grant):  # nothing to change: no transaction, no crash
            self.expected[name] = outcome
        else:
            assert outcome.remote_type in {*REFUSALS, "RuntimeError"}, str(outcome)
        self.actor_restarts()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def nothing_is_held_twice_lost_or_over_committed(self) -> None:
        grants = self.call("grants", GrantsQuery(), GrantList)
        pool = self.call("pool", PoolQuery(), PoolInfo)
        assert isinstance(grants, GrantList)
        assert isinstance(pool, PoolInfo)
        assert {key(g) for g in grants.grants} == {key(g) for g in self.expected.values()}
        cpus = [c for g in grants.grants for c in g.cpus]
        blocks = [b for g in grants.grants for b in g.memory_blocks]
        queues = [q for g in grants.grants for q in g.queues]
        assert len(cpus) == len(set(cpus))
        assert len(blocks) == len(set(blocks))
        assert len(queues) == len(set(queues))
        assert set(cpus) <= self.pool.cpus.keys()
        assert set(blocks) <= self.pool.blocks.keys()
        assert set(cpus) | set(pool.free_cpus) == self.pool.cpus.keys()
        assert not set(cpus) & set(pool.free_cpus)
        assert pool.memory_free + len(blocks) * BLOCK == pool.memory_total
        assert pool.pending == 0

    @invariant()
    def running_instances_hold_what_their_grant_says(self) -> None:
        for name, (agent, _) in self.agents.items():
            grant = self.expected.get(name)
            if grant is not None:
                assert agent.cpus == set(grant.cpus), name
                assert agent.memory == grant.memory, name
                assert agent.queues == grant.queues, name


ResourceMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestResourceMachine = ResourceMachine.TestCase
