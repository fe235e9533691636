"""Load reports: what an agent measures, from a fake /proc and /sys and from the kernel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from multikernel.services._load import LoadSampler, Reading, load_between, psi_some_total

pytestmark = pytest.mark.anyio
MiB = 1 << 20
AGENT = 40  # the agent's pid in the fake trees


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def fake_instance(
    root: Path,
    *,
    memcg: str = "/multikernel/host-1/web",
    cgroup2: str = "/",
    threads: dict[int, tuple[int, int]],
) -> None:
    """An agent (pid 40) in a memory cgroup at `memcg` and a v2 cgroup at `cgroup2`."""
    proc = root / "proc"
    (proc / str(AGENT)).mkdir(parents=True)
    (proc / str(AGENT) / "cgroup").write_text(
        f"4:memory:{memcg}\n3:cpuset:/multikernel/host-1/web\n1:cpu:/\n0::{cgroup2}\n"
    )
    group = root / "sys/fs/cgroup/memory" / memcg.lstrip("/")
    group.mkdir(parents=True)
    (group / "tasks").write_text("".join(f"{tid}\n" for tid in threads))
    (group / "memory.usage_in_bytes").write_text(f"{96 * MiB}\n")
    set_threads(root, threads)


def set_threads(root: Path, threads: dict[int, tuple[int, int]]) -> None:
    for tid, (ran, waited) in threads.items():
        (root / "proc" / str(tid)).mkdir(parents=True, exist_ok=True)
        (root / "proc" / str(tid) / "schedstat").write_text(f"{ran} {waited} 7\n")


def test_cpu_time_and_waits_come_from_each_threads_schedstat_and_memory_from_its_cgroup(
    tmp_path: Path,
) -> None:
    fake_instance(tmp_path, threads={40: (0, 0), 41: (10**9, 0)})
    clock = Clock()
    sampler = LoadSampler("web", AGENT, root=tmp_path, clock=clock)
    assert sampler.report(3, 0, tx=5, cpus=2, memory=256 * MiB) is None  # nothing to compare
    set_threads(tmp_path, {40: (5 * 10**8, 2 * 10**8), 41: (2 * 10**9, 10**9)})
    clock.now += 2 * 10**9  # two seconds later
    report = sampler.report(3, 0, tx=5, cpus=2, memory=256 * MiB)
    assert report is not None
    assert (report.instance, report.tx, report.cpus, report.period) == (3, 5, 2, 2.0)
    assert report.cpu_busy == pytest.approx(0.75)  # 1.5 s of CPU in 2 s
    assert report.cpu_waiting == pytest.approx(0.6)  # 1.2 s waited in 2 s
    assert (report.memory, report.memory_used) == (256 * MiB, 96 * MiB)
    assert (report.cpu_pressure, report.memory_pressure) == (None, None)
    assert report.sources == ("schedstat", "memcg")


def test_psi_is_read_from_the_instances_own_cgroup_v2_directory(tmp_path: Path) -> None:
    fake_instance(tmp_path, cgroup2="/multikernel/host-1/web", threads={40: (0, 0)})
    own = tmp_path / "sys/fs/cgroup/unified/multikernel/host-1/web"
    own.mkdir(parents=True)
    (own / "cgroup.procs").write_text("40\n")

    def pressure(cpu_us: int, memory_us: int) -> None:
        for name, total in (("cpu", cpu_us), ("memory", memory_us)):
            (own / f"{name}.pressure").write_text(
                f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            )

    pressure(1_000, 0)
    clock = Clock()
    sampler = LoadSampler("web", AGENT, root=tmp_path, clock=clock)
    sampler.report(3, 0, tx=1, cpus=1, memory=128 * MiB)
    pressure(1_000 + 500_000, 100_000)  # 0.5 s and 0.1 s stalled
    clock.now += 2 * 10**9
    report = sampler.report(3, 1, tx=1, cpus=1, memory=128 * MiB)
    assert report is not None
    assert (report.cpu_pressure, report.memory_pressure) == (0.25, 0.05)
    assert report.sources == ("schedstat", "memcg", "psi")


def test_cgroups_inherited_from_the_host_are_not_taken_for_the_instances(tmp_path: Path) -> None:
    """The host's memory cgroup and the machine's /proc/pressure would measure the whole host:
    without cgroups of its own the instance is its process tree and has no PSI."""
    fake_instance(tmp_path, memcg="/process_api/04e1", threads={})
    (tmp_path / "proc/pressure").mkdir()
    (tmp_path / "proc/pressure/cpu").write_text("some avg10=9.00 avg60=0 avg300=0 total=99\n")
    tree = {AGENT: [41], 41: []}
    for pid, children in tree.items():
        task = tmp_path / "proc" / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "children").write_text(" ".join(map(str, children)))
        (tmp_path / "proc" / str(pid) / "statm").write_text("1000 256 0 0 0 0 0\n")
    set_threads(tmp_path, {AGENT: (0, 0), 41: (3 * 10**8, 0)})
    sampler = LoadSampler("web", AGENT, root=tmp_path)
    reading = sampler.read()
    assert set(reading.threads) == {AGENT, 41}
    assert reading.memory_used == 2 * 256 * os.sysconf("SC_PAGE_SIZE")  # resident pages
    assert reading.cpu_stall_us is None
    assert sampler.sources == ("schedstat", "rss")


def test_a_platform_may_name_the_instances_own_pressure_files(tmp_path: Path) -> None:
    """On a multikernel machine /proc/pressure is the instance's own kernel's ($MULTIKERNEL_PSI)."""
    fake_instance(tmp_path, threads={40: (0, 0)})
    pressure = tmp_path / "proc/pressure"
    pressure.mkdir()
    (pressure / "cpu").write_text("some avg10=1.00 avg60=0 avg300=0 total=4468127290\n")
    (pressure / "memory").write_text("full avg10=0 avg60=0 avg300=0 total=5\n")  # no "some"
    reading = LoadSampler("web", AGENT, root=tmp_path, psi=pressure).read()
    assert (reading.cpu_stall_us, reading.memory_stall_us) == (4468127290, None)


def test_a_period_without_psi_has_none_and_pressure_is_a_share_of_at_most_one() -> None:
    first = Reading(0, {1: (0, 0)}, cpu_stall_us=0)
    later = Reading(10**9, {1: (10**9, 3 * 10**9), 2: (10**8, 0)}, cpu_stall_us=2 * 10**6)
    report = load_between(first, later, 1, 0, tx=1, cpus=1, memory=0)
    assert report.cpu_busy == pytest.approx(1.1)  # a thread new in the period counts whole
    assert report.cpu_waiting == pytest.approx(3.0)  # three threads' worth of waiting
    assert (report.cpu_pressure, report.memory_pressure) == (1.0, None)


def test_psi_files_without_a_some_total_read_as_none() -> None:
    assert psi_some_total("some avg10=0.00 avg60=0.00 avg300=0.00 total=17\n") == 17
    assert psi_some_total("some avg10=0.00 total=x\n") is None
    assert psi_some_total(None) is None


SPINNERS = """
import os, sys, time
cpu = int(sys.argv[1])
start_r, start_w = os.pipe()
hold_r, hold_w = os.pipe()
for _ in range(2):
    if os.fork() == 0:
        os.sched_setaffinity(0, {cpu})
        os.close(start_w)
        os.close(hold_w)
        os.read(start_r, 1)
        began = time.process_time()
        while time.process_time() - began < 0.1:
            pass
        os.write(1, b"done\\n")
        os.read(hold_r, 1)
        os._exit(0)
print("ready", flush=True)
sys.stdin.readline()
os.close(start_w)
sys.stdin.readline()
os.close(hold_w)
os.wait(); os.wait()
"""


async def test_two_processes_on_one_cpu_show_their_run_time_and_their_wait() -> None:
    """Real counters: two processes spinning 0.1 s of CPU each on one CPU ran at least 0.2 s
    between them, and one waited while the other ran."""
    cpu = min(os.sched_getaffinity(0))
    async with await anyio.open_process([sys.executable, "-c", SPINNERS, str(cpu)]) as parent:
        assert parent.stdin is not None
        assert parent.stdout is not None
        lines = parent.stdout
        buffer = b""

        async def line() -> bytes:
            nonlocal buffer
            while b"\n" not in buffer:
                buffer += await lines.receive()
            first, buffer = buffer.split(b"\n", 1)
            return first

        with anyio.fail_after(30):
            assert await line() == b"ready"
            sampler = LoadSampler("spinners", parent.pid)
            before = sampler.read()
            await parent.stdin.send(b"go\n")
            assert [await line(), await line()] == [b"done", b"done"]
            after = sampler.read()
            await parent.stdin.send(b"end\n")
            await parent.wait()
    spinners = set(after.threads) - {parent.pid}
    assert len(spinners) == 2
    ran = sum(after.threads[t][0] - before.threads.get(t, (0, 0))[0] for t in spinners)
    waited = sum(after.threads[t][1] - before.threads.get(t, (0, 0))[1] for t in spinners)
    assert ran >= 2 * 10**8
    assert waited > 0
