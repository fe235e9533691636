"""What the fake multikernel kernel's overlay transactions do to its pool and instances.

`apply` runs a parsed overlay the way `kernel/multikernel/overlay.c` is documented to
(Documentation/multikernel/overlays.rst): fragments in ascending unit address; under `/instances`
`instance-create` then `instance-remove`; under `/instances/<name>` memory-remove, memory-add,
cpu-remove, cpu-add, device-remove, device-add. Each step records its inverse; a refusal undoes
the steps already taken, in reverse, so a failed transaction leaves nothing. `Transaction.rollback`
is `rmdir tx_<N>`: the inverses in reverse, refused (EBUSY) if that would destroy an instance
that is loaded or active. An `instance-remove` cannot be undone (the kernel keeps no copy).
Pool targets (`/resources`) are refused with EPERM: the fake's pool is fixed at construction.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from multikernel.services import _mk_dt as dt

PAGE = 4096
_INSTANCE_OPS = (
    "memory-remove",
    "memory-add",
    "cpu-remove",
    "cpu-add",
    "device-remove",
    "device-add",
)
_NAMESPACE_OPS = ("instance-create", "instance-remove")


class Refused(Exception):
    """What the kernel would answer an operation with: an errno and why (its dmesg line)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.errno = code


@dataclass
class FakeInstance:
    """One instance as the fake kernel holds it."""

    name: str
    id: int
    cpus: set[int]
    regions: list[tuple[int, int]]  # (base, size), oldest first
    state: str = "ready"
    kernel: str | None = None
    process: subprocess.Popen[bytes] | None = None
    halted_by: str = ""  # "halt", "force", "panic": how it last left `active`
    devices: set[str] = field(default_factory=set)  # PCI addresses lent to it


@dataclass
class FakePool:
    cpus: set[int]
    chunks: list[tuple[int, int]]
    instances: dict[str, FakeInstance] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # node name -> PCI address

    def lent_devices(self) -> set[str]:
        return set().union(*(i.devices for i in self.instances.values()))

    def free_cpus(self) -> set[int]:
        lent = set().union(*(i.cpus for i in self.instances.values()))
        return self.cpus - lent

    def used(self) -> list[tuple[int, int]]:
        return sorted(r for i in self.instances.values() for r in i.regions)

    def allocate(self, size: int) -> tuple[int, int]:
        """First fit of `size` bytes in the pool (ENOMEM if nothing fits)."""
        for base, length in self.chunks:
            at = base
            for used_base, used_size in self.used():
                if used_base >= base + length or used_base + used_size <= at:
                    continue
                if used_base - at >= size:
                    break
                at = used_base + used_size
            if at + size <= base + length:
                return at, size
        raise Refused(errno.ENOMEM, f"no {size} bytes free in the pool")

    def check_free(self, base: int, size: int) -> None:
        if not any(b <= base and base + size <= b + s for b, s in self.chunks):
            raise Refused(errno.EINVAL, f"range {base:#x}+{size:#x} is not inside a pool chunk")
        for used_base, used_size in self.used():
            if base < used_base + used_size and used_base < base + size:
                raise Refused(errno.EBUSY, f"range {base:#x}+{size:#x} is lent to an instance")


@dataclass
class Transaction:
    """`overlays/tx_<id>`: the blob, its status, and how to undo what it did."""

    id: int
    dtbo: bytes
    tree: dt.Node
    status: str = "pending"
    target: str = ""
    resources: str = ""
    undo: list[Callable[[], None]] = field(default_factory=list)
    created: list[FakeInstance] = field(default_factory=list)

    def rollback(self, pool: FakePool) -> None:
        for inst in self.created:
            if inst.state in ("loaded", "active"):
                raise Refused(errno.EBUSY, f"instance {inst.name} is {inst.state}: stop it first")
        for step in reversed(self.undo):
            step()
        self.undo.clear()
        self.status = "removed"


def apply(pool: FakePool, tx: Transaction) -> None:
    """Run `tx`'s overlay on `pool`, all or nothing (`Refused` after undoing what it did)."""
    tx.resources = tx.tree.string("mk,resources") or ""
    fragments = [c for c in tx.tree.children if c.name.startswith("fragment@")]
    try:
        fragments.sort(key=lambda c: int(c.name.partition("@")[2], 16))
    except ValueError:
        raise Refused(errno.EINVAL, "a fragment's unit address is not a number") from None
    if not fragments:
        raise Refused(errno.EINVAL, "the overlay has no fragment")
    tx.target = fragments[0].string("target-path") or ""
    try:
        for fragment in fragments:
            _fragment(pool, tx, fragment)
    except (Refused, dt.DeviceTreeError) as error:
        for step in reversed(tx.undo):
            step()
        tx.undo.clear()
        tx.created.clear()
        if isinstance(error, Refused):
            raise
        raise Refused(errno.EINVAL, str(error)) from error


def _fragment(pool: FakePool, tx: Transaction, fragment: dt.Node) -> None:
    target = fragment.string("target-path")
    overlay = fragment.child("__overlay__")
    if target is None or overlay is None:
        raise Refused(errno.EINVAL, f"{fragment.name}: needs target-path and __overlay__")
    known = _NAMESPACE_OPS if target == "/instances" else _INSTANCE_OPS
    if target == "/resources":
        raise Refused(errno.EPERM, "this kernel's pool is not changed by overlays here")
    if target != "/instances" and not target.startswith("/instances/"):
        raise Refused(errno.EINVAL, f"unsupported target-path {target!r}")
    for unknown in overlay.children:
        if unknown.name not in known:
            raise Refused(errno.EINVAL, f"{unknown.name!r} is not an operation under {target}")
    for name in known:
        op = overlay.child(name)
        if op is None:
            continue
        if target == "/instances":
            (_create if name == "instance-create" else _remove)(pool, tx, op)
            continue
        inst_name = target.removeprefix("/instances/")
        inst = pool.instances.get(inst_name)
        if not inst_name or "/" in inst_name or inst is None:
            raise Refused(errno.ENOENT, f"no instance {inst_name!r}")
        _STEPS[name](pool, tx, inst, op)


def _create(pool: FakePool, tx: Transaction, op: dt.Node) -> None:
    name = op.string("instance-name")
    resources = op.child("resources")
    if not name or "/" in name or resources is None:
        raise Refused(errno.EINVAL, "instance-create needs instance-name and resources")
    if name in pool.instances:
        raise Refused(errno.EEXIST, f"an instance named {name!r} exists")
    ids = {i.id for i in pool.instances.values()}
    wanted = op.u32("id")
    if wanted == 0:
        raise Refused(errno.ENOMEM, "instance id 0 is reserved for the host kernel")
    if wanted is not None and wanted in ids:
        raise Refused(errno.ENOSPC, f"instance id {wanted} is taken")
    instance_id = wanted if wanted is not None else min(set(range(1, len(ids) + 2)) - ids)
    memory = resources.u64("memory-bytes")
    if not memory or memory % PAGE:
        raise Refused(errno.EINVAL, "memory-bytes must be a non-zero number of pages")
    cpus = set(resources.cells("cpus"))
    _check_cpus_free(pool, cpus)
    region = pool.allocate(memory)
    inst = FakeInstance(name, instance_id, cpus, [region])
    pool.instances[name] = inst
    tx.created.append(inst)

    def forget() -> None:
        pool.instances.pop(name, None)

    tx.undo.append(forget)


def _remove(pool: FakePool, tx: Transaction, op: dt.Node) -> None:
    name = op.string("instance-name") or ""
    inst = pool.instances.get(name)
    if inst is None:
        raise Refused(errno.ENOENT, f"no instance {name!r}")
    if inst.state in ("loaded", "active"):
        raise Refused(errno.EBUSY, f"instance {name!r} is {inst.state}: stop and unload it first")
    del pool.instances[name]  # not undone: the kernel keeps no copy of its configuration


def _check_cpus_free(pool: FakePool, cpus: set[int]) -> None:
    if cpus - pool.cpus:
        raise Refused(errno.EINVAL, f"CPUs {sorted(cpus - pool.cpus)} are not in the pool")
    if cpus - pool.free_cpus():
        raise Refused(errno.EBUSY, f"CPUs {sorted(cpus - pool.free_cpus())} are lent already")


def _items(op: dt.Node, prefix: str) -> list[dt.Node]:
    items = [c for c in op.children if c.name.startswith(prefix)]
    if not items:
        raise Refused(errno.EINVAL, f"{op.name} names no {prefix}N item")
    return items


def _cpu_add(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    cpus = {item.cells("reg")[0] for item in _items(op, "cpu@")}
    _check_cpus_free(pool, cpus)
    inst.cpus |= cpus
    tx.undo.append(lambda: inst.cpus.difference_update(cpus))


def _cpu_remove(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    cpus = {item.cells("reg")[0] for item in _items(op, "cpu@")}
    if cpus - inst.cpus:
        raise Refused(errno.EINVAL, f"CPUs {sorted(cpus - inst.cpus)} are not {inst.name}'s")
    inst.cpus -= cpus
    tx.undo.append(lambda: inst.cpus.update(cpus))


def _memory_add(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    for item in _items(op, "memory@"):
        base, size = item.reg()
        if not size or base % PAGE or size % PAGE:
            raise Refused(errno.EINVAL, f"range {base:#x}+{size:#x} is not page aligned")
        pool.check_free(base, size)
        inst.regions.append((base, size))
        tx.undo.append(partial(inst.regions.remove, (base, size)))


def _memory_remove(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    for item in _items(op, "memory@"):
        region = item.reg()
        if region not in inst.regions:
            raise Refused(errno.EINVAL, f"{inst.name} has no range {region[0]:#x}+{region[1]:#x}")
        at = inst.regions.index(region)
        inst.regions.remove(region)
        tx.undo.append(partial(inst.regions.insert, at, region))


def _pci_ids(op: dt.Node) -> set[str]:
    ids = set()
    for item in _items(op, "pci@"):
        pci_id = item.string("pci-id")
        if not pci_id or pci_id.count(":") != 2 or "." not in pci_id:
            raise Refused(errno.EINVAL, f"{op.name}/{item.name}: no valid pci-id")
        ids.add(pci_id)
    return ids


def _device_add(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    ids = _pci_ids(op)
    if unknown := ids - set(pool.devices.values()):
        raise Refused(errno.ENODEV, f"devices {sorted(unknown)} are not in the pool")
    if lent := ids & pool.lent_devices():
        raise Refused(errno.EBUSY, f"devices {sorted(lent)} are lent already")
    inst.devices |= ids
    tx.undo.append(lambda: inst.devices.difference_update(ids))


def _device_remove(pool: FakePool, tx: Transaction, inst: FakeInstance, op: dt.Node) -> None:
    ids = _pci_ids(op)
    if ids - inst.devices:
        raise Refused(errno.EINVAL, f"devices {sorted(ids - inst.devices)} are not {inst.name}'s")
    inst.devices -= ids
    tx.undo.append(lambda: inst.devices.update(ids))


_STEPS = {
    "cpu-add": _cpu_add,
    "cpu-remove": _cpu_remove,
    "memory-add": _memory_add,
    "memory-remove": _memory_remove,
    "device-add": _device_add,
    "device-remove": _device_remove,
}
