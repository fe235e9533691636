"""Finding local instances again after the host restarted: launch records, adoption, membership.

Instances outlive their control plane (docs/platform.md), so a restarted host must take back the
ones still running and clean up after the ones that are not. For every launch the lifecycle stores
a `LaunchRecord`: the keeper's and the agent's pids with their start times (so a recycled pid is
never taken for them) and the cgroup directories. A recorded directory is used only if it is an
instance cgroup of this host's own group (`multikernel/<host-id>/<unit>`, the platform's
`CgroupLayout`): a record of another layout names nothing to remove. `adopt` opens pidfds on the
processes a record names if they are still the same processes, and returns an `AdoptedInstance`
that the platform waits on, kills and reclaims like one it launched; the one thing it cannot learn
is the exit status (the keeper is no longer our child), so `wait` answers `STATUS_UNKNOWN`.
`reclaim_record` and `reclaim_dirs` end what is left of a launch that cannot be adopted and remove
its cgroups.

`instance_of` answers the hub when a process attaches by path (an agent or workload re-attaching
after a hub restart): which of our instances it belongs to, from kernel facts only (its cgroups,
its PID namespace, or the process tree), never from anything the process says.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Iterable
from pathlib import Path
from signal import SIGKILL, pidfd_send_signal

import msgspec

from multikernel.services._cgroups import (
    CGROUP_ROOT,
    CgroupLayout,
    InstanceCgroups,
    kill_all,
    process_tree,
)
from multikernel.services._local_process import LocalInstance, wait_pidfd
from multikernel.services._platform import STATUS_UNKNOWN, LaunchSpec, Platform


class LaunchRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a restarted host needs to find one launch of an instance again."""

    unit: str  # the launch's cgroup name: the instance's name, or name.slot
    keeper: int  # host pid of the keeper (the agent itself without namespaces)
    keeper_start: int  # its start time (/proc/<pid>/stat field 22, clock ticks since boot)
    agent: int
    agent_start: int
    namespaces: bool
    cpuset: str = ""  # the launch's cgroup directories, "" where it has none
    memory: str = ""


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def record_of(instance: LocalInstance) -> LaunchRecord:
    keeper = instance.keeper_pid
    groups = instance.cgroups
    return LaunchRecord(
        unit=instance.spec.unit,
        keeper=keeper,
        keeper_start=start_time(keeper) or 0,
        agent=instance.pid,
        agent_start=start_time(instance.pid) or 0,
        namespaces=instance.namespaces,
        cpuset=str(groups.cpuset) if groups is not None and groups.cpuset else "",
        memory=str(groups.memory) if groups is not None and groups.memory else "",
    )


def _open_if_same(pid: int, started: int) -> int | None:
    """A pidfd for `pid` if it is still the process that started at `started`."""
    if not pid or not started:
        return None
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if start_time(pid) != started:  # checked after opening: the pidfd is the process we checked
        os.close(fd)
        return None
    return fd


def _ended(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _cgroup_dir(text: str, layout: CgroupLayout) -> Path | None:
    """A recorded cgroup directory, if it is an instance's in this host's group (a state file is
    ours, but check anyway: nothing outside the group is ever killed or removed)."""
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute() or CGROUP_ROOT not in path.parents or ".." in path.parts:
        return None
    return path if path.parent in layout.parents else None


def _instance_cgroups(record: LaunchRecord, layout: CgroupLayout) -> InstanceCgroups:
    return InstanceCgroups(
        _cgroup_dir(record.cpuset, layout), _cgroup_dir(record.memory, layout), layout.levels
    )


class AdoptedInstance(LocalInstance):
    """A launch found again after a host restart: its keeper is not our child."""

    def __init__(
        self,
        platform: Platform,
        spec: LaunchSpec,
        record: LaunchRecord,
        cgroups: InstanceCgroups,
        keeper_fd: int,
        agent_fd: int | None,
    ) -> None:
        super().__init__(
            platform,
            spec,
            None,
            namespaces=record.namespaces,
            cgroups=cgroups,
            keeper_pid=record.keeper,
            keeper_fd=keeper_fd,
        )
        self.pid = record.agent
        self.agent_fd = agent_fd

    def reap(self) -> None:
        """The keeper is init's child now: we see that it ended, never how."""
        if self.returncode is None and self.keeper_fd is not None and _ended(self.keeper_fd):
            self.returncode = STATUS_UNKNOWN


def adopt(
    platform: Platform, spec: LaunchSpec, record: LaunchRecord, layout: CgroupLayout
) -> AdoptedInstance | None:
    """The launch `record` describes, if its processes still run; else None."""
    keeper_fd = _open_if_same(record.keeper, record.keeper_start)
    if keeper_fd is None:
        return None
    agent_fd = None
    if record.namespaces:
        agent_fd = _open_if_same(record.agent, record.agent_start)
        if agent_fd is None or _ended(keeper_fd):  # the keeper outlives its agent by moments
            os.close(keeper_fd)
            if agent_fd is not None:
                os.close(agent_fd)
            return None
    cgroups = _instance_cgroups(record, layout)
    return AdoptedInstance(platform, spec, record, cgroups, keeper_fd, agent_fd)


async def reclaim_record(record: LaunchRecord, layout: CgroupLayout) -> None:
    """End whatever is left of a launch that was not adopted, and remove its cgroups."""
    for pid, started in ((record.keeper, record.keeper_start), (record.agent, record.agent_start)):
        fd = _open_if_same(pid, started)
        if fd is None:
            continue
        try:
            with contextlib.suppress(ProcessLookupError):
                pidfd_send_signal(fd, SIGKILL)
            await wait_pidfd(fd)
        finally:
            os.close(fd)
    await reclaim_dirs(_instance_cgroups(record, layout))


async def reclaim_dirs(groups: InstanceCgroups) -> None:
    """SIGKILL every process in the cgroups `groups`, then remove them, and their group
    directories if nobody else uses them (missing ones are fine)."""
    present = [d for d in groups.dirs if d.is_dir()]
    if not present:
        return
    await kill_all(groups.pids)
    await groups.remove()


def instance_of(pid: int, instances: Iterable[LocalInstance]) -> int:
    """The id of the instance among `instances` that process `pid` is part of, else 0."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return 0
    member_of: set[Path] = set()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller:
                member_of.add(CGROUP_ROOT / controller / path.lstrip("/"))
    pid_ns: int | None = None
    ancestors: list[int] | None = None
    for instance in instances:
        if instance.reclaimed or instance.returncode is not None:
            continue
        groups = instance.cgroups
        if groups is not None and groups.dirs:
            if any(d in member_of for d in groups.dirs):
                return instance.instance_id
        elif instance.namespaces:
            if pid_ns is None:
                pid_ns = _pid_namespace(pid)
            if pid_ns is not None and pid_ns == _pid_namespace(instance.pid):
                return instance.instance_id
        else:
            if ancestors is None:
                ancestors = _ancestors(pid)
            if instance.pid in ancestors or pid in process_tree(instance.pid):
                return instance.instance_id
    return 0


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _ancestors(pid: int) -> list[int]:
    chain = [pid]
    while len(chain) < 64 and (parent := _parent(chain[-1])) > 1:
        chain.append(parent)
    return chain
