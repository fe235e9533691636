"""The rebalancer's decision function, alone: load reports and the pool's state in, resizes out."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.protocol import InvalidResourceRequestError, LoadReport
from multikernel.services._rebalance import (
    InstanceView,
    PressureRebalancer,
    RebalancePolicy,
    RebalanceState,
    Resize,
    checked,
    cpu_stall,
    load_rebalancer,
)

MiB = 1 << 20
BLOCK = 128 * MiB
POLICY = PressureRebalancer()  # window 3, grow at 25 % stall, shrink at 5 % and half busy


def load(
    busy: float = 0.0,
    waiting: float = 0.0,
    *,
    psi: float | None = None,
    used: int = int(2.8 * BLOCK),  # 70 % of the 4 blocks `inst` holds: neither full nor spare
    memory_psi: float | None = None,
) -> LoadReport:
    return LoadReport(
        instance=1, period=2.0, tx=1, cpu_busy=busy, cpu_waiting=waiting, cpu_pressure=psi,
        memory_used=used, memory_pressure=memory_psi,
    )  # fmt: skip


def inst(
    name: str = "web",
    reports: Sequence[LoadReport] = (),
    *,
    cpus: int = 2,
    blocks: int = 4,
    floor: tuple[int, int] = (1, 1),
    most: tuple[int, int] = (8, 16),
    id: int = 1,
) -> InstanceView:
    return InstanceView(name, id, cpus, blocks, *floor, *most, reports=tuple(reports))


def state(*instances: InstanceView, cpus: int = 4, blocks: int = 8) -> RebalanceState:
    return RebalanceState(tuple(instances), cpus, blocks, BLOCK)


def test_an_instance_waiting_for_cpu_in_each_of_its_last_reports_gets_one_more() -> None:
    web = inst(reports=[load(1.0, 0.1)] + [load(2.0, 0.6)] * 3)  # the oldest is out of window
    (change,) = POLICY.decide(state(web))
    assert change == Resize(
        "web", 1, 3, None,
        "CPU pressure: threads waited at least 60% of the time over 3 reports",
    )  # fmt: skip


@pytest.mark.parametrize(
    "reports",
    [
        [load(2.0, 0.6)] * 2,  # not sustained yet: two of three
        [load(2.0, 0.6), load(2.0, 0.1), load(2.0, 0.6)],  # one quiet report in the window
    ],
    ids=["too-few", "not-sustained"],
)
def test_pressure_that_is_not_sustained_changes_nothing(reports: list[LoadReport]) -> None:
    assert POLICY.decide(state(inst(reports=reports))) == []


def test_psi_is_the_stall_where_the_report_has_it() -> None:
    assert cpu_stall(load(2.0, 3.0)) == 1.0  # waiting threads, capped at a whole period
    assert cpu_stall(load(2.0, 3.0, psi=0.1)) == 0.1
    assert POLICY.decide(state(inst(reports=[load(2.0, 3.0, psi=0.1)] * 3))) == []


def test_an_idle_instance_above_its_floor_gives_one_cpu_back() -> None:
    idle = [load(0.4, 0.0)] * 3
    (change,) = POLICY.decide(state(inst(reports=idle, cpus=3, floor=(1, 1))))
    assert (change.cpus, change.blocks) == (2, None)
    assert change.reason == "CPU idle: at most 0.40 of 3 CPUs busy over 3 reports"


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (inst(reports=[load(2.0, 0.9)] * 3, cpus=8, most=(8, 16)), "at its bound"),
        (inst(reports=[load(0.1)] * 3, cpus=2, floor=(2, 1)), "at its floor"),
        (inst(reports=[load(0.1)] * 3, cpus=1, floor=(0, 1)), "one CPU is the least"),
        (inst(reports=[load(1.2)] * 3, cpus=3), "busier than half of one CPU fewer"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bounds_and_busy_instances_are_left_alone(view: InstanceView, why: str) -> None:
    assert POLICY.decide(state(view)) == [], why


def test_with_too_few_free_cpus_the_most_stalled_grow_first_then_by_name() -> None:
    a = inst("a", [load(2.0, 0.5)] * 3, id=1)
    b = inst("b", [load(2.0, 0.9)] * 3, id=2)
    c = inst("c", [load(2.0, 0.5)] * 3, id=3)
    assert [d.instance for d in POLICY.decide(state(a, b, c, cpus=2))] == ["a", "b"]
    assert [d.instance for d in POLICY.decide(state(c, b, a, cpus=1))] == ["b"]
    assert POLICY.decide(state(a, b, c, cpus=0)) == []


def test_memory_grows_a_block_when_nearly_full_or_stalled_and_shrinks_when_half_of_less() -> None:
    full = [load(used=int(3.7 * BLOCK))] * 3  # 92 % of 4 blocks
    (grow,) = POLICY.decide(state(inst(reports=full, cpus=1)))
    assert (grow.cpus, grow.blocks) == (None, 5)
    stalled = [load(used=BLOCK, memory_psi=0.3)] * 3
    assert POLICY.decide(state(inst(reports=stalled, cpus=1)))[0].blocks == 5
    spare = [load(used=int(1.5 * BLOCK))] * 3  # fits half of 3 blocks
    (shrink,) = POLICY.decide(state(inst(reports=spare, cpus=1)))
    assert (shrink.blocks, shrink.reason) == (3, "memory spare: at most 192 MiB of 512 MiB used")
    assert POLICY.decide(state(inst(reports=full, cpus=1), blocks=0)) == []  # nothing free


def test_a_cpu_and_a_memory_change_of_one_instance_are_one_resize() -> None:
    both = [load(2.0, 0.5, used=int(3.8 * BLOCK))] * 3
    (change,) = POLICY.decide(state(inst(reports=both)))
    assert (change.cpus, change.blocks) == (3, 5)
    assert change.reason.startswith("CPU pressure: ")
    assert "; memory pressure: " in change.reason


def test_thresholds_that_leave_no_gap_are_refused() -> None:
    for bad in (
        {"window": 0},
        {"grow_stall": 0.1, "shrink_stall": 0.1},
        {"memory_grow": 0.5, "memory_shrink": 0.5},
        {"shrink_busy": 0.0},
    ):
        with pytest.raises(ValueError, match=r"at least one|gap|0 < shrink_busy"):
            PressureRebalancer(**bad)  # type: ignore[arg-type]
    assert isinstance(POLICY, RebalancePolicy)


def test_checked_keeps_decisions_within_bounds_and_the_free_pool() -> None:
    web, db = inst("web", id=1, cpus=2, most=(3, 16)), inst("db", id=2, cpus=2, floor=(2, 1))
    given = state(web, db, cpus=1, blocks=0)
    decisions = [
        Resize("web", 1, 4, None, "beyond its bound"),
        Resize("db", 2, 1, None, "below its floor"),
        Resize("nope", 9, 2, None, "unknown"),
        Resize("web", 1, 3, None, "fine"),
        Resize("web", 1, 2, 3, "a second one, and no block is free"),
        Resize("db", 2, 3, None, "no CPU left after web's"),
        Resize("db", 2, 2, 4, "no change at all"),
    ]
    good, problems = checked(given, decisions)
    assert [d.reason for d in good] == ["fine"]
    assert [p.rsplit(": ", 1)[1] for p in problems] == [
        "4 CPUs is beyond its bound (3)",
        "1 CPUs is below its floor (2)",
        "no such instance in the state it was given",
        "a second decision for one instance",
        "more than the pool has free",
        "no change",
    ]


# -- properties -------------------------------------------------------------------------------

share = st.floats(0.0, 1.0)
reports_ = st.lists(
    st.builds(
        load,
        busy=st.floats(0.0, 8.0),
        waiting=st.floats(0.0, 4.0),
        psi=st.none() | share,
        used=st.integers(0, 20 * BLOCK),
        memory_psi=st.none() | share,
    ),
    max_size=5,
)


@st.composite
def states(draw: st.DrawFn) -> RebalanceState:
    names = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=6))
    views = []
    for id, name in enumerate(names, 1):
        cpus, blocks = draw(st.integers(1, 8)), draw(st.integers(1, 16))
        views.append(
            InstanceView(
                name, id, cpus, blocks,
                floor_cpus=draw(st.integers(0, 10)), floor_blocks=draw(st.integers(0, 18)),
                max_cpus=draw(st.integers(1, 10)), max_blocks=draw(st.integers(1, 18)),
                reports=tuple(draw(reports_)),
            )
        )  # fmt: skip
    return RebalanceState(tuple(views), draw(st.integers(0, 4)), draw(st.integers(0, 4)), BLOCK)


@settings(max_examples=400, deadline=None)
@given(given_state=states())
def test_every_decision_keeps_the_contract_and_moves_one_step(
    given_state: RebalanceState,
) -> None:
    decisions = POLICY.decide(given_state)
    good, problems = checked(given_state, decisions)
    assert problems == []
    assert good == list(decisions)
    views = {v.name: v for v in given_state.instances}
    for d in decisions:
        v = views[d.instance]
        window = v.reports[-POLICY.window :]
        assert len(window) == POLICY.window  # only ever on a full window
        if d.cpus is not None:
            assert abs(d.cpus - v.cpus) == 1
            stalls = [cpu_stall(r) for r in window]
            if d.cpus > v.cpus:
                assert min(stalls) >= POLICY.grow_stall
            else:
                assert max(stalls) <= POLICY.shrink_stall
                assert all(r.cpu_busy <= POLICY.shrink_busy * d.cpus for r in window)
        if d.blocks is not None:
            assert abs(d.blocks - v.blocks) == 1
        assert d.reason


@settings(max_examples=200, deadline=None)
@given(given_state=states(), seed=st.integers(0, 2**32))
def test_decisions_do_not_depend_on_the_order_instances_are_listed_in(
    given_state: RebalanceState, seed: int
) -> None:
    shuffled = list(given_state.instances)
    random.Random(seed).shuffle(shuffled)
    again = replace(given_state, instances=tuple(shuffled))
    assert set(POLICY.decide(again)) == set(POLICY.decide(given_state))


@settings(max_examples=300, deadline=None)
@given(
    demand=st.floats(0.0, 12.0),
    memory=st.floats(0.0, 24.0),
    start=st.tuples(st.integers(1, 10), st.integers(1, 20)),
    floor=st.tuples(st.integers(0, 6), st.integers(0, 12)),
    most=st.tuples(st.integers(1, 10), st.integers(1, 20)),
    window=st.integers(1, 4),
)
def test_a_steady_load_moves_a_grant_one_way_and_settles_it_never_flaps(
    demand: float,
    memory: float,
    start: tuple[int, int],
    floor: tuple[int, int],
    most: tuple[int, int],
    window: int,
) -> None:
    """An instance whose `demand` threads want a CPU each and which would use `memory` blocks,
    reporting what a kernel would measure under each grant, is resized in one direction only
    until nothing changes: the hysteresis gap leaves no load that both grows and shrinks it."""
    policy = PressureRebalancer(window=window)
    cpus, blocks = start
    seen = [(cpus, blocks)]
    for _ in range(40):
        report = load(
            busy=min(demand, cpus), waiting=max(0.0, demand - cpus),
            used=int(min(memory, blocks) * BLOCK),
        )  # fmt: skip
        view = InstanceView("web", 1, cpus, blocks, *floor, *most, reports=(report,) * window)
        decisions = policy.decide(RebalanceState((view,), 64, 64, BLOCK))
        if not decisions:
            break
        (change,) = decisions
        cpus, blocks = change.cpus or cpus, change.blocks or blocks
        seen.append((cpus, blocks))
    else:
        pytest.fail(f"never settled: {seen}")
    for axis in (0, 1):
        steps = {b[axis] - a[axis] for a, b in itertools.pairwise(seen)} - {0}
        assert len(steps) <= 1, f"flapped: {seen}"


class Never:
    """A plugin policy: never changes anything."""

    name = "never"

    def decide(self, state: RebalanceState) -> Sequence[Resize]:
        return ()


def test_the_host_names_a_rebalancer_or_a_plugin_and_a_bad_name_is_refused() -> None:
    assert isinstance(load_rebalancer("pressure"), PressureRebalancer)
    assert load_rebalancer(f"{__name__}:Never").name == "never"  # a class
    with pytest.raises(InvalidResourceRequestError, match="unknown rebalance policy 'fast'"):
        load_rebalancer("fast")
    with pytest.raises(InvalidResourceRequestError, match="cannot load rebalance policy"):
        load_rebalancer("no.such.module:Policy")
    with pytest.raises(InvalidResourceRequestError, match="is not a rebalance policy"):
        load_rebalancer(f"{__name__}:POLICY_NAME")


POLICY_NAME = "not a policy"
