"""The pool is what the machine's sysfs says, less what the host keeps (a fake sysfs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multikernel.services import Pool, PoolError, discover_pool
from multikernel.services.testing import FakeSysfs

MiB = 1 << 20
GiB = 1 << 30


def machine(tmp_path: Path) -> FakeSysfs:
    return (
        FakeSysfs(tmp_path)
        .cpus(8, nodes=2, threads_per_core=2)
        .memory(4 * GiB, block_size=128 * MiB, nodes=2)
    )


def test_cpus_have_their_node_core_package_and_sibling_threads(tmp_path: Path) -> None:
    pool = discover_pool(machine(tmp_path).root)
    assert sorted(pool.cpus) == list(range(8))
    cpu = pool.cpus[1]
    assert (cpu.node, cpu.package, cpu.core, sorted(cpu.siblings)) == (0, 0, 1, [1, 5])
    assert (pool.cpus[2].node, sorted(pool.cpus[2].siblings)) == (1, [2, 6])
    assert pool.nodes == (0, 1)


def test_memory_is_counted_in_blocks_of_the_machine_block_size(tmp_path: Path) -> None:
    pool = discover_pool(machine(tmp_path).root)
    assert pool.block_size == 128 * MiB
    assert len(pool.blocks) == 32
    assert pool.memory == 4 * GiB
    assert {b.node for b in pool.blocks.values()} == {0, 1}
    assert pool.blocks_for(200 * MiB) == 2


def test_blocks_beyond_memtotal_and_offline_blocks_are_not_in_the_pool(tmp_path: Path) -> None:
    fake = (
        FakeSysfs(tmp_path)
        .cpus(2)
        .memory(2 * GiB, block_size=256 * MiB, offline=frozenset({7}), reserved_by_kernel=300 * MiB)
    )
    pool = discover_pool(fake.root)
    # 8 blocks listed, block 7 offline; MemTotal (2 GiB - 300 MiB) covers 6 blocks: the highest
    # online ones, since the kernel's own memory is at the bottom.
    assert sorted(pool.blocks) == [1, 2, 3, 4, 5, 6]


def test_without_memory_block_dirs_node_meminfo_says_how_much(tmp_path: Path) -> None:
    fake = (
        FakeSysfs(tmp_path)
        .cpus(4, nodes=2)
        .memory(1 * GiB, block_size=128 * MiB, nodes=2, blocks_dirs=False)
    )
    pool = discover_pool(fake.root)
    assert len(pool.blocks) == 8
    assert sorted(b.node for b in pool.blocks.values()) == [0] * 4 + [1] * 4


def test_io_queues_come_from_nics_disks_and_gpus_backed_by_hardware(tmp_path: Path) -> None:
    fake = (
        machine(tmp_path)
        .nic("eth0", queues=2, pci="0000:00:03.0", virtio=True)
        .nic("eth1", queues=1, pci="0000:81:00.0", node=1)
        .virtual_nic("lo")
        .disk("nvme0n1", queues=3, pci="0000:02:00.0")
        .gpu("card0", pci="0000:03:00.0", node=1)
    )
    pool = discover_pool(fake.root)
    assert list(pool.queues) == [
        "block/nvme0n1/mq-0", "block/nvme0n1/mq-1", "block/nvme0n1/mq-2", "gpu/card0",
        "net/eth0/rx-0", "net/eth0/rx-1", "net/eth0/tx-0", "net/eth0/tx-1",
        "net/eth1/rx-0", "net/eth1/tx-0",
    ]  # fmt: skip
    rx = pool.queues["net/eth0/rx-1"]
    assert (rx.kind, rx.device, rx.node) == ("net-rx", "0000:00:03.0", 0)
    assert (pool.queues["net/eth1/tx-0"].node, pool.queues["gpu/card0"].kind) == (1, "gpu")


def test_the_host_keeps_its_reserved_cpus_and_memory_out_of_the_pool(tmp_path: Path) -> None:
    pool = discover_pool(
        machine(tmp_path).root, reserve_cpus=frozenset({0, 4}), reserve_memory=300 * MiB
    )
    assert sorted(pool.cpus) == [1, 2, 3, 5, 6, 7]
    assert sorted(pool.reserved_cpus) == [0, 4]
    assert len(pool.reserved_blocks) == 3  # 300 MiB is three 128 MiB blocks, rounded up
    assert sorted(pool.reserved_blocks) == [0, 1, 2]
    assert pool.memory == 29 * 128 * MiB
    assert "the host keeps CPUs 0,4 and 384 MiB" in pool.describe()


@pytest.mark.parametrize(
    ("cpus", "memory", "message"),
    [
        (
            frozenset({9}),
            0,
            "reserves CPU 9, which this machine does not have online (online: 0-7)",
        ),
        (frozenset(range(8)), 0, "reserves every CPU (0-7): leave at least one for instances"),
        (frozenset(), 4 * GiB, "reserves 4 GiB of memory and the machine has 4 GiB"),
    ],
)
def test_a_reservation_the_machine_cannot_honour_is_refused(
    tmp_path: Path, cpus: frozenset[int], memory: int, message: str
) -> None:
    with pytest.raises(PoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover_pool(machine(tmp_path).root, reserve_cpus=cpus, reserve_memory=memory)


def test_a_machine_without_cpus_online_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match=r"cannot read .*/sys/devices/system/cpu/online"):
        discover_pool(tmp_path)


def test_a_thousand_cpu_machine(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path).cpus(1000, nodes=4, threads_per_core=2)
    fake.memory(1 << 40, block_size=2 * GiB, nodes=4)
    pool = discover_pool(fake.root)
    assert (len(pool.cpus), len(pool.blocks), pool.nodes) == (1000, 512, tuple(range(4)))
    assert sorted(pool.cpus[0].siblings) == [0, 500]


def test_this_machine_has_a_pool() -> None:
    pool = discover_pool()
    assert isinstance(pool, Pool)
    assert pool.cpus
    assert pool.blocks
