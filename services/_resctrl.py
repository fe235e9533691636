"""The machine's cache and memory-bandwidth partitioning (Intel RDT, AMD PQoS), through resctrl.

Linux exposes both as the resctrl file system (Documentation/arch/x86/resctrl.rst), mounted at
`/sys/fs/resctrl`. `probe_resctrl` reads what it offers, once, into a `ResctrlInfo`, or says in
one sentence why there is nothing to use (the kernel makes the mount point only on hardware that
has it; it may be there but not mounted):

- each cache resource under `info/` with a `cbm_mask` (`L3`, `L2`, or `L3CODE`/`L3DATA` when
  mounted with `cdp`): its full mask, `min_cbm_bits`, `shareable_bits` (ways the hardware shares
  with I/O), `num_closids`, and its domains (the cache ids of its line in the root `schemata`),
  each with the CPUs that share that cache (`/sys/devices/system/cpu/cpu<N>/cache/index<K>/id`);
- memory bandwidth (`info/MB`): `min_bandwidth` and `bandwidth_gran`, in percent of a core's.

`ResctrlFs` is where resctrl is and how its groups are made: the kernel's (`mkdir`, `rmdir`, one
`write` per command) under `root`; `multikernel.services.testing.FakeResctrl` is a fake one that
acts like the kernel, for tests. The groups themselves are `_resctrl_groups`'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from multikernel.services._cache_masks import reserved, share, ways
from multikernel.services._cgroups import parse_cpu_list

#: Where the kernel mounts resctrl, under a machine's root.
RESCTRL_MOUNT: Final = Path("sys/fs/resctrl")
#: Directories of the resctrl root that are not control groups.
NOT_GROUPS: Final = frozenset({"info", "mon_groups", "mon_data"})
_SHARED: Final = "cache and memory bandwidth are shared"
NO_RESCTRL: Final = f"no resctrl on this machine: {_SHARED}"


class ResctrlFs:
    """The resctrl file system of the machine under `root`, and the kernel's ways to change it."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    @property
    def mount(self) -> Path:
        return self.root / RESCTRL_MOUNT

    def mkdir(self, path: Path) -> None:
        """Make a control group (the kernel gives it a CLOSID and its files)."""
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        """Remove a control group (the kernel moves its tasks to the default group)."""
        path.rmdir()

    def write(self, path: Path, text: str) -> None:
        """One write: the kernel takes each write to a resctrl file as one command."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def parse_schemata(text: str) -> dict[str, dict[int, str]]:
    """`L3:0=7ff;1=7ff` lines (AMD pads them with spaces) → {"L3": {0: "7ff", 1: "7ff"}}."""
    lines: dict[str, dict[int, str]] = {}
    for line in text.splitlines():
        name, colon, rest = line.strip().partition(":")
        if not colon:
            continue
        values = lines.setdefault(name.strip(), {})
        for item in rest.split(";"):
            domain, equals, value = item.partition("=")
            if equals:
                values[int(domain)] = value.strip()
    return lines


@dataclass(frozen=True)
class CacheResource:
    """One cache that resctrl partitions (`L3`), as its `info/<name>` directory describes it."""

    name: str
    cbm_mask: int
    min_cbm_bits: int
    shareable_bits: int
    num_closids: int
    domains: Mapping[int, frozenset[int]]  # cache id -> the CPUs that share that cache

    @property
    def reserved(self) -> int:
        """The ways no instance gets: the default group's floor, and the placeholder."""
        return reserved(self.min_cbm_bits)

    @property
    def budget(self) -> int:
        """Ways instances may be given in a domain: all but the shareable and reserved ones."""
        return ways(self.cbm_mask & ~self.shareable_bits & ~self.reserved)

    def share(self, domain: int, cpus: frozenset[int]) -> int:
        """The ways an instance holding `cpus` is due in `domain`; 0: it has no CPU there
        (`_cache_masks.share`)."""
        here = self.domains[domain]
        return share(self.budget, self.min_cbm_bits, len(cpus & here), len(here))

    def format(self, mask: int) -> str:
        return f"{mask:0{(self.cbm_mask.bit_length() + 3) // 4}x}"


@dataclass(frozen=True)
class Bandwidth:
    """Memory-bandwidth allocation (`info/MB`): throttling in percent, per L3 domain."""

    min_bandwidth: int
    granularity: int
    num_closids: int
    domains: tuple[int, ...]

    def step(self, percent: int) -> int:
        """`percent` rounded up to a step the hardware has (min_bandwidth + N * granularity)."""
        if percent <= self.min_bandwidth:
            return self.min_bandwidth
        steps = -(-(percent - self.min_bandwidth) // max(self.granularity, 1))
        return min(100, self.min_bandwidth + steps * max(self.granularity, 1))


@dataclass(frozen=True)
class ResctrlInfo:
    """What this machine's resctrl offers (see the module docstring)."""

    mount: Path
    caches: Mapping[str, CacheResource]
    bandwidth: Bandwidth | None = None

    @property
    def num_closids(self) -> int:
        """Control groups the machine can have, the default one included (the kernel uses the
        smallest number of any resource)."""
        counts = [c.num_closids for c in self.caches.values()]
        if self.bandwidth is not None:
            counts.append(self.bandwidth.num_closids)
        return min(counts)

    def describe(self) -> str:
        """One line for the log."""
        caches = ", ".join(
            f"{c.name} {ways(c.cbm_mask)} ways (min {c.min_cbm_bits}) in {len(c.domains)} domain(s)"
            for c in self.caches.values()
        )
        mb = self.bandwidth
        bandwidth = f", MB {mb.min_bandwidth}-100% in steps of {mb.granularity}" if mb else ""
        return f"resctrl at {self.mount}: {caches}{bandwidth}, {self.num_closids} CLOSIDs"


def _read(path: Path) -> str:
    return path.read_text().strip()


class _Unreadable(Exception):
    def __init__(self, path: Path, error: Exception) -> None:
        super().__init__(f"cannot read {path} ({error})")


def _number(path: Path, base: int = 10) -> int:
    try:
        return int(_read(path), base)
    except (OSError, ValueError) as error:
        raise _Unreadable(path, error) from error


def _cache_cpus(root: Path, level: int) -> dict[int, set[int]]:
    """Cache id → CPUs, for the caches of `level`, from each CPU's `cache/index<K>`."""
    domains: dict[int, set[int]] = {}
    system = root / "sys/devices/system/cpu"
    for cpu in system.glob("cpu[0-9]*"):
        for index in cpu.glob("cache/index[0-9]*"):
            try:
                if int(_read(index / "level")) == level:
                    domains.setdefault(int(_read(index / "id")), set()).add(int(cpu.name[3:]))
            except (OSError, ValueError):
                continue
    return domains


def _online(root: Path) -> frozenset[int]:
    try:
        return parse_cpu_list(_read(root / "sys/devices/system/cpu/online"))
    except (OSError, ValueError):
        return frozenset()


def _cache(fs: ResctrlFs, info: Path, level: int, domains: dict[int, str]) -> CacheResource:
    found = _cache_cpus(fs.root, level)
    every = _online(fs.root)  # a domain whose CPUs sysfs does not list: assume all share it
    return CacheResource(
        name=info.name,
        cbm_mask=_number(info / "cbm_mask", 16),
        min_cbm_bits=_number(info / "min_cbm_bits"),
        shareable_bits=_number(info / "shareable_bits", 16),
        num_closids=_number(info / "num_closids"),
        domains={d: frozenset(found.get(d, every)) for d in sorted(domains)},
    )


def probe_resctrl(fs: ResctrlFs) -> ResctrlInfo | str:
    """What `fs` offers, or one sentence (a platform warning) saying why nothing."""
    mount = fs.mount
    if not mount.is_dir():
        return NO_RESCTRL
    info = mount / "info"
    if not info.is_dir():
        return f"resctrl is not mounted (mount -t resctrl resctrl /{RESCTRL_MOUNT}): {_SHARED}"
    try:
        try:
            schemata = parse_schemata((mount / "schemata").read_text())
        except (OSError, ValueError) as error:
            raise _Unreadable(mount / "schemata", error) from error
        caches: dict[str, CacheResource] = {}
        for entry in sorted(info.iterdir()):
            match = re.fullmatch(r"L(\d)(CODE|DATA)?", entry.name)
            if match and (entry / "cbm_mask").exists() and entry.name in schemata:
                caches[entry.name] = _cache(fs, entry, int(match[1]), schemata[entry.name])
        bandwidth = None
        mb = info / "MB"
        if (mb / "min_bandwidth").exists() and "MB" in schemata:
            bandwidth = Bandwidth(
                min_bandwidth=_number(mb / "min_bandwidth"),
                granularity=_number(mb / "bandwidth_gran"),
                num_closids=_number(mb / "num_closids"),
                domains=tuple(sorted(schemata["MB"])),
            )
    except _Unreadable as error:
        return f"{error}: {_SHARED}"
    if not caches:
        return f"resctrl here has no cache allocation (monitoring only): {_SHARED}"
    return ResctrlInfo(mount, caches, bandwidth)
