"""The host's pool, as the machine describes itself under /sys: CPUs, memory blocks, I/O queues.

`discover_pool(root)` reads a sysfs tree (the machine's own at `/`, a fake one in tests:
`multikernel.services.testing.FakeSysfs`) and returns a frozen `Pool`:

- **CPUs** by id (`/sys/devices/system/cpu/online`), each with its NUMA node (`node<N>/cpulist`),
  package, core and sibling threads (`cpu<N>/topology`).
- **Memory** in blocks of `/sys/devices/system/memory/block_size_bytes`, the unit Linux hotplugs
  memory in and the unit the multikernel kernel moves it between instances. The blocks are the
  online `memory<M>` of each node, as many as `MemTotal` (of `/proc/meminfo`) covers, the highest
  ids first (the kernel's own memory sits at the bottom); without memory-block directories,
  `node<N>/meminfo`'s MemTotal is cut into blocks, and without nodes `/proc/meminfo`'s.
- **I/O queues**: each NIC's `/sys/class/net/<if>/queues/{rx,tx}-<n>`, each disk's hardware
  queues `/sys/block/<disk>/mq/<n>`, each GPU `/sys/class/drm/card<n>`; only devices backed by
  hardware (a `device` link: `lo`, `ifb*`, loop and zram devices are not), with the PCI address
  and NUMA node of that hardware.
- **Host reservations**: CPUs and memory the host keeps for itself (its config) leave the pool;
  reserved memory is whole blocks, the lowest ids.

Nothing here writes to sysfs: the pool is a description. Who holds what is `_holdings`'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from multikernel.protocol import (
    InvalidResourceRequestError,
    MultikernelError,
    format_cpu_list,
    format_size,
    parse_cpu_list,
)

#: The memory-block size when the machine does not publish one (kerf's fallback too).
DEFAULT_BLOCK_SIZE: Final = 128 << 20
PAGE_SIZE: Final = 4096
_PCI: Final = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


class PoolError(MultikernelError):
    """The machine's description cannot make a pool (unreadable sysfs, a reservation of CPUs the
    machine does not have, nothing left for instances); the message says which file or setting."""


@dataclass(frozen=True)
class Cpu:
    """One logical CPU: its NUMA node, package, core and the threads that share its core."""

    id: int
    node: int = 0
    package: int = 0
    core: int = 0
    siblings: frozenset[int] = frozenset()


@dataclass(frozen=True)
class MemoryBlock:
    """One memory block (`/sys/devices/system/memory/memory<id>`) and its NUMA node."""

    id: int
    node: int = 0


@dataclass(frozen=True)
class Queue:
    """One I/O queue: `net/eth0/rx-0` (kind net-rx), `block/vda/mq-0` (block), `gpu/card0`."""

    name: str
    kind: str
    device: str = ""  # the PCI address of its hardware, "" when unknown
    node: int = 0


@dataclass(frozen=True)
class Pool:
    """What instances may be given, and what the host keeps (`reserved_*`)."""

    cpus: Mapping[int, Cpu]
    block_size: int
    blocks: Mapping[int, MemoryBlock]
    queues: Mapping[str, Queue] = field(default_factory=dict)
    reserved_cpus: Mapping[int, Cpu] = field(default_factory=dict)
    reserved_blocks: Mapping[int, MemoryBlock] = field(default_factory=dict)

    @property
    def memory(self) -> int:
        """Bytes of memory in the pool."""
        return len(self.blocks) * self.block_size

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(
            sorted({c.node for c in self.cpus.values()} | {b.node for b in self.blocks.values()})
        )

    def blocks_for(self, size: int) -> int:
        """How many blocks hold `size` bytes (rounded up)."""
        return -(-size // self.block_size)

    def pages(self, blocks: int) -> int:
        return blocks * self.block_size // PAGE_SIZE

    def describe(self) -> str:
        """One line for the log: what the pool holds and what the host keeps."""
        queues = f", {len(self.queues)} I/O queues" if self.queues else ""
        kept = ""
        if self.reserved_cpus or self.reserved_blocks:
            kept = (
                f"; the host keeps CPUs {format_cpu_list(self.reserved_cpus) or 'none'} and "
                f"{format_size(len(self.reserved_blocks) * self.block_size)}"
            )
        return (
            f"{len(self.cpus)} CPUs ({format_cpu_list(self.cpus)}) on {len(self.nodes)} NUMA "
            f"node(s), {format_size(self.memory)} in {format_size(self.block_size)} blocks"
            f"{queues}{kept}"
        )


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        if default is not None:
            return default
        raise PoolError(f"cannot read {path}: {error.strerror}") from error


def _cpu_list(path: Path, *, required: bool = False) -> frozenset[int]:
    text = _read(path) if required else _read(path, "")
    try:
        return parse_cpu_list(text) if text else frozenset()
    except InvalidResourceRequestError as error:
        raise PoolError(f"{path} is not a CPU list: {error}") from error


def _kib(text: str, path: Path) -> int:
    """`MemTotal:  24731708 kB` (or `Node 0 MemTotal: ...`) → bytes."""
    for line in text.splitlines():
        words = line.split()
        if "MemTotal:" in words:
            return int(words[words.index("MemTotal:") + 1]) * 1024
    raise PoolError(f"{path} has no MemTotal")


def _node_dirs(root: Path) -> dict[int, Path]:
    nodes = root / "sys/devices/system/node"
    found: dict[int, Path] = {}
    if nodes.is_dir():
        for entry in nodes.iterdir():
            if re.fullmatch(r"node\d+", entry.name):
                found[int(entry.name[4:])] = entry
    return found


def discover_cpus(root: Path) -> dict[int, Cpu]:
    """Every online CPU with its topology."""
    system = root / "sys/devices/system/cpu"
    online = _cpu_list(system / "online", required=True)
    if not online:
        raise PoolError(f"{system / 'online'} lists no CPU")
    node_of: dict[int, int] = {}
    for node, path in _node_dirs(root).items():
        for cpu in _cpu_list(path / "cpulist"):
            node_of[cpu] = node
    cpus: dict[int, Cpu] = {}
    for cpu in sorted(online):
        topology = system / f"cpu{cpu}" / "topology"
        siblings = _cpu_list(topology / "thread_siblings_list") or frozenset({cpu})
        cpus[cpu] = Cpu(
            id=cpu,
            node=node_of.get(cpu, 0),
            package=max(0, int(_read(topology / "physical_package_id", "0"))),
            core=int(_read(topology / "core_id", str(cpu))),
            siblings=siblings & online | {cpu},
        )
    return cpus


def discover_memory(root: Path) -> tuple[int, dict[int, MemoryBlock]]:
    """(block size, every block of memory instances may use, by id)."""
    memory = root / "sys/devices/system/memory"
    size_text = _read(memory / "block_size_bytes", "")
    block_size = int(size_text, 16) if size_text else DEFAULT_BLOCK_SIZE
    if block_size <= 0 or block_size % PAGE_SIZE:
        raise PoolError(f"{memory / 'block_size_bytes'} says {size_text!r}: not a block size")
    meminfo = root / "proc/meminfo"
    nodes = _node_dirs(root)
    listed: dict[int, MemoryBlock] = {}
    for node, path in nodes.items():
        for entry in path.iterdir():
            if re.fullmatch(r"memory\d+", entry.name):
                block = int(entry.name[6:])
                if _read(memory / entry.name / "online", "1") == "1":
                    listed[block] = MemoryBlock(block, node)
    if listed:
        total = _kib(_read(meminfo), meminfo) if meminfo.exists() else len(listed) * block_size
        keep = sorted(listed)[-(total // block_size) :] if total >= block_size else []
        return block_size, {b: listed[b] for b in keep}
    blocks: dict[int, MemoryBlock] = {}
    if nodes:
        for node in sorted(nodes):
            path = nodes[node] / "meminfo"
            for _ in range(_kib(_read(path), path) // block_size):
                blocks[len(blocks)] = MemoryBlock(len(blocks), node)
    else:
        for _ in range(_kib(_read(meminfo), meminfo) // block_size):
            blocks[len(blocks)] = MemoryBlock(len(blocks), 0)
    return block_size, blocks


def _hardware(device: Path) -> tuple[str, int] | None:
    """(PCI address, NUMA node) of what `<dev>/device` points to; None for a virtual device."""
    link = device / "device"
    if not link.exists():
        return None
    resolved = link.resolve()
    address = next((p for p in reversed(resolved.parts) if _PCI.fullmatch(p)), "")
    node = int(_read(resolved / "numa_node", "0") or 0)
    if node < 0 and address:  # a virtio device's own dir has none; its PCI parent may
        parent = next(p for p in (resolved, *resolved.parents) if p.name == address)
        node = int(_read(parent / "numa_node", "0") or 0)
    return address, max(node, 0)


def discover_queues(root: Path) -> dict[str, Queue]:
    """Every hardware I/O queue: NIC rx/tx queues, disk hardware queues, GPUs."""
    queues: dict[str, Queue] = {}

    def entries(path: Path) -> list[Path]:
        return sorted(path.iterdir()) if path.is_dir() else []

    for nic in entries(root / "sys/class/net"):
        hardware = _hardware(nic)
        if hardware is None:
            continue
        for q in entries(nic / "queues"):
            if match := re.fullmatch(r"(rx|tx)-(\d+)", q.name):
                name = f"net/{nic.name}/{q.name}"
                queues[name] = Queue(name, f"net-{match.group(1)}", *hardware)
    for disk in entries(root / "sys/block"):
        hardware = _hardware(disk)
        if hardware is None:
            continue
        for q in entries(disk / "mq"):
            if q.name.isdigit():
                name = f"block/{disk.name}/mq-{q.name}"
                queues[name] = Queue(name, "block", *hardware)
    for card in entries(root / "sys/class/drm"):
        if re.fullmatch(r"card\d+", card.name) and (hardware := _hardware(card)) is not None:
            queues[f"gpu/{card.name}"] = Queue(f"gpu/{card.name}", "gpu", *hardware)
    return dict(sorted(queues.items(), key=lambda item: _natural(item[0])))


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def discover_pool(
    root: Path = Path("/"),
    *,
    reserve_cpus: frozenset[int] = frozenset(),
    reserve_memory: int = 0,
) -> Pool:
    """The pool of the machine whose sysfs and procfs are under `root`, less what the host keeps.

    Raises `PoolError` naming the file or the setting that is wrong.
    """
    cpus = discover_cpus(root)
    block_size, blocks = discover_memory(root)
    return make_pool(
        cpus, block_size, blocks, discover_queues(root),
        reserve_cpus=reserve_cpus, reserve_memory=reserve_memory,
    )  # fmt: skip


def make_pool(
    cpus: Mapping[int, Cpu],
    block_size: int,
    blocks: Mapping[int, MemoryBlock],
    queues: Mapping[str, Queue],
    *,
    reserve_cpus: frozenset[int] = frozenset(),
    reserve_memory: int = 0,
) -> Pool:
    """The pool of these CPUs, blocks and queues, less what the host keeps (the lowest blocks).

    Raises `PoolError` naming the setting that is wrong.
    """
    unknown = reserve_cpus - cpus.keys()
    if unknown:
        raise PoolError(
            f"the host config reserves CPU {format_cpu_list(unknown)}, which this machine does "
            f"not have online (online: {format_cpu_list(cpus)})"
        )
    if reserve_cpus >= cpus.keys():
        raise PoolError(
            f"the host config reserves every CPU ({format_cpu_list(cpus)}): leave at least one "
            "for instances"
        )
    kept = -(-reserve_memory // block_size) if reserve_memory > 0 else 0
    if kept >= len(blocks):
        raise PoolError(
            f"the host config reserves {format_size(reserve_memory)} of memory and the machine "
            f"has {format_size(len(blocks) * block_size)}: leave at least one "
            f"{format_size(block_size)} block for instances"
        )
    order = sorted(blocks)
    return Pool(
        cpus={c: cpu for c, cpu in cpus.items() if c not in reserve_cpus},
        block_size=block_size,
        blocks={b: blocks[b] for b in order[kept:]},
        queues=dict(queues),
        reserved_cpus={c: cpus[c] for c in sorted(reserve_cpus)},
        reserved_blocks={b: blocks[b] for b in order[:kept]},
    )
