"""cgroup v1 groups for one instance (a cpuset and a memory cgroup), and killing what is in them.

The cpuset is `/sys/fs/cgroup/cpuset/<group>/<name>` (`cpuset.mems` copied from the parent,
`cpuset.cpus` from the instance's resources); the memory cgroup is `<group>/<name>` under this
process's own memory cgroup (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` when swap
is accounted, so swap is no way around the limit). `<group>` is one platform's own parent, such as
a host's `multikernel/<host-id>`, so that hosts, demos and test runs on one machine never meet in
one directory. Its directories are created on demand and removed again, from the bottom up, when
the last instance leaves them (a directory another platform still uses stays: rmdir refuses).
Every directory created is removed by `InstanceCgroups.remove`, which runs only after the
instance's processes are gone: `kill_all` ends them, listed by the cgroups' `cgroup.procs` or, on
a host without cgroups, by `process_tree`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from signal import SIGKILL, SIGSTOP, pidfd_send_signal

import anyio

from multikernel.services._platform import LaunchError, PlatformError, Resources

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The directory every platform's group goes under, in each hierarchy.
GROUP_ROOT = "multikernel"
_GROUP_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def group_levels(group: str) -> int:
    """How many directories `group` ("multikernel/<host-id>") has; ValueError if malformed."""
    parts = group.split("/")
    if not all(_GROUP_PART.fullmatch(part) for part in parts):
        raise ValueError(
            f"bad cgroup group {group!r}: use relative directory names of letters, digits, "
            "'_', '.' and '-' joined by '/', such as 'multikernel/host-1a2b3c4d'"
        )
    return len(parts)


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU ids from the kernel's list format ("0-2,5")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise PlatformError(f"cannot write {text!r} to {path}: {error.strerror}") from error


@dataclass(frozen=True)
class CgroupLayout:
    """Where this host's instance cgroups go; None (with a reason in `problems`) when missing."""

    cpuset_parent: Path | None
    memory_parent: Path | None
    problems: tuple[str, ...] = ()
    levels: int = 1  # directories between a hierarchy's root and an instance's cgroup

    @property
    def parents(self) -> list[Path]:
        """The group directories instances go into (created on demand: they may not exist)."""
        return [d for d in (self.cpuset_parent, self.memory_parent) if d is not None]

    @property
    def dirs_possible(self) -> bool:
        """True when an instance gets at least one cgroup."""
        return self.cpuset_parent is not None or self.memory_parent is not None

    @classmethod
    def discover(cls, group: str, *, root: Path = CGROUP_ROOT) -> CgroupLayout:
        """Find the cpuset hierarchy and this process's memory cgroup, and check we may write."""
        levels = group_levels(group)
        problems: list[str] = []
        if (root / "cgroup.controllers").exists():
            problems.append(f"{root} is a cgroup v2 hierarchy; only cgroup v1 is supported")
            return cls(None, None, tuple(problems))
        cpuset: Path | None = None
        if not (root / "cpuset" / "cpuset.cpus").exists():
            problems.append(f"no cpuset cgroup hierarchy at {root / 'cpuset'}")
        elif not os.access(root / "cpuset", os.W_OK):
            problems.append(f"no permission to create cpusets in {root / 'cpuset'}")
        else:
            cpuset = root / "cpuset"
        memory = cls._own_memory_cgroup(root)
        if memory is None:
            problems.append(f"no memory cgroup hierarchy at {root / 'memory'}")
        elif not os.access(memory, os.W_OK):
            problems.append(f"no permission to create memory cgroups in {memory}")
            memory = None
        return cls(
            cpuset / group if cpuset else None,
            memory / group if memory else None,
            tuple(problems),
            levels,
        )

    def remove_groups(self) -> None:
        """rmdir this layout's group directories, bottom up, where nothing is left in them.

        Empty instance cgroups (left by a host that crashed) go first; a cgroup with processes, or
        a directory another platform still uses, stays: the kernel refuses to remove it.
        """
        for parent in self.parents:
            with contextlib.suppress(OSError):
                for child in parent.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
            _remove_up(parent, self.levels)

    @staticmethod
    def _own_memory_cgroup(root: Path) -> Path | None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                own = root / "memory" / path.lstrip("/")
                return own if (own / "memory.limit_in_bytes").exists() else None
        return None


class InstanceCgroups:
    """The cgroups of one instance; `create` makes them, `remove` takes them away again."""

    def __init__(self, cpuset: Path | None, memory: Path | None, levels: int = 1) -> None:
        self.cpuset = cpuset
        self.memory = memory
        self.levels = levels

    @property
    def dirs(self) -> list[Path]:
        return [d for d in (self.cpuset, self.memory) if d is not None]

    @classmethod
    def create(cls, layout: CgroupLayout, name: str, resources: Resources) -> InstanceCgroups:
        """Make the instance's cpuset and memory cgroup with its resources applied.

        A leftover empty directory of the same name (a host that crashed) is replaced; one that
        still has processes means the name is in use, and `LaunchError` says so.
        """
        groups = cls(None, None, layout.levels)
        try:
            if layout.cpuset_parent is not None:
                groups.cpuset = _make_child(
                    layout.cpuset_parent, name, layout.levels, _prepare_cpuset
                )
                _write(groups.cpuset / "cpuset.mems", _read(layout.cpuset_parent / "cpuset.mems"))
                groups.set_cpus(resources.cpus)
            if layout.memory_parent is not None:
                groups.memory = _make_child(layout.memory_parent, name, layout.levels, None)
                groups.set_memory(resources.memory)
        except BaseException:
            groups.remove_now()
            raise
        return groups

    def procs_files(self) -> list[str]:
        """The `cgroup.procs` files the agent writes itself into."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def set_cpus(self, cpus: frozenset[int]) -> None:
        if self.cpuset is not None:
            _write(self.cpuset / "cpuset.cpus", format_cpu_list(cpus))

    def set_memory(self, memory: int) -> None:
        """Set the limit; memory+swap follows it (raised first when growing, lowered after)."""
        if self.memory is None:
            return
        limit = self.memory / "memory.limit_in_bytes"
        memsw = self.memory / "memory.memsw.limit_in_bytes"
        current = self.memory_limit()
        growing = current is not None and memory >= current  # None: unlimited
        if memsw.exists() and growing:
            _write(memsw, str(memory))
        try:
            limit.write_text(str(memory))
        except OSError as error:
            if error.errno == errno.EBUSY:
                used = int(_read(self.memory / "memory.usage_in_bytes"))
                raise PlatformError(
                    f"cannot lower the memory limit to {memory} bytes: the instance uses {used} "
                    "and the kernel could not reclaim enough; free memory inside it or choose a "
                    "larger size"
                ) from error
            raise PlatformError(f"cannot write {memory} to {limit}: {error.strerror}") from error
        if memsw.exists() and not growing:
            _write(memsw, str(memory))

    def cpus(self) -> frozenset[int] | None:
        return parse_cpu_list(_read(self.cpuset / "cpuset.cpus")) if self.cpuset else None

    def memory_limit(self) -> int | None:
        if self.memory is None:
            return None
        value = int(_read(self.memory / "memory.limit_in_bytes"))
        return None if value >= 2**62 else value

    def pids(self) -> set[int]:
        """Host pids of every process in the instance's cgroups."""
        return self._ids("cgroup.procs")

    def tids(self) -> set[int]:
        """Host ids of every thread in the instance's cgroups."""
        return self._ids("tasks")

    def _ids(self, filename: str) -> set[int]:
        ids: set[int] = set()
        for d in self.dirs:
            try:
                ids.update(int(line) for line in (d / filename).read_text().split())
            except FileNotFoundError:
                continue
        return ids

    async def remove(self) -> None:
        """rmdir the instance's cgroups, then their group directories if nobody else uses them.

        Call it once the instance's processes are gone; EBUSY (the last tasks still leaving) is
        retried with a short back-off for up to about two seconds.
        """
        for d in self.dirs:
            delay = 0.001
            for _ in range(40):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise PlatformError(f"cannot remove {d}: {error.strerror}") from error
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
            else:
                raise PlatformError(
                    f"cannot remove {d}: still busy with {self._ids('cgroup.procs') or 'no'} "
                    "processes; kill them and reclaim again"
                )
        self._remove_parents()
        self.cpuset = self.memory = None

    def remove_now(self) -> None:
        """Best-effort synchronous removal, for a launch that failed before any process ran."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
        self._remove_parents()
        self.cpuset = self.memory = None

    def _remove_parents(self) -> None:
        for d in self.dirs:
            _remove_up(d.parent, self.levels)


def _remove_up(directory: Path, levels: int) -> None:
    """rmdir `directory` and up to `levels - 1` of its parents, stopping at the first in use."""
    for _ in range(levels):
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY or ENOTEMPTY: another instance, or another platform, is in it
            return
        directory = directory.parent


def _prepare_cpuset(group: Path) -> None:
    """A new cpuset has no CPUs or memory nodes: give a group directory all of its parent's.

    Raw file operations: FileNotFoundError (another platform removed the directory meanwhile)
    reaches `_make_child`, which starts over.
    """
    for filename in ("cpuset.cpus", "cpuset.mems"):
        if not (group / filename).read_text().strip():
            (group / filename).write_text((group.parent / filename).read_text().strip())


def _make_child(
    parent: Path, name: str, levels: int, prepare: Callable[[Path], None] | None
) -> Path:
    """mkdir `parent/name`, creating `parent` and the `levels - 1` directories above it first
    (each `prepare`d); replace a stale empty `parent/name`."""
    child = parent / name
    chain = [parent, *parent.parents][:levels][::-1]  # the group's directories, top down
    for _ in range(5):  # another host process may remove an empty group at the same moment
        try:
            for group in chain:
                group.mkdir(exist_ok=True)
                if prepare is not None:
                    prepare(group)
            child.mkdir()
        except FileExistsError:
            if (child / "cgroup.procs").read_text().split():
                raise LaunchError(
                    f"an instance named {name!r} is already running on this host ({child} has "
                    "processes): kill it or choose another name"
                ) from None
            try:
                child.rmdir()  # left behind by a host that crashed
            except OSError as error:
                raise LaunchError(f"cannot replace stale {child}: {error.strerror}") from error
        except FileNotFoundError:
            continue
        except OSError as error:
            raise LaunchError(f"cannot create {child}: {error.strerror}") from error
        else:
            return child
    raise LaunchError(f"cannot create {child}: its parent keeps disappearing")


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, parents before children (from /proc/<pid>/task/*/children)."""
    pids = [root]
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                pids.extend(
                    int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                )
            except FileNotFoundError:
                continue
    return pids


async def kill_all(source: Callable[[], Iterable[int]], *, stop_first: bool = False) -> None:
    """SIGKILL every pid `source` lists until it lists none that is new, and await their exit.

    Signals go through pidfds, so a recycled pid is never hit. A process with SIGKILL pending
    cannot fork, so each round only finds children forked before the previous one. With
    `stop_first` (a process tree, where a dying parent's children would move out of reach)
    everything is SIGSTOPped top-down first and killed once nothing new appears.
    """
    for _ in range(100):
        held: dict[int, int] = {}
        try:
            first = SIGSTOP if stop_first else SIGKILL
            while True:
                fresh = [pid for pid in source() if pid not in held]
                if not fresh:
                    break
                for pid in fresh:
                    try:
                        held[pid] = fd = os.pidfd_open(pid)
                        pidfd_send_signal(fd, first)
                    except ProcessLookupError:
                        held.setdefault(pid, -1)
            fds = [fd for fd in held.values() if fd >= 0]
            if stop_first:
                for fd in fds:
                    pidfd_send_signal(fd, SIGKILL)
            for fd in fds:
                await anyio.wait_readable(fd)
        finally:
            for fd in held.values():
                if fd >= 0:
                    os.close(fd)
        if not held or stop_first:
            return
    raise PlatformError("processes keep appearing in the instance's cgroups while it is killed")
