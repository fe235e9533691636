"""Measuring an instance's load from inside it: CPU time, CPU waits, memory, pressure.

`LoadSampler` reads counters, `report()` turns two readings into a `LoadReport` of the period
between them. What it reads, where the kernel has it (`root` is `/`, or a fake tree in tests):

- **CPU run and wait time per thread**, from `/proc/<tid>/schedstat` (CONFIG_SCHED_INFO: the
  nanoseconds a thread ran and the nanoseconds it was runnable but waited on a run queue). The
  sums over the instance's threads, divided by the period, are `cpu_busy` (CPUs' worth of
  running) and `cpu_waiting` (threads' worth of waiting). This works for one process tree on
  any kernel, with or without cgroups. Its threads are those listed in its own memory cgroup
  (`tasks`), else the process tree under its agent (in a PID namespace, that is all of them: an
  orphan is re-parented to the agent, PID 1). A thread that ended during the period takes its
  last partial period with it.
- **Memory used**: its own memory cgroup's `memory.usage_in_bytes` (cgroup v1) or
  `memory.current` (v2); without one, the resident size of its processes.
- **Pressure (PSI)**, the share of the period in which at least one task was stalled ("some"),
  for CPU and memory, from pressure files that are the instance's own: a directory named by
  `$MULTIKERNEL_PSI` (a platform that knows: on a multikernel machine `/proc/pressure` is the
  instance's own kernel's), else the instance's own cgroup v2 directory (`cpu.pressure`,
  `memory.pressure`). `/proc/pressure` of a shared kernel is the whole machine's and is never
  taken for the instance's: then the report has no pressure (None), and the rebalancer uses
  `cpu_waiting`.

A cgroup is the instance's own when its directory is named after the instance (the local
platform names each instance's cgroups so); one inherited from the host would measure the host.
Not read: `cpuacct.usage` and `cpu.stat` throttling (cgroup v1's `cpu`, `cpuacct`): an instance
has no such cgroup of its own (a grant is whole CPUs, a cpuset, never a CFS quota, so it is never
throttled), and schedstat gives the waits that cpuacct cannot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from multikernel.protocol import LoadReport

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Reading:
    """Counters at one moment: per-thread (run ns, wait ns), memory used, PSI totals (µs)."""

    at_ns: int
    threads: dict[int, tuple[int, int]] = field(default_factory=dict)
    memory_used: int = 0
    cpu_stall_us: int | None = None
    memory_stall_us: int | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def psi_some_total(text: str | None) -> int | None:
    """The "some" line's `total=` (µs) of a PSI file, None if there is none."""
    for line in (text or "").splitlines():
        if line.startswith("some "):
            for part in line.split():
                if part.startswith("total="):
                    value = part[6:]
                    return int(value) if value.isdigit() else None
    return None


class LoadSampler:
    """Reads the load of the instance whose agent is `pid` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        pid: int,
        *,
        root: Path = Path("/"),
        psi: Path | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.name = name
        self.pid = pid
        self.proc = root / "proc"
        self.clock = clock
        self._memcg, self._cgroup2 = self._own_cgroups(root)
        self._psi = self._pressure_files(psi)
        self._last: Reading | None = None

    # -- where to read ---------------------------------------------------------------------

    def _own_cgroups(self, root: Path) -> tuple[Path | None, Path | None]:
        """The instance's own memory cgroup (v1) and cgroup v2 directory, if it has them."""
        memcg = cgroup2 = None
        for line in (_read(self.proc / str(self.pid) / "cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3 or Path(parts[2]).name != self.name:
                continue  # not the instance's own (the host's, inherited)
            relative = parts[2].lstrip("/")
            if "memory" in parts[1].split(","):
                memcg = root / "sys/fs/cgroup/memory" / relative
            elif parts[0] == "0" and not parts[1]:
                for mount in ("sys/fs/cgroup/unified", "sys/fs/cgroup"):
                    if (root / mount / relative / "cgroup.procs").exists():
                        cgroup2 = root / mount / relative
                        break
        return memcg, cgroup2

    def _pressure_files(self, psi: Path | None) -> tuple[Path, Path] | None:
        if psi is not None:
            if (psi / "cpu.pressure").exists():
                return psi / "cpu.pressure", psi / "memory.pressure"
            return psi / "cpu", psi / "memory"  # /proc/pressure's names
        if self._cgroup2 is not None and (self._cgroup2 / "cpu.pressure").exists():
            return self._cgroup2 / "cpu.pressure", self._cgroup2 / "memory.pressure"
        return None

    @property
    def sources(self) -> tuple[str, ...]:
        """Where the numbers come from, as the report says."""
        memory = "memcg" if self._memcg is not None else "rss"
        return ("schedstat", memory) + (("psi",) if self._psi is not None else ())

    # -- reading ---------------------------------------------------------------------------

    def _tids(self) -> Iterable[int]:
        if self._memcg is not None:
            text = _read(self._memcg / "tasks")
            if text is not None:
                return [int(t) for t in text.split() if t.isdigit()]
        tids: list[int] = []
        for pid in self._tree():
            try:
                tids.extend(int(t) for t in os.listdir(self.proc / str(pid) / "task"))
            except (FileNotFoundError, ValueError):
                continue
        return tids

    def _tree(self) -> list[int]:
        """The agent and its descendants (from each thread's `children`)."""
        pids, seen = [self.pid], {self.pid}
        for pid in pids:
            try:
                tasks = os.listdir(self.proc / str(pid) / "task")
            except FileNotFoundError:
                continue
            for tid in tasks:
                text = _read(self.proc / str(pid) / "task" / tid / "children") or ""
                for child in map(int, text.split()):
                    if child not in seen:
                        seen.add(child)
                        pids.append(child)
        return pids

    def _memory_used(self) -> int:
        if self._memcg is not None:
            text = _read(self._memcg / "memory.usage_in_bytes")
            if text is not None and text.strip().isdigit():
                return int(text)
        if self._cgroup2 is not None:
            text = _read(self._cgroup2 / "memory.current")
            if text is not None and text.strip().isdigit():
                return int(text)
        total = 0
        for pid in self._tree():
            fields = (_read(self.proc / str(pid) / "statm") or "").split()
            if len(fields) > 1 and fields[1].isdigit():
                total += int(fields[1]) * PAGE_SIZE
        return total

    def read(self) -> Reading:
        """The counters now."""
        threads: dict[int, tuple[int, int]] = {}
        for tid in self._tids():
            fields = (_read(self.proc / str(tid) / "schedstat") or "").split()
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                threads[tid] = (int(fields[0]), int(fields[1]))
        cpu = memory = None
        if self._psi is not None:
            cpu = psi_some_total(_read(self._psi[0]))
            memory = psi_some_total(_read(self._psi[1]))
        return Reading(self.clock(), threads, self._memory_used(), cpu, memory)

    def report(
        self, instance: int, seq: int, *, tx: int, cpus: int, memory: int
    ) -> LoadReport | None:
        """The load since the last call (None the first time: nothing to compare with)."""
        now, last = self.read(), self._last
        self._last = now
        if last is None or now.at_ns <= last.at_ns:
            return None
        return load_between(last, now, instance, seq, tx=tx, cpus=cpus, memory=memory,
                            sources=self.sources)  # fmt: skip


def load_between(
    last: Reading,
    now: Reading,
    instance: int,
    seq: int,
    *,
    tx: int,
    cpus: int,
    memory: int,
    sources: tuple[str, ...] = (),
) -> LoadReport:
    """The report of the period from `last` to `now` (see `LoadReport` for the fields)."""
    period_ns = now.at_ns - last.at_ns
    run = wait = 0
    for tid, (ran, waited) in now.threads.items():
        before_run, before_wait = last.threads.get(tid, (0, 0))
        run += max(0, ran - before_run)
        wait += max(0, waited - before_wait)

    def share(after: int | None, before: int | None) -> float | None:
        if after is None or before is None:
            return None
        return min(1.0, max(0.0, (after - before) * 1000 / period_ns))

    return LoadReport(
        instance=instance, seq=seq, period=period_ns / 1e9, tx=tx, cpus=cpus,
        cpu_busy=run / period_ns, cpu_waiting=wait / period_ns,
        cpu_pressure=share(now.cpu_stall_us, last.cpu_stall_us), memory=memory,
        memory_used=now.memory_used,
        memory_pressure=share(now.memory_stall_us, last.memory_stall_us), sources=sources,
    )  # fmt: skip
