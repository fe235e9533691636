"""The `qemu` platform behind the platform interface: a guest gets its grant's memory and CPU
count, is pinned to its CPUs, talks over its channel, stops by itself or is killed, and leaves
nothing behind."""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import sys
import tempfile
from pathlib import Path

import anyio
import pytest

from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import InvalidSpecError, LaunchError, LaunchSpec, Resources
from multikernel.services._qemu_image import GuestImage
from multikernel.services._qemu_platform import QemuPlatform

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def spec(name: str, *, cpus: frozenset[int] | None = None, memory: int = 256 * MiB,
         pass_fds: tuple[int, ...] = ()) -> LaunchSpec:  # fmt: skip
    cpus = cpus if cpus is not None else frozenset({max(online_cpus())})
    argv = [sys.executable, "-m", "multikernel.services.agent"]
    return LaunchSpec(name, 7, argv, {}, pass_fds, Resources(cpus, memory))


async def test_specs_a_guest_cannot_take_are_refused_before_anything_starts() -> None:
    platform = QemuPlatform()
    with pytest.raises(InvalidSpecError, match="at least 128 MiB"):
        await platform.launch(spec("small", memory=64 * MiB))
    with pytest.raises(InvalidSpecError, match="inherits no fds"):
        await platform.launch(spec("fds", pass_fds=(5,)))
    with pytest.raises(InvalidSpecError, match="not online"):
        await platform.launch(spec("cpus", cpus=frozenset({4096})))
    assert platform.capabilities().namespaces
    assert not platform.capabilities().cpuset


@pytest.mark.timeout(60)
async def test_qemu_failing_at_start_fails_the_launch_at_once_saying_why(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """Not at the boot timeout: as soon as QEMU exits, with what QEMU said."""
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage")
    platform = QemuPlatform(dataclasses.replace(guest_image, kernel=kernel))
    with anyio.fail_after(30), pytest.raises(LaunchError) as failed:
        await platform.launch(spec("broken"))
    first = str(failed.value).splitlines()[0]
    assert first == "guest 'broken' did not come up: QEMU exited with status 1. Its last output:"
    assert "qemu: linux kernel too old" in str(failed.value)  # what QEMU said, in qemu.log


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_guest_runs_on_its_grant_and_stops_when_its_channel_closes(
    guest_image: GuestImage,
) -> None:
    platform = QemuPlatform(guest_image)
    cpu = max(online_cpus())
    async with await platform.launch(spec("web", cpus=frozenset({cpu}))) as guest:
        assert guest.hello.startswith("ring ready")
        assert " peer=1 " in guest.hello  # the one-client handshake made QEMU peer 1
        report = platform.inspect(guest)
        assert report.affinity == {cpu}
        assert report.memory_limit == 256 * MiB
        assert not report.own_pid_namespace  # QEMU is a host process; the guest is its kernel
        assert guest.channel is not None
        await guest.channel.send(b"ping")
        assert await guest.channel.receive() == b"ping"
        guest.channel.close()  # the guest's program sees end of stream and powers off
        assert await platform.wait(guest) == 0
        workdir = guest.workdir
    assert not workdir.exists()
    await platform.reclaim(guest)  # idempotent


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_kill_ends_qemu_and_reclaim_gives_everything_back(guest_image: GuestImage) -> None:
    platform = QemuPlatform(guest_image)
    guest = await platform.launch(spec("doomed"))
    try:
        pid = guest.pid
        await platform.kill(guest)
        assert await platform.wait(guest) == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        await platform.reclaim(guest)
    assert not guest.workdir.exists()


@pytest.mark.timeout(60)
async def test_a_launch_cancelled_mid_boot_leaves_nothing(guest_image: GuestImage) -> None:
    """QEMU started, the guest still booting: cancelling `launch` kills and reclaims it (the
    suite checks for leaked child processes and fds), and the name can be used again."""
    platform = QemuPlatform(guest_image)
    pattern = os.path.join(tempfile.gettempdir(), "mk-qemu-early-*")
    before = set(glob.glob(pattern))
    with anyio.move_on_after(1.5) as scope:
        await platform.launch(spec("early"))
    assert scope.cancelled_caught
    assert set(glob.glob(pattern)) == before
    with anyio.move_on_after(0.5):
        await platform.launch(spec("early"))  # not refused as "already running"
