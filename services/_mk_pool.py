"""The resource actor's pool on a multikernel kernel: what the kernel's global tree lends.

On the multikernel platform an instance's CPUs and memory are the kernel's to lend, not this
machine's as its sysfs describes them: the kernel keeps a pool (`mk_pool`, reserved at boot) and
publishes it in the global `device_tree`'s `/resources`, the node kerf's `DeviceTreeParser`
reads as the hardware inventory:

- `cpus`: every CPU of the pool (`cpus-available` is the ones no instance holds; the resource
  actor keeps its own account of who holds what, so the pool is all of `cpus`);
- `memory@<base>` with `reg = <base size>` (two u64 cells) and an optional `numa-node-id`: the
  pool's memory chunks, cut here into blocks of `DEFAULT_BLOCK_SIZE` (128 MiB, kerf's unit too),
  the remainder of a chunk that is not a whole block left out.

- `devices/<name>` with a `pci-id` (`DDDD:BB:SS.F`): a whole PCI device the kernel can lend an
  instance (device-add), in the pool as the queue `pci/<pci-id>` of kind `device`: `--queues
  pci/0000:01:00.0` asks for it, and the grant reaches the kernel as a device overlay
  (`MultikernelHostSide`).

The host's reservations (`--reserve-cpus`, `--reserve-memory`) leave the pool
as on the local platform (`_pool.make_pool`). The tree is read through the seam
(`MultikernelKernel.read`), so the fake kernel's pool is what the tests see.
"""

from __future__ import annotations

from typing import Final

from multikernel.services import _mk_dt as dt
from multikernel.services._mk_kernel import MultikernelKernel
from multikernel.services._pool import (
    DEFAULT_BLOCK_SIZE,
    Cpu,
    MemoryBlock,
    Pool,
    PoolError,
    Queue,
    make_pool,
)

#: `numa-node-id` when a chunk may come from any node (kerf's `ANY_NODE`).
_ANY_NODE: Final = 0xFFFFFFFF


def kernel_pool(
    kernel: MultikernelKernel,
    *,
    reserve_cpus: frozenset[int] = frozenset(),
    reserve_memory: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Pool:
    """The pool the kernel's `device_tree` lends instances, less what the host keeps.

    Raises `PoolError` saying what in the tree is missing or wrong.
    """
    try:
        tree = dt.parse(kernel.read("device_tree"))
    except OSError as error:
        raise PoolError(
            f"cannot read the multikernel kernel's device_tree ({error.strerror}): is its file "
            "system mounted (mount -t multikernel none /sys/fs/multikernel)?"
        ) from error
    except dt.DeviceTreeError as error:
        raise PoolError(
            f"the multikernel kernel's device_tree is not a device tree: {error}"
        ) from error
    resources = tree.child("resources")
    if resources is None:
        raise PoolError("the multikernel kernel's device_tree has no /resources: no pool to lend")
    cpus = {c: Cpu(id=c, core=c, siblings=frozenset({c})) for c in sorted(resources.cells("cpus"))}
    if not cpus:
        raise PoolError("the multikernel kernel's pool has no CPUs (/resources has no `cpus`)")
    blocks: dict[int, MemoryBlock] = {}
    for chunk in resources.children:
        if not chunk.name.startswith("memory@"):
            continue
        try:
            base, size = chunk.reg()
            node = chunk.u32("numa-node-id")
        except dt.DeviceTreeError as error:
            raise PoolError(f"the multikernel kernel's pool: {error}") from error
        node = 0 if node is None or node == _ANY_NODE else node
        first = -(-base // block_size)  # whole blocks inside [base, base + size)
        for block in range(first, (base + size) // block_size):
            blocks[block] = MemoryBlock(block, node)
    if not blocks:
        raise PoolError(
            f"the multikernel kernel's pool has no memory in whole {block_size >> 20} MiB "
            "blocks (/resources has no large enough memory@ chunk)"
        )
    devices = resources.child("devices") or dt.Node("devices")
    queues = {}
    for device in devices.children:  # each a whole device the kernel can lend an instance
        pci_id = device.string("pci-id")
        if pci_id:
            name = f"pci/{pci_id}"
            queues[name] = Queue(name, "device", pci_id, device.u32("numa-node-id") or 0)
    return make_pool(
        cpus, block_size, blocks, queues, reserve_cpus=reserve_cpus, reserve_memory=reserve_memory
    )
