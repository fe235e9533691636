"""The rebalancer's decision: load reports and the pool's state in, grant changes out, purely.

A rebalance policy is anything with a `name` and `decide(state) -> Sequence[Resize]`
(`RebalancePolicy`). It sees a `RebalanceState`: every instance that reported its load, with what
it holds (CPUs, memory blocks), the bounds it must stay within (`floor_*`: what its operator
granted; `max_*`: the host's elastic bound, or the floor if that is more) and its recent
`LoadReport`s, only those measured under the grant it holds now, oldest first; and how many CPUs
and blocks of the pool nobody holds. It answers with `Resize`s: an instance's new CPU count or
number of blocks, and why. Like a placement policy it does no I/O and keeps no state, so it is
tested alone and replayed from recorded reports; the resource actor's loop (`_rebalancing`)
applies its answers as ordinary transactions (placement, admission, the agent's acknowledgement).

`PressureRebalancer`, the default ("pressure"), moves one CPU or one memory block at a time:

- **CPU**: an instance whose threads waited for a CPU at least `grow_stall` of the time in each
  of its last `window` reports gets one more CPU (the most stalled first, while the pool has
  unheld CPUs); one that waited at most `shrink_stall` and whose busy time would fit in one CPU
  fewer at most `shrink_busy` full (in each report) gives one back, down to its floor. The stall
  is PSI "some" where the report has it, else the waiting threads (`cpu_waiting`, capped at 1).
- **Memory**: one block more when each report has used at least `memory_grow` of the grant (or
  memory PSI at least `grow_stall`); one fewer, down to the floor, when what is used would fill
  at most `memory_shrink` of one block fewer (and memory PSI, if any, is at most
  `shrink_stall`).

`load_rebalancer` turns the host's `--rebalance` setting into a policy: `pressure`, or
`package.module:attribute` for a plugin.

Hysteresis, so it does not flap: it acts only on `window` consecutive reports taken under the
current grant (so after any change it waits for `window` fresh ones), and the grow and shrink
thresholds leave a gap: a load that made an instance grow from n to n+1 CPUs (waiting) cannot
make it shrink (it would have to use at most `shrink_busy` x n of n+1), and memory that grew at
90 % full shrinks only below 50 % of a block less.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from multikernel.protocol import LoadReport, format_size
from multikernel.services._plugins import load_plugin


@dataclass(frozen=True)
class InstanceView:
    """One instance, as a rebalancer sees it (see the module docstring)."""

    name: str
    id: int
    cpus: int
    blocks: int
    floor_cpus: int
    floor_blocks: int
    max_cpus: int
    max_blocks: int
    reports: tuple[LoadReport, ...] = ()


@dataclass(frozen=True)
class RebalanceState:
    """The instances that reported, and how many CPUs and memory blocks nobody holds."""

    instances: tuple[InstanceView, ...]
    free_cpus: int
    free_blocks: int
    block_size: int


@dataclass(frozen=True)
class Resize:
    """A decision: `instance` should hold `cpus` CPUs and `blocks` blocks (None: as now)."""

    instance: str
    instance_id: int
    cpus: int | None
    blocks: int | None
    reason: str


@runtime_checkable
class RebalancePolicy(Protocol):
    """Decides grant changes from load; pure: no I/O, no state of its own."""

    @property
    def name(self) -> str:
        """Its name, in the actor's log."""
        ...

    def decide(self, state: RebalanceState) -> Sequence[Resize]:
        """At most one `Resize` per instance, within its floor and max and the free pool."""
        ...


def cpu_stall(report: LoadReport) -> float:
    """The share of the period (0..1) its threads waited for a CPU: PSI if it has it."""
    if report.cpu_pressure is not None:
        return report.cpu_pressure
    return min(1.0, report.cpu_waiting)


@dataclass(frozen=True)
class PressureRebalancer:
    """One CPU or memory block at a time, by sustained pressure or idleness (module docstring)."""

    window: int = 3
    grow_stall: float = 0.25
    shrink_stall: float = 0.05
    shrink_busy: float = 0.5
    memory_grow: float = 0.9
    memory_shrink: float = 0.5
    name: str = "pressure"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("a rebalancer's window is at least one report")
        if not 0 <= self.shrink_stall < self.grow_stall <= 1:
            raise ValueError("0 <= shrink_stall < grow_stall <= 1: the gap is the hysteresis")
        if not 0 < self.shrink_busy <= 1 or not 0 < self.memory_shrink < self.memory_grow <= 1:
            raise ValueError("0 < shrink_busy <= 1 and 0 < memory_shrink < memory_grow <= 1")

    def decide(self, state: RebalanceState) -> Sequence[Resize]:
        cpus: dict[str, tuple[int, str]] = {}
        blocks: dict[str, tuple[int, str]] = {}
        want_cpu: list[tuple[float, InstanceView]] = []
        want_block: list[tuple[float, InstanceView]] = []
        for inst in state.instances:
            recent = inst.reports[-self.window :]
            if len(recent) < self.window:
                continue  # not sustained yet
            stalls = [cpu_stall(r) for r in recent]
            if inst.cpus < inst.max_cpus and min(stalls) >= self.grow_stall:
                want_cpu.append((min(stalls), inst))
            elif inst.cpus > max(inst.floor_cpus, 1) and self._cpu_idle(inst, recent, stalls):
                busy = max(r.cpu_busy for r in recent)
                cpus[inst.name] = (
                    inst.cpus - 1,
                    f"CPU idle: at most {busy:.2f} of {inst.cpus} CPUs busy over {len(recent)} "
                    "reports",
                )
            used = [r.memory_used / (inst.blocks * state.block_size or 1) for r in recent]
            if inst.blocks < inst.max_blocks and self._memory_full(recent, used):
                want_block.append((min(used), inst))
            elif inst.blocks > max(inst.floor_blocks, 1) and self._memory_spare(
                inst, recent, state.block_size
            ):
                most = max(r.memory_used for r in recent)
                blocks[inst.name] = (
                    inst.blocks - 1,
                    f"memory spare: at most {format_size(most)} of "
                    f"{format_size(inst.blocks * state.block_size)} used",
                )
        for stall, inst in _most_first(want_cpu)[: state.free_cpus]:
            cpus[inst.name] = (
                inst.cpus + 1,
                f"CPU pressure: threads waited at least {stall:.0%} of the time over "
                f"{self.window} reports",
            )
        for share, inst in _most_first(want_block)[: state.free_blocks]:
            blocks[inst.name] = (
                inst.blocks + 1,
                f"memory pressure: at least {share:.0%} used (or stalled) over {self.window} "
                "reports",
            )
        decisions = []
        for inst in state.instances:
            cpu, block = cpus.get(inst.name), blocks.get(inst.name)
            if cpu is None and block is None:
                continue
            reason = "; ".join(change[1] for change in (cpu, block) if change is not None)
            decisions.append(
                Resize(
                    inst.name,
                    inst.id,
                    cpu[0] if cpu is not None else None,
                    block[0] if block is not None else None,
                    reason,
                )
            )
        return decisions

    def _cpu_idle(
        self, inst: InstanceView, recent: Sequence[LoadReport], stalls: list[float]
    ) -> bool:
        fewer = inst.cpus - 1
        return max(stalls) <= self.shrink_stall and all(
            r.cpu_busy <= self.shrink_busy * fewer for r in recent
        )

    def _memory_full(self, recent: Sequence[LoadReport], used: list[float]) -> bool:
        return all(
            share >= self.memory_grow
            or (r.memory_pressure is not None and r.memory_pressure >= self.grow_stall)
            for r, share in zip(recent, used, strict=True)
        )

    def _memory_spare(
        self, inst: InstanceView, recent: Sequence[LoadReport], block_size: int
    ) -> bool:
        fewer = (inst.blocks - 1) * block_size
        return all(
            r.memory_used <= self.memory_shrink * fewer
            and (r.memory_pressure is None or r.memory_pressure <= self.shrink_stall)
            for r in recent
        )


def _most_first(wanting: list[tuple[float, InstanceView]]) -> list[tuple[float, InstanceView]]:
    """The most pressed first; ties by name, so the same state gives the same decisions."""
    return sorted(wanting, key=lambda item: (-item[0], item[1].name))


def checked(state: RebalanceState, decisions: Sequence[Resize]) -> tuple[list[Resize], list[str]]:
    """The decisions that keep the contract, and what is wrong with the others.

    Each names an instance of `state` once, with its id; a count that changes moves toward its
    bound and stays within it (grow: at most `max_*`; shrink: at least its floor and 1); the
    instances' growth together fits in the free CPUs and blocks. A policy is a plugin: the
    resource actor applies only these, as `place()` checks a placement policy's answer.
    """
    views = {inst.name: inst for inst in state.instances}
    good: list[Resize] = []
    problems: list[str] = []
    seen: set[str] = set()
    free_cpus, free_blocks = state.free_cpus, state.free_blocks
    for change in decisions:
        inst = views.get(change.instance)
        wrong = ""
        if inst is None or inst.id != change.instance_id:
            wrong = "no such instance in the state it was given"
        elif change.instance in seen:
            wrong = "a second decision for one instance"
        else:
            wrong = _out_of_bounds("CPUs", change.cpus, inst.cpus, inst.floor_cpus, inst.max_cpus)
            wrong = wrong or _out_of_bounds(
                "blocks", change.blocks, inst.blocks, inst.floor_blocks, inst.max_blocks
            )
            more_cpus = max(0, (change.cpus or inst.cpus) - inst.cpus)
            more_blocks = max(0, (change.blocks or inst.blocks) - inst.blocks)
            if not wrong and (more_cpus > free_cpus or more_blocks > free_blocks):
                wrong = "more than the pool has free"
            if (
                not wrong
                and change.cpus in (None, inst.cpus)
                and change.blocks
                in (
                    None,
                    inst.blocks,
                )
            ):
                wrong = "no change"
        if wrong:
            problems.append(f"{change}: {wrong}")
            continue
        assert inst is not None
        seen.add(change.instance)
        free_cpus -= max(0, (change.cpus or inst.cpus) - inst.cpus)
        free_blocks -= max(0, (change.blocks or inst.blocks) - inst.blocks)
        good.append(change)
    return good, problems


def _out_of_bounds(what: str, new: int | None, held: int, floor: int, most: int) -> str:
    if new is None or new == held:
        return ""
    if new > held and new > most:
        return f"{new} {what} is beyond its bound ({most})"
    if new < held and new < max(floor, 1):
        return f"{new} {what} is below its floor ({max(floor, 1)})"
    return ""


def load_rebalancer(spec: str) -> RebalancePolicy:
    """`pressure` (the default policy) or `package.module:attribute` naming a rebalance policy
    object, class or factory (the host's `--rebalance` setting)."""
    builtins = {"pressure": PressureRebalancer}
    needs = "a name and decide(state)"
    return load_plugin(spec, builtins, RebalancePolicy, "rebalance policy", needs)  # type: ignore[type-abstract]
