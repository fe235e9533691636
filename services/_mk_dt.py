"""Device trees and overlays of the multikernel kernel: made with kerf, read with pylibfdt.

The overlays the platform writes to `overlays/new` are kerf's (`kerf.dtc.overlay`
`OverlayGenerator`, kerf-multikernel 0.4): `instance-create` under `/instances`, cpu/memory
add/remove under `/instances/<name>`, `instance-remove`; so an overlay of ours is one `kerf`
would write, byte for byte. What the kernel reads back (the root `device_tree`, an instance's
`device_tree`) is read here with pylibfdt into a `Node` tree: kerf's `DeviceTreeParser` reads
whole global trees into its own models and requires properties (`memory-base`) that kerf's own
generator no longer writes, so it cannot read its own `instance-create` overlays back; the fake
kernel (`_mk_fake`) and the platform walk the tree themselves.

Cells follow the kernel: CPU ids are 64-bit cells (32-bit accepted on read), `reg` of a memory
range is `<u64 base, u64 size>`, `memory-bytes` a u64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, cast

import libfdt
from kerf.dtc.overlay import OverlayGenerator
from kerf.models import (
    CPUAllocation,
    GlobalDeviceTree,
    HardwareInventory,
    Instance,
    InstanceResources,
    MemoryAllocation,
)

#: The compatible string of the kernel's own trees.
COMPATIBLE = "multikernel-v1"


class DeviceTreeError(ValueError):
    """A blob that is not a device tree the kernel would take."""


@dataclass
class Node:
    """A device tree node: its properties (raw bytes) and its subnodes, in order."""

    name: str
    props: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def child(self, name: str) -> Node | None:
        return next((c for c in self.children if c.name == name), None)

    def string(self, prop: str) -> str | None:
        value = self.props.get(prop)
        return None if value is None else value.rstrip(b"\0").decode(errors="replace")

    def u32(self, prop: str) -> int | None:
        value = self.props.get(prop)
        if value is None:
            return None
        if len(value) != 4:
            raise DeviceTreeError(f"{self.name}/{prop} is {len(value)} bytes, not a u32")
        return int(struct.unpack(">I", value)[0])

    def u64(self, prop: str) -> int | None:
        value = self.props.get(prop)
        if value is None:
            return None
        if len(value) != 8:
            raise DeviceTreeError(f"{self.name}/{prop} is {len(value)} bytes, not a u64")
        return int(struct.unpack(">Q", value)[0])

    def strings(self, prop: str) -> list[str]:
        """A stringlist property (NUL-separated)."""
        value = self.props.get(prop, b"")
        return [s.decode(errors="replace") for s in value.split(b"\0") if s]

    def cells(self, prop: str) -> list[int]:
        """A list of CPU ids: 64-bit cells, or 32-bit ones in older trees."""
        value = self.props.get(prop, b"")
        width = "Q" if len(value) % 8 == 0 else "I"
        if len(value) % struct.calcsize(width):
            raise DeviceTreeError(f"{self.name}/{prop} is {len(value)} bytes: not a cell array")
        return list(struct.unpack(f">{len(value) // struct.calcsize(width)}{width}", value))

    def reg(self) -> tuple[int, int]:
        """`reg = <u64 base, u64 size>` of a memory item."""
        value = self.props.get("reg", b"")
        if len(value) != 16:
            raise DeviceTreeError(f"{self.name}/reg must be 16 bytes, not {len(value)}")
        base, size = struct.unpack(">QQ", value)
        return int(base), int(size)


def parse(blob: bytes) -> Node:
    """The tree of a flattened device tree blob; `DeviceTreeError` if it is not one."""
    try:
        fdt = libfdt.Fdt(bytes(blob))
    except libfdt.FdtException as error:
        raise DeviceTreeError(f"not a device tree blob: {error}") from error
    if fdt.totalsize() != len(blob):
        raise DeviceTreeError(f"blob is {len(blob)} bytes, its header says {fdt.totalsize()}")

    def node(offset: int) -> Node:
        found = Node(str(fdt.get_name(offset)))
        prop = fdt.first_property_offset(offset, [libfdt.FDT_ERR_NOTFOUND])
        while prop >= 0:
            item = fdt.get_property_by_offset(prop)
            found.props[str(item.name)] = bytes(item)
            prop = fdt.next_property_offset(prop, [libfdt.FDT_ERR_NOTFOUND])
        sub = fdt.first_subnode(offset, [libfdt.FDT_ERR_NOTFOUND])
        while sub >= 0:
            found.children.append(node(sub))
            sub = fdt.next_subnode(sub, [libfdt.FDT_ERR_NOTFOUND])
        return found

    return node(0)


def build(root: Node) -> bytes:
    """The blob of a tree (what the fake kernel shows in its `device_tree` files)."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()

    def emit(node: Node) -> None:
        sw.begin_node(node.name)
        for name, value in node.props.items():
            sw.property(name, value)
        for child in node.children:
            emit(child)
        sw.end_node()

    emit(root)
    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def cpu_cells(cpus: list[int] | set[int] | frozenset[int]) -> bytes:
    return struct.pack(f">{len(cpus)}Q", *sorted(cpus))


# -- overlays, by kerf -------------------------------------------------------------------------


def _instance(
    name: str,
    instance_id: int | None,
    cpus: frozenset[int],
    memory: int,
    devices: frozenset[str] = frozenset(),
) -> Any:
    return Instance(
        name=name,
        id=instance_id,
        resources=InstanceResources(
            cpus=sorted(cpus), memory_base=0, memory_bytes=memory, devices=sorted(devices)
        ),
    )


def _tree(instances: dict[str, Any]) -> Any:
    # kerf's generator reads only `instances` and the devices' PCI ids from a tree.
    hardware = HardwareInventory(
        cpus=CPUAllocation(total=0, host_reserved=[], available=[]),
        memory=MemoryAllocation(total_bytes=0, host_reserved_bytes=0),
        devices={},
    )
    return GlobalDeviceTree(hardware=hardware, instances=instances, device_references={})


def create_overlay(name: str, instance_id: int, cpus: frozenset[int], memory: int) -> bytes:
    """`instance-create` of `name` with id `instance_id`, its CPUs and `memory` bytes."""
    new = _instance(name, instance_id, cpus, memory)
    blob = OverlayGenerator().generate_overlay(_tree({}), _tree({name: new}))
    return bytes(cast(bytearray, blob))


def update_overlay(
    name: str,
    old: tuple[frozenset[int], int],
    new: tuple[frozenset[int], int],
    *,
    regions: list[tuple[int, int]],
    add_base: int | None,
    devices: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset()),
) -> bytes:
    """cpu/memory/device add/remove under `/instances/<name>`, from `old` to `new` (CPUs,
    bytes), and from `devices[0]` to `devices[1]` (PCI addresses, `DDDD:BB:SS.F`).

    `regions` are the instance's memory ranges, oldest first (a shrink gives back whole ones,
    newest first); `add_base` is where a grow's memory goes (a free pool range)."""
    blob = OverlayGenerator().generate_update_overlay(
        name, _instance(name, None, *old, devices[0]), _instance(name, None, *new, devices[1]),
        memory_regions=regions, memory_add_base=add_base,
    )  # fmt: skip
    return bytes(cast(bytearray, blob))


def remove_overlay(name: str) -> bytes:
    """`instance-remove` of `name`."""
    return bytes(cast(bytearray, OverlayGenerator().generate_removal_overlay(name)))
