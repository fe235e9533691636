"""The local platform: isolation applied and read back, live updates, kill, reclaim, degraded paths.

The agent is a small Python program (`AGENT`) that prints what it sees from inside (pid, hostname,
affinity, cgroups, memory limit, visible pids) as one JSON line, and can start a grandchild that
ignores SIGTERM and reports the same. Every test is time-bound and checks, besides the suite's
fd / process / shm leak checker, that no cgroup of ours is left behind.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from multikernel.services import _local
from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import MIN_MEMORY, online_cpus
from multikernel.services._local_process import LocalInstance
from multikernel.services._platform import (
    InvalidSpecError,
    LaunchError,
    LaunchSpec,
    PlatformError,
    Resources,
)
from multikernel.services._resctrl import ResctrlFs, probe_resctrl
from tests._run import CGROUP_GROUP, cgroups_under

pytestmark = pytest.mark.anyio

CPUS = sorted(online_cpus())
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="namespaces and cgroups need root")
MEMORY = 128 * 2**20
PREFIX = f"t{os.getpid()}-"
_names = itertools.count()

AGENT = r"""
import json, os, signal, socket, subprocess, sys, time

def report(role):
    groups = dict(line.split(":", 2)[1:] for line in open("/proc/self/cgroup").read().splitlines())
    limit = None
    if groups.get("memory", "/") != "/":
        path = "/sys/fs/cgroup/memory" + groups["memory"] + "/memory.limit_in_bytes"
        limit = int(open(path).read())
    return {
        "role": role, "pid": os.getpid(), "hostname": socket.gethostname(),
        "affinity": sorted(os.sched_getaffinity(0)), "cpuset": groups.get("cpuset"),
        "memory": groups.get("memory"), "memory_limit": limit,
        "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    }

role, modes = sys.argv[1], sys.argv[2:]
if role == "grandchild":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "usr1" in modes:
    signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"usr1\n"))
for mode in modes:
    if mode.startswith("fd="):
        os.write(int(mode[3:]), b"hello over the channel fd")
if role == "agent" and ("spawn" in modes or "orphan" in modes):
    code = sys.orig_argv[sys.orig_argv.index("-c") + 1]
    subprocess.Popen([sys.executable, "-c", code, "grandchild"])
    if "orphan" in modes:
        sys.exit(3)
print(json.dumps(report(role)), flush=True)
if "exit" in modes:
    sys.exit(7)
while True:
    time.sleep(3600)
"""


def our_cgroups() -> set[Path]:
    """Instance cgroups of this test session (named with PREFIX) in this run's group."""
    return {d for d in cgroups_under(CGROUP_GROUP) if d.name.startswith(PREFIX)}


@pytest.fixture(autouse=True)
def no_cgroup_left() -> Iterator[None]:
    """Fail a test that leaves an instance cgroup of ours behind."""
    before = our_cgroups()
    yield
    left = our_cgroups() - before
    for d in left:  # clean up so that one failure does not cascade
        d.rmdir()
    assert not left, f"cgroups left behind: {sorted(map(str, left))}"


class Output:
    """The agent's stdout: a pipe read line by line, without blocking the event loop."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._buffer = b""

    def after_launch(self) -> None:
        os.close(self.write_fd)  # the instance holds its own copy
        self.write_fd = -1

    async def line(self) -> str:
        while b"\n" not in self._buffer:
            await anyio.wait_readable(self.read_fd)
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise EOFError(f"the instance closed its stdout; got {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def report(self, role: str) -> dict[str, Any]:
        while True:
            report: dict[str, Any] = json.loads(await self.line())
            if report["role"] == role:
                return report

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def output() -> Iterator[Output]:
    out = Output()
    yield out
    out.close()


@pytest.fixture
def platform() -> LocalPlatform:
    return LocalPlatform(group=CGROUP_GROUP)


def make_spec(
    out: Output | None,
    *modes: str,
    cpus: set[int] | None = None,
    memory: int = MEMORY,
    pass_fds: tuple[int, ...] = (),
    hostname: str | None = None,
    argv: list[str] | None = None,
) -> LaunchSpec:
    return LaunchSpec(
        name=f"{PREFIX}{next(_names)}",
        instance_id=1,
        argv=argv or [sys.executable, "-I", "-c", AGENT, "agent", *modes],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        pass_fds=pass_fds,
        resources=Resources(frozenset(cpus if cpus is not None else {CPUS[-1]}), memory),
        hostname=hostname,
        stdout=out.write_fd if out else None,
    )


async def launch(platform: LocalPlatform, out: Output, *modes: str, **kw: Any) -> LocalInstance:
    instance = await platform.launch(make_spec(out, *modes, **kw))
    out.after_launch()
    return instance


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def gone(pidfds: list[int]) -> bool:
    """True when every process behind `pidfds` has ended (pidfds poll readable)."""
    return len(select.select(pidfds, [], [], 0)[0]) == len(pidfds)


# --- isolation applied ----------------------------------------------------------------------


@needs_root
def test_capabilities_as_root_apply_everything() -> None:
    capabilities = LocalPlatform(group=CGROUP_GROUP).capabilities()
    assert capabilities.isolated
    # Cache partitioning needs hardware: a machine without it gets the one sentence that says so.
    missing = probe_resctrl(ResctrlFs())
    assert capabilities.warnings == (() if capabilities.cache else (missing,))


@needs_root
async def test_agent_is_pid_1_with_its_hostname_cpus_and_memory_limit(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, cpus={CPUS[0]}) as instance:
            inside = await output.report("agent")
            report = platform.inspect(instance)
    assert inside["pid"] == 1
    assert inside["visible_pids"] == [1]  # its own /proc
    assert inside["hostname"] == instance.name
    assert inside["affinity"] == [CPUS[0]]
    assert inside["cpuset"] == f"/{CGROUP_GROUP}/{instance.name}"  # this run's group only
    assert inside["memory"].endswith(f"/{CGROUP_GROUP}/{instance.name}")
    assert inside["memory_limit"] == MEMORY
    assert report.namespace_pid == 1
    assert report.pid == instance.pid != 1
    assert report.own_pid_namespace
    assert report.own_uts_namespace
    assert report.own_mount_namespace
    assert report.affinity == report.cpuset_cpus == frozenset({CPUS[0]})
    assert report.memory_limit == MEMORY
    assert report.cgroups["cpuset"] == inside["cpuset"]
    assert report.processes == (instance.pid,)


@needs_root
async def test_hostname_can_differ_from_the_name(platform: LocalPlatform, output: Output) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, hostname="custom.host") as _:
            assert (await output.report("agent"))["hostname"] == "custom.host"


@needs_root
async def test_grandchildren_inherit_namespaces_cgroups_and_affinity(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, "spawn") as instance:
            agent = await output.report("agent")
            grandchild = await output.report("grandchild")
            report = platform.inspect(instance)
    assert grandchild["pid"] > 1
    assert grandchild["visible_pids"] == [1, grandchild["pid"]]
    for key in ("hostname", "affinity", "cpuset", "memory", "memory_limit"):
        assert grandchild[key] == agent[key], key
    assert len(report.processes) == 2


async def test_channel_fds_are_inherited_under_the_same_number(platform: LocalPlatform) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs, anyio.fail_after(10):
        spec = make_spec(None, f"fd={theirs.fileno()}", "exit", pass_fds=(theirs.fileno(),))
        async with await platform.launch(spec) as instance:
            assert await platform.wait(instance) == 7
        assert ours.recv(100) == b"hello over the channel fd"


# --- live update ----------------------------------------------------------------------------


@needs_root
@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
async def test_update_changes_cpus_and_memory_of_every_process_live(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, "spawn", cpus={CPUS[0]}) as instance:
            await output.report("grandchild")
            new = Resources(frozenset(CPUS[:2]), 2 * MEMORY)
            await platform.update(instance, new)
            report = platform.inspect(instance)
            assert report.cpuset_cpus == report.affinity == new.cpus
            assert report.memory_limit == new.memory
            for pid in report.processes:
                assert os.sched_getaffinity(pid) == new.cpus
            await platform.update(instance, Resources(frozenset({CPUS[1]}), MEMORY))
            report = platform.inspect(instance)
            assert report.cpuset_cpus == frozenset({CPUS[1]})
            assert report.memory_limit == MEMORY
            for pid in report.processes:
                assert os.sched_getaffinity(pid) == {CPUS[1]}
            assert instance.resources == Resources(frozenset({CPUS[1]}), MEMORY)


# --- kill, wait, reclaim --------------------------------------------------------------------


async def _kill_whole_tree(platform: LocalPlatform, output: Output) -> None:
    with anyio.fail_after(10):
        instance = await launch(platform, output, "spawn")
        await output.report("grandchild")
        pids = platform.inspect(instance).processes
        assert len(pids) == 2
        pidfds = [os.pidfd_open(pid) for pid in pids]
        try:
            await platform.kill(instance)
            assert gone(pidfds)
            assert instance.returncode == -signal.SIGKILL
        finally:
            for fd in pidfds:
                os.close(fd)
        await platform.reclaim(instance)


@needs_root
async def test_kill_ends_every_process_even_one_ignoring_sigterm(
    platform: LocalPlatform, output: Output
) -> None:
    await _kill_whole_tree(platform, output)


async def test_kill_without_isolation_stops_and_kills_the_tree(output: Output) -> None:
    await _kill_whole_tree(LocalPlatform(isolate=False, group=CGROUP_GROUP), output)


@needs_root
async def test_kill_without_pid_namespace_kills_through_the_cgroups(output: Output) -> None:
    await _kill_whole_tree(LocalPlatform(namespaces=False, group=CGROUP_GROUP), output)


@needs_root
async def test_reclaim_removes_every_cgroup_and_is_idempotent(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        instance = await launch(platform, output)
        await output.report("agent")
        assert our_cgroups() >= {instance.cgroups.cpuset, instance.cgroups.memory}  # type: ignore[union-attr]
        await platform.reclaim(instance)
        assert not our_cgroups()
        await platform.reclaim(instance)
        await instance.aclose()
        assert await platform.wait(instance) == -signal.SIGKILL
        with pytest.raises(anyio.ClosedResourceError):
            platform.inspect(instance)


@needs_root
async def test_sigkill_of_the_agent_from_outside_is_seen_at_once(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        instance = await launch(platform, output, "spawn")
        await output.report("grandchild")
        pids = platform.inspect(instance).processes
        os.kill(instance.pid, signal.SIGKILL)
        # Seen through the agent's pidfd, not by polling: how fast is bench_platform.py's
        # figure (a timed assertion here would only flake on a loaded machine).
        assert await platform.wait(instance) == -signal.SIGKILL
        assert not any(alive(pid) for pid in pids)
        await platform.reclaim(instance)


@needs_root
async def test_sigkill_of_the_keeper_ends_the_instance_and_reclaim_cleans_up(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        instance = await launch(platform, output, "spawn")
        await output.report("grandchild")
        os.kill(instance.keeper.pid, signal.SIGKILL)
        assert await platform.wait(instance) == -signal.SIGKILL
        await platform.reclaim(instance)
        with pytest.raises(EOFError):  # every writer of the pipe is gone
            await output.line()


@needs_root
async def test_reclaim_kills_what_outlived_an_agent_without_pid_namespace(output: Output) -> None:
    platform = LocalPlatform(namespaces=False, group=CGROUP_GROUP)
    with anyio.fail_after(10):
        instance = await launch(platform, output, "orphan")
        grandchild = await output.report("grandchild")
        assert await platform.wait(instance) == 3
        pidfd = os.pidfd_open(grandchild["pid"])
        try:
            await platform.reclaim(instance)
            assert gone([pidfd])
        finally:
            os.close(pidfd)


async def test_exit_status_is_the_agents(platform: LocalPlatform, output: Output) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, "exit") as instance:
            assert await platform.wait(instance) == 7
            assert await platform.wait(instance) == 7


async def test_concurrent_waits_all_see_the_end(platform: LocalPlatform, output: Output) -> None:
    results: list[int] = []

    async def waiter(instance: LocalInstance) -> None:
        results.append(await platform.wait(instance))

    with anyio.fail_after(10):
        async with await launch(platform, output) as instance:
            await output.report("agent")
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(waiter, instance)
                await anyio.wait_all_tasks_blocked()
                await platform.kill(instance)
    assert results == [-signal.SIGKILL] * 3


async def test_signal_reaches_an_agent_that_handles_it(
    platform: LocalPlatform, output: Output
) -> None:
    with anyio.fail_after(10):
        async with await launch(platform, output, "usr1") as instance:
            await output.report("agent")
            platform.signal(instance, signal.SIGUSR1)
            assert await output.line() == "usr1"


# --- degraded paths -------------------------------------------------------------------------


async def test_isolate_false_launches_with_affinity_only_and_warns(
    output: Output, caplog: pytest.LogCaptureFixture
) -> None:
    platform = LocalPlatform(isolate=False, group=CGROUP_GROUP)
    capabilities = platform.capabilities()
    assert (capabilities.namespaces, capabilities.cpuset, capabilities.memory_limit) == (
        False,
        False,
        False,
    )
    assert capabilities.affinity
    assert any("isolation is off" in warning for warning in capabilities.warnings)
    with caplog.at_level(logging.WARNING, "multikernel.services.local"), anyio.fail_after(10):
        async with await launch(platform, output, cpus={CPUS[0]}) as instance:
            inside = await output.report("agent")
            report = platform.inspect(instance)
    assert any("isolation is off" in record.getMessage() for record in caplog.records)
    assert inside["pid"] == instance.pid == report.namespace_pid
    assert inside["hostname"] == socket.gethostname()
    assert inside["affinity"] == [CPUS[0]]
    assert report.affinity == {CPUS[0]}
    assert not report.own_pid_namespace
    assert not report.own_uts_namespace
    assert report.cpuset_cpus is None
    assert report.memory_limit is None


async def test_without_root_capabilities_say_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, output: Output
) -> None:
    import multikernel.services._local_probe as probe

    monkeypatch.setattr(probe, "_has_cap_sys_admin", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    platform = LocalPlatform(group=CGROUP_GROUP)
    monkeypatch.undo()
    capabilities = platform.capabilities()
    assert not capabilities.namespaces
    assert not capabilities.cpuset
    assert not capabilities.memory_limit
    assert capabilities.affinity
    text = " ".join(capabilities.warnings)
    assert "not running as root" in text
    assert "memory is not limited" in text
    with anyio.fail_after(10):
        async with await launch(platform, output) as instance:
            assert (await output.report("agent"))["affinity"] == [CPUS[-1]]
            await platform.update(instance, Resources(frozenset({CPUS[0]}), MEMORY))
            assert platform.inspect(instance).affinity == {CPUS[0]}


# --- bad specs and failed launches ----------------------------------------------------------


async def test_bad_specs_are_refused_before_anything_starts(platform: LocalPlatform) -> None:
    with pytest.raises(InvalidSpecError, match="not an online CPU"):
        await platform.launch(make_spec(None, cpus={max(CPUS) + 1}))
    with pytest.raises(InvalidSpecError, match="below the floor"):
        await platform.launch(make_spec(None, memory=MIN_MEMORY - 1))
    with pytest.raises(InvalidSpecError, match="more than this host has"):
        await platform.launch(make_spec(None, memory=2**60))
    with pytest.raises(InvalidSpecError, match="bad instance name"):
        LaunchSpec("Bad_Name", 1, ["true"], {}, (), Resources(frozenset({0}), MEMORY))
    with pytest.raises(InvalidSpecError, match="at least one CPU"):
        Resources(frozenset(), MEMORY)
    with pytest.raises(InvalidSpecError, match="pass_fds"):
        LaunchSpec("ok", 1, ["true"], {}, (1,), Resources(frozenset({0}), MEMORY))
    with pytest.raises(InvalidSpecError, match="bad hostname"):
        LaunchSpec("ok", 1, ["true"], {}, (), Resources(frozenset({0}), MEMORY), hostname="a b")


async def test_an_agent_that_cannot_be_executed_is_a_launch_error(
    platform: LocalPlatform,
) -> None:
    with anyio.fail_after(10), pytest.raises(LaunchError, match="exec '/nonexistent/agent'"):
        await platform.launch(make_spec(None, argv=["/nonexistent/agent"]))


async def test_a_name_can_run_once(platform: LocalPlatform, output: Output) -> None:
    with anyio.fail_after(10):
        spec = make_spec(output)
        async with await platform.launch(spec):
            with pytest.raises(LaunchError, match="already running"):
                await platform.launch(spec)


async def test_update_of_an_ended_instance_is_an_error(platform: LocalPlatform) -> None:
    with anyio.fail_after(10):
        async with await platform.launch(make_spec(None, argv=["/bin/true"])) as instance:
            await platform.wait(instance)
            with pytest.raises(PlatformError, match="has ended"):
                await platform.update(instance, instance.resources)
            with pytest.raises(PlatformError, match="has ended"):
                platform.inspect(instance)


@pytest.mark.parametrize(
    "when", ["before the keeper reports", "once it reports the agent's pid", "once the agent runs"]
)
async def test_a_cancelled_launch_leaves_nothing_behind(
    platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Cancelled at each point launch can be cancelled at, decided by what the keeper has said
    (not by a delay): the keeper, the agent and the cgroups go, and the name is free again."""
    scope = anyio.CancelScope()
    read_report = _local.read_to_eof

    async def read_then_cancel(fd: int) -> bytes:
        if when == "once it reports the agent's pid":
            await anyio.wait_readable(fd)  # its first line: the agent's process exists
        if when != "once the agent runs":
            scope.cancel()
        report = await read_report(fd)
        scope.cancel()  # the report is complete: the agent has exec'd
        await anyio.lowlevel.checkpoint()
        return report

    monkeypatch.setattr(_local, "read_to_eof", read_then_cancel)
    spec = make_spec(None)
    with anyio.fail_after(10):
        with scope:
            await platform.launch(spec)
        assert scope.cancelled_caught
        monkeypatch.undo()
        async with await platform.launch(spec):  # the cancelled launch freed its name
            pass
