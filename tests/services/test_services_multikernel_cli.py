"""`mkctl host up --platform multikernel`: its options, and a host that cannot find the kernel.

A host on the multikernel platform needs a multikernel kernel, or the fake served on a socket
(`test_services_multikernel_restart.py`); here the command line is checked, and a host pointed at
a tree that is not the kernel's file system refuses to start with a line that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from multikernel.services._host import HostConfig
from multikernel.services._mk_steps import BootImage, MultikernelHostSide
from multikernel.services._resource_process import ResourceConfig
from multikernel.services.host import config_from, parser

from .conftest import fails

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def test_the_multikernel_platform_needs_a_kernel_to_boot(tmp_path: Path) -> None:
    code, line = await fails(tmp_path, "host", "up", "--platform", "multikernel")
    assert (code, line) == (
        2,
        "error: --platform multikernel boots a kernel: give it with --kernel PATH",
    )


async def test_kernel_options_are_for_the_multikernel_platform(tmp_path: Path) -> None:
    code, line = await fails(tmp_path, "host", "up", "--kernfs", str(tmp_path))
    assert code == 2
    assert (
        line == "error: --kernfs, --kernel, --initrd and --cmdline are for --platform multikernel"
    )


async def test_a_host_without_the_kernels_file_system_says_so(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    args = ["host", "up", "--platform", "multikernel", "--kernfs", str(tmp_path / "nothing")]
    args += ["--kernel", str(tmp_path / "vmlinux"), "--metrics", "off"]
    code, line = await fails(tmp_path, *args)
    assert code == 1
    assert line == f"error: the host did not start (exit status 1); see {tmp_path / 'host.log'}"
    log = await anyio.Path(tmp_path / "host.log").read_text()
    assert (
        "host: no multikernel file system (No such file or directory): is this a multikernel "
        "kernel? mount -t multikernel none /sys/fs/multikernel, or give its path (--kernfs)"
    ) in log


def test_the_host_and_its_resource_actor_get_the_multikernel_settings(tmp_path: Path) -> None:
    args = parser().parse_args(
        ["--socket", str(tmp_path / "bus.sock"), "--platform", "multikernel", "--kernfs",
         str(tmp_path), "--kernel", "/boot/vmlinux", "--initrd", "/boot/mk.img", "--cmdline", "q"]
    )  # fmt: skip
    config = config_from(args)
    assert (config.platform, config.kernfs) == ("multikernel", tmp_path)
    assert config.boot == BootImage(Path("/boot/vmlinux"), Path("/boot/mk.img"), "q")
    resource = config.resource_config()
    assert resource.kernfs == str(tmp_path)
    assert isinstance(resource.host_side(), MultikernelHostSide)
    local = HostConfig(tmp_path / "bus.sock", tmp_path / "state").resource_config()
    assert local.kernfs == ""
    assert not isinstance(
        ResourceConfig(socket="s", state_dir="d").host_side(), MultikernelHostSide
    )
