"""Hosts and test runs on one machine: nothing one does reaches what another made.

A second host (another user's, a demo, a test run) may run instances of the same names on the
same machine. Killing, deleting or stopping on one host, and cleaning up after one run, must
leave the other's instances, cgroups and /dev/shm files exactly as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CreateInstance,
    DeleteInstance,
    ExecRequest,
    ExecResult,
    InstanceInfo,
    KillInstance,
    LoadImage,
    StartInstance,
)
from multikernel.services._host import HostConfig, cgroup_group, run_host
from multikernel.shm import find_orphans, name_prefix, remove_orphans
from tests._run import RUN, SHM_PREFIX, group_dirs

pytestmark = pytest.mark.anyio
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="instance cgroups and namespaces are made only when running as root"
)
MB = 1 << 20
PEER = Path(__file__).parents[1] / "shm" / "peer.py"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def unsigned_image(root: Path) -> Path:
    image = root / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "t"\nversion = "1"\nentry = ["{python}", "-c", "import time; time.sleep(300)"]\n'
    )
    return image


@asynccontextmanager
async def a_host(root: Path) -> AsyncIterator[tuple[Endpoint, str]]:
    """A host of its own (state dir under `root`), a client on it, and its cgroup group."""
    config = HostConfig(root / "bus.sock", root / "state", allow_unsigned=True)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        async with connect(config.socket, name="test") as bus:
            yield bus, cgroup_group(config.state_dir)
        stop.set()


async def start_web(bus: Endpoint, image: Path) -> InstanceInfo:
    info: InstanceInfo | None = None
    for method, body in (
        ("create", CreateInstance("web", cpu_count=1, memory=128 * MB)),
        ("load", LoadImage("web", str(image))),
        ("start", StartInstance("web")),
    ):
        info = await bus.request("lifecycle", method, body, response=InstanceInfo)
    assert info is not None
    return info


async def cpuset_of(bus: Endpoint, info: InstanceInfo) -> str:
    ran = await bus.request(
        f"instance.{info.id}.agent",
        "exec",
        ExecRequest(("cat", "/proc/self/cgroup")),
        response=ExecResult,
    )
    return dict(line.split(":", 2)[1:] for line in ran.stdout.decode().split())["cpuset"]


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@needs_root
async def test_one_hosts_kill_delete_and_stop_never_touch_anothers_instance(
    tmp_path: Path,
) -> None:
    image = unsigned_image(tmp_path)
    with anyio.fail_after(90):
        async with a_host(tmp_path / "b") as (theirs, their_group):
            their_web = await start_web(theirs, image)
            async with a_host(tmp_path / "a") as (ours, our_group):
                assert our_group != their_group
                our_web = await start_web(ours, image)  # the same name: no "already running"
                assert await cpuset_of(ours, our_web) == f"/{our_group}/web"
                assert await cpuset_of(theirs, their_web) == f"/{their_group}/web"
                await ours.request("lifecycle", "kill", KillInstance("web", force=True))
                await ours.request("lifecycle", "delete", DeleteInstance("web"))
                assert not alive(our_web.pid)
                assert alive(their_web.pid)
                await start_web(ours, image)  # and a host that stops with its web running
            assert not any(d.exists() for d in group_dirs(our_group))  # ours: gone with it
            assert alive(their_web.pid)  # theirs: untouched, in its own group
            assert all((d / "web").is_dir() for d in group_dirs(their_group))
            assert await cpuset_of(theirs, their_web) == f"/{their_group}/web"
    assert not alive(their_web.pid)
    assert not any(d.exists() for d in group_dirs(their_group))


def test_cleaning_up_one_runs_orphans_leaves_anothers() -> None:
    """A run removes only its own tag's orphaned regions; another run's stay where they are."""
    other_tag = f"other{RUN}"  # as another run's would be: a tag of its own
    paths = []
    for tag in (RUN, other_tag):
        env = {**os.environ, "MULTIKERNEL_SHM_TAG": tag}
        proc = subprocess.Popen(
            [sys.executable, str(PEER), "orphan", "-"], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        paths.append(Path(proc.stdout.readline().decode().strip()))
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    ours, theirs = paths
    try:
        assert theirs.name.startswith(name_prefix(other_tag))
        assert remove_orphans(prefix=SHM_PREFIX) == [ours]
        assert theirs.exists()
        assert theirs in set(find_orphans(prefix=name_prefix(other_tag)))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
