"""This test run's own part of every machine-global name, so concurrent runs never meet.

A demo, a user's host or a second `make test` may run on the machine at the same time as this
suite. Whatever is machine-global carries this run's tag, and the leak checks look only at names
with it: named /dev/shm regions (`$MULTIKERNEL_SHM_TAG`, inherited by every process the suite
starts) and instance cgroups (`CGROUP_GROUP`, the group the suite's platforms use; a host started
by a test gets its own `multikernel/<host-id>` from its state dir).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from multikernel.shm import name_prefix

#: Unique among the runs on this machine: the pid of pytest, and a random part for pid reuse.
RUN = f"t{os.getpid()}.{secrets.token_hex(2)}"
SHM_PREFIX = name_prefix(RUN)
#: The cgroup directory (in each hierarchy) the suite's own `LocalPlatform`s put instances in.
CGROUP_GROUP = f"multikernel/{RUN.replace('.', '-')}"

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_memory_cgroup() -> Path:
    """This process's memory cgroup directory (instances' memory cgroups go under it)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/")
    return CGROUP_ROOT / "memory"


def group_dirs(group: str = CGROUP_GROUP) -> list[Path]:
    """The cpuset and memory directories of a platform's `group` (existing or not)."""
    return [CGROUP_ROOT / "cpuset" / group, own_memory_cgroup() / group]


def cgroups_under(group: str = CGROUP_GROUP) -> set[Path]:
    """The instance cgroups in `group` (by default this run's), in both hierarchies."""
    found: set[Path] = set()
    for parent in group_dirs(group):
        if parent.is_dir():
            found.update(d for d in parent.iterdir() if d.is_dir())
    return found


def shm_files() -> set[str]:
    """This run's named shared-memory regions in /dev/shm."""
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}*")}
