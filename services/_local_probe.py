"""What this host can give a local instance: CPUs, memory, and which isolation really applies.

`check_resources` holds a request against the host's online CPUs and total memory (and the floor
an agent needs), so a bad request is refused before anything starts. `probe_isolation` decides,
once, when a `LocalPlatform` is made, which mechanisms it will use: PID/UTS/mount namespaces need
CAP_SYS_ADMIN and a kernel that has them; cpuset and memory cgroups need root and a cgroup v1
hierarchy (`CgroupLayout.discover` says what is missing); cache partitioning needs root and
resctrl (`probe_resctrl`: hardware with Intel RDT or AMD PQoS, and the file system mounted).
Whatever is missing, by choice or not,
becomes one sentence in `Capabilities.warnings` that says what it means for an instance and what
to do about it, because the platform still launches without it and the operator must be told.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from multikernel.services._cgroups import CgroupLayout, group_levels, parse_cpu_list
from multikernel.services._platform import (
    Capabilities,
    InvalidSpecError,
    PlatformError,
    Resources,
)
from multikernel.services._resctrl import ResctrlFs, probe_resctrl
from multikernel.services._resctrl_groups import ResctrlGroups

#: The least memory an instance may have: a Python agent does not start in less.
MIN_MEMORY: Final = 16 * 2**20
CAP_SYS_ADMIN: Final = 21
NS_KINDS: Final = ("pid", "uts", "mnt")

_CGROUP_CONSEQUENCE: Final = (
    "instances run without that cgroup (CPUs by sched_setaffinity only, or memory not limited)"
)
_TREE_KILL_WARNING: Final = (
    "no PID namespace and no cgroups: a process that double-forks out of an instance survives "
    "its kill"
)


def online_cpus() -> frozenset[int]:
    """The host's online CPU ids."""
    return parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())


def host_memory() -> int:
    """The host's total memory in bytes (MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise PlatformError("/proc/meminfo has no MemTotal")


def check_resources(resources: Resources) -> None:
    """Raise `InvalidSpecError` unless this host can give an instance `resources`."""
    missing = resources.cpus - online_cpus()
    if missing:
        raise InvalidSpecError(
            f"CPU {sorted(missing)} is not an online CPU of this host "
            f"(online: {sorted(online_cpus())})"
        )
    if resources.memory < MIN_MEMORY:
        raise InvalidSpecError(
            f"memory {resources.memory} bytes is below the floor of {MIN_MEMORY} "
            f"({MIN_MEMORY // 2**20} MiB) an agent needs"
        )
    if resources.memory > host_memory():
        raise InvalidSpecError(
            f"memory {resources.memory} bytes is more than this host has ({host_memory()})"
        )


def _has_cap_sys_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


@dataclass(frozen=True)
class HostIsolation:
    """The mechanisms a local platform applies on this host, as `probe_isolation` found them."""

    namespaces: bool  # each instance gets its own PID, UTS and mount namespaces
    layout: CgroupLayout  # where instance cgroups go; parents are None where there are none
    capabilities: Capabilities
    cache: ResctrlGroups | None = None  # each instance's resctrl group, where there is resctrl


def probe_isolation(
    isolate: bool,
    *,
    namespaces: bool,
    cgroups: bool,
    group: str,
    resctrl: ResctrlFs | None = None,
    memory_bandwidth: int | None = None,
) -> HostIsolation:
    """Which isolation `LocalPlatform(isolate, namespaces=…, cgroups=…, group=…)` gets here.

    `resctrl`: where to look for cache partitioning (the machine's by default);
    `memory_bandwidth`: each instance's limit in percent, if any.
    """
    root = _has_cap_sys_admin()
    want_ns = isolate and namespaces
    have_ns = want_ns and root and all(Path(f"/proc/self/ns/{k}").exists() for k in NS_KINDS)
    levels = group_levels(group)
    if isolate and cgroups and os.geteuid() == 0:
        layout = CgroupLayout.discover(group)
    else:
        layout = CgroupLayout(None, None, levels=levels)
    cache: ResctrlGroups | None = None
    cache_warnings: tuple[str, ...] = ()
    if isolate and os.geteuid() == 0:
        cache, cache_warnings = _cache(resctrl or ResctrlFs(), group, memory_bandwidth)
    capabilities = Capabilities(
        namespaces=have_ns,
        cpuset=layout.cpuset_parent is not None,
        memory_limit=layout.memory_parent is not None,
        affinity=True,
        warnings=_warnings(isolate, namespaces, cgroups, root, have_ns, layout) + cache_warnings,
        cache=cache is not None,
    )
    return HostIsolation(have_ns, layout, capabilities, cache)


def _cache(
    resctrl: ResctrlFs, group: str, bandwidth: int | None
) -> tuple[ResctrlGroups | None, tuple[str, ...]]:
    """The instances' resctrl groups, or the sentence that says why there are none."""
    found = probe_resctrl(resctrl)
    if isinstance(found, str):
        return None, (found,)
    warnings: tuple[str, ...] = ()
    if bandwidth is not None and found.bandwidth is None:
        warnings = (
            "this machine's resctrl has no memory-bandwidth allocation (info/MB): instances' "
            "memory bandwidth is not limited",
        )
    return ResctrlGroups(found, resctrl, group, bandwidth=bandwidth), warnings


def _warnings(
    isolate: bool, namespaces: bool, cgroups: bool, root: bool, have_ns: bool, layout: CgroupLayout
) -> tuple[str, ...]:
    """One short sentence per missing piece, for people (mkctl shows them once per host)."""
    if not isolate:
        return (
            "isolation is off (--no-isolation): instances share the host's namespaces, are "
            "pinned to their CPUs by affinity only, and their memory is not limited",
        )
    if not root and os.geteuid() != 0:
        return (
            "not running as root: instances share the host's namespaces, are pinned to their "
            "CPUs by affinity only, and their memory is not limited",
        )
    warnings: list[str] = []
    if not namespaces:
        warnings.append("namespaces are off: instances share the host's PID, UTS and mount ones")
    elif not root:
        warnings.append(
            "no CAP_SYS_ADMIN: instances share the host's PID, UTS and mount namespaces"
        )
    elif not have_ns:
        warnings.append(
            "this kernel lacks PID, UTS or mount namespaces: instances share the host's"
        )
    if not cgroups:
        warnings.append(
            "cgroups are off: instances are pinned to their CPUs by affinity only, and their "
            "memory is not limited"
        )
    elif os.geteuid() != 0:
        warnings.append(
            "not running as root: no cgroups, so instances are pinned to their CPUs by affinity "
            "only, and their memory is not limited"
        )
    else:
        warnings.extend(f"{problem}: {_CGROUP_CONSEQUENCE}" for problem in layout.problems)
    if not have_ns and not layout.dirs_possible:
        warnings.append(_TREE_KILL_WARNING)
    return tuple(warnings)
