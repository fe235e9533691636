"""The `qemu` platform behind the platform interface: a guest gets its grant's memory and CPU
count, is pinned to its CPUs, boots our agent, which attaches to the host's hub over the session
channel in its ivshmem memory and serves the host there; it stops through the agent or is
killed (a call in flight then fails cleanly), and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub
from multikernel.endpoints import connect
from multikernel.protocol import (
    AgentHello,
    AgentStatus,
    ExecRequest,
    ExecResult,
    MultikernelError,
    Shutdown,
)
from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import InvalidSpecError, LaunchError, LaunchSpec, Resources
from multikernel.services._qemu_image import GuestImage
from multikernel.services._qemu_platform import QemuPlatform
from multikernel.shm import WaitPolicy

pytestmark = pytest.mark.anyio
MiB = 1 << 20
ID = 7


def spec(
    name: str,
    *,
    cpus: frozenset[int] | None = None,
    memory: int = 256 * MiB,
    pass_fds: tuple[int, ...] = (),
    stdout: int | None = None,
    interrupts: bool = False,
) -> LaunchSpec:
    cpus = cpus if cpus is not None else frozenset({max(online_cpus())})
    env = {
        "MULTIKERNEL_INSTANCE": str(ID),
        "MULTIKERNEL_INSTANCE_NAME": name,
        "MULTIKERNEL_WORKLOAD": json.dumps([]),
        "MULTIKERNEL_MEMORY": str(memory),
        "PATH": "/bin",
    }
    argv = ["/bin/python3", "-m", "multikernel.services.agent"]
    return LaunchSpec(
        name, ID, argv, env, pass_fds, Resources(cpus, memory), stdout=stdout, stderr=stdout,
        interrupts=interrupts,
    )  # fmt: skip


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    hub = Hub(tmp_path / "bus.sock")
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()


async def test_specs_a_guest_cannot_take_are_refused_before_anything_starts() -> None:
    platform = QemuPlatform()
    with pytest.raises(InvalidSpecError, match="at least 128 MiB"):
        await platform.launch(spec("small", memory=64 * MiB))
    with pytest.raises(InvalidSpecError, match="inherits no fds"):
        await platform.launch(spec("fds", pass_fds=(5,)))
    with pytest.raises(InvalidSpecError, match="not online"):
        await platform.launch(spec("cpus", cpus=frozenset({4096})))
    with pytest.raises(LaunchError, match=r"serve_region=hub\.serve_region and enter it"):
        await platform.launch(spec("nohub"))  # its guests' sessions need the host's hub
    assert platform.capabilities().namespaces
    assert not platform.capabilities().cpuset


@pytest.mark.timeout(60)
async def test_qemu_failing_at_start_fails_the_launch_at_once_saying_why(
    guest_image: GuestImage, hub: Hub, tmp_path: Path
) -> None:
    """Not at the boot timeout: as soon as QEMU exits, with what QEMU said."""
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage")
    image = dataclasses.replace(guest_image, kernel=kernel)
    async with QemuPlatform(image, serve_region=hub.serve_region) as platform:
        with anyio.fail_after(30), pytest.raises(LaunchError) as failed:
            await platform.launch(spec("broken"))
    first = str(failed.value).splitlines()[0]
    assert first == "guest 'broken' did not come up: QEMU exited with status 1. Its last output:"
    assert "qemu: linux kernel too old" in str(failed.value)  # what QEMU said, in qemu.log


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_guest_runs_our_agent_on_its_grant_and_stops_through_it(
    guest_image: GuestImage, hub: Hub
) -> None:
    """`launch` returns once the agent in the guest is attached to the hub (bound to the
    instance, with QEMU's pid); the host calls it (status, exec) through the hub's relay; a
    negotiated shutdown ends the agent, the guest powers off, `wait` says the agent's status."""
    cpu = max(online_cpus())
    console, console_w = os.pipe()
    async with (
        QemuPlatform(guest_image, serve_region=hub.serve_region) as platform,
        connect(hub.path, name="host") as host,
        await host.subscribe(f"mk.instance.{ID}.hello") as hellos,
    ):
        try:
            guest = await platform.launch(spec("web", cpus=frozenset({cpu}), stdout=console_w))
        finally:
            os.close(console_w)
        async with guest:
            (session,) = [e for e in hub.snapshot().endpoints if e.instance == ID]
            assert (session.name, session.pid) == ("agent-web", guest.pid)
            with anyio.fail_after(30):
                hello = (await hellos.__anext__()).decode(AgentHello)
            assert hello.hostname == "web"
            agent = f"instance.{ID}.agent"
            status = await host.request(agent, "status", None, response=AgentStatus)
            assert (status.instance, status.hostname, status.memory) == (ID, "web", 256 * MiB)
            uname = await host.request(
                agent, "exec", ExecRequest(("uname", "-r")), response=ExecResult
            )
            assert uname.stdout.decode().strip() == guest_image.kernel_version
            report = platform.inspect(guest)
            assert report.affinity == {cpu}
            assert report.memory_limit == 256 * MiB
            assert (report.kernel, report.vcpus, report.own_kernel) == (
                guest_image.kernel_version,
                1,
                True,
            )
            assert not report.own_pid_namespace  # QEMU is a host process; the guest its kernel
            await host.request(agent, "shutdown", Shutdown(ID))
            with anyio.fail_after(60):
                assert await platform.wait(guest) == 0  # the agent's own exit status
            workdir = guest.workdir
        assert not workdir.exists()
        assert [e for e in hub.snapshot().endpoints if e.instance == ID] == []
        await platform.reclaim(guest)  # idempotent
    with os.fdopen(console, "rb") as out:
        text = out.read().decode(errors="replace")
    assert "multikernel-guest: agent exited 0" in text  # the console: what `mkctl logs` shows


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_in_interrupt_mode_the_guest_rings_the_hub_which_never_polls(
    guest_image: GuestImage, hub: Hub
) -> None:
    """The hub's readers of the guest's session channels poll every ten minutes here, so
    everything the guest sends (its Hello, its hello, its answers) reaches the hub only because
    the guest rang it: a store to its doorbell register, which QEMU turns into a write of the
    eventfd the hub's reader sleeps on."""
    never = WaitPolicy(spin=0, poll_min=600, poll_max=600)
    async with (
        QemuPlatform(guest_image, serve_region=hub.serve_region, policy=never) as platform,
        connect(hub.path, name="host") as host,
        await host.subscribe(f"mk.instance.{ID}.hello") as hellos,
    ):
        guest = await platform.launch(spec("rung", interrupts=True))
        async with guest:
            with anyio.fail_after(60):
                await hellos.__anext__()
            agent = f"instance.{ID}.agent"
            for _ in range(5):
                status = await host.request(agent, "status", None, response=AgentStatus)
                assert status.hostname == "rung"
            await host.request(agent, "shutdown", Shutdown(ID))
            with anyio.fail_after(60):
                assert await platform.wait(guest) == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_guest_killed_mid_call_fails_the_caller_and_gives_everything_back(
    guest_image: GuestImage, hub: Hub
) -> None:
    console, console_w = os.pipe()
    async with (
        QemuPlatform(guest_image, serve_region=hub.serve_region) as platform,
        connect(hub.path, name="host") as host,
        await host.subscribe(f"mk.instance.{ID}.hello") as hellos,
    ):
        try:
            guest = await platform.launch(spec("doomed", stdout=console_w))
        finally:
            os.close(console_w)
        try:
            pid = guest.pid
            with anyio.fail_after(30):
                await hellos.__anext__()  # the agent serves once it said hello
            failed: list[BaseException] = []

            async def call() -> None:
                request = ExecRequest(("sh", "-c", "echo in the call >/dev/ttyS0; sleep 60"))
                try:
                    await host.request(f"instance.{ID}.agent", "exec", request)
                except MultikernelError as exc:
                    failed.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(60):
                    await console_says(console, "in the call")  # the guest runs the call
                await platform.kill(guest)
            assert failed, "the call in flight failed when its server's kernel died"
            assert await platform.wait(guest) == -signal.SIGKILL
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        finally:
            os.close(console)
            await platform.reclaim(guest)
        assert not guest.workdir.exists()
        assert [e for e in hub.snapshot().endpoints if e.instance == ID] == []


async def console_says(console: int, text: str) -> None:
    """Read the console pipe until a line holds `text`."""
    seen = b""
    while text.encode() not in seen:
        await anyio.wait_readable(console)
        seen = seen[-4096:] + os.read(console, 65536)


@pytest.mark.timeout(60)
async def test_a_launch_cancelled_mid_boot_leaves_nothing(
    guest_image: GuestImage, hub: Hub
) -> None:
    """QEMU started, the guest still booting: cancelling `launch` kills and reclaims it (the
    suite checks for leaked child processes and fds), and the name can be used again."""
    async with QemuPlatform(guest_image, serve_region=hub.serve_region) as platform:
        pattern = os.path.join(tempfile.gettempdir(), "mk-qemu-early-*")
        before = set(glob.glob(pattern))
        with anyio.move_on_after(1.5) as scope:
            await platform.launch(spec("early"))
        assert scope.cancelled_caught
        assert set(glob.glob(pattern)) == before
        with anyio.move_on_after(0.5):
            await platform.launch(spec("early"))  # not refused as "already running"
