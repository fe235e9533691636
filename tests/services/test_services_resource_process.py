"""The resource actor is a process of its own: the host starts, restarts and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CpuSpec,
    Grant,
    GrantList,
    GrantRequest,
    GrantsQuery,
    NameOwnerChanged,
)
from multikernel.services._actors import ActorProcess, ActorStartError
from multikernel.services._host import HostConfig, run_host
from multikernel.services._local_process import read_to_eof
from multikernel.services.testing import FakeSysfs

pytestmark = pytest.mark.anyio
BLOCK = 128 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def fake_machine(root: Path) -> Path:
    return FakeSysfs(root).cpus(4).memory(2 << 30, block_size=BLOCK).root


@dataclass
class Running:
    config: HostConfig
    bus: Endpoint


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Running]:
    config = HostConfig(
        tmp_path / "bus.sock", tmp_path / "state", sysfs_root=fake_machine(tmp_path / "machine")
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        async with connect(config.socket, name="test") as bus:
            yield Running(config, bus)
        stop.set()


async def owner_pid(bus: Endpoint, name: str) -> int:
    snapshot = await bus.introspect()
    (owner,) = snapshot.names[name][:1]
    return next(e.pid for e in snapshot.endpoints if e.endpoint_id == owner)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_resource_actor_runs_in_its_own_process(host: Running) -> None:
    pid = await owner_pid(host.bus, "resource")
    assert pid != os.getpid()
    assert (await anyio.Path(f"/proc/{pid}/cmdline").read_bytes()).split(b"\0")[:3] == [
        sys.executable.encode(),
        b"-m",
        b"multikernel.services.resource",
    ]


async def test_a_killed_resource_actor_is_restarted_and_forgets_nothing(host: Running) -> None:
    request = GrantRequest("web", 1, cpus=CpuSpec(count=2), memory=BLOCK)
    grant = await host.bus.request("resource", "allocate", request, response=Grant)
    pid = await owner_pid(host.bus, "resource")
    async with await host.bus.subscribe("mk.bus.names.resource") as changes:
        os.kill(pid, signal.SIGKILL)
        while True:  # the hub says when the name has an owner again: the restarted actor
            change = msgspec.msgpack.decode((await changes.receive()).data, type=NameOwnerChanged)
            if change.new_owner:
                break
    assert await owner_pid(host.bus, "resource") != pid
    grants = await host.bus.request("resource", "grants", GrantsQuery(), response=GrantList)
    assert grants.grants == (grant,)
    with pytest.raises(Exception, match="'web' already holds a grant"):
        await host.bus.request("resource", "allocate", request, response=Grant)


async def test_stopping_the_host_stops_the_resource_actor(tmp_path: Path) -> None:
    config = HostConfig(
        tmp_path / "bus.sock", tmp_path / "state", sysfs_root=fake_machine(tmp_path / "machine")
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        async with connect(config.socket, name="test") as bus:
            pid = await owner_pid(bus, "resource")
        stop.set()
    assert not alive(pid)  # and reaped: the suite's fixture fails a test that leaves a child


async def test_a_host_that_is_killed_leaves_no_resource_actor_behind(tmp_path: Path) -> None:
    machine = fake_machine(tmp_path / "machine")
    socket = tmp_path / "bus.sock"
    read, write = os.pipe()
    try:
        host = await anyio.open_process(
            [sys.executable, "-m", "multikernel.services.host", "--socket", str(socket),
             "--state-dir", str(tmp_path / "state"), "--sysfs-root", str(machine),
             "--no-isolation", "--ready-fd", str(write)],
            pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(write)
    async with host:
        try:
            assert (await read_to_eof(read)).startswith(b"ready")
        finally:
            os.close(read)
        async with connect(socket, name="test", reconnect=False) as bus:
            pid = await owner_pid(bus, "resource")
        actor = os.pidfd_open(pid)
        try:
            host.kill()
            await host.wait()
            with anyio.fail_after(10):
                await anyio.wait_readable(actor)  # it dies with its host (PR_SET_PDEATHSIG)
        finally:
            os.close(actor)


async def test_an_actor_that_never_says_ready_fails_the_start() -> None:
    actor = ActorProcess("broken", lambda fd: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(ActorStartError, match=r"the broken actor did not start \(exit status 3\)"):
        await actor.run()


async def test_an_actor_that_keeps_exiting_is_given_up_on() -> None:
    says_ready = "import os, sys; os.write(int(sys.argv[1]), b'ready')"
    actor = ActorProcess(
        "flaky", lambda fd: [sys.executable, "-c", says_ready, str(fd)], intensity=3
    )
    await actor.run()  # returns once it gives up: three exits within a minute
    assert actor.restarts == 2
