"""A fake resctrl for tests: a directory laid out like `/sys/fs/resctrl` that acts like the kernel.

mkdir in an ordinary directory makes an empty one, and writes just replace a file, so `FakeResctrl`
is a `ResctrlFs` that does what the kernel does behind them: `mkdir` gives a new group its files
(`schemata` with the kernel's initial masks, `tasks`, `cpus`, `cpus_list`, `mode`, and
`mon_groups`/`mon_data` with monitoring) or fails with ENOSPC when the CLOSIDs are used up;
`rmdir` moves the group's tasks to the default group; `write` checks what the kernel checks before
taking it (a mask within `cbm_mask`, contiguous, with `min_cbm_bits`; no overlap with an exclusive
group, nor, for an exclusive group, with any other; a bandwidth within range, rounded up to a
step) and otherwise fails with EINVAL and says why in `info/last_cmd_status`. The state is the
files, so two `FakeResctrl` on one directory agree, as two processes do on the real one.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

from multikernel.services._cache_masks import is_contiguous, runs, ways
from multikernel.services._resctrl import NOT_GROUPS, ResctrlFs, parse_schemata


class _Refused(Exception):
    pass


class FakeResctrl(ResctrlFs):
    """resctrl under `root` (see the module docstring); build it with `cache` and `bandwidth`.

    `mounted=False` leaves only the empty mount point, as on a machine that has resctrl but has
    not mounted it; `monitoring` adds the monitoring directories a real mount has.
    """

    def __init__(self, root: Path, *, mounted: bool = True, monitoring: bool = True) -> None:
        super().__init__(root)
        self.mount.mkdir(parents=True, exist_ok=True)
        self.monitoring = monitoring
        if not mounted:
            return
        (self.mount / "info").mkdir(exist_ok=True)
        self._put("info/last_cmd_status", "ok")
        for name, text in [("schemata", ""), ("tasks", ""), ("cpus", "0"), ("cpus_list", ""),
                           ("mode", "shareable")]:  # fmt: skip
            self._put(name, text)
        if monitoring:
            for name in ("mon_groups", "mon_data", "info/L3_MON"):
                (self.mount / name).mkdir(exist_ok=True)
            self._put("info/L3_MON/num_rmids", "128")

    def _put(self, relative: str, text: str) -> None:
        path = self.mount / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n" if text else "")

    # -- building ---------------------------------------------------------------------------

    def cache(
        self,
        name: str = "L3",
        *,
        cbm_mask: int = 0x7FF,
        min_cbm_bits: int = 1,
        num_closids: int = 16,
        shareable_bits: int = 0,
        domains: Mapping[int, Iterable[int]] | None = None,
    ) -> Self:
        """A cache resctrl partitions; `domains`: cache id → its CPUs (default: one, CPU 0)."""
        level = int(name[1])
        cpus = {d: sorted(c) for d, c in (domains or {0: [0]}).items()}
        width = (cbm_mask.bit_length() + 3) // 4
        for file, value in [("cbm_mask", f"{cbm_mask:0{width}x}"), ("min_cbm_bits", min_cbm_bits),
                            ("num_closids", num_closids), ("shareable_bits",
                            f"{shareable_bits:0{width}x}"), ("bit_usage", "")]:  # fmt: skip
            self._put(f"info/{name}/{file}", str(value))
        system = self.root / "sys/devices/system/cpu"
        every = sorted({c for c_list in cpus.values() for c in c_list})
        if not (system / "online").exists():
            system.mkdir(parents=True, exist_ok=True)
            (system / "online").write_text(",".join(map(str, every)) + "\n")
        for domain, members in cpus.items():
            for cpu in members:
                index = system / f"cpu{cpu}/cache/index{level}"
                index.mkdir(parents=True, exist_ok=True)
                for file, value in [("level", level), ("id", domain), ("type", "Unified"),
                                    ("shared_cpu_list", ",".join(map(str, members)))]:  # fmt: skip
                    (index / file).write_text(f"{value}\n")
        self._add_line(name, {d: f"{cbm_mask:0{width}x}" for d in cpus})
        return self

    def bandwidth(
        self, *, min_bandwidth: int = 10, granularity: int = 10, num_closids: int = 8,
        percent: bool = True,
    ) -> Self:  # fmt: skip
        """Memory-bandwidth allocation on the L3 domains, in percent like Intel's, or with
        `percent=False` like AMD's (min_bandwidth 0, granularity 1, up to 2048 eighths of GB/s).
        """
        if not percent:
            min_bandwidth, granularity = 0, 1
        for file, value in [("min_bandwidth", min_bandwidth), ("bandwidth_gran", granularity),
                            ("num_closids", num_closids), ("delay_linear", 1)]:  # fmt: skip
            self._put(f"info/MB/{file}", str(value))
        domains = parse_schemata(self._read("schemata")).get("L3", {0: ""})
        self._add_line("MB", {d: str(self._mb_max()) for d in domains})
        return self

    def _add_line(self, name: str, values: Mapping[int, str]) -> None:
        lines = parse_schemata(self._read("schemata"))
        lines[name] = dict(values)
        self._put("schemata", _render(lines).rstrip("\n"))

    def _mb_max(self) -> int:
        """The kernel's default (and largest) MB value: 100 percent, or AMD's 2048."""
        return 100 if int(self._read("info/MB/min_bandwidth")) else 2048

    # -- reading back (for tests) -----------------------------------------------------------

    def _read(self, relative: str) -> str:
        return (self.mount / relative).read_text()

    def groups(self) -> list[str]:
        """The control groups, by directory (not the default group)."""
        return sorted(
            e.name for e in self.mount.iterdir() if e.is_dir() and e.name not in NOT_GROUPS
        )

    def masks(self, group: str = "", cache: str = "L3") -> dict[int, int]:
        """A group's masks of `cache` by cache id ("" for the default group)."""
        values = parse_schemata(self._read(f"{group}/schemata" if group else "schemata"))
        return {d: int(v, 16) for d, v in values.get(cache, {}).items()}

    def bandwidths(self, group: str = "") -> dict[int, int]:
        values = parse_schemata(self._read(f"{group}/schemata" if group else "schemata"))
        return {d: int(v) for d, v in values.get("MB", {}).items()}

    def mode(self, group: str) -> str:
        return self._read(f"{group}/mode").strip()

    def tasks(self, group: str = "") -> list[int]:
        return [int(t) for t in self._read(f"{group}/tasks" if group else "tasks").split()]

    # -- what the kernel does ---------------------------------------------------------------

    def mkdir(self, path: Path) -> None:
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        if path.parent != self.mount or path.name in NOT_GROUPS:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        closids = min(
            int(self._read(f"info/{r}/num_closids"))
            for r in self._resources()
            if (self.mount / "info" / r / "num_closids").exists()
        )
        if len(self.groups()) + 1 >= closids:
            self._status("Out of CLOSIDs")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        lines: dict[str, dict[int, str]] = {}
        for name, values in parse_schemata(self._read("schemata")).items():
            if name == "MB":
                lines[name] = {d: str(self._mb_max()) for d in values}
                continue
            cbm, minimum, shareable = self._limits(name)
            lines[name] = {}
            for domain in values:
                used = shareable
                fresh = shareable
                for group in ["", *self.groups()]:
                    mask = self.masks(group, name).get(domain, 0)
                    used |= mask
                    if not group or self.mode(group) == "shareable":
                        fresh |= mask
                fresh |= cbm & ~used
                first = runs(fresh)[0] if fresh else (0, 0)
                mask = ((1 << first[1]) - 1) << first[0]  # the kernel makes it valid: one run
                if ways(mask) < minimum:
                    self._status(f"No space on {name}:{domain}")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                lines[name][domain] = self._hex(name, mask)
        path.mkdir()
        files = {"schemata": _render(lines), "tasks": "", "cpus": "0\n", "cpus_list": "\n",
                 "mode": "shareable\n"}  # fmt: skip
        for file, text in files.items():
            (path / file).write_text(text)
        if self.monitoring:
            (path / "mon_groups").mkdir()
            (path / "mon_data").mkdir()
        self._status("ok")

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if path == self.mount or path.parent != self.mount or path.name in NOT_GROUPS:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        moved = (path / "tasks").read_text().split()
        if moved:
            with (self.mount / "tasks").open("a") as out:
                out.write("".join(f"{t}\n" for t in moved))
        shutil.rmtree(path)

    def write(self, path: Path, text: str) -> None:
        group = "" if path.parent == self.mount else path.parent.name
        try:
            match path.name:
                case "schemata":
                    self._write_schemata(group, text)
                case "mode":
                    self._write_mode(group, text.strip())
                case "tasks":
                    self._write_task(group, text.strip())
                case _:
                    path.write_text(text)
        except _Refused as refused:
            self._status(str(refused))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path)) from None
        self._status("ok")

    def _status(self, text: str) -> None:
        self._put("info/last_cmd_status", text)

    def _resources(self) -> list[str]:
        return list(parse_schemata(self._read("schemata")))

    def _limits(self, cache: str) -> tuple[int, int, int]:
        info = f"info/{cache}"
        return (
            int(self._read(f"{info}/cbm_mask"), 16),
            int(self._read(f"{info}/min_cbm_bits")),
            int(self._read(f"{info}/shareable_bits"), 16),
        )

    def _hex(self, cache: str, mask: int) -> str:
        return f"{mask:0{(self._limits(cache)[0].bit_length() + 3) // 4}x}"

    def _others(self, group: str) -> list[str]:
        return [g for g in ["", *self.groups()] if g != group]

    def _exclusive(self, group: str) -> bool:
        return bool(group) and self.mode(group) in {"exclusive", "pseudo-locked"}

    def _write_schemata(self, group: str, text: str) -> None:
        schemata = self.mount / group / "schemata"
        lines = parse_schemata(schemata.read_text())
        changed: list[tuple[str, int, int]] = []
        for line in text.splitlines():
            name, _, rest = line.strip().partition(":")
            if not name:
                continue
            if name not in lines:
                raise _Refused(f"Unknown or unsupported resource name '{name}'")
            for item in filter(None, (i.strip() for i in rest.split(";"))):
                domain_text, _, value = item.partition("=")
                domain = int(domain_text)
                if domain not in lines[name]:
                    raise _Refused(f"Unknown domain {domain}")
                if name == "MB":
                    lines[name][domain] = str(self._bandwidth(int(value)))
                    continue
                mask = self._mask(name, value.strip())
                lines[name][domain] = self._hex(name, mask)
                changed.append((name, domain, mask))
        exclusive = self._exclusive(group)
        for name, domain, mask in changed:
            for other in self._others(group):
                if mask & self.masks(other, name).get(domain, 0):
                    if exclusive:
                        raise _Refused("Overlaps with other group")
                    if self._exclusive(other):
                        raise _Refused("Overlaps with exclusive group")
        schemata.write_text(_render(lines))

    def _mask(self, cache: str, text: str) -> int:
        cbm, minimum, _ = self._limits(cache)
        try:
            mask = int(text, 16)
        except ValueError:
            raise _Refused(f"Non-hex character in the mask {text}") from None
        if mask & ~cbm:
            raise _Refused(f"Mask out of range: 0x{mask:x} in {cache}")
        if not is_contiguous(mask):
            raise _Refused(f"The mask {mask:x} has non-consecutive 1-bits")
        if ways(mask) < minimum:
            raise _Refused(f"Need at least {minimum} bits in the mask")
        return mask

    def _bandwidth(self, value: int) -> int:
        minimum = int(self._read("info/MB/min_bandwidth"))
        granularity = int(self._read("info/MB/bandwidth_gran"))
        if not minimum <= value <= self._mb_max():
            raise _Refused(f"MB value {value} out of range [{minimum},{self._mb_max()}]")
        return -(-value // granularity) * granularity

    def _write_mode(self, group: str, mode: str) -> None:
        if not group:
            raise _Refused("Cannot change the default group's mode")
        if mode == "exclusive":
            for name in self._resources():
                if name == "MB":
                    continue
                for domain, mask in self.masks(group, name).items():
                    if any(mask & self.masks(o, name).get(domain, 0) for o in self._others(group)):
                        raise _Refused("Schemata overlaps")
        elif mode != "shareable":
            raise _Refused(f"Unknown or unsupported mode {mode!r}")
        (self.mount / group / "mode").write_text(mode + "\n")

    def _write_task(self, group: str, text: str) -> None:
        try:
            pid = int(text)
        except ValueError:
            raise _Refused(f"Invalid task id {text!r}") from None
        for other in self._others(group):
            tasks = self.mount / other / "tasks"
            tasks.write_text("".join(f"{t}\n" for t in tasks.read_text().split() if t != text))
        with (self.mount / group / "tasks").open("a") as out:
            out.write(f"{pid}\n")


def _render(lines: Mapping[str, Mapping[int, str]]) -> str:
    return "".join(
        f"{name}:" + ";".join(f"{d}={v}" for d, v in sorted(values.items())) + "\n"
        for name, values in lines.items()
    )
