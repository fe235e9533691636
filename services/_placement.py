"""Placement: which CPUs, memory blocks and queues an instance gets, as a pure function.

A placement policy is anything with a `name` and `place(request, state) -> Placement | Refusal`
(`PlacementPolicy`): it sees the request (`PlacementRequest`: a CPU count or ids, a number of
memory blocks, queue names, and what the instance holds now) and a read-only `PoolState` (the
pool's topology and who holds what), and answers. It does no I/O and keeps no state, so it can
be tested alone, replayed from the history and swapped by the host config (`policy = "pack"`,
`"spread"`, or `"package.module:attribute"` for a plugin).

`place()` wraps every policy the same way. **Admission** first, independent of the policy: ids
that are not in the pool, CPUs or queues someone else holds, more CPUs or memory than is free are
refused (`InvalidResourceRequestError`, `ResourceUnavailableError`), with who holds what was asked
and what is free, sizes for people. Then the policy chooses, and its answer is **checked**: a
policy that hands out something held or gives the wrong amount is a bug, refused with the
policy's name, so no plugin can double-allocate or over-commit.

The policies are in `_policies`. The two real ones are NUMA packing (`PackPolicy`: the fewest
nodes, whole cores, memory on the CPUs' nodes; Kubernetes' static CPU manager with the
`single-numa-node` topology policy, best effort) and spreading (`SpreadPolicy`: across nodes and
one thread per core, memory interleaved; for instances that want memory bandwidth more than
locality). `ScoredPolicy` is the hook an eBPF policy plugs into: it ranks the free CPUs by a
`CpuScorer`, and the eBPF scorer will be a program run on each candidate with
`BPF_PROG_TEST_RUN` (docs/resources.md, "Placement").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from multikernel.protocol import (
    CpuSpec,
    InvalidResourceRequestError,
    ResourceUnavailableError,
    format_cpu_list,
    format_size,
)
from multikernel.services._pool import Cpu, Pool


@dataclass(frozen=True)
class Holding:
    """What one instance holds: CPU ids, memory block ids, queue names."""

    cpus: frozenset[int] = frozenset()
    blocks: frozenset[int] = frozenset()
    queues: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlacementRequest:
    """What `instance` should hold after the change; None keeps what it holds."""

    instance: str
    cpus: CpuSpec | None = None
    blocks: int | None = None
    queues: frozenset[str] | None = None
    current: Holding = field(default_factory=Holding)


@dataclass(frozen=True)
class Placement:
    """A policy's answer: everything the instance holds once the grant is applied."""

    cpus: frozenset[int]
    blocks: frozenset[int]
    queues: frozenset[str]


@dataclass(frozen=True)
class Refusal:
    """A policy's refusal, with a message for people (what it would need)."""

    message: str


@dataclass(frozen=True)
class PoolState:
    """The pool and who holds what (granted or being granted), read-only, for a policy.

    A CPU may be held by up to `cpu_share` instances (1, exclusive, unless the host config says
    otherwise); memory blocks and queues have one holder.
    """

    pool: Pool
    cpu_holders: Mapping[int, frozenset[str]] = field(default_factory=dict)
    block_holders: Mapping[int, str] = field(default_factory=dict)
    queue_holders: Mapping[str, str] = field(default_factory=dict)
    cpu_share: int = 1

    def cpu_free_for(self, cpu: int, instance: str) -> bool:
        holders = self.cpu_holders.get(cpu, frozenset())
        return instance in holders or len(holders) < self.cpu_share

    def free_cpus(self, instance: str) -> list[Cpu]:
        """CPUs `instance` may have (those it holds included), least shared first, then by id."""
        free = [c for c in self.pool.cpus.values() if self.cpu_free_for(c.id, instance)]
        return sorted(free, key=lambda c: (len(self.cpu_holders.get(c.id, ())), c.id))

    def free_blocks(self, instance: str) -> list[int]:
        return [b for b in self.pool.blocks if self.block_holders.get(b, instance) == instance]

    def holdings_text(self, instance: str) -> str:
        """Who else holds CPUs and memory, for a refusal: "web CPUs 0-1 and 4 GiB; db ..."."""
        cpus: dict[str, set[int]] = {}
        for cpu, holders in self.cpu_holders.items():
            for holder in holders:
                cpus.setdefault(holder, set()).add(cpu)
        blocks = Counter(self.block_holders.values())
        parts = []
        for holder in sorted(set(cpus) | set(blocks)):
            if holder != instance:
                held = [f"CPUs {format_cpu_list(cpus[holder])}"] if holder in cpus else []
                if blocks[holder]:
                    held.append(format_size(blocks[holder] * self.pool.block_size))
                parts.append(f"{holder!r} {' and '.join(held)}")
        return "; ".join(parts) or "nobody else"


@runtime_checkable
class PlacementPolicy(Protocol):
    """Decides what an instance gets; pure: no I/O, no state of its own."""

    name: str

    def place(self, request: PlacementRequest, state: PoolState) -> Placement | Refusal:
        """Everything `request.instance` holds after the change, or why it cannot be."""
        ...


@runtime_checkable
class CpuScorer(Protocol):
    """Scores one free CPU for a request (higher is better): the eBPF hook (`ScoredPolicy`)."""

    name: str

    def score(self, request: PlacementRequest, cpu: Cpu, state: PoolState) -> int: ...


# -- admission and checking, around every policy ---------------------------------------------


def _free_text(state: PoolState, instance: str) -> str:
    cpus = [c.id for c in state.free_cpus(instance)]
    blocks = len(state.free_blocks(instance))
    return (
        f"free: CPUs {format_cpu_list(cpus) or 'none'} and "
        f"{format_size(blocks * state.pool.block_size)}"
    )


def _admit(request: PlacementRequest, state: PoolState) -> None:
    pool, name = state.pool, request.instance
    spec = request.cpus
    if spec is not None and spec.ids:
        asked = frozenset(spec.ids)
        outside = asked - pool.cpus.keys()
        if outside:
            kept = (
                f"; the host keeps {format_cpu_list(pool.reserved_cpus)}"
                if pool.reserved_cpus
                else ""
            )
            raise InvalidResourceRequestError(
                f"CPU {format_cpu_list(outside)} is not an online CPU of this host's pool "
                f"(the pool has {format_cpu_list(pool.cpus)}{kept})"
            )
        taken = sorted(c for c in asked if not state.cpu_free_for(c, name))
        if taken:
            holders = sorted({h for c in taken for h in state.cpu_holders.get(c, ())})
            raise ResourceUnavailableError(
                f"CPU {format_cpu_list(taken)} for {name!r} is held by "
                f"{', '.join(map(repr, holders))}; {_free_text(state, name)}",
                details={"holder": ",".join(holders), "free_cpus": _free_cpus(state, name)},
            )
    elif spec is not None and spec.count > len(state.free_cpus(name)):
        free = len(state.free_cpus(name))
        raise ResourceUnavailableError(
            f"{spec.count} CPU{'s' if spec.count > 1 else ''} asked for {name!r}, {free} free; "
            f"{_free_text(state, name)}; "
            f"held: {state.holdings_text(name)}",
            details={"free_cpus": _free_cpus(state, name)},
        )
    if request.blocks is not None and request.blocks > len(state.free_blocks(name)):
        size = pool.block_size
        raise ResourceUnavailableError(
            f"{format_size(request.blocks * size)} of memory asked for {name!r}, "
            f"{format_size(len(state.free_blocks(name)) * size)} free of the pool's "
            f"{format_size(pool.memory)}; held: {state.holdings_text(name)}",
            details={"free_memory": len(state.free_blocks(name)) * size},
        )
    for queue in sorted(request.queues or ()):
        if queue not in pool.queues:
            known = ", ".join(pool.queues) or "none on this host"
            raise InvalidResourceRequestError(f"there is no I/O queue {queue!r} (queues: {known})")
        holder = state.queue_holders.get(queue, name)
        if holder != name:
            free_queues = [q for q in pool.queues if state.queue_holders.get(q, name) == name]
            raise ResourceUnavailableError(
                f"queue {queue} for {name!r} is held by {holder!r}; free queues: "
                f"{', '.join(free_queues) or 'none'}",
                details={"holder": holder},
            )


def _free_cpus(state: PoolState, instance: str) -> str:
    return format_cpu_list(c.id for c in state.free_cpus(instance))


def _check(
    policy: PlacementPolicy, request: PlacementRequest, state: PoolState, p: Placement
) -> None:
    name = request.instance
    bad = [c for c in p.cpus if c not in state.pool.cpus or not state.cpu_free_for(c, name)]
    bad_blocks = [
        b
        for b in p.blocks
        if b not in state.pool.blocks or state.block_holders.get(b, name) != name
    ]
    if request.cpus is None:
        want_cpus = len(request.current.cpus)
        if p.cpus != request.current.cpus:
            bad.append(-1)
    else:
        want_cpus = request.cpus.count or len(request.cpus.ids)
        if request.cpus.ids and p.cpus != frozenset(request.cpus.ids):
            bad.append(-1)
    want_blocks = request.blocks if request.blocks is not None else len(request.current.blocks)
    want_queues = request.queues if request.queues is not None else request.current.queues
    if (
        bad
        or bad_blocks
        or len(p.cpus) != want_cpus
        or len(p.blocks) != want_blocks
        or p.queues != want_queues
        or not p.cpus
    ):
        raise ResourceUnavailableError(
            f"placement policy {policy.name!r} answered CPUs {format_cpu_list(p.cpus)}, "
            f"{len(p.blocks)} memory blocks and queues {sorted(p.queues)} for {name!r}, which is "
            "not what was asked or not free: a bug in that policy; nothing was granted"
        )


def place(policy: PlacementPolicy, request: PlacementRequest, state: PoolState) -> Placement:
    """Admit the request, ask the policy, check its answer (see the module docstring)."""
    _admit(request, state)
    decision = policy.place(request, state)
    if isinstance(decision, Refusal):
        raise ResourceUnavailableError(f"{decision.message}; {_free_text(state, request.instance)}")
    _check(policy, request, state, decision)
    return decision
