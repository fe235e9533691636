"""The placement policies: NUMA packing, spreading, and the scored policy an eBPF one plugs into.

Each is a `PlacementPolicy` (`_placement`): a pure `place(request, state)`. What they share
(`_Policy`): explicit CPUs as asked, queues as asked, and growing or shrinking from what the
instance holds (kept as far as possible, so a change moves as little as it can).

- `PackPolicy` ("pack"): CPUs on as few NUMA nodes as possible, core by core, in the node that
  fits most tightly; memory on the CPUs' nodes.
- `SpreadPolicy` ("spread"): CPUs across nodes in turn, one thread per core first; memory
  interleaved over those nodes.
- `ScoredPolicy`: the free CPUs ranked by a `CpuScorer`, the eBPF hook.

`load_policy` turns the host config's `policy` setting into one of them, or a plugin's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from multikernel.services._placement import (
    CpuScorer,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    PoolState,
    Refusal,
)
from multikernel.services._plugins import load_plugin
from multikernel.services._pool import Cpu

# -- the policies -----------------------------------------------------------------------------


def _keep_or_fill(
    current: Iterable[int], candidates: list[int], count: int, drop_order: list[int]
) -> frozenset[int]:
    """Keep what is held (dropping in `drop_order` when shrinking), fill from `candidates`."""
    kept = set(current)
    if len(kept) > count:
        for item in drop_order:
            if len(kept) == count:
                break
            kept.discard(item)
        return frozenset(kept)
    for item in candidates:
        if len(kept) == count:
            break
        kept.add(item)
    return frozenset(kept)


class _Policy:
    """What both policies share: queues as asked, explicit CPUs as asked, memory by node."""

    name = "base"

    def place(self, request: PlacementRequest, state: PoolState) -> Placement | Refusal:
        current = request.current
        spec = request.cpus
        if spec is None:
            cpus = current.cpus
        elif spec.ids:
            cpus = frozenset(spec.ids)
        else:
            cpus = self.choose_cpus(request, state, spec.count)
        if not cpus:
            return Refusal(f"{request.instance!r} holds no CPU: ask for some (--cpus N)")
        blocks = current.blocks
        if request.blocks is not None:
            blocks = self.choose_blocks(request, state, cpus, request.blocks)
        queues = request.queues if request.queues is not None else current.queues
        return Placement(cpus, blocks, queues)

    def choose_cpus(
        self, request: PlacementRequest, state: PoolState, count: int
    ) -> frozenset[int]:
        raise NotImplementedError

    def node_order(self, state: PoolState, cpus: frozenset[int]) -> list[int]:
        """Nodes to take memory from: the CPUs' nodes (most CPUs first), then the others."""
        on = Counter(state.pool.cpus[c].node for c in cpus if c in state.pool.cpus)
        rest = [n for n in state.pool.nodes if n not in on]
        return [n for n, _ in sorted(on.items(), key=lambda kv: (-kv[1], kv[0]))] + rest

    def choose_blocks(
        self, request: PlacementRequest, state: PoolState, cpus: frozenset[int], count: int
    ) -> frozenset[int]:
        nodes = self.node_order(state, cpus)
        rank = {node: i for i, node in enumerate(nodes)}
        blocks = state.pool.blocks
        free = sorted(
            (b for b in state.free_blocks(request.instance) if b not in request.current.blocks),
            key=lambda b: (rank.get(blocks[b].node, len(rank)), b),
        )
        drop = sorted(request.current.blocks, key=lambda b: (-rank.get(blocks[b].node, 99), -b))
        return _keep_or_fill(request.current.blocks, free, count, drop)


class PackPolicy(_Policy):
    """NUMA packing: CPUs on as few nodes as possible, whole cores first; memory beside them.

    A new instance goes to the node with the fewest free CPUs that still fits it (best fit, so
    big holes stay for big instances); a growing one grows on its own nodes first. Within a node,
    CPUs are taken core by core (both threads of a core before the next core).
    """

    name = "pack"

    def choose_cpus(
        self, request: PlacementRequest, state: PoolState, count: int
    ) -> frozenset[int]:
        free = state.free_cpus(request.instance)
        by_node: dict[int, list[Cpu]] = {}
        for cpu in free:
            by_node.setdefault(cpu.node, []).append(cpu)
        mine = Counter(
            state.pool.cpus[c].node for c in request.current.cpus if c in state.pool.cpus
        )
        extra = count - len(request.current.cpus)

        def node_key(node: int) -> tuple[int, int, int, int]:
            fits = len(by_node[node]) >= extra
            return (
                -mine[node],
                0 if fits else 1,
                len(by_node[node]) if fits else -len(by_node[node]),
                node,
            )

        order = [c for node in sorted(by_node, key=node_key) for c in _core_order(by_node[node])]
        drop = [
            c.id for c in reversed(_core_order([state.pool.cpus[c] for c in request.current.cpus]))
        ]
        drop.sort(key=lambda c: mine[state.pool.cpus[c].node])  # leave the minor nodes first
        return _keep_or_fill(request.current.cpus, [c.id for c in order], count, drop)


def _core_order(cpus: list[Cpu]) -> list[Cpu]:
    """Core by core: both threads of a core, then the next core (package, core, id)."""
    return sorted(cpus, key=lambda c: (c.package, c.core, min(c.siblings), c.id))


class SpreadPolicy(_Policy):
    """Spreading: CPUs across nodes in turn, one thread per core before any sibling; memory
    interleaved over the nodes the CPUs are on."""

    name = "spread"

    def choose_cpus(
        self, request: PlacementRequest, state: PoolState, count: int
    ) -> frozenset[int]:
        free = state.free_cpus(request.instance)
        chosen = set(request.current.cpus)
        busy_cores = {
            (state.pool.cpus[c].package, state.pool.cpus[c].core)
            for c in chosen
            if c in state.pool.cpus
        }
        load = Counter(state.pool.cpus[c].node for c in chosen if c in state.pool.cpus)
        candidates = [c for c in free if c.id not in chosen]
        while len(chosen) < count and candidates:
            best = min(
                candidates,
                key=lambda c: (
                    (c.package, c.core) in busy_cores,
                    load[c.node],
                    len(state.cpu_holders.get(c.id, ())),
                    c.id,
                ),
            )
            candidates.remove(best)
            chosen.add(best.id)
            busy_cores.add((best.package, best.core))
            load[best.node] += 1
        if len(chosen) > count:
            by_node = Counter(state.pool.cpus[c].node for c in chosen)
            for cpu in sorted(chosen, key=lambda c: (-by_node[state.pool.cpus[c].node], -c)):
                if len(chosen) == count:
                    break
                chosen.discard(cpu)
                by_node[state.pool.cpus[cpu].node] -= 1
        return frozenset(chosen)

    def choose_blocks(
        self, request: PlacementRequest, state: PoolState, cpus: frozenset[int], count: int
    ) -> frozenset[int]:
        nodes = self.node_order(state, cpus)[: len({state.pool.cpus[c].node for c in cpus})] or [0]
        by_node: dict[int, list[int]] = {n: [] for n in nodes}
        for b in state.free_blocks(request.instance):
            node = state.pool.blocks[b].node
            if node in by_node and b not in request.current.blocks:
                by_node[node].append(b)
        interleaved: list[int] = []
        while any(by_node.values()):
            for node in nodes:
                if by_node[node]:
                    interleaved.append(by_node[node].pop(0))
        others = [
            b for b in super().choose_blocks(request, state, cpus, count) if b not in interleaved
        ]
        drop = sorted(request.current.blocks, reverse=True)
        return _keep_or_fill(request.current.blocks, interleaved + others, count, drop)


class ScoredPolicy(_Policy):
    """Ranks the free CPUs by a `CpuScorer` (highest first, then by id); memory as `PackPolicy`.

    This is where an eBPF policy plugs in: its scorer runs a BPF program on each candidate CPU.
    """

    def __init__(self, scorer: CpuScorer) -> None:
        self.scorer = scorer
        self.name = f"scored:{scorer.name}"

    def choose_cpus(
        self, request: PlacementRequest, state: PoolState, count: int
    ) -> frozenset[int]:
        free = [c for c in state.free_cpus(request.instance) if c.id not in request.current.cpus]
        ranked = sorted(free, key=lambda c: (-self.scorer.score(request, c, state), c.id))
        held = [state.pool.cpus[c] for c in request.current.cpus if c in state.pool.cpus]
        drop = [
            c.id for c in sorted(held, key=lambda c: (self.scorer.score(request, c, state), -c.id))
        ]
        return _keep_or_fill(request.current.cpus, [c.id for c in ranked], count, drop)


POLICIES: dict[str, type[_Policy]] = {"pack": PackPolicy, "spread": SpreadPolicy}


def load_policy(spec: str) -> PlacementPolicy:
    """`pack`, `spread`, or `package.module:attribute` naming a policy object, class or factory."""
    needs = "a name and place(request, state)"
    return load_plugin(spec, POLICIES, PlacementPolicy, "placement policy", needs)  # type: ignore[type-abstract]
