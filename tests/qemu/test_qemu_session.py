"""A guest's endpoint attaches to the host's hub over ivshmem: the session channel is laid in
the guest's memory by the host and served with `Hub.serve_region`, bound to the instance the host
says; the guest publishes to a host subscriber of that instance and calls a host service, through
the direct channel the hub relays for it (docs/bus.md). One boot."""

from __future__ import annotations

import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.endpoints import connect
from multikernel.services._ivshmem import IvshmemServer
from multikernel.services._qemu_image import GuestImage
from multikernel.services._qemu_link import SHARED_MEMORY
from multikernel.services._qemu_vm import Vm, VmConfig
from multikernel.shm import Channel, Region, WaitPolicy, format_channel

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

INSTANCE = 5
ANYONE_MAY_CALL = """
[[rule]]
who = "*"
call = ["on.host"]
"""


@pytest.mark.timeout(240)
async def test_a_guest_attaches_to_the_hub_over_ivshmem(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(ANYONE_MAY_CALL))
    workdir = Path(tempfile.mkdtemp(prefix="mk-qemu-"))  # short enough for AF_UNIX
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            with Region.create(SHARED_MEMORY) as region:
                format_channel(region, Limits().session_capacity)
                inside = hub.open_instance_socket(INSTANCE)
                async with (
                    connect(fd=inside.detach(), name="host-in-5") as host,
                    await host.subscribe("guest.>") as sub,
                    connect(hub.path, name="host-service") as server,
                    IvshmemServer(workdir / "ivshmem.sock", region.fd),
                ):
                    svc = server.service("on.host")

                    @svc.method
                    async def echo(data: bytes) -> bytes:
                        return data

                    await svc.start()
                    config = VmConfig(
                        guest_image,
                        ivshmem_socket=workdir / "ivshmem.sock",
                        args=(("mode", "attach"), ("call", "on.host"), ("calls", "200")),
                    )
                    started = time.monotonic()
                    async with await Vm.start(config) as vm:
                        channel = Channel.open_region(region, 0, WaitPolicy(spin=0))
                        tg.start_soon(partial(hub.serve_region, INSTANCE, channel, pid=vm.pid))
                        with anyio.fail_after(180):
                            said = await vm.console_line("attached")
                        attached = time.monotonic() - started
                        endpoint = int(said.split()[1].removeprefix("endpoint="))
                        with anyio.fail_after(30):
                            message = await sub.__anext__()
                        assert message.source == endpoint
                        assert message.decode(bytes).startswith(b"from 6.")  # the guest's kernel
                        (info,) = [e for e in hub.snapshot().endpoints if e.endpoint_id == endpoint]
                        assert (info.name, info.instance, info.pid) == ("guest", INSTANCE, vm.pid)
                        with anyio.fail_after(30):
                            called = await vm.console_line("call")
                        assert called == "call answered b'ping'", called
                        with anyio.fail_after(60):
                            timed = await vm.console_line("calls")
                        with anyio.fail_after(30):
                            await vm.console_line("detached")
                            await vm.drain()
                            assert await vm.wait() == 0
                    print(
                        f"QEMU start -> guest endpoint attached: {attached:.1f} s ({said}); {timed}"
                    )
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
