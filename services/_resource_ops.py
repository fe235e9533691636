"""A change of holding, as the multikernel kernel would be told it: `MK_RES_*` messages.

`ops_for(pool, instance_id, before, after)` lists the kernel ABI messages that take an instance
from one holding to another, in the overlay order of Documentation/multikernel/overlays.rst
(memory, then CPUs, then devices; within each, removals before additions, so a resource is let go
before it is taken): `MemRemove`/`MemAdd` per run of contiguous memory blocks on one node (a block
is `block_size / 4096` pages from page frame `block * block_size / 4096`), `CpuRemove`/`CpuAdd`
per CPU (with its node and the hyperthread flag), `DeviceRemove`/`DeviceAdd` per I/O queue, naming
the PCI function the queue belongs to. `undo(pool, ops)` is the rollback: the inverse of each op,
in reverse order, as the kernel rolls back a transaction. `grant_of` and `pool_info` are the
messages that describe holdings and the pool.
"""

from __future__ import annotations

from collections.abc import Iterable

from multikernel.protocol import (
    CpuAdd,
    CpuFlag,
    CpuInfo,
    CpuRemove,
    DeviceAdd,
    DeviceRemove,
    Grant,
    GrantOp,
    MemAdd,
    MemRemove,
    NodeInfo,
    PoolInfo,
    QueueInfo,
)
from multikernel.services._ledger import Ledger
from multikernel.services._placement import Holding
from multikernel.services._pool import PAGE_SIZE, Pool


def pci_address(text: str) -> tuple[int, int, int]:
    """`0000:03:00.1` → (domain 0, bus 3, devfn 1); (0, 0, 0) when there is none."""
    if not text:
        return 0, 0, 0
    domain, bus, rest = text.split(":")
    slot, function = rest.split(".")
    return int(domain, 16), int(bus, 16), int(slot, 16) << 3 | int(function)


def _runs(pool: Pool, blocks: Iterable[int]) -> list[tuple[int, int, int]]:
    """(first block, count, node) for each run of consecutive blocks on one node."""
    runs: list[tuple[int, int, int]] = []
    for block in sorted(blocks):
        node = pool.blocks[block].node if block in pool.blocks else 0
        if runs and runs[-1][0] + runs[-1][1] == block and runs[-1][2] == node:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, node)
        else:
            runs.append((block, 1, node))
    return runs


def ops_for(pool: Pool, instance: int, before: Holding, after: Holding) -> tuple[GrantOp, ...]:
    """The kernel messages that take `instance` from `before` to `after` (see the docstring)."""
    pages = pool.block_size // PAGE_SIZE
    ops: list[GrantOp] = []
    for first, count, _ in _runs(pool, before.blocks - after.blocks):
        ops.append(MemRemove(instance, start_pfn=first * pages, nr_pages=count * pages))
    for first, count, node in _runs(pool, after.blocks - before.blocks):
        ops.append(
            MemAdd(instance, start_pfn=first * pages, nr_pages=count * pages, numa_node=node)
        )
    for cpu in sorted(before.cpus - after.cpus):
        ops.append(CpuRemove(instance, cpu_id=cpu))
    for cpu in sorted(after.cpus - before.cpus):
        info = pool.cpus.get(cpu)
        flags = int(CpuFlag.MK_CPU_HYPERTHREAD) if info and len(info.siblings) > 1 else 0
        ops.append(CpuAdd(instance, cpu_id=cpu, numa_node=info.node if info else 0, flags=flags))
    for queue in sorted(before.queues - after.queues):
        domain, bus, devfn = pci_address(_device(pool, queue))
        ops.append(DeviceRemove(instance, domain=domain, bus=bus, devfn=devfn))
    for queue in sorted(after.queues - before.queues):
        domain, bus, devfn = pci_address(_device(pool, queue))
        ops.append(DeviceAdd(instance, domain=domain, bus=bus, devfn=devfn))
    return tuple(ops)


def _device(pool: Pool, queue: str) -> str:
    return pool.queues[queue].device if queue in pool.queues else ""


def undo(pool: Pool, ops: tuple[GrantOp, ...]) -> tuple[GrantOp, ...]:
    """The rollback of `ops`: the inverse of each, in reverse order."""
    pages = pool.block_size // PAGE_SIZE
    inverse: list[GrantOp] = []
    for op in reversed(ops):
        match op:
            case MemAdd():
                inverse.append(MemRemove(op.instance, op.start_pfn, op.nr_pages))
            case MemRemove():
                block = op.start_pfn // pages
                node = pool.blocks[block].node if block in pool.blocks else 0
                inverse.append(MemAdd(op.instance, op.start_pfn, op.nr_pages, numa_node=node))
            case CpuAdd():
                inverse.append(CpuRemove(op.instance, op.cpu_id))
            case CpuRemove():
                info = pool.cpus.get(op.cpu_id)
                flags = int(CpuFlag.MK_CPU_HYPERTHREAD) if info and len(info.siblings) > 1 else 0
                node = info.node if info else 0
                inverse.append(CpuAdd(op.instance, op.cpu_id, numa_node=node, flags=flags))
            case DeviceAdd():
                inverse.append(DeviceRemove(op.instance, op.domain, op.bus, op.devfn))
            case DeviceRemove():
                inverse.append(DeviceAdd(op.instance, op.domain, op.bus, op.devfn))
    return tuple(inverse)


def grant_of(
    pool: Pool, name: str, id: int, held: Holding, tx: int = 0, applied_by: str = ""
) -> Grant:
    """The `Grant` message for what an instance holds."""
    nodes = {pool.cpus[c].node for c in held.cpus if c in pool.cpus}
    nodes |= {pool.blocks[b].node for b in held.blocks if b in pool.blocks}
    return Grant(
        instance=name,
        instance_id=id,
        cpus=tuple(sorted(held.cpus)),
        memory=len(held.blocks) * pool.block_size,
        memory_blocks=tuple(sorted(held.blocks)),
        queues=tuple(sorted(held.queues)),
        numa_nodes=tuple(sorted(nodes)),
        tx=tx,
        applied_by=applied_by,
    )


def holding_of(grant: Grant) -> Holding:
    return Holding(frozenset(grant.cpus), frozenset(grant.memory_blocks), frozenset(grant.queues))


def pool_info(ledger: Ledger, policy: str) -> PoolInfo:
    """The `pool` answer: every CPU with its holders, nodes, memory, queues, what is free."""
    pool, state = ledger.pool, ledger.state()

    def cpu(c: int, reserved: bool) -> CpuInfo:
        info = pool.reserved_cpus[c] if reserved else pool.cpus[c]
        return CpuInfo(
            c, info.node, info.package, info.core, tuple(sorted(info.siblings)),
            tuple(sorted(state.cpu_holders.get(c, ()))), reserved,
        )  # fmt: skip

    cpus = [cpu(c, False) for c in pool.cpus] + [cpu(c, True) for c in pool.reserved_cpus]
    free_blocks = [b for b in pool.blocks if b not in state.block_holders]
    nodes = [
        NodeInfo(
            node,
            tuple(sorted(c for c, i in pool.cpus.items() if i.node == node)),
            sum(1 for b in pool.blocks.values() if b.node == node),
            sum(1 for b in free_blocks if pool.blocks[b].node == node),
        )
        for node in pool.nodes
    ]
    return PoolInfo(
        cpus=tuple(sorted(cpus, key=lambda c: c.id)),
        nodes=tuple(nodes),
        memory_block=pool.block_size,
        memory_total=pool.memory,
        memory_free=len(free_blocks) * pool.block_size,
        memory_reserved=len(pool.reserved_blocks) * pool.block_size,
        queues=tuple(
            QueueInfo(q.name, q.kind, q.device, q.node, state.queue_holders.get(q.name, ""))
            for q in pool.queues.values()
        ),
        free_cpus=tuple(
            c for c in pool.cpus if len(state.cpu_holders.get(c, ())) < ledger.cpu_share
        ),
        policy=policy,
        cpu_share=ledger.cpu_share,
        pending=ledger.pending,
    )
