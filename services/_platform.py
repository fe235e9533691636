"""The platform interface: what the lifecycle actor asks of whatever runs an instance.

A platform turns a `LaunchSpec` (the instance agent's command line, its channel fds and the
`Resources` it was given) into a running instance, changes its resources live, waits for it,
signals it, kills it and gives back everything it took. `capabilities()` says which isolation
the platform can really apply on this host, with a human-readable warning for each piece that is
missing; `inspect()` reads back from the kernel what was applied, so tests and `mkctl show` check
facts rather than intentions.

The `local` platform (`multikernel.services._local`) makes an instance an isolated process tree;
the `multikernel` platform drives a real multikernel kernel. docs/platform.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, Self, TypeVar

import anyio

from multikernel.protocol import MultikernelError, RefusedError

#: Instance names: what the kernel accepts under /sys/fs/multikernel/instances, and safe as a
#: cgroup directory name and a hostname.
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
#: A launch's slot: a second process tree of one instance (a standby) runs under its own slot.
SLOT_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")
#: What `Platform.wait` answers when the instance ended but its exit status cannot be known (a
#: platform that found the instance again after a host restart is no longer its parent).
STATUS_UNKNOWN: Final = -(1 << 16)


class PlatformError(MultikernelError):
    """Root of the errors a platform raises."""


class InvalidSpecError(PlatformError, RefusedError, ValueError):
    """A launch spec or resources the platform cannot honour (unknown CPU, too little memory, a
    bad name); nothing was started."""


class LaunchError(PlatformError):
    """The instance could not be started (setting up its isolation, or executing its agent,
    failed); everything the attempt took has been given back."""


def devices_of(queues: tuple[str, ...] | list[str]) -> frozenset[str]:
    """The PCI addresses of the whole devices among granted `queues`."""
    return frozenset(
        q.removeprefix(DEVICE_QUEUE_PREFIX) for q in queues if q.startswith(DEVICE_QUEUE_PREFIX)
    )


def check_name(name: str) -> str:
    """`name` if it is a valid instance name, else `InvalidSpecError` saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidSpecError(
            f"bad instance name {name!r}: use 1 to 31 characters, lower-case letters, digits "
            "and '-', starting with a letter or digit"
        )
    return name


#: A granted queue that is a whole PCI device (`pci/<DDDD:BB:SS.F>`, from a multikernel kernel's
#: pool: `_mk_pool`), lent to the instance's kernel by a device overlay.
DEVICE_QUEUE_PREFIX: Final = "pci/"


@dataclass(frozen=True)
class Resources:
    """What an instance was given: host CPU ids, a memory size in bytes, and the PCI addresses
    of whole devices (only a multikernel kernel lends those: `devices_of`)."""

    cpus: frozenset[int]
    memory: int
    devices: frozenset[str] = frozenset()

    @classmethod
    def granted(cls, cpus: frozenset[int], memory: int, queues: tuple[str, ...]) -> Resources:
        return cls(cpus, memory, devices_of(queues))

    def __post_init__(self) -> None:
        if not self.cpus:
            raise InvalidSpecError("an instance needs at least one CPU")
        if any(cpu < 0 for cpu in self.cpus):
            raise InvalidSpecError(f"CPU ids are not negative: {sorted(self.cpus)}")
        if self.memory <= 0:
            raise InvalidSpecError(f"memory must be a positive number of bytes, not {self.memory}")


@dataclass(frozen=True)
class LaunchSpec:
    """How to start an instance: its agent is the first process and everything else descends
    from it.

    `pass_fds` are inherited by the agent under the same numbers (its bus socket, channel fds),
    the way a real kernel finds its IPI buffers in the device tree it boots with. `stdout` and
    `stderr` are fds the agent writes to (None: this process's own); its stdin is /dev/null.
    """

    name: str
    instance_id: int
    argv: tuple[str, ...] | list[str]
    env: Mapping[str, str]
    pass_fds: tuple[int, ...]
    resources: Resources
    hostname: str | None = None  # the UTS name inside the instance; default: the instance name
    cwd: str | None = None
    stdout: int | None = None
    stderr: int | None = None
    slot: str = ""  # "": the instance's own tree; else a second tree of it (e.g. a standby)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.slot and not SLOT_PATTERN.fullmatch(self.slot):
            raise InvalidSpecError(f"bad slot {self.slot!r}: 1 to 16 of [a-z0-9-]")
        if self.instance_id < 0:
            raise InvalidSpecError(f"instance id must not be negative, not {self.instance_id}")
        if not self.argv:
            raise InvalidSpecError("argv is empty: give the agent's command line")
        if any(fd < 3 for fd in self.pass_fds):
            raise InvalidSpecError(
                f"pass_fds {self.pass_fds} include 0, 1 or 2: use stdout/stderr for those"
            )
        host = self.hostname
        if host is not None and not (
            0 < len(host) <= 64 and host.isascii() and host.isprintable() and " " not in host
        ):
            raise InvalidSpecError(f"bad hostname {host!r}: 1 to 64 printable ASCII characters")

    @property
    def uts_name(self) -> str:
        """The hostname the instance sees."""
        return self.hostname if self.hostname is not None else self.name

    @property
    def unit(self) -> str:
        """What the platform names this launch by (its cgroups): `name`, or `name.slot`."""
        return f"{self.name}.{self.slot}" if self.slot else self.name


@dataclass(frozen=True)
class Capabilities:
    """Which isolation a platform really applies on this host.

    `warnings` has one sentence per missing piece, saying what it means for an instance and
    what to do about it; empty when everything is applied.
    """

    namespaces: bool  # own PID (the agent is PID 1), UTS and mount namespaces, /proc remounted
    cpuset: bool  # a cpuset cgroup holds every process of the instance to its CPUs
    memory_limit: bool  # a memory cgroup limits the instance's memory
    affinity: bool  # the agent starts with sched_setaffinity to its CPUs
    warnings: tuple[str, ...] = ()
    cache: bool = False  # a resctrl group gives it cache ways of its own (needs the hardware)

    @property
    def isolated(self) -> bool:
        """True when every mechanism is applied (cache partitioning, which needs hardware that
        has it, is `cache`)."""
        return self.namespaces and self.cpuset and self.memory_limit and self.affinity


@dataclass(frozen=True)
class CacheShare:
    """An instance's share of the caches and memory bandwidth: its resctrl group, read back.

    `masks` has each cache's capacity bitmask per cache id (`{"L3": {0: 0x7e0, 1: 0x001}}`);
    `bandwidth` the group's memory-bandwidth values per L3 domain as the kernel shows them
    (percent on Intel, where 100 is no limit; empty where the machine has no MB).
    """

    group: str  # the group's directory
    masks: Mapping[str, Mapping[int, int]]
    bandwidth: Mapping[int, int] = field(default_factory=dict)

    def ways(self, cache: str = "L3") -> dict[int, int]:
        """How many ways of `cache` it may fill, per cache id."""
        return {domain: mask.bit_count() for domain, mask in self.masks.get(cache, {}).items()}

    def describe(self) -> str:
        """`L3 0=0x7e0 (6 ways), 1=0x1 (1 way); MB 0=50` (for people)."""
        parts = [
            f"{cache} "
            + ", ".join(
                f"{d}=0x{m:x} ({m.bit_count()} way{'s' if m.bit_count() != 1 else ''})"
                for d, m in sorted(masks.items())
            )
            for cache, masks in sorted(self.masks.items())
        ]
        if self.bandwidth:
            parts.append("MB " + ", ".join(f"{d}={v}" for d, v in sorted(self.bandwidth.items())))
        return "; ".join(parts)


@dataclass(frozen=True)
class NamespaceIds:
    """Namespace inode numbers, as `stat /proc/<pid>/ns/<kind>` gives them."""

    pid: int
    uts: int
    mnt: int


@dataclass(frozen=True)
class IsolationReport:
    """What the kernel says about a running instance (read back, not remembered)."""

    pid: int  # the agent's pid on the host
    namespace_pid: int  # the agent's pid in its own PID namespace: 1 when isolated
    affinity: frozenset[int]  # the agent's CPU affinity
    namespaces: NamespaceIds  # the agent's
    host_namespaces: NamespaceIds  # the calling process's
    cgroups: Mapping[str, str] = field(default_factory=dict)  # controller -> the agent's cgroup
    cpuset_cpus: frozenset[int] | None = None  # the instance cpuset's cpuset.cpus
    memory_limit: int | None = None  # the instance memory cgroup's limit (page-rounded)
    processes: tuple[int, ...] = ()  # host pids of every process of the instance
    cache: CacheShare | None = None  # its resctrl group's cache ways and bandwidth, if it has one

    @property
    def own_pid_namespace(self) -> bool:
        return self.namespaces.pid != self.host_namespaces.pid

    @property
    def own_uts_namespace(self) -> bool:
        return self.namespaces.uts != self.host_namespaces.uts

    @property
    def own_mount_namespace(self) -> bool:
        return self.namespaces.mnt != self.host_namespaces.mnt


class InstanceProcess:
    """A launched instance: a handle its platform's methods take.

    `resources` follows `Platform.update`; `returncode` is set once `Platform.wait` has seen the
    instance end (negative: killed by that signal). `async with` (or `aclose()`) kills what is
    left and reclaims everything; it is idempotent.
    """

    def __init__(self, platform: Platform, spec: LaunchSpec, pid: int) -> None:
        self.platform = platform
        self.spec = spec
        self.name = spec.name
        self.instance_id = spec.instance_id
        self.pid = pid
        self.resources = spec.resources
        self.returncode: int | None = None
        self.reclaimed = False  # set by the platform's `reclaim`
        #: An adopted launch's output brought back by the platform itself (a pipe's read end,
        #: the taker's to close), where there is no pipe on this kernel to reopen (multikernel).
        self.output: int | None = None

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<{type(self).__name__} {self.name!r} pid={self.pid} {state}>"

    async def aclose(self) -> None:
        """Kill whatever is left of the instance and reclaim what it holds."""
        await self.platform.kill(self)
        await self.platform.reclaim(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


P = TypeVar("P", bound=InstanceProcess)


def launched_by(platform: object, proc: InstanceProcess, kind: type[P], *, live: bool = False) -> P:
    """`proc` as the platform's own `kind`: TypeError if another platform launched it, and with
    `live`, anyio.ClosedResourceError once it has been reclaimed."""
    if not isinstance(proc, kind) or proc.platform is not platform:
        raise TypeError(f"{proc!r} was not launched by this platform")
    if live and proc.reclaimed:
        raise anyio.ClosedResourceError(f"instance {proc.name!r} has been reclaimed")
    return proc


class Platform(Protocol):
    """What runs instances: `local` (process trees) or `multikernel` (real kernels)."""

    name: str

    def capabilities(self) -> Capabilities:
        """Which isolation is really applied here, with a warning per missing piece."""
        ...

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> None:
        """What an instance needs before it starts, made at the lifecycle's `create` (`load`
        False) and `load` (True) and kept across its launches: on the multikernel platform the
        kernel's instance (`ready`) and its loaded kernel (`loaded`); nothing on the others.
        Idempotent; raises `PlatformError` with the kernel's reason."""
        ...

    async def release(self, name: str, instance_id: int) -> None:
        """Undo `prepare` (the lifecycle's `delete`): nothing if there is nothing."""
        ...

    async def launch(self, spec: LaunchSpec) -> InstanceProcess:
        """Start the instance's agent inside its isolation; returns once the agent is executing.

        Raises `InvalidSpecError` before anything starts, `LaunchError` if starting failed.
        """
        ...

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        """Change the instance's CPUs and memory limit live."""
        ...

    async def wait(self, proc: InstanceProcess) -> int:
        """The agent's exit status once the instance has ended (negative: killed by a signal)."""
        ...

    def signal(self, proc: InstanceProcess, signum: int) -> None:
        """Send `signum` to the instance's first process (its agent)."""
        ...

    async def kill(self, proc: InstanceProcess) -> None:
        """SIGKILL every process of the instance and wait until they are all gone."""
        ...

    async def reclaim(self, proc: InstanceProcess) -> None:
        """Give back everything the instance held (ending what is left first); idempotent."""
        ...

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        """Read back from the kernel what isolation the instance really has."""
        ...
