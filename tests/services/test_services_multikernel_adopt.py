"""A host restarted on the same state dir finds its multikernel instances again in the kernel.

Host A (hub, resource and lifecycle actors, a `MultikernelPlatform` over a `FakeMultikernel`)
starts two instances, then stops without stopping them: its actors end without `_stop_all`, its
platform forgets them, as a host killed outright would leave them (its hub and the host ends of
the instances' vsock streams stay up, as the fake cannot lose a process's fds without losing its
own state). While nobody watches, one instance's kernel panics. Host B, on the same state dir and
kernel, adopts the instance the kernel still runs (`active`: no new boot) and reclaims the other
(halted: its kernel stays `loaded`, as the lifecycle's `load` left it); deleting both leaves
nothing in the kernel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CreateInstance,
    DeleteInstance,
    InstanceInfo,
    InstanceList,
    KillInstance,
    LoadImage,
    ShowInstances,
    StartInstance,
)
from multikernel.services import _mk_adopt
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._mk_fake import FakeMultikernel, KexecCall, RebootCall, boot_init
from multikernel.services._mk_kernel import KEXEC_FILE_UNLOAD, REBOOT_CMD_BOOT
from multikernel.services._mk_pool import kernel_pool
from multikernel.services._mk_steps import MultikernelHostSide
from multikernel.services._mk_vsock import UnixVsock
from multikernel.services._multikernel import BootImage, MultikernelPlatform
from multikernel.services._platform import Resources
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services._signature import make_signing_key

pytestmark = pytest.mark.anyio
MB = 1 << 20
GB = 1 << 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


class Machine:
    """What outlives a host: its state dir, the kernel, the image and the trust."""

    def __init__(self, root: Path) -> None:
        key, self.cert = make_signing_key("multikernel tests", algorithm="ec-p256")
        self.root = root
        self.image = root / "image"
        self.image.mkdir()
        (self.image / "manifest.toml").write_text(
            'name = "sleeper"\nversion = "1"\nentry = ["{python}", "main.py"]\n'
        )
        (self.image / "main.py").write_text(textwrap.dedent("import time\ntime.sleep(300)\n"))
        sign_image(self.image, key, self.cert)
        (root / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
        self.vsock = UnixVsock(Path(tempfile.mkdtemp(prefix="mkvs-")))
        self.state = root / "state"
        self.kernel = FakeMultikernel(
            root / "machine", cpus=range(1, 5), memory=[(1 << 32, GB)], boot=boot_init(self.vsock)
        )

    def status(self, name: str) -> str:
        try:
            return self.kernel.read(f"instances/{name}/status").decode().strip()
        except FileNotFoundError:
            return "absent"

    def transactions(self) -> list[str]:
        return [d for d in self.kernel.listdir("overlays") if d.startswith("tx_")]

    @asynccontextmanager
    async def host(self, name: str) -> AsyncIterator[tuple[Endpoint, LifecycleActor]]:
        """A host on this machine, serving until the caller leaves; the caller may make it
        end without stopping its instances (`abandon`)."""
        hub = Hub(self.root / f"{name}.sock", policy=Policy.from_toml(host_rule(os.getuid())))
        platform = MultikernelPlatform(
            self.kernel, BootImage(self.root / "vmlinux"), connector=self.vsock, poll=0.01
        )
        store = ResourceStore(self.state / "resource.db")
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(hub.serve)
                async with (
                    platform,
                    connect(hub.path, name="resource") as resource_ep,
                    connect(hub.path, name="lifecycle") as lifecycle_ep,
                    connect(hub.path, name="test") as bus,
                ):
                    async with anyio.create_task_group() as actors:
                        grants = MultikernelHostSide(platform.steps)
                        pool = kernel_pool(self.kernel)
                        resource = ResourceActor(resource_ep, pool, store, host=grants)
                        await actors.start(resource.run)
                        lifecycle = LifecycleActor(
                            lifecycle_ep, platform, open_instance_socket=hub.open_instance_socket,
                            state_dir=self.state, trusted_certs=[self.cert], hello_timeout=20,
                        )  # fmt: skip
                        await actors.start(lifecycle.run)
                        yield bus, lifecycle
                        actors.cancel_scope.cancel()
                    if getattr(lifecycle, "abandoned", False):
                        left = list(platform._running.values())
                        platform._running.clear()  # a dead host reclaims nothing
                        try:
                            await anyio.sleep_forever()  # its streams stay until the test ends
                        finally:
                            for inst in left:
                                if inst.control is not None:
                                    inst.control.close()
                tg.cancel_scope.cancel()
        finally:
            store.close()


def abandon(lifecycle: LifecycleActor) -> None:
    """Make the host end as a killed one would: its instances left running."""

    async def nothing() -> None:
        pass

    lifecycle._stop_all = nothing  # type: ignore[method-assign]
    lifecycle.abandoned = True  # type: ignore[attr-defined]


async def call(bus: Endpoint, method: str, body: object) -> InstanceInfo:
    info: InstanceInfo = await bus.request("lifecycle", method, body, response=InstanceInfo)
    return info


@pytest.mark.timeout(120)
async def test_a_restarted_host_adopts_the_instances_the_kernel_still_runs(
    tmp_path: Path,
) -> None:
    machine = Machine(tmp_path)
    try:
        async with anyio.create_task_group() as dead:
            # Host A starts web and db, then dies with them running.
            started = anyio.Event()
            ids: dict[str, int] = {}

            async def host_a() -> None:
                async with machine.host("a") as (bus, lifecycle):
                    for name in ("web", "db"):
                        await call(
                            bus, "create", CreateInstance(name, cpu_count=1, memory=128 * MB)
                        )
                        await call(bus, "load", LoadImage(name, str(machine.image)))
                        ids[name] = (await call(bus, "start", StartInstance(name))).id
                    abandon(lifecycle)
                    started.set()

            dead.start_soon(host_a)
            with anyio.fail_after(60):
                await started.wait()
            assert machine.status("web") == machine.status("db") == "active"
            machine.kernel.panic("db")  # while no host watches it
            before = list(machine.kernel.calls)
            tx_before = len(machine.transactions())

            with anyio.fail_after(60):
                async with machine.host("b") as (bus, _):
                    listed = await bus.request(
                        "lifecycle", "show", ShowInstances(""), response=InstanceList
                    )
                    states = {i.name: i.state for i in listed.instances}
                    assert states == {"web": "active", "db": "loaded"}
                    assert machine.status("web") == "active"  # adopted: not booted again
                    new = machine.kernel.calls[len(before) :]
                    assert RebootCall(REBOOT_CMD_BOOT, ids["web"]) not in new
                    # db's launch was reclaimed: its kernel, loaded, stays for its next start.
                    assert machine.status("db") == "loaded"
                    assert not [c for c in new if isinstance(c, KexecCall)]
                    assert len(machine.transactions()) == tx_before

                    killed = await call(bus, "kill", KillInstance("web", force=True))
                    assert killed.state == "loaded"
                    assert machine.status("web") == "loaded"
                    for name in ("web", "db"):
                        await call(bus, "delete", DeleteInstance(name))
                        assert machine.status(name) == "absent"
                    unloads = [c for c in machine.kernel.calls[len(before) :]]
                    unloads = [c for c in unloads if isinstance(c, KexecCall)]
                    assert [c.flags & KEXEC_FILE_UNLOAD for c in unloads] == [KEXEC_FILE_UNLOAD] * 2
            assert machine.transactions() == []
            dead.cancel_scope.cancel()
    finally:
        machine.kernel.close()
        shutil.rmtree(machine.vsock.directory, ignore_errors=True)


async def test_a_launch_cut_short_or_not_adoptable_is_reclaimed_and_anothers_left_alone(
    tmp_path: Path,
) -> None:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    kernel = FakeMultikernel(tmp_path / "machine", cpus=range(1, 5), memory=[(1 << 32, GB)])
    platform = MultikernelPlatform(
        kernel, BootImage(tmp_path / "vmlinux"), connector=UnixVsock(tmp_path), poll=0.01
    )
    steps = platform.steps
    resources = Resources(frozenset({1}), 128 * MB)
    async with platform:
        # A launch cut short before its record was stored: booted, never recorded. The
        # lifecycle still has the instance: it is halted, its kernel left `loaded`.
        await platform.prepare("cut", 3, resources, load=True)
        steps.reboot("boot", REBOOT_CMD_BOOT, 3)
        # A recorded launch the lifecycle never saw become active: booted, still running.
        made = await steps.create("early", 4, Resources(frozenset({2}), 128 * MB))
        await steps.load("early", 4)
        steps.reboot("boot", REBOOT_CMD_BOOT, 4)
        record = _mk_adopt.encode_record("early", 4, [made])
        # A recorded launch of an instance the lifecycle made (kept): halted, left `loaded`.
        await platform.prepare("kept", 6, Resources(frozenset({4}), 128 * MB), load=True)
        steps.reboot("boot", REBOOT_CMD_BOOT, 6)
        kept = _mk_adopt.encode_record("kept", 6, [], kept=True)
        # kerf's instance under a name our record has, with another id: not ours.
        await steps.create("theirs", 9, Resources(frozenset({3}), 128 * MB))

        await platform.reclaim_unit("cut")
        await platform.reclaim_record(record)
        await platform.reclaim_record(kept)
        await platform.reclaim_record(_mk_adopt.encode_record("theirs", 5, []))
        await platform.reclaim_unit("nothing")
        assert steps.status("cut") == steps.status("kept") == "loaded"
        assert steps.status("early") == "absent"
        # The lifecycle's delete of each; `theirs` under another id is not ours to remove.
        await platform.release("cut", 3)
        await platform.release("kept", 6)
        await platform.release("theirs", 5)
    assert os.listdir(kernel.kernfs / "instances") == ["theirs"]
    assert len([d for d in kernel.listdir("overlays") if d.startswith("tx_")]) == 1
