"""One resctrl control group per instance: its own cache ways, and optionally a bandwidth limit.

An instance's group is `<mount>/<group with '/' as '.'>.<name>`, e.g.
`/sys/fs/resctrl/multikernel.host-1a2b3c4d.web`: resctrl groups cannot nest, so the host's part
is in the name, and several hosts on one machine never touch each other's groups (instance names
have no '.'; the host id is fixed-length). `create` plans the instance's masks
(`_cache_masks`: its CPU share of each cache domain, exclusive and contiguous), narrows the
default group so it holds none of them, makes the group, writes its `schemata` and sets its
`mode` to `exclusive`, so the kernel itself refuses any group that would overlap it later. The
instance's first process then writes itself into the group's `tasks` (the keeper does it before
exec, so every thread and child inherits it). `resize` follows a CPU grant; `remove` gives the
ways back to the default group; `remove_stale` removes this host's groups with no task left (a
host that crashed). Every change is read, decided and written under `flock(LOCK_EX)` on the mount,
the locking resctrl.rst asks of every program that allocates, so two hosts (or the lifecycle and
resource actors of one) never both take the same ways.

The kernel is the only record: nothing is remembered between calls, so a restarted host, or the
resource actor in its own process, sees exactly what is there. What cannot be done raises
`ResctrlError` saying why (out of CLOSIDs, no free ways) with the kernel's `last_cmd_status`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from multikernel.endpoints.log import get_logger
from multikernel.services._cache_masks import choose, default_mask, ways
from multikernel.services._platform import NAME_PATTERN, CacheShare, PlatformError
from multikernel.services._resctrl import (
    NOT_GROUPS,
    CacheResource,
    ResctrlFs,
    ResctrlInfo,
    parse_schemata,
)

log = get_logger("multikernel.services.local")
Masks = dict[str, dict[int, int]]  # cache resource -> domain -> mask


class ResctrlError(PlatformError):
    """resctrl could not give an instance its share (no CLOSID or ways left, or the kernel
    refused a write); the message says what and what to do."""


@dataclass(frozen=True)
class _Group:
    masks: Masks
    bandwidth: dict[int, int]
    exclusive: bool


class ResctrlGroups:
    """This host's instance groups in resctrl (see the module docstring).

    `bandwidth`: every instance's memory-bandwidth limit in percent (None: not limited).
    """

    def __init__(
        self, info: ResctrlInfo, fs: ResctrlFs, group: str, *, bandwidth: int | None = None
    ) -> None:
        self.info = info
        self.fs = fs
        self.prefix = group.replace("/", ".") + "."
        self.bandwidth = bandwidth

    def path(self, name: str) -> Path:
        return self.info.mount / f"{self.prefix}{name}"

    def tasks_file(self, name: str) -> Path:
        """The file the instance's first process writes its pid into."""
        return self.path(name) / "tasks"

    def names(self) -> list[str]:
        """The instances of this host that have a group."""
        return sorted(
            entry.name[len(self.prefix) :]
            for entry in self.info.mount.iterdir()
            if entry.name.startswith(self.prefix)
            and NAME_PATTERN.fullmatch(entry.name[len(self.prefix) :])
        )

    def read(self, name: str) -> CacheShare | None:
        """What the instance's group has, from the kernel; None if it has none."""
        try:
            group = self._read_group(self.path(name))
        except FileNotFoundError:
            return None
        return CacheShare(str(self.path(name)), group.masks, group.bandwidth)

    def create(self, name: str, cpus: frozenset[int]) -> CacheShare:
        """Make the group of `name`, holding `cpus`, with its share; replace a stale one."""
        path = self.path(name)
        with self._locked():
            if path.exists():
                if self._tasks(path):
                    raise ResctrlError(
                        f"an instance named {name!r} is already running on this host ({path} "
                        "has tasks): kill it or choose another name"
                    )
                self._rmdir(path)  # left behind by a host that crashed
            groups = self._groups()
            self._check_closids(name, groups)
            masks = self._plan(name, cpus, groups, {})
            self._set_default(groups, masks)
            try:
                self._mkdir(path)
                lines = self._lines(masks)
                if self.bandwidth is not None:
                    lines += self._bandwidth_line(path)
                self._write(path / "schemata", lines)
                if not self._placeholders(masks):
                    self._write(path / "mode", "exclusive\n")
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.rmdir(path)
                with contextlib.suppress(ResctrlError):
                    self._set_default(self._groups(), {})
                raise
        share = self.read(name)
        assert share is not None
        return share

    def resize(self, name: str, cpus: frozenset[int]) -> CacheShare | None:
        """Give the instance the share of `cpus` (None: it has no group, as it is not running).

        Its ways are kept where they can be: a smaller share is the top of what it has, a larger
        one grows around it as far as there is room (`ResctrlError` only if a domain where it
        had no CPU has not even one way free).
        """
        path = self.path(name)
        with self._locked():
            groups = self._groups()
            own = groups.pop(path.name, None)
            if own is None:
                return None
            masks = self._plan(name, cpus, groups, own.masks)
            if masks != own.masks:
                exclusive = not self._placeholders(masks)
                if own.exclusive and not exclusive:
                    self._write(path / "mode", "shareable\n")  # a placeholder is shared
                self._set_default(groups, self._union(own.masks, masks))  # both, for a moment
                self._write(path / "schemata", self._lines(masks))
                self._set_default(groups, masks)
                if exclusive and not own.exclusive:
                    self._write(path / "mode", "exclusive\n")
        return self.read(name)

    def remove(self, name: str) -> None:
        """Remove the group (its tasks, if any, go to the default group); idempotent."""
        with self._locked():
            if self.path(name).exists():
                self._rmdir(self.path(name))
                self._set_default(self._groups(), {})

    def remove_stale(self) -> list[str]:
        """Remove this host's groups that no task is in (left by a host that crashed)."""
        removed = []
        with self._locked():
            for name in self.names():
                if not self._tasks(self.path(name)):
                    self._rmdir(self.path(name))
                    removed.append(name)
            if removed:
                self._set_default(self._groups(), {})
        return removed

    # -- reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.info.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _tasks(self, path: Path) -> list[str]:
        try:
            return (path / "tasks").read_text().split()
        except FileNotFoundError:
            return []

    def _read_group(self, path: Path) -> _Group:
        lines = parse_schemata((path / "schemata").read_text())
        masks = {
            cache: {d: int(v, 16) for d, v in lines.get(cache, {}).items()}
            for cache in self.info.caches
        }
        bandwidth = {d: int(v) for d, v in lines.get("MB", {}).items()}
        try:
            mode = (path / "mode").read_text().strip()
        except FileNotFoundError:
            mode = "shareable"
        return _Group(masks, bandwidth, mode in {"exclusive", "pseudo-locked"})

    def _groups(self) -> dict[str, _Group]:
        """Every control group but the default one (any host's, any program's), by directory."""
        found: dict[str, _Group] = {}
        for entry in sorted(self.info.mount.iterdir()):
            if entry.name in NOT_GROUPS or not entry.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError):  # a program that does not lock
                found[entry.name] = self._read_group(entry)
        return found

    # -- deciding ---------------------------------------------------------------------------

    def _check_closids(self, name: str, groups: dict[str, _Group]) -> None:
        if len(groups) + 1 >= self.info.num_closids:
            users = ["the default group", *(self._who(g) for g in groups)]
            raise ResctrlError(
                f"no cache partition for {name!r}: this machine has {self.info.num_closids} "
                f"resctrl CLOSIDs and all are in use ({', '.join(users)}): stop an instance, or "
                f"remove groups under {self.info.mount} that nothing uses"
            )

    def _held(self, groups: dict[str, _Group], cache: CacheResource, domain: int) -> int:
        """The ways `groups` hold in `domain` of `cache`, placeholders left out."""
        held = 0
        for group in groups.values():
            mask = group.masks.get(cache.name, {}).get(domain, 0)
            if mask != cache.reserved or group.exclusive:
                held |= mask
        return held

    def _union(self, a: Masks, b: Masks) -> Masks:
        """Both instances' ways, per domain (a placeholder only where both have one)."""
        union: Masks = {}
        for cache, values in b.items():
            reserved = self.info.caches[cache].reserved
            for domain, mask in values.items():
                other = a.get(cache, {}).get(domain, reserved)
                real = [m for m in (mask, other) if m != reserved]
                union.setdefault(cache, {})[domain] = (real[0] | real[-1]) if real else reserved
        return union

    def _placeholders(self, masks: Masks) -> bool:
        """True if `masks` has a placeholder (a domain where the instance has no CPU)."""
        return any(
            mask == self.info.caches[cache].reserved
            for cache, values in masks.items()
            for mask in values.values()
        )

    def _plan(
        self, name: str, cpus: frozenset[int], others: dict[str, _Group], own: Masks
    ) -> Masks:
        masks: Masks = {}
        for cache in self.info.caches.values():
            masks[cache.name] = {}
            for domain in cache.domains:
                due = cache.share(domain, cpus)
                if not due:
                    masks[cache.name][domain] = cache.reserved
                    continue
                held = self._held(others, cache, domain)
                current = own.get(cache.name, {}).get(domain, 0)
                if current == cache.reserved:
                    current = 0  # a placeholder: it held nothing here
                mask = choose(
                    due, cbm_mask=cache.cbm_mask, min_bits=cache.min_cbm_bits,
                    shareable=cache.shareable_bits, held=held, current=current,
                    at_least=min(due, max(ways(current), cache.min_cbm_bits, 1)),
                )  # fmt: skip
                if mask is None:
                    raise self._no_room(name, cache, domain, held, others)
                if ways(mask) < due:
                    log.warning(
                        "smaller cache share", instance=name, cache=cache.name, domain=domain,
                        ways=ways(mask), due=due, reason="no larger run of free ways",
                    )  # fmt: skip
                masks[cache.name][domain] = mask
        return masks

    def _no_room(
        self, name: str, cache: CacheResource, domain: int, held: int, others: dict[str, _Group]
    ) -> ResctrlError:
        free = cache.cbm_mask & ~cache.shareable_bits & ~cache.reserved & ~held
        holders = [
            f"{self._who(g)} 0x{m:x}"
            for g, group in others.items()
            if (m := group.masks.get(cache.name, {}).get(domain, 0)) and m != cache.reserved
        ]
        return ResctrlError(
            f"no room in the {cache.name} cache for {name!r}: domain {domain} has "
            f"{ways(free)} of its {cache.budget} ways free, none in a run of "
            f"{max(cache.min_cbm_bits, 1)} (held: {', '.join(holders) or 'none'}): stop an "
            "instance or give this one fewer CPUs"
        )

    def _who(self, directory: str) -> str:
        """A group for people: an instance of this host by name, anything else by directory."""
        return (
            repr(directory[len(self.prefix) :]) if directory.startswith(self.prefix) else directory
        )

    # -- writing ----------------------------------------------------------------------------

    def _lines(self, masks: Masks) -> str:
        return "".join(
            f"{cache}:"
            + ";".join(
                f"{d}={self.info.caches[cache].format(m)}" for d, m in sorted(values.items())
            )
            + "\n"
            for cache, values in masks.items()
        )

    def _bandwidth_line(self, path: Path) -> str:
        """The `MB:` line of `bandwidth` percent, if the machine's MB values are percentages."""
        mb = self.info.bandwidth
        if mb is None or self.bandwidth is None:
            return ""
        fresh = self._read_group(path).bandwidth  # the kernel's default: 100 only in percent
        if set(fresh.values()) != {100}:
            log.warning(
                "memory bandwidth not limited",
                reason=f"resctrl's MB values here are not percentages ({fresh}: AMD's units or "
                "the mba_MBps mount option)",
            )
            return ""
        value = mb.step(self.bandwidth)
        return "MB:" + ";".join(f"{d}={value}" for d in mb.domains) + "\n"

    def _set_default(self, others: dict[str, _Group], held: Masks) -> None:
        """Narrow or widen the default group to the free run from way 0 (`default_mask`), with
        `others` and `held` (this instance's masks) holding what they hold."""
        root = self.info.mount
        current = self._read_group(root).masks
        wanted: Masks = {}
        for cache in self.info.caches.values():
            for domain in cache.domains:
                mine = held.get(cache.name, {}).get(domain, 0)
                taken = self._held(others, cache, domain)
                if mine != cache.reserved:
                    taken |= mine
                mask = default_mask(cache.cbm_mask, taken)
                if current.get(cache.name, {}).get(domain) != mask:
                    wanted.setdefault(cache.name, {})[domain] = mask
        if wanted:
            self._write(root / "schemata", self._lines(wanted))

    def _write(self, path: Path, text: str) -> None:
        try:
            self.fs.write(path, text)
        except OSError as error:
            raise ResctrlError(
                f"resctrl refused {text.strip()!r} in {path}: {error.strerror} ({self._status()})"
            ) from error

    def _mkdir(self, path: Path) -> None:
        try:
            self.fs.mkdir(path)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise ResctrlError(
                    f"cannot make {path}: the kernel is out of CLOSIDs or RMIDs "
                    f"({self._status()}): stop an instance, or remove groups under "
                    f"{self.info.mount} that nothing uses"
                ) from error
            raise ResctrlError(
                f"cannot make {path}: {error.strerror} ({self._status()})"
            ) from error

    def _rmdir(self, path: Path) -> None:
        try:
            self.fs.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ResctrlError(f"cannot remove {path}: {error.strerror}") from error

    def _status(self) -> str:
        try:
            return (self.info.mount / "info" / "last_cmd_status").read_text().strip()
        except OSError:
            return "no last_cmd_status"
