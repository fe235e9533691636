"""The local platform: an instance is an isolated process tree on this host.

As root, an instance's agent is PID 1 of its own PID namespace, with its own UTS namespace (the
hostname is the instance name) and mount namespace (a fresh /proc, so tools inside see only the
instance); it sits in a cpuset cgroup with the instance's CPUs and a memory cgroup with its memory
limit, and starts with that CPU affinity; where the machine partitions its caches (resctrl), it
also has a resctrl group with cache ways of its own (`_resctrl_groups`). Every process it starts
inherits all of it. The keeper (`_namespaces.py`) sets this up between fork and exec; the agent
inherits its channel fds.

Without root, or with `LocalPlatform(isolate=False)`, an instance is a plain process tree pinned
with `sched_setaffinity`; `capabilities().warnings` says what is missing, and it is logged once.

Killing is reliable on every path: with a PID namespace, SIGKILL to its PID 1 makes the kernel
kill the rest; without one, every pid in the instance's cgroups is SIGKILLed (through pidfds,
until none is left); without cgroups either, the process tree is stopped top-down and then killed.
Every exit is awaited on a pidfd, never polled; `reclaim` removes every cgroup created.

`LocalPlatform` is the bookkeeping and the order of these steps; what this host offers (CPUs,
memory, which isolation, the warnings) is probed in `_local_probe`, and the keeper and agent
processes, behind their pidfds, are `_local_process`'s.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from signal import SIGKILL, pidfd_send_signal

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from multikernel.endpoints.log import get_logger
from multikernel.services._cgroups import GROUP_ROOT, InstanceCgroups, kill_all, process_tree
from multikernel.services._local_adopt import (
    LaunchRecord,
    adopt,
    instance_of,
    reclaim_dirs,
    reclaim_record,
    record_of,
)
from multikernel.services._local_probe import check_resources, probe_isolation
from multikernel.services._local_process import (
    LocalInstance,
    agent_pid,
    child_pidfd,
    read_to_eof,
    spawn_keeper,
    wait_pidfd,
)
from multikernel.services._namespaces import namespace_ids
from multikernel.services._platform import (
    CacheShare,
    Capabilities,
    InstanceProcess,
    IsolationReport,
    LaunchError,
    LaunchSpec,
    NamespaceIds,
    PlatformError,
    Resources,
    launched_by,
)
from multikernel.services._resctrl import ResctrlFs
from multikernel.services._resctrl_groups import ResctrlError, ResctrlGroups

# The platform's logger (docs/platform.md), whichever of its modules logs.
log = get_logger("multikernel.services.local")


class LocalPlatform:
    """Instances as isolated process trees on this host (see the module docstring).

    `isolate=False` turns every isolation but CPU affinity off (tests use it to exercise the
    non-root path as root); `namespaces=False` or `cgroups=False` turn off one mechanism.
    `group` names the cgroup directory instances go under, in each hierarchy: a host passes its
    own `multikernel/<host-id>`; by default each platform gets a fresh `multikernel/p<pid>-<hex>`,
    so that two platforms never share one. `close()` removes it once no instance is left.
    Cache partitioning uses resctrl where the machine has it (`resctrl`: a fake one in tests) and
    the same group, and limits each instance's memory bandwidth to `memory_bandwidth` percent if
    given.
    """

    name = "local"

    def __init__(
        self,
        isolate: bool = True,
        *,
        namespaces: bool = True,
        cgroups: bool = True,
        group: str | None = None,
        resctrl: ResctrlFs | None = None,
        memory_bandwidth: int | None = None,
    ) -> None:
        if group is None:
            group = f"{GROUP_ROOT}/p{os.getpid()}-{secrets.token_hex(3)}"
        if memory_bandwidth is not None and not 1 <= memory_bandwidth <= 100:
            raise ValueError(f"memory bandwidth is a percentage (1-100), not {memory_bandwidth}")
        self.group = group
        host = probe_isolation(
            isolate, namespaces=namespaces, cgroups=cgroups, group=group, resctrl=resctrl,
            memory_bandwidth=memory_bandwidth,
        )  # fmt: skip
        self._namespaces = host.namespaces
        self._layout = host.layout
        self._capabilities = host.capabilities
        self._cache = host.cache
        self._running: set[str] = set()
        self._live: dict[str, LocalInstance] = {}  # by unit: what `instance_of` looks through
        self._warned = False

    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def cgroup_parents(self) -> list[Path]:
        """Where this platform's instance cgroups go (empty without cgroups); may not exist yet."""
        return self._layout.parents

    @property
    def cache(self) -> ResctrlGroups | None:
        """This platform's resctrl groups (None: no cache partitioning here)."""
        return self._cache

    def close(self) -> None:
        """Remove this platform's group directories, where no instance is left in them.

        The host calls it when it stops, after its instances are reclaimed. Only this platform's
        group is touched (and the shared `multikernel` directory, if that was its last group).
        """
        if self._layout.dirs_possible:
            self._layout.remove_groups()
        self.remove_stale_cache_groups()

    def remove_stale_cache_groups(self) -> list[str]:
        """Remove this platform's resctrl groups that no task is in (a host that crashed left
        them) and give their ways back; the instances they were for, by name. The host calls it
        at start; other hosts' groups, and groups with tasks, are left as they are."""
        return self._cache.remove_stale() if self._cache is not None else []

    def check(self, resources: Resources) -> None:
        """Raise `InvalidSpecError` unless this host can give an instance `resources`."""
        check_resources(resources)

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> None:
        """Nothing: every launch makes its instance anew (`Platform.prepare`)."""

    async def release(self, name: str, instance_id: int) -> None:
        """Nothing: `prepare` made nothing."""

    async def launch(self, spec: LaunchSpec) -> LocalInstance:
        self.check(spec.resources)
        if spec.unit in self._running:
            raise LaunchError(
                f"instance {spec.unit!r} is already running: kill and reclaim it first"
            )
        if self._capabilities.warnings and not self._warned:
            self._warned = True
            for warning in self._capabilities.warnings:
                log.warning("isolation missing", platform=self.name, warning=warning)
        groups = None
        if self._layout.dirs_possible:
            groups = InstanceCgroups.create(self._layout, spec.unit, spec.resources)
        join: list[str] = []
        made = False  # the cache group, by this launch
        try:
            if self._cache is not None:
                # One cache group per instance: a second tree of it (a standby) joins the group
                # its own tree made, inside the same share (docs/fault.md, "Resources").
                if not (spec.slot and self._cache.tasks_file(spec.name).exists()):
                    await self._in_thread(self._cache.create, spec.name, spec.resources.cpus)
                    made = True
                join.append(str(self._cache.tasks_file(spec.name)))
            keeper, ready = spawn_keeper(spec, groups, namespaces=self._namespaces, join=join)
        except BaseException as error:
            if groups is not None:
                groups.remove_now()
            if made:
                assert self._cache is not None
                await self._in_thread(self._cache.remove, spec.name)
            if isinstance(error, ResctrlError):
                raise LaunchError(f"cannot start instance {spec.name!r}: {error}") from error
            raise
        instance = LocalInstance(self, spec, keeper, namespaces=self._namespaces, cgroups=groups)
        self._running.add(spec.unit)
        self._live[spec.unit] = instance
        try:
            try:
                report = await read_to_eof(ready)
            finally:
                os.close(ready)
            instance.pid = agent_pid(spec.name, report)
            if self._namespaces:
                instance.agent_fd = child_pidfd(instance.pid, keeper.pid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await instance.aclose()
            raise
        return instance

    @staticmethod
    async def _in_thread(call: Callable[..., object], *args: object) -> None:
        """Run a resctrl change (it waits for resctrl's lock) in a worker thread, to the end."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(call, *args)

    def _mine(self, proc: InstanceProcess) -> LocalInstance:
        return launched_by(self, proc, LocalInstance)

    def _own(self, proc: InstanceProcess) -> LocalInstance:
        """`proc`, if it is ours and has not been reclaimed."""
        return launched_by(self, proc, LocalInstance, live=True)

    def instance_cgroups(self, name: str) -> list[InstanceCgroups]:
        """The cgroups of the instance `name` if it runs on this host, else []: found by name
        (the resource actor, a process of its own, changes them when a grant changes), for each
        of its process trees: `name`, and `name.<slot>` of a standby or of the standby that took
        it over, all inside the instance's one grant."""
        cpuset, memory = self._layout.cpuset_parent, self._layout.memory_parent
        units: set[str] = set()
        for parent in (cpuset, memory):
            if parent is not None and parent.is_dir():
                units.update(
                    entry.name
                    for entry in parent.iterdir()
                    if (entry.name == name or entry.name.startswith(f"{name}.")) and entry.is_dir()
                )
        found = []
        for unit in sorted(units):
            groups = InstanceCgroups(
                cpuset / unit if cpuset is not None and (cpuset / unit).is_dir() else None,
                memory / unit if memory is not None and (memory / unit).is_dir() else None,
                self._layout.levels,
            )
            if groups.dirs:
                found.append(groups)
        return found

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        instance = self._own(proc)
        self.check(resources)
        await anyio.lowlevel.checkpoint()
        if instance.returncode is not None:
            raise PlatformError(f"instance {instance.name!r} has ended; nothing to update")
        if instance.cgroups is not None:
            instance.cgroups.set_memory(resources.memory)
        instance.resources = replace(instance.resources, memory=resources.memory)
        if instance.cgroups is not None:
            instance.cgroups.set_cpus(resources.cpus)
        await self.resize_cache(instance.name, resources.cpus)
        for tid in self._threads(instance):
            try:
                os.sched_setaffinity(tid, resources.cpus)
            except (ProcessLookupError, PermissionError):
                continue  # exited meanwhile, or an exec'd setuid program we may not touch
        instance.resources = resources

    async def resize_cache(self, name: str, cpus: frozenset[int]) -> CacheShare | None:
        """Give the instance `name` the cache share of `cpus` (the resource actor calls it when a
        grant changes); None if it has no resctrl group (not running, or no resctrl here)."""
        share = None
        if self._cache is not None:
            with anyio.CancelScope(shield=True):
                share = await anyio.to_thread.run_sync(self._cache.resize, name, cpus)
        return share

    async def wait(self, proc: InstanceProcess) -> int:
        instance = self._mine(proc)
        while instance.returncode is None:
            assert instance.keeper_fd is not None  # only reclaim closes it, after the keeper ended
            await wait_pidfd(instance.keeper_fd)
            instance.reap()
        return instance.returncode

    def signal(self, proc: InstanceProcess, signum: int) -> None:
        """Send `signum` to the agent; nothing if it has already ended.

        As PID 1 of its namespace the agent only receives signals it has a handler for (SIGKILL
        and SIGSTOP excepted): the kernel protects a namespace's init from everything else.
        """
        fd = self._own(proc).signal_fd
        if fd is not None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                pidfd_send_signal(fd, signum)

    async def kill(self, proc: InstanceProcess) -> None:
        instance = self._mine(proc)
        if instance.reclaimed:
            return
        instance.reap()
        if instance.returncode is None:
            if instance.namespaces:
                fd = instance.agent_fd if instance.agent_fd is not None else instance.keeper_fd
                assert fd is not None
                with contextlib.suppress(ProcessLookupError):
                    pidfd_send_signal(fd, SIGKILL)  # the kernel kills the rest of the namespace
            elif instance.cgroups is not None:
                await kill_all(instance.cgroups.pids)
            else:
                await kill_all(lambda: process_tree(instance.pid), stop_first=True)
        await self.wait(instance)
        if instance.agent_fd is not None:  # the keeper was killed: PID 1 dies of its pdeathsig
            await wait_pidfd(instance.agent_fd)
        if instance.cgroups is not None:  # what outlived the agent (no PID namespace to end it)
            await kill_all(instance.cgroups.pids)

    async def reclaim(self, proc: InstanceProcess) -> None:
        """Kill what is left of the instance, remove its cgroups and close its pidfds."""
        instance = self._mine(proc)
        if instance.reclaimed:
            return
        await self.kill(instance)
        if instance.cgroups is not None:
            await instance.cgroups.remove()
        others = {u for u in self._running if u.partition(".")[0] == instance.name}
        if self._cache is not None and others <= {instance.spec.unit}:
            await self._in_thread(self._cache.remove, instance.name)
        instance.close_fds()
        instance.reclaimed = True
        self._running.discard(instance.spec.unit)
        if self._live.get(instance.spec.unit) is instance:
            del self._live[instance.spec.unit]

    # -- after a host restart (docs/fault.md, "Durability") ---------------------------------

    def record(self, proc: InstanceProcess) -> str:
        """What a restarted host needs to find this launch again (JSON, for the state store)."""
        return msgspec.json.encode(record_of(self._own(proc))).decode()

    def adopt(self, spec: LaunchSpec, record: str) -> LocalInstance | None:
        """Take back the launch `record` describes if it still runs (None if it does not)."""
        found = msgspec.json.decode(record, type=LaunchRecord)
        spec = replace(spec, slot=found.unit.partition(".")[2])
        if spec.unit in self._running:
            return None
        instance = adopt(self, spec, found, self._layout)
        if instance is not None:
            self._running.add(spec.unit)
            self._live[spec.unit] = instance
        return instance

    async def reclaim_record(self, record: str) -> None:
        """End what is left of a recorded launch that was not adopted; remove its cgroups."""
        await reclaim_record(msgspec.json.decode(record, type=LaunchRecord), self._layout)

    async def reclaim_unit(self, unit: str) -> None:
        """End and remove the cgroups a launch of `unit` would have (one cut short by a crash)."""
        layout = self._layout
        cpuset, memory = layout.cpuset_parent, layout.memory_parent
        await reclaim_dirs(
            InstanceCgroups(
                cpuset / unit if cpuset is not None else None,
                memory / unit if memory is not None else None,
                layout.levels,
            )
        )

    def instance_of(self, pid: int) -> int:
        """The id of the running instance process `pid` is part of, else 0 (for the hub)."""
        return instance_of(pid, list(self._live.values()))

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        instance = self._own(proc)
        pid = instance.pid
        try:
            affinity = frozenset(os.sched_getaffinity(pid))
            ns = NamespaceIds(*namespace_ids(pid))
            status = Path(f"/proc/{pid}/status").read_text()
            cgroup_lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except (ProcessLookupError, FileNotFoundError) as error:
            raise PlatformError(
                f"instance {instance.name!r} has ended; nothing to inspect"
            ) from error
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        cgroups: dict[str, str] = {}
        for line in cgroup_lines:
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                cgroups[controller or "unified"] = path
        groups = instance.cgroups
        return IsolationReport(
            pid=pid,
            namespace_pid=int(nspid.split()[-1]),
            affinity=affinity,
            namespaces=ns,
            host_namespaces=NamespaceIds(*namespace_ids("self")),
            cgroups=cgroups,
            cpuset_cpus=groups.cpus() if groups else None,
            memory_limit=groups.memory_limit() if groups else None,
            processes=tuple(sorted(groups.pids() if groups else process_tree(pid))),
            cache=self._cache.read(instance.name) if self._cache is not None else None,
        )

    def _threads(self, instance: LocalInstance) -> set[int]:
        if instance.cgroups is not None:
            return instance.cgroups.tids()
        tids: set[int] = set()
        for pid in process_tree(instance.pid):
            try:
                tids.update(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
            except FileNotFoundError:
                continue
        return tids
