"""Test doubles for code that works with the host's resources: a fake machine, a fake agent.

`FakeSysfs` writes, under a directory of your choice, the files the resource pool reads from a
machine (`/sys/devices/system/{cpu,memory,node}`, `/proc/meminfo`, `/sys/class/net`,
`/sys/block`, `/sys/class/drm`), so a pool, a placement policy or a plugin can be tested against
any machine shape, a 1,000-CPU one included, without touching the real one::

    from multikernel.services.testing import FakeSysfs
    from multikernel.services import discover_pool

    def test_my_policy(tmp_path):
        machine = (
            FakeSysfs(tmp_path)
            .cpus(8, nodes=2, threads_per_core=2)
            .memory(16 << 30, block_size=128 << 20, nodes=2)
            .nic("eth0", queues=4)
        )
        pool = discover_pool(machine.root, reserve_cpus=frozenset({0}))
        assert len(pool.cpus) == 7

Each method returns the builder, so a machine reads as one expression. CPU ids follow x86 Linux:
with two threads per core, CPUs 0..n/2-1 are each core's first thread and n/2.. their siblings;
cores are spread over the NUMA nodes in order. Memory blocks are numbered from 0, split evenly
over the nodes. Devices get PCI addresses in order unless one is given.

`FakeResctrl` is a resctrl file system (`/sys/fs/resctrl`, cache and memory-bandwidth
partitioning) under a directory of your choice that acts like the kernel's: a group made with
mkdir gets the kernel's files, and a write the kernel would refuse (a non-contiguous mask, an
overlap with an exclusive group, CLOSIDs used up) fails the same way. Hand it to a
`LocalPlatform(resctrl=...)` to see what the platform does on a machine with Intel RDT::

    resctrl = FakeResctrl(tmp_path).cache("L3", cbm_mask=0x7ff, domains={0: range(8)})
    platform = LocalPlatform(resctrl=resctrl)
    ...
    assert resctrl.masks(group) == {0: 0x780}

`FakeAgent` serves an instance's `resource` method the way a real agent does (acknowledges each
op, undoes what a rollback names, refuses a transaction rolled back before it came) without
touching any process: it records the transactions, and can be told to refuse (`refuse`) or to
never answer (`hang`), to test what the resource actor does then::

    agent = FakeAgent(instance=3)
    async with bus.connect("agent", instance=3) as ep:
        await agent.serve(ep)
        ...
        assert agent.transactions[-1].ops == (CpuAdd(3, cpu_id=2),)

`FakeMultikernel` is the multikernel kernel's side (its file system under `/sys/fs/multikernel`,
`kexec_file_load` and `reboot`, every call recorded) in a directory of your choice, acting like
the kernel: overlay transactions, rollback, the instance states, and the kernel's refusals. Hand
it to a `MultikernelPlatform`; with `boot=boot_init(UnixVsock(dir))` a booted instance runs our
in-instance init as a local process, reached through `UnixVsock`, the stand-in for AF_VSOCK::

    vsock = UnixVsock(short_dir)
    with FakeMultikernel(tmp_path, cpus={1, 2, 3}, boot=boot_init(vsock)) as kernel:
        async with MultikernelPlatform(kernel, BootImage(vmlinux), connector=vsock) as mk:
            ...
            kernel.panic("web")  # the instance's kernel goes down: `loaded` again

`KernelServer(kernel, socket_path, vsock=vsock.directory)` serves such a kernel to other
processes: a host started with `--kernfs socket_path` drives it (and can be killed while its
instances run on), as it would drive the real kernel.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Self

import anyio

from multikernel.endpoints import Bus
from multikernel.protocol import ResourceTransaction, ResourceTransactionAck
from multikernel.services._agent_resources import InstanceResources, refused
from multikernel.services._mk_fake import FakeMultikernel, boot_init
from multikernel.services._mk_remote import KernelServer
from multikernel.services._mk_vsock import UnixVsock
from multikernel.services._resctrl_fake import FakeResctrl

__all__ = [
    "FakeAgent",
    "FakeMultikernel",
    "FakeResctrl",
    "FakeSysfs",
    "KernelServer",
    "UnixVsock",
    "boot_init",
]


def _cpu_list(cpus: list[int]) -> str:
    from multikernel.protocol import format_cpu_list

    return format_cpu_list(cpus)


class FakeSysfs:
    """A fake machine description under `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._nodes = 1
        self._next_pci = 3

    def _write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        return path

    def _node(self, node: int) -> Path:
        path = self.root / f"sys/devices/system/node/node{node}"
        path.mkdir(parents=True, exist_ok=True)
        self._nodes = max(self._nodes, node + 1)
        return path

    def cpus(self, count: int, *, nodes: int = 1, threads_per_core: int = 1) -> Self:
        """`count` online CPUs on `nodes` NUMA nodes, `threads_per_core` threads per core."""
        if count % threads_per_core or (count // threads_per_core) % nodes:
            raise ValueError("count must split evenly into cores and the cores over the nodes")
        cores = count // threads_per_core
        per_node = cores // nodes
        system = "sys/devices/system/cpu"
        self._write(f"{system}/online", f"0-{count - 1}" if count > 1 else "0")
        node_cpus: dict[int, list[int]] = {n: [] for n in range(nodes)}
        for cpu in range(count):
            core = cpu % cores
            node = core // per_node
            siblings = [core + t * cores for t in range(threads_per_core)]
            topology = f"{system}/cpu{cpu}/topology"
            self._write(f"{topology}/core_id", str(core % per_node))
            self._write(f"{topology}/physical_package_id", str(node))
            self._write(f"{topology}/thread_siblings_list", _cpu_list(siblings))
            node_cpus[node].append(cpu)
        for node, cpus in node_cpus.items():
            (self._node(node) / "cpulist").write_text(_cpu_list(cpus) + "\n")
        return self

    def memory(
        self,
        total: int,
        *,
        block_size: int = 128 << 20,
        nodes: int = 1,
        blocks_dirs: bool = True,
        offline: frozenset[int] = frozenset(),
        reserved_by_kernel: int = 0,
    ) -> Self:
        """`total` bytes in `block_size` blocks on `nodes` nodes.

        `blocks_dirs=False` leaves out the memory-block directories (a machine without memory
        hotplug), so only `node<N>/meminfo` says how much there is. `offline` blocks are listed
        but offline. `reserved_by_kernel` bytes are in blocks but not in MemTotal, as on a real
        machine (the kernel's own memory).
        """
        count = total // block_size
        self._write("sys/devices/system/memory/block_size_bytes", f"{block_size:x}")
        self._write("proc/meminfo", f"MemTotal:       {(total - reserved_by_kernel) // 1024} kB")
        per_node = count // nodes
        for node in range(nodes):
            path = self._node(node)
            node_total = per_node * block_size // 1024
            (path / "meminfo").write_text(f"Node {node} MemTotal:       {node_total} kB\n")
        if blocks_dirs:
            for block in range(count):
                node = min(block // per_node, nodes - 1)
                self._write(
                    f"sys/devices/system/memory/memory{block}/online",
                    "0" if block in offline else "1",
                )
                link = self._node(node) / f"memory{block}"
                if not link.exists():
                    link.symlink_to(f"../../memory/memory{block}")
        return self

    def _device(self, pci: str | None, node: int, *, virtio: bool) -> Path:
        if pci is None:
            pci = f"0000:00:{self._next_pci:02x}.0"
            self._next_pci += 1
        device = self.root / "sys/devices/pci0000:00" / pci
        device.mkdir(parents=True, exist_ok=True)
        (device / "numa_node").write_text(f"{node}\n")
        if virtio:  # a virtio device hangs below its PCI function, with numa_node -1
            device = device / f"virtio{self._next_pci}"
            device.mkdir(exist_ok=True)
            (device / "numa_node").write_text("-1\n")
        return device

    def _link(self, at: Path, device: Path) -> None:
        at.mkdir(parents=True, exist_ok=True)
        (at / "device").symlink_to(device)

    def nic(
        self,
        name: str,
        *,
        queues: int = 1,
        pci: str | None = None,
        node: int = 0,
        virtio: bool = False,
    ) -> Self:
        """A NIC backed by hardware, with `queues` rx and `queues` tx queues."""
        nic = self.root / "sys/class/net" / name
        self._link(nic, self._device(pci, node, virtio=virtio))
        for q in range(queues):
            (nic / "queues" / f"rx-{q}").mkdir(parents=True)
            (nic / "queues" / f"tx-{q}").mkdir(parents=True)
        return self

    def virtual_nic(self, name: str, *, queues: int = 1) -> Self:
        """A NIC with no hardware (like `lo` or `ifb0`): not part of the pool."""
        for q in range(queues):
            (self.root / "sys/class/net" / name / "queues" / f"rx-{q}").mkdir(parents=True)
        return self

    def disk(self, name: str, *, queues: int = 1, pci: str | None = None, node: int = 0) -> Self:
        """A block device backed by hardware, with `queues` hardware queues."""
        disk = self.root / "sys/block" / name
        self._link(disk, self._device(pci, node, virtio=False))
        for q in range(queues):
            (disk / "mq" / str(q)).mkdir(parents=True)
        return self

    def gpu(self, name: str = "card0", *, pci: str | None = None, node: int = 0) -> Self:
        """A GPU (`/sys/class/drm/<name>`), granted whole."""
        self._link(self.root / "sys/class/drm" / name, self._device(pci, node, virtio=False))
        return self


class FakeAgent(InstanceResources):
    """An instance agent's `resource` method, without an instance (see the module docstring).

    `refuse`: a message; every transaction is then refused with -EBUSY and that message.
    `hang`: transactions are not answered until `release_hang()` (or their deadline passes).
    `used`: the memory the instance "uses" (a shrink below it is refused, as for real).
    """

    def __init__(self, instance: int, *, cpus: frozenset[int] = frozenset(), memory: int = 0):
        super().__init__(instance, cpus, memory)
        self.transactions: list[ResourceTransaction] = []
        self.refuse: str | None = None
        self.hang = False
        self.used = 0
        self.received = anyio.Event()
        self._unhang = anyio.Event()

    async def serve(self, bus: Bus) -> None:
        """Serve `instance.<id>.agent` with its `resource` method on `bus`."""
        service = bus.service(f"instance.{self.instance}.agent")
        service.method(self.resource, name="resource")
        await service.start()

    def release_hang(self) -> None:
        self.hang = False
        self._unhang.set()

    async def resource(self, request: ResourceTransaction) -> ResourceTransactionAck:
        self.transactions.append(request)
        self.received.set()
        self.received = anyio.Event()
        if self.hang and not request.rollback_of:
            await self._unhang.wait()
        if self.refuse is not None and not request.rollback_of:
            return refused(request, -errno.EBUSY, self.refuse)
        return await self.handle(request)

    def set_affinity(self, cpus: frozenset[int]) -> None:
        return None

    def memory_used(self) -> int:
        return self.used
