"""The local platform's cache partitioning: real instances, a fake resctrl (this machine has none).

The instances are real (namespaces, cgroups, a keeper), so these need root; only the resctrl
tree is fake, and the keeper writes the agent into it exactly as it would into the kernel's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from multikernel.services._enforce import LocalHostSide
from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import LaunchError, LaunchSpec, Resources
from multikernel.services._resctrl import NO_RESCTRL, ResctrlFs, probe_resctrl
from multikernel.services.testing import FakeResctrl
from tests._run import CGROUP_GROUP, cgroups_under

pytestmark = pytest.mark.anyio
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="instances get cgroups only as root")

CPUS = sorted(online_cpus())
MEMORY = 64 << 20
SLEEPER = [sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)"]
PREFIX = CGROUP_GROUP.replace("/", ".") + "."


def spec(name: str, cpus: set[int]) -> LaunchSpec:
    return LaunchSpec(
        name, 1, SLEEPER, {"PATH": os.environ.get("PATH", "/bin")}, (),
        Resources(frozenset(cpus), MEMORY),
    )  # fmt: skip


def machine(root: Path, **kw: int) -> FakeResctrl:
    """One L3 of 11 ways shared by every online CPU of this machine."""
    return FakeResctrl(root).cache("L3", domains={0: CPUS}, **kw)


def ways_for(cpus: int) -> int:
    return 10 * cpus // len(CPUS)


@pytest.mark.skipif(Path("/sys/fs/resctrl").exists(), reason="this machine has resctrl")
@needs_root
def test_without_resctrl_the_platform_says_cache_is_shared() -> None:
    assert probe_resctrl(ResctrlFs()) == NO_RESCTRL
    capabilities = LocalPlatform(group=CGROUP_GROUP).capabilities()
    assert not capabilities.cache
    assert [w for w in capabilities.warnings if "resctrl" in w] == [NO_RESCTRL]


@needs_root
@pytest.mark.parametrize("namespaces", [False, True], ids=["no-pid-namespace", "pid-namespace"])
async def test_an_instance_runs_in_its_group_and_reclaim_removes_it(
    tmp_path: Path, namespaces: bool
) -> None:
    fake = machine(tmp_path)
    platform = LocalPlatform(namespaces=namespaces, group=CGROUP_GROUP, resctrl=fake)
    assert platform.capabilities().cache
    assert not any("resctrl" in warning for warning in platform.capabilities().warnings)
    name = f"rdt{os.getpid()}-{int(namespaces)}"
    with anyio.fail_after(10):
        async with await platform.launch(spec(name, {CPUS[0]})) as instance:
            # The agent wrote itself into the group before exec (its pid as its own PID
            # namespace numbers it), so every thread and child it makes is in the group too.
            assert fake.tasks(PREFIX + name) == [1 if namespaces else instance.pid]
            report = platform.inspect(instance)
            assert report.cache is not None
            assert report.cache.group == str(fake.mount / (PREFIX + name))
            assert report.cache.ways() == {0: ways_for(1)}
            assert fake.mode(PREFIX + name) == "exclusive"
            await platform.update(instance, Resources(frozenset(CPUS), MEMORY))
            assert fake.masks(PREFIX + name) == {0: 0x7FE}  # every way it may have
            # The resource actor's end of a grant, by name, from its own platform object.
            elsewhere = LocalPlatform(group=CGROUP_GROUP, resctrl=fake)
            await LocalHostSide(elsewhere).apply(name, frozenset({CPUS[0]}), None, running=True)
            narrowed = platform.inspect(instance).cache
            assert narrowed is not None
            assert narrowed.ways() == {0: ways_for(1)}
    assert fake.groups() == []
    assert fake.masks() == {0: 0x7FF}


@needs_root
async def test_a_launch_without_a_closid_fails_and_leaves_nothing(tmp_path: Path) -> None:
    fake = machine(tmp_path, num_closids=1)  # only the default group
    platform = LocalPlatform(group=CGROUP_GROUP, resctrl=fake)
    name = f"rdt{os.getpid()}-full"
    with pytest.raises(LaunchError) as caught:
        await platform.launch(spec(name, {CPUS[0]}))
    assert str(caught.value) == (
        f"cannot start instance {name!r}: no cache partition for {name!r}: this machine has 1 "
        f"resctrl CLOSIDs and all are in use (the default group): stop an instance, or remove "
        f"groups under {fake.mount} that nothing uses"
    )
    assert not [d for d in cgroups_under(CGROUP_GROUP) if d.name == name]
    assert fake.groups() == []


@needs_root
def test_leftover_groups_of_this_platform_only_are_removed(tmp_path: Path) -> None:
    fake = machine(tmp_path)
    ours = LocalPlatform(group=CGROUP_GROUP, resctrl=fake)
    theirs = LocalPlatform(group=f"{CGROUP_GROUP}-other", resctrl=fake)
    assert ours.cache is not None
    assert theirs.cache is not None
    ours.cache.create("web", frozenset({CPUS[0]}))
    theirs.cache.create("web", frozenset({CPUS[-1]}))
    assert ours.remove_stale_cache_groups() == ["web"]
    assert fake.groups() == [f"{CGROUP_GROUP}-other".replace("/", ".") + ".web"]
    theirs.close()
    assert fake.groups() == []


@needs_root
def test_memory_bandwidth_is_a_percentage_and_needs_mb(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory bandwidth is a percentage"):
        LocalPlatform(group=CGROUP_GROUP, memory_bandwidth=0)
    platform = LocalPlatform(group=CGROUP_GROUP, resctrl=machine(tmp_path), memory_bandwidth=50)
    assert platform.capabilities().warnings[-1] == (
        "this machine's resctrl has no memory-bandwidth allocation (info/MB): instances' memory "
        "bandwidth is not limited"
    )
