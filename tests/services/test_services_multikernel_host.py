"""The lifecycle, resource and fault actors on the multikernel platform, against the fake kernel.

The same actors as on the local platform, in this process: the hub, the resource actor (lending
the kernel's pool, its grants to a running instance made by overlay), the lifecycle actor
with a `MultikernelPlatform` over a `FakeMultikernel`, and the fault actor. Each instance is a
fake kernel whose userspace is our real agent, reached over the vsock stand-in; a panic the
kernel reports (the instance back to `loaded`) is a crash the fault actor restarts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
    InstanceStateChanged,
    KillInstance,
    LoadImage,
    RefusedError,
    ShowInstances,
    StartInstance,
    UpdateInstance,
)
from multikernel.services import _mk_dt as dt
from multikernel.services._fault import FaultActor
from multikernel.services._fault_store import FaultStore
from multikernel.services._fault_watch import DetectionConfig
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local_probe import online_cpus
from multikernel.services._mk_fake import FakeMultikernel, KexecCall, RebootCall, boot_init
from multikernel.services._mk_kernel import REBOOT_CMD_BOOT, kexec_flags
from multikernel.services._mk_pool import kernel_pool
from multikernel.services._mk_steps import MultikernelHostSide
from multikernel.services._mk_vsock import UnixVsock
from multikernel.services._multikernel import BootImage, MultikernelPlatform
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services._signature import make_signing_key

pytestmark = pytest.mark.anyio
MB = 1 << 20
HEARTBEAT = 0.2
NVME = "0000:01:00.0"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@dataclass
class Host:
    bus: Endpoint
    kernel: FakeMultikernel
    image: Path

    async def call(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.bus.request(
            "lifecycle", method, body, response=InstanceInfo
        )
        return info

    def memory(self, name: str) -> int:
        tree = dt.parse(self.kernel.read(f"instances/{name}/device_tree"))
        resources = tree.child("resources")
        assert resources is not None
        return sum(c.reg()[1] for c in resources.children if c.name.startswith("memory@"))

    def devices(self, name: str) -> list[str]:
        tree = dt.parse(self.kernel.read(f"instances/{name}/device_tree"))
        resources = tree.child("resources")
        assert resources is not None
        return resources.strings("devices")

    def transactions(self) -> list[str]:
        return [d for d in self.kernel.listdir("overlays") if d.startswith("tx_")]

    def status(self, name: str) -> str:
        try:
            return self.kernel.read(f"instances/{name}/status").decode().strip()
        except FileNotFoundError:
            return "absent"


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    key, cert = make_signing_key("multikernel tests", algorithm="ec-p256")
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "sleeper"\nversion = "1"\nentry = ["{python}", "main.py"]\n'
    )
    (image / "main.py").write_text(textwrap.dedent("import time\ntime.sleep(300)\n"))
    sign_image(image, key, cert)
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    vsock = UnixVsock(Path(tempfile.mkdtemp(prefix="mkvs-")))
    state = tmp_path / "state"
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    kernel = FakeMultikernel(
        tmp_path / "machine",
        cpus=online_cpus(),
        # Three 128 MiB chunks: 384 MiB for the resource actor, but no 256 MiB in one range.
        memory=[(1 << 32, 128 * MB), (1 << 33, 128 * MB), (1 << 34, 128 * MB)],
        devices={"nvme0": NVME},
        boot=boot_init(vsock),
    )
    platform = MultikernelPlatform(
        kernel, BootImage(tmp_path / "vmlinux"), connector=vsock, poll=0.01
    )
    resources = ResourceStore(state / "resource.db")
    faults = FaultStore(state / "fault.db")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            async with (
                platform,
                connect(hub.path, name="resource") as resource_ep,
                connect(hub.path, name="lifecycle") as lifecycle_ep,
                connect(hub.path, name="fault") as fault_ep,
                connect(hub.path, name="test") as bus,
                anyio.create_task_group() as actors,
            ):
                grants = MultikernelHostSide(platform.steps)  # a running instance's: overlays
                pool = kernel_pool(kernel)
                resource = ResourceActor(resource_ep, pool, resources, host=grants)
                await actors.start(resource.run)
                lifecycle = LifecycleActor(
                    lifecycle_ep, platform, open_instance_socket=hub.open_instance_socket,
                    state_dir=state, trusted_certs=[cert], hello_timeout=20, heartbeat=HEARTBEAT,
                )  # fmt: skip
                await actors.start(lifecycle.run)
                fault = FaultActor(fault_ep, faults, detection=DetectionConfig(period=HEARTBEAT))
                await actors.start(fault.run)
                yield Host(bus, kernel, image)
                actors.cancel_scope.cancel()
            tg.cancel_scope.cancel()
    finally:
        kernel.close()
        resources.close()
        faults.close()
        shutil.rmtree(vsock.directory, ignore_errors=True)


async def next_state(states, new: str) -> InstanceStateChanged:  # type: ignore[no-untyped-def]
    async for message in states:
        change = message.decode(InstanceStateChanged)
        if change.new == new:
            return change
    raise AssertionError("the subscription ended")


@pytest.mark.timeout(90)
async def test_an_instance_kernel_runs_our_agent_and_a_panic_is_restarted(host: Host) -> None:
    with anyio.fail_after(60):
        async with await host.bus.subscribe("mk.instance.*.state") as states:
            await host.call("create", CreateInstance("web", cpu_count=1, memory=128 * MB))
            assert host.status("web") == "ready"  # the kernel's instance, made at create
            await host.call("load", LoadImage("web", str(host.image)))
            assert host.status("web") == "loaded"  # its kernel, loaded at load
            info = await host.call("start", StartInstance("web"))
            assert info.state == "active"
            assert host.status("web") == "active"
            await next_state(states, "active")

            host.kernel.panic("web")  # the instance's kernel goes down: `loaded` again
            crashed = await next_state(states, "loaded")
            assert crashed.cause == "crashed"
            await next_state(states, "active")  # the fault actor restarted it
            assert host.status("web") == "active"
            boots = [c for c in host.kernel.calls if c == RebootCall(REBOOT_CMD_BOOT, info.id)]
            assert len(boots) == 2
            # Booted again as it was: neither created again nor reloaded.
            assert [c.flags for c in host.kernel.calls if isinstance(c, KexecCall)] == [
                kexec_flags(info.id, initramfs=False)
            ]
            assert len(host.transactions()) == 1  # its instance-create

            # A grant the resource actor can lend but the kernel cannot place (256 MiB more, in
            # one range) is refused by the kernel and rolled back.
            with pytest.raises(RefusedError) as refused:
                await host.call("update", UpdateInstance("web", memory=384 * MB))
            assert str(refused.value).startswith(
                "'web' did not get its new grant: the host could not apply it: the pool has no "
                "268435456 free bytes in one range (kerf show); nothing changed"
            )
            assert host.memory("web") == 128 * MB  # the grant was rolled back
            # A grant to the running instance reaches its kernel as an overlay.
            grown = await host.call("update", UpdateInstance("web", memory=256 * MB))
            assert grown.memory == 256 * MB
            assert host.memory("web") == 256 * MB

            assert (await host.call("kill", KillInstance("web"))).state == "loaded"
            assert host.status("web") == "loaded"  # halted; its kernel stays for the next start
            await host.call("delete", DeleteInstance("web"))
            assert host.status("web") == "absent"  # unloaded, every transaction undone
    assert [d for d in host.kernel.listdir("overlays") if d.startswith("tx_")] == []


@pytest.mark.timeout(60)
async def test_a_create_the_kernel_refuses_leaves_nothing(host: Host) -> None:
    """The kernel's instance is made at create: a refusal there is the create's, with the
    kernel's reason, and leaves no instance, no grant and no transaction behind."""
    with anyio.fail_after(30):
        # 256 MiB: the resource actor has the blocks, the kernel has no such range in one chunk.
        with pytest.raises(RefusedError) as refused:
            await host.call("create", CreateInstance("big", cpu_count=1, memory=256 * MB))
        assert str(refused.value).startswith("cannot create instance 'big': ENOMEM: ")
        assert host.status("big") == "absent"
        listed = await host.bus.request(
            "lifecycle", "show", ShowInstances(""), response=InstanceList
        )
        assert listed.instances == ()
        # Its grant was released: the pool lends all of it again.
        info = await host.call("create", CreateInstance("big", cpu_count=1, memory=128 * MB))
        assert host.status("big") == "ready"
        await host.call("delete", DeleteInstance(info.name))
    assert host.status("big") == "absent"
    assert host.transactions() == []


@pytest.mark.timeout(60)
async def test_a_grant_that_carries_a_device_reaches_the_kernel_as_a_device_overlay(
    host: Host,
) -> None:
    """The kernel's PCI devices are in the resource actor's pool (`pci/<address>`); granting
    one lends it to the instance's kernel (device-add), giving it back removes it."""
    with anyio.fail_after(30):
        queues = (f"pci/{NVME}",)
        await host.call("create", CreateInstance("db", cpu_count=1, memory=128 * MB, queues=queues))
        assert host.devices("db") == [NVME]  # device-add, right after the instance-create
        await host.call("update", UpdateInstance("db", queues=()))
        assert host.devices("db") == []  # device-remove
        await host.call("update", UpdateInstance("db", queues=queues))
        assert host.devices("db") == [NVME]
        with pytest.raises(RefusedError):  # the resource actor lends it once
            await host.call(
                "create", CreateInstance("web", cpu_count=1, memory=128 * MB, queues=queues)
            )
        await host.call("delete", DeleteInstance("db"))
    assert host.status("db") == "absent"
    assert host.transactions() == []
