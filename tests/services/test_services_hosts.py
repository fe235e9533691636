"""Hosts on one machine never meet: each has its own id, cgroup group and state dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from multikernel.services._cgroups import CgroupLayout, group_levels
from multikernel.services._host import cgroup_group, host_id
from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import LaunchSpec, PlatformError, Resources
from tests._run import CGROUP_GROUP, group_dirs

pytestmark = pytest.mark.anyio
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="instance cgroups are made only when running as root"
)
MB = 1 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def test_a_host_id_is_made_once_and_kept_in_the_state_dir(tmp_path: Path) -> None:
    first = host_id(tmp_path)
    assert first.startswith("host-")
    assert host_id(tmp_path) == first  # a restarted host is the same host
    assert host_id(tmp_path / "other") != first  # another state dir, another host
    assert cgroup_group(tmp_path) == f"multikernel/{first}"


def test_a_damaged_host_id_file_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "host-id").write_text("../../etc\n")
    with pytest.raises(PlatformError, match=r"not a host id .*: remove it and start the host"):
        host_id(tmp_path)


def test_a_group_is_relative_directory_names_only() -> None:
    assert group_levels("multikernel/host-0a1b2c3d") == 2
    for bad in ("/abs", "multikernel/../x", "a//b", "multikernel/", "a b"):
        with pytest.raises(ValueError, match="bad cgroup group"):
            group_levels(bad)
    with pytest.raises(ValueError, match="bad cgroup group"):
        LocalPlatform(group="../escape")


def test_platforms_get_a_group_of_their_own_by_default() -> None:
    one, two = LocalPlatform(), LocalPlatform()
    assert one.group != two.group
    assert one.group.startswith(f"multikernel/p{os.getpid()}-")


def spec(name: str) -> LaunchSpec:
    return LaunchSpec(
        name=name,
        instance_id=1,
        argv=[sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)"],
        env={},
        pass_fds=(),
        resources=Resources(frozenset({max(online_cpus())}), 64 * MB),
    )


@needs_root
async def test_two_platforms_run_instances_of_one_name_side_by_side() -> None:
    """What two hosts (or a demo and a test run) do: same instance name, separate groups."""
    ours = LocalPlatform(group=CGROUP_GROUP)
    theirs = LocalPlatform(group=f"{CGROUP_GROUP}-other")
    with anyio.fail_after(20):
        async with await ours.launch(spec("web")) as a, await theirs.launch(spec("web")) as b:
            assert a.cgroups is not None
            assert b.cgroups is not None
            assert a.cgroups.cpuset == group_dirs(CGROUP_GROUP)[0] / "web"
            assert b.cgroups.cpuset == group_dirs(f"{CGROUP_GROUP}-other")[0] / "web"
            assert ours.inspect(a).processes == (a.pid,)  # each sees only its own instance
            assert theirs.inspect(b).processes == (b.pid,)
    for group in (CGROUP_GROUP, f"{CGROUP_GROUP}-other"):
        assert not any(d.exists() for d in group_dirs(group))  # emptied groups go too


@needs_root
async def test_close_removes_only_its_own_empty_group() -> None:
    ours = LocalPlatform(group=CGROUP_GROUP)
    theirs = LocalPlatform(group=f"{CGROUP_GROUP}-other")
    stale = [d / "crashed" for d in ours.cgroup_parents]  # left by a host that crashed
    for d in stale:
        d.mkdir(parents=True)
    try:
        with anyio.fail_after(20):
            async with await theirs.launch(spec("busy")):
                ours.close()
                assert not any(d.exists() for d in group_dirs(CGROUP_GROUP))
                theirs.close()  # its instance is still in it: nothing is removed
                assert all(d.exists() for d in group_dirs(f"{CGROUP_GROUP}-other"))
                assert all((d / "busy").exists() for d in theirs.cgroup_parents)
    finally:
        for d in stale:
            if d.exists():
                d.rmdir()
    assert not any(d.exists() for d in group_dirs(f"{CGROUP_GROUP}-other"))


@needs_root
def test_a_layout_puts_a_hosts_instances_two_levels_down() -> None:
    layout = CgroupLayout.discover("multikernel/host-0a1b2c3d")
    assert layout.levels == 2
    assert layout.cpuset_parent == Path("/sys/fs/cgroup/cpuset/multikernel/host-0a1b2c3d")
