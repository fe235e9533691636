"""A restarted host ends the guests of its predecessor rather than adopting them: the launch's
record (QEMU's pid, its start time, the guest's directory) lets it kill that QEMU, and only
that process, and remove the directory. No QEMU needed: a stand-in process plays its part."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import anyio
import pytest

from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import LaunchSpec, Resources
from multikernel.services._platforms import Platforms
from multikernel.services._qemu_platform import QemuPlatform
from multikernel.services._qemu_record import QemuRecords

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_recorded_guest_is_ended_and_its_directory_removed() -> None:
    stand_in = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(300)"])
    workdir = Path(tempfile.mkdtemp(prefix="mk-qemu-old-"))
    try:
        record = QemuRecords().record("old", stand_in.pid, workdir)
        assert record.startswith("qemu ")
        platforms = Platforms(QemuPlatform(), QemuPlatform())  # routes "qemu ..." records
        spec = LaunchSpec("old", 3, ["(adopted)"], {}, (), Resources(frozenset(online_cpus()), 1))
        assert platforms.adopt(spec, record) is None  # never adopted: its session is gone
        await platforms.reclaim_record(record)
        with anyio.fail_after(10):
            assert await stand_in.wait() == -signal.SIGKILL
        assert not await anyio.Path(workdir).exists()
    finally:
        if stand_in.returncode is None:
            stand_in.kill()
        await stand_in.aclose()


async def test_a_record_whose_pid_is_another_process_now_kills_nothing() -> None:
    """The pid was reused (the start time differs): that process is left alone."""
    bystander = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(300)"])
    workdir = Path(tempfile.mkdtemp(prefix="mk-qemu-gone-"))
    try:
        record = QemuRecords().record("gone", bystander.pid, workdir)
        forged = record.replace('"start":', '"start":1', 1)  # another start time
        await QemuRecords().reclaim(forged)
        assert bystander.returncode is None
        assert not await anyio.Path(workdir).exists()  # its own directory goes all the same
        os.kill(bystander.pid, 0)  # still there
    finally:
        bystander.kill()
        await bystander.aclose()
