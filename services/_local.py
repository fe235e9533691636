"""The local platform: an instance is an isolated process tree on this host.

As root, an instance's agent is PID 1 of its own PID namespace, with its own UTS namespace (the
hostname is the instance name) and mount namespace (a fresh /proc, so tools inside see only the
instance); it sits in a cpuset cgroup with the instance's CPUs and a memory cgroup with its memory
limit, and starts with that CPU affinity. Every process it starts inherits all of it. The keeper
(`_namespaces.py`) sets this up between fork and exec; the agent inherits its channel fds.

Without root, or with `LocalPlatform(isolate=False)`, an instance is a plain process tree pinned
with `sched_setaffinity`; `capabilities().warnings` says what is missing, and it is logged once.

Killing is reliable on every path: with a PID namespace, SIGKILL to its PID 1 makes the kernel
kill the rest; without one, every pid in the instance's cgroups is SIGKILLed (through pidfds,
until none is left); without cgroups either, the process tree is stopped top-down and then killed.
Every exit is awaited on a pidfd, never polled; `reclaim` removes every cgroup created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from signal import SIGKILL, pidfd_send_signal
from typing import Final

import anyio
import anyio.lowlevel

from multikernel.services._cgroups import (
    CgroupLayout,
    InstanceCgroups,
    kill_all,
    parse_cpu_list,
    process_tree,
)
from multikernel.services._namespaces import keeper_argv, namespace_ids
from multikernel.services._platform import (
    Capabilities,
    InstanceProcess,
    InvalidSpecError,
    IsolationReport,
    LaunchError,
    LaunchSpec,
    NamespaceIds,
    PlatformError,
    Resources,
)

#: The least memory an instance may have: a Python agent does not start in less.
MIN_MEMORY: Final = 16 * 2**20
CAP_SYS_ADMIN: Final = 21

logger = logging.getLogger("multikernel.services.local")


def online_cpus() -> frozenset[int]:
    """The host's online CPU ids."""
    return parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())


def host_memory() -> int:
    """The host's total memory in bytes (MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise PlatformError("/proc/meminfo has no MemTotal")


def _has_cap_sys_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


class LocalInstance(InstanceProcess):
    """An instance on the local platform: the keeper (our child) and the agent it started."""

    def __init__(
        self,
        platform: LocalPlatform,
        spec: LaunchSpec,
        keeper: subprocess.Popen[bytes],
        *,
        namespaces: bool,
        cgroups: InstanceCgroups | None,
    ) -> None:
        super().__init__(platform, spec, keeper.pid)
        self.keeper = keeper  # the agent itself without namespaces
        self.namespaces = namespaces
        self.cgroups = cgroups
        self.keeper_fd: int | None = os.pidfd_open(keeper.pid)
        self.agent_fd: int | None = None  # with namespaces: the agent is the keeper's child
        self.reclaimed = False

    @property
    def signal_fd(self) -> int | None:
        return self.agent_fd if self.namespaces else self.keeper_fd

    def reap(self) -> None:
        """Collect the keeper's exit status if it has ended (never blocks)."""
        if self.returncode is not None or self.keeper_fd is None:
            return
        try:
            result = os.waitid(os.P_PIDFD, self.keeper_fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it: the status is lost
            logger.warning("instance %s: its exit status was collected elsewhere", self.name)
            self.returncode = self.keeper.returncode = -SIGKILL
            return
        if result is None:
            return
        code = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        self.returncode = self.keeper.returncode = code

    def close_fds(self) -> None:
        for fd in (self.agent_fd, self.keeper_fd):
            if fd is not None:
                os.close(fd)
        self.agent_fd = self.keeper_fd = None


class LocalPlatform:
    """Instances as isolated process trees on this host (see the module docstring).

    `isolate=False` turns every isolation but CPU affinity off (tests use it to exercise the
    non-root path as root); `namespaces=False` or `cgroups=False` turn off one mechanism.
    `group` names the cgroup directory instances go under.
    """

    name = "local"

    def __init__(
        self,
        isolate: bool = True,
        *,
        namespaces: bool = True,
        cgroups: bool = True,
        group: str = "multikernel",
    ) -> None:
        root = _has_cap_sys_admin()
        want_ns = isolate and namespaces
        self._namespaces = (
            want_ns and root and all(Path(f"/proc/self/ns/{k}").exists() for k in NS_KINDS)
        )
        if isolate and cgroups and os.geteuid() == 0:
            self._layout = CgroupLayout.discover(group)
        else:
            self._layout = CgroupLayout(None, None)
        self._capabilities = Capabilities(
            namespaces=self._namespaces,
            cpuset=self._layout.cpuset_parent is not None,
            memory_limit=self._layout.memory_parent is not None,
            affinity=True,
            warnings=self._warnings(isolate, namespaces, cgroups, root),
        )
        self._running: set[str] = set()
        self._warned = False

    def _warnings(
        self, isolate: bool, namespaces: bool, cgroups: bool, root: bool
    ) -> tuple[str, ...]:
        if not isolate:
            return (
                "isolation is off (LocalPlatform(isolate=False)): instances are plain process "
                "trees pinned to their CPUs with sched_setaffinity; they share the host's PID, "
                "UTS and mount namespaces and their memory is not limited",
                _TREE_KILL_WARNING,
            )
        warnings: list[str] = []
        if not namespaces:
            warnings.append(
                "namespaces are off (namespaces=False): instances share the host's PID, UTS and "
                "mount namespaces"
            )
        elif not root:
            warnings.append(
                "not running as root (no CAP_SYS_ADMIN): instances share the host's PID, UTS and "
                "mount namespaces, so they see every host process and the host's hostname; run "
                "the host as root to give each its own"
            )
        elif not self._namespaces:
            warnings.append(
                "this kernel lacks PID, UTS or mount namespaces: instances share the host's"
            )
        if not cgroups:
            warnings.append(
                "cgroups are off (cgroups=False): an instance's CPUs are set with "
                "sched_setaffinity only, which its processes may widen, and its memory is not "
                "limited"
            )
        elif os.geteuid() != 0:
            warnings.append(
                "not running as root: no cpuset or memory cgroup; an instance's CPUs are set with "
                "sched_setaffinity only, which its processes may widen, and its memory is not "
                "limited"
            )
        else:
            warnings.extend(
                f"{problem}: {_CGROUP_CONSEQUENCE}" for problem in self._layout.problems
            )
        if not self._namespaces and not self._layout.dirs_possible:
            warnings.append(_TREE_KILL_WARNING)
        return tuple(warnings)

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def check(self, resources: Resources) -> None:
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

    async def launch(self, spec: LaunchSpec) -> LocalInstance:
        self.check(spec.resources)
        if spec.name in self._running:
            raise LaunchError(
                f"instance {spec.name!r} is already running: kill and reclaim it first"
            )
        if self._capabilities.warnings and not self._warned:
            self._warned = True
            for warning in self._capabilities.warnings:
                logger.warning("local platform: %s", warning)
        groups = None
        if self._layout.dirs_possible:
            groups = InstanceCgroups.create(self._layout, spec.name, spec.resources)
        keeper, ready = self._spawn(spec, groups)
        instance = LocalInstance(self, spec, keeper, namespaces=self._namespaces, cgroups=groups)
        self._running.add(spec.name)
        try:
            try:
                report = await _read_to_eof(ready)
            finally:
                os.close(ready)
            instance.pid = _agent_pid(spec.name, report)
            if self._namespaces:
                instance.agent_fd = _child_pidfd(instance.pid, keeper.pid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await instance.aclose()
            raise
        return instance

    def _spawn(
        self, spec: LaunchSpec, groups: InstanceCgroups | None
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start the keeper; returns it and the read end of its ready pipe."""
        ready, ready_w = os.pipe()
        argv = keeper_argv(
            ready_fd=ready_w,
            namespaces=self._namespaces,
            hostname=spec.uts_name,
            cpus=spec.resources.cpus,
            cgroup_procs=groups.procs_files() if groups else [],
            argv=list(spec.argv),
        )
        try:
            # Fork and exec only (vfork): returns before the keeper's Python even starts, as
            # asyncio's own subprocess_exec does.
            keeper = subprocess.Popen(
                argv,
                env=dict(spec.env),
                pass_fds=(*spec.pass_fds, ready_w),
                stdin=subprocess.DEVNULL,
                stdout=spec.stdout,
                stderr=spec.stderr,
                cwd=spec.cwd,
                start_new_session=True,
            )
        except BaseException as error:
            os.close(ready)
            if groups is not None:
                groups.remove_now()
            if isinstance(error, OSError):
                raise LaunchError(f"cannot start instance {spec.name!r}: {error}") from error
            raise
        finally:
            os.close(ready_w)
        return keeper, ready

    def _mine(self, proc: InstanceProcess) -> LocalInstance:
        if isinstance(proc, LocalInstance) and proc.platform is self:
            return proc
        raise TypeError(f"{proc!r} was not launched by this platform")

    def _own(self, proc: InstanceProcess) -> LocalInstance:
        """`proc`, if it is ours and has not been reclaimed."""
        instance = self._mine(proc)
        if instance.reclaimed:
            raise anyio.ClosedResourceError(f"instance {proc.name!r} has been reclaimed")
        return instance

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
        for tid in self._threads(instance):
            try:
                os.sched_setaffinity(tid, resources.cpus)
            except (ProcessLookupError, PermissionError):
                continue  # exited meanwhile, or an exec'd setuid program we may not touch
        instance.resources = resources

    async def wait(self, proc: InstanceProcess) -> int:
        instance = self._mine(proc)
        while instance.returncode is None:
            assert instance.keeper_fd is not None  # only reclaim closes it, after the keeper ended
            await _wait_pidfd(instance.keeper_fd)
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
            await _wait_pidfd(instance.agent_fd)
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
        instance.close_fds()
        instance.reclaimed = True
        self._running.discard(instance.name)

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


NS_KINDS: Final = ("pid", "uts", "mnt")
_CGROUP_CONSEQUENCE: Final = (
    "instances run without that cgroup (CPUs by sched_setaffinity only, or memory not limited)"
)
_TREE_KILL_WARNING: Final = (
    "with neither a PID namespace nor cgroups, kill finds an instance's processes by walking its "
    "process tree; a process that left the tree (a double fork) escapes it"
)


async def _wait_pidfd(pidfd: int) -> None:
    """Wait until the process ends. On a dup, so that several tasks may wait for one process."""
    fd = os.dup(pidfd)
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def _agent_pid(name: str, report: bytes) -> int:
    """The agent's host pid from the keeper's report, or the `LaunchError` it reports."""
    lines = report.decode(errors="replace").splitlines()
    failure = next((line[4:] for line in lines if line.startswith("err ")), None)
    pids = [int(line[4:]) for line in lines if line.startswith("pid ")]
    if failure is None and not pids:
        failure = "the keeper ended before it started the agent"
    if failure is not None:
        raise LaunchError(f"cannot start instance {name!r}: {failure}")
    return pids[0]


async def _read_to_eof(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _child_pidfd(pid: int, parent: int) -> int | None:
    """A pidfd for `pid` if it is still `parent`'s child (not a recycled pid), else None."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if _parent(pid) != parent:
        os.close(fd)
        return None
    return fd
