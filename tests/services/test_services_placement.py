"""Placement is a pure function: admission, the two policies, the eBPF hook, bad policies."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.protocol import (
    CpuSpec,
    InvalidResourceRequestError,
    ResourceUnavailableError,
)
from multikernel.services._placement import (
    Holding,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    PoolState,
    Refusal,
    place,
)
from multikernel.services._policies import PackPolicy, ScoredPolicy, SpreadPolicy, load_policy
from multikernel.services._pool import Cpu, MemoryBlock, Pool, Queue

MiB = 1 << 20


def make_pool(nodes: int = 2, cores: int = 2, threads: int = 2, blocks: int = 4) -> Pool:
    """`cores` cores per node, `threads` per core (x86 numbering), `blocks` 128 MiB per node."""
    total = nodes * cores
    cpus = {}
    for cpu in range(total * threads):
        core = cpu % total
        siblings = frozenset(core + t * total for t in range(threads))
        cpus[cpu] = Cpu(cpu, node=core // cores, package=core // cores, core=core % cores,
                        siblings=siblings)  # fmt: skip
    memory = {b: MemoryBlock(b, b // blocks) for b in range(nodes * blocks)}
    queues = {f"net/eth0/rx-{q}": Queue(f"net/eth0/rx-{q}", "net-rx") for q in range(2)}
    return Pool(cpus=cpus, block_size=128 * MiB, blocks=memory, queues=queues)


def state_of(pool: Pool, held: dict[str, Holding] | None = None, share: int = 1) -> PoolState:
    cpu_holders: dict[int, set[str]] = {}
    block_holders: dict[int, str] = {}
    queue_holders: dict[str, str] = {}
    for name, holding in (held or {}).items():
        for cpu in holding.cpus:
            cpu_holders.setdefault(cpu, set()).add(name)
        block_holders.update(dict.fromkeys(holding.blocks, name))
        queue_holders.update(dict.fromkeys(holding.queues, name))
    return PoolState(
        pool, {c: frozenset(h) for c, h in cpu_holders.items()}, block_holders, queue_holders,
        share,
    )  # fmt: skip


def request(
    name: str = "db",
    cpus: CpuSpec | None = None,
    blocks: int | None = None,
    queues: frozenset[str] | None = None,
    current: Holding | None = None,
) -> PlacementRequest:
    return PlacementRequest(name, cpus, blocks, queues, current or Holding())


def test_pack_takes_both_threads_of_a_core_and_memory_on_that_node() -> None:
    pool = make_pool()
    placed = place(PackPolicy(), request(cpus=CpuSpec(count=2), blocks=2), state_of(pool))
    (cpu, *_) = sorted(placed.cpus)
    assert placed.cpus == pool.cpus[cpu].siblings
    assert {pool.blocks[b].node for b in placed.blocks} == {pool.cpus[cpu].node}


def test_pack_picks_the_node_that_fits_most_tightly() -> None:
    pool = make_pool()  # node 0: CPUs 0,1,4,5; node 1: CPUs 2,3,6,7
    held = {"web": Holding(cpus=frozenset({0, 4}))}
    placed = place(PackPolicy(), request(cpus=CpuSpec(count=2), blocks=1), state_of(pool, held))
    assert placed.cpus == {1, 5}  # node 0's last core, leaving node 1 whole


def test_spread_uses_one_thread_per_core_across_nodes_and_interleaves_memory() -> None:
    pool = make_pool()
    placed = place(SpreadPolicy(), request(cpus=CpuSpec(count=2), blocks=4), state_of(pool))
    assert {pool.cpus[c].node for c in placed.cpus} == {0, 1}
    assert all(not (pool.cpus[c].siblings - {c}) & placed.cpus for c in placed.cpus)
    assert sorted(pool.blocks[b].node for b in placed.blocks) == [0, 0, 1, 1]


@pytest.mark.parametrize("policy", [PackPolicy(), SpreadPolicy()], ids=lambda p: p.name)
def test_growing_keeps_what_is_held_and_shrinking_keeps_a_part_of_it(
    policy: PlacementPolicy,
) -> None:
    pool = make_pool()
    current = Holding(cpus=frozenset({2, 6}), blocks=frozenset({4, 5}))
    state = state_of(pool, {"db": current})
    grown = place(policy, request(cpus=CpuSpec(count=3), blocks=3, current=current), state)
    assert grown.cpus > current.cpus
    assert grown.blocks > current.blocks
    shrunk = place(policy, request(cpus=CpuSpec(count=1), blocks=1, current=current), state)
    assert shrunk.cpus < current.cpus
    assert shrunk.blocks < current.blocks


def test_explicit_cpus_held_by_another_instance_are_refused_naming_the_holder() -> None:
    state = state_of(make_pool(), {"web": Holding(cpus=frozenset({1}))})
    with pytest.raises(ResourceUnavailableError) as refused:
        place(PackPolicy(), request(cpus=CpuSpec(ids=(0, 1)), blocks=1), state)
    assert str(refused.value) == ("CPU 1 for 'db' is held by 'web'; free: CPUs 0,2-7 and 1 GiB")
    assert refused.value.details["holder"] == "web"


def test_more_cpus_than_are_free_is_refused_with_what_is_free_and_held() -> None:
    state = state_of(make_pool(), {"web": Holding(cpus=frozenset(range(6)), blocks=frozenset({0}))})
    with pytest.raises(ResourceUnavailableError) as refused:
        place(PackPolicy(), request(cpus=CpuSpec(count=3), blocks=1), state)
    assert str(refused.value) == (
        "3 CPUs asked for 'db', 2 free; free: CPUs 6-7 and 896 MiB; "
        "held: 'web' CPUs 0-5 and 128 MiB"
    )


def test_more_memory_than_is_free_is_refused_in_sizes_for_people() -> None:
    state = state_of(make_pool(), {"web": Holding(cpus=frozenset({0}), blocks=frozenset({0, 1}))})
    with pytest.raises(ResourceUnavailableError) as refused:
        place(PackPolicy(), request(cpus=CpuSpec(count=1), blocks=332), state)
    assert str(refused.value) == (
        "41.5 GiB of memory asked for 'db', 768 MiB free of the pool's 1 GiB; "
        "held: 'web' CPUs 0 and 256 MiB"
    )


def test_cpus_outside_the_pool_and_unknown_queues_are_bad_requests() -> None:
    pool = make_pool()
    with pytest.raises(InvalidResourceRequestError, match=re.escape(
        "CPU 9,12 is not an online CPU of this host's pool (the pool has 0-7)"
    )):  # fmt: skip
        place(PackPolicy(), request(cpus=CpuSpec(ids=(1, 9, 12)), blocks=1), state_of(pool))
    bad_queue = request(cpus=CpuSpec(count=1), blocks=1, queues=frozenset({"net/eth9/rx-0"}))
    with pytest.raises(InvalidResourceRequestError, match="there is no I/O queue 'net/eth9/rx-0'"):
        place(PackPolicy(), bad_queue, state_of(pool))


def test_a_queue_held_by_another_instance_is_refused_naming_it() -> None:
    state = state_of(make_pool(), {"web": Holding(queues=frozenset({"net/eth0/rx-0"}))})
    with pytest.raises(ResourceUnavailableError, match=re.escape(
        "queue net/eth0/rx-0 for 'db' is held by 'web'; free queues: net/eth0/rx-1"
    )):  # fmt: skip
        place(PackPolicy(), request(cpus=CpuSpec(count=1), blocks=1,
                                    queues=frozenset({"net/eth0/rx-0"})), state)  # fmt: skip


def test_cpus_may_be_shared_only_as_far_as_the_host_allows() -> None:
    pool = make_pool(nodes=1, cores=1, threads=1)
    held = {"web": Holding(cpus=frozenset({0}))}
    assert place(PackPolicy(), request(cpus=CpuSpec(count=1), blocks=1),
                 state_of(pool, held, share=2)).cpus == {0}  # fmt: skip
    held["db2"] = Holding(cpus=frozenset({0}))
    with pytest.raises(ResourceUnavailableError, match="held by 'db2', 'web'"):
        place(PackPolicy(), request(cpus=CpuSpec(ids=(0,)), blocks=1), state_of(pool, held, 2))


class Greedy:
    """A buggy plugin: hands out CPU 0 whoever holds it."""

    name = "greedy"

    def place(self, request: PlacementRequest, state: PoolState) -> Placement | Refusal:
        return Placement(frozenset({0}), frozenset({0}), frozenset())


class Shy:
    name = "shy"

    def place(self, request: PlacementRequest, state: PoolState) -> Placement | Refusal:
        return Refusal("shy places nothing on Tuesdays")


def test_a_policy_that_double_allocates_is_caught_and_nothing_is_granted() -> None:
    state = state_of(make_pool(), {"web": Holding(cpus=frozenset({0}))})
    with pytest.raises(ResourceUnavailableError, match="a bug in that policy"):
        place(Greedy(), request(cpus=CpuSpec(count=1), blocks=1), state)


def test_a_policys_refusal_says_why_and_what_is_free() -> None:
    with pytest.raises(
        ResourceUnavailableError, match="shy places nothing on Tuesdays; free: CPUs"
    ):
        place(Shy(), request(cpus=CpuSpec(count=1), blocks=1), state_of(make_pool()))


class OddFirst:
    """A scorer like an eBPF program would be: prefer odd CPU ids."""

    name = "odd"

    def score(self, request: PlacementRequest, cpu: Cpu, state: PoolState) -> int:
        return cpu.id % 2


def test_a_scored_policy_ranks_cpus_by_its_scorer() -> None:
    policy = ScoredPolicy(OddFirst())
    assert policy.name == "scored:odd"
    assert place(policy, request(cpus=CpuSpec(count=3), blocks=1),
                 state_of(make_pool())).cpus == {1, 3, 5}  # fmt: skip


def test_policies_load_by_name_or_import_path() -> None:
    assert load_policy("pack").name == "pack"
    assert load_policy("spread").name == "spread"
    assert load_policy(f"{__name__}:Shy").name == "shy"
    with pytest.raises(InvalidResourceRequestError, match="unknown placement policy 'best'"):
        load_policy("best")
    with pytest.raises(InvalidResourceRequestError, match="cannot load placement policy"):
        load_policy("no.such.module:policy")
    with pytest.raises(InvalidResourceRequestError, match="is not a placement policy"):
        load_policy(f"{__name__}:MiB")


@st.composite
def situations(draw: st.DrawFn) -> tuple[PoolState, PlacementRequest]:
    pool = make_pool(
        nodes=draw(st.integers(1, 3)), cores=draw(st.integers(1, 3)),
        threads=draw(st.integers(1, 2)), blocks=draw(st.integers(1, 4)),
    )  # fmt: skip
    share = draw(st.integers(1, 2))
    held: dict[str, Holding] = {}
    free_blocks = sorted(pool.blocks)
    for name in ("a", "b", "c"):
        cpus = draw(st.frozensets(st.sampled_from(sorted(pool.cpus)), max_size=3))
        cpus = frozenset(c for c in cpus if sum(c in h.cpus for h in held.values()) < share)
        n = draw(st.integers(0, len(free_blocks)))
        held[name] = Holding(cpus, frozenset(free_blocks[:n]))
        free_blocks = free_blocks[n:]
    state = state_of(pool, held, share)
    me = draw(st.sampled_from(["a", "b", "new"]))
    current = held.get(me, Holding())
    if draw(st.booleans()):
        spec = CpuSpec(count=draw(st.integers(1, len(pool.cpus) + 1)))
    else:
        ids = draw(st.frozensets(st.integers(0, len(pool.cpus)), min_size=1, max_size=3))
        spec = CpuSpec(ids=tuple(sorted(ids)))
    blocks = draw(st.integers(0, len(pool.blocks) + 1))
    return state, PlacementRequest(me, spec, blocks, None, current)


@settings(max_examples=300, deadline=None)
@given(situation=situations(), policy=st.sampled_from([PackPolicy(), SpreadPolicy()]))
def test_no_policy_ever_double_allocates_or_over_commits(
    situation: tuple[PoolState, PlacementRequest], policy: PlacementPolicy
) -> None:
    state, req = situation
    assert req.cpus is not None
    try:
        placed = place(policy, req, state)
    except (ResourceUnavailableError, InvalidResourceRequestError):
        free_cpus = {c.id for c in state.free_cpus(req.instance)}
        fits = (
            set(req.cpus.ids) <= free_cpus if req.cpus.ids else req.cpus.count <= len(free_cpus)
        ) and (req.blocks or 0) <= len(state.free_blocks(req.instance))
        assert not fits
        return
    assert len(placed.cpus) == (req.cpus.count or len(req.cpus.ids))
    assert len(placed.blocks) == req.blocks
    for cpu in placed.cpus:
        others = state.cpu_holders.get(cpu, frozenset()) - {req.instance}
        assert len(others) < state.cpu_share
    for block in placed.blocks:
        assert state.block_holders.get(block, req.instance) == req.instance
