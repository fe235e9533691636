"""The resource actor's pool on a multikernel host is the kernel's (`_mk_pool.kernel_pool`).

The kernel lends what its global `device_tree`'s `/resources` says (`cpus`, `memory@` chunks),
not what this machine's sysfs says; a host on `--platform multikernel` shows that pool in
`mkctl resources pool`. The fake kernel keeps its files in a directory, so a host process and its
resource actor read its pool as they would read the kernel's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest

from multikernel.services._mk_fake import FakeMultikernel
from multikernel.services._mk_pool import kernel_pool
from multikernel.services._pool import PoolError
from multikernel.services._resource_process import ResourceConfig

from .conftest import mkctl

pytestmark = pytest.mark.anyio
MB = 1 << 20
GB = 1 << 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def test_the_pool_is_the_kernels_cpus_and_memory_chunks(tmp_path: Path) -> None:
    kernel = FakeMultikernel(
        tmp_path, cpus=range(8, 16), memory=[(4 * GB, GB), (8 * GB + 64 * MB, 320 * MB)]
    )
    pool = kernel_pool(kernel)
    assert sorted(pool.cpus) == list(range(8, 16))
    assert pool.block_size == 128 * MB
    # 8 blocks of the first chunk; the second starts mid-block: its 2 whole blocks only.
    assert pool.memory == 10 * 128 * MB
    assert pool.queues == {}  # no devices in this kernel's pool


def test_the_kernels_pci_devices_are_queues_of_kind_device(tmp_path: Path) -> None:
    kernel = FakeMultikernel(
        tmp_path, memory=[(4 * GB, GB)], devices={"nvme0": "0000:01:00.0", "eth1": "0000:02:00.1"}
    )
    pool = kernel_pool(kernel)
    assert {(q.name, q.kind, q.device) for q in pool.queues.values()} == {
        ("pci/0000:01:00.0", "device", "0000:01:00.0"),
        ("pci/0000:02:00.1", "device", "0000:02:00.1"),
    }


def test_the_hosts_reservations_leave_the_kernels_pool(tmp_path: Path) -> None:
    kernel = FakeMultikernel(tmp_path, cpus=range(4), memory=[(4 * GB, GB)])
    pool = kernel_pool(kernel, reserve_cpus=frozenset({0}), reserve_memory=200 * MB)
    assert (sorted(pool.cpus), sorted(pool.reserved_cpus)) == ([1, 2, 3], [0])
    assert (pool.memory, len(pool.reserved_blocks)) == (6 * 128 * MB, 2)


def test_a_kernel_without_a_pool_says_so(tmp_path: Path) -> None:
    kernel = FakeMultikernel(tmp_path, memory=[(4 * GB, 64 * MB)])
    with pytest.raises(PoolError) as error:
        kernel_pool(kernel)
    assert str(error.value) == (
        "the multikernel kernel's pool has no memory in whole 128 MiB blocks (/resources has no "
        "large enough memory@ chunk)"
    )
    (tmp_path / "kernfs" / "device_tree").unlink()
    with pytest.raises(PoolError) as error:
        kernel_pool(kernel)
    assert str(error.value).startswith(
        "cannot read the multikernel kernel's device_tree (No such file or directory)"
    )


def test_the_resource_actors_pool_is_the_kernels_on_the_multikernel_platform(
    tmp_path: Path,
) -> None:
    kernel = FakeMultikernel(tmp_path, cpus=range(8), memory=[(4 * GB, GB)])
    config = ResourceConfig(socket="s", state_dir="d", kernfs=str(kernel.kernfs))
    assert sorted(config.pool().cpus) == list(range(8))
    assert config.pool().memory == GB


@pytest.mark.timeout(60)
async def test_mkctl_resources_pool_on_a_multikernel_host_shows_the_kernels_pool(
    tmp_path: Path,
) -> None:
    kernel = FakeMultikernel(tmp_path / "machine", cpus=range(8), memory=[(4 * GB, 2 * GB)])
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    env = {**os.environ, "MULTIKERNEL_BUS": str(tmp_path / "bus.sock")}
    up = [sys.executable, "-m", "multikernel.endpoints.mkctl", "--state-dir", str(tmp_path),
          "host", "up", "--foreground", "--metrics", "off", "--platform", "multikernel",
          "--kernfs", str(kernel.kernfs), "--kernel", str(tmp_path / "vmlinux"),
          "--reserve-cpus", "0"]  # fmt: skip
    async with await anyio.open_process(up, env=env) as proc:
        assert proc.stderr is not None
        seen = b""
        with anyio.fail_after(30):
            while b'"host ready"' not in seen:
                chunk = await proc.stderr.receive()
                seen += chunk
        code, out, err = await mkctl(tmp_path, "resources", "pool", "--json")
        assert (await mkctl(tmp_path, "--state-dir", str(tmp_path), "host", "down"))[0] == 0
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    assert code == 0, err
    pool = json.loads(out)
    assert [c["id"] for c in pool["cpus"]] == list(range(8))  # the kernel's, not this machine's
    assert [c["id"] for c in pool["cpus"] if c.get("reserved")] == [0]
    assert pool["free_cpus"] == list(range(1, 8))
    assert pool["memory_total"] == 2 * GB
    assert pool["memory_block"] == 128 * MB
