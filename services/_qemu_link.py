"""A guest joined to the host over ivshmem: shared memory, its server, the guest, a channel.

`open_guest` makes a sealed memfd (`SHARED_MEMORY` bytes, a power of two as ivshmem wants),
lays a channel out at its start, serves it with an `IvshmemServer` (the host is peer 0, QEMU
peer 1), boots a guest with an `ivshmem-doorbell` device on that server, and waits for the guest
to say its end of the ring is open. The host's end is a `Channel` over the same memory, with no
doorbell: both sides poll (`WaitPolicy.poll_min`/`poll_max`), the mode that needs nothing from
the guest kernel but a PCI BAR it can map. Interrupts (the server's eventfds, MSI-X in the
guest through VFIO) are the next step: docs/platform.md, "qemu (in progress)".

On the way out the host closes its end, the guest's program sees end of stream and powers the
guest off; a guest that has not within `grace` seconds is killed. The socket's directory, the
server, QEMU and the memory are all gone when `open_guest` returns.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

from multikernel.services._ivshmem import IvshmemServer
from multikernel.services._qemu_image import GuestImage
from multikernel.services._qemu_vm import Vm, VmConfig
from multikernel.shm import Channel, Region, WaitPolicy, channel_size, format_channel

#: The ivshmem device's memory: a power of two, with room for more channels later.
SHARED_MEMORY: Final = 4 << 20
DEFAULT_CAPACITY: Final = 64 << 10


@dataclass
class GuestLink:
    """A running guest and the host's end of the channel into it."""

    vm: Vm
    server: IvshmemServer
    channel: Channel
    ready_after: float  # seconds from starting QEMU to the guest's end of the ring open
    guest_says: str  # the guest's first frame: its device and whether its ring core is native


@asynccontextmanager
async def open_guest(
    image: GuestImage,
    *,
    memory_mib: int = 512,
    cpus: int = 1,
    capacity: int = DEFAULT_CAPACITY,
    policy: WaitPolicy | None = None,
    grace: float = 30.0,
    ring_each: bool = False,
) -> AsyncIterator[GuestLink]:
    """Boot a guest running the echo program, joined over ivshmem (see the module docstring).

    `ring_each`: the guest rings the host's vector-0 eventfd (`server.host.vectors[0]`) after
    every frame it sends back, not only once at start.
    """
    if channel_size(capacity) > SHARED_MEMORY:
        raise ValueError(f"a channel of capacity {capacity} does not fit in {SHARED_MEMORY} bytes")
    workdir = Path(tempfile.mkdtemp(prefix="mk-qemu-"))  # 0700, and short enough for AF_UNIX
    try:
        with Region.create(SHARED_MEMORY) as region:
            format_channel(region, capacity)
            socket_path = workdir / "ivshmem.sock"
            polls = policy or WaitPolicy()  # the guest polls as we do
            config = VmConfig(
                image, memory_mib=memory_mib, cpus=cpus, ivshmem_socket=socket_path,
                args=(("mode", "echo"), ("spin", f"{polls.spin:g}"),
                      ("poll_min", f"{polls.poll_min:g}"), ("poll_max", f"{polls.poll_max:g}"),
                      ("ring", "1" if ring_each else "0")),
            )  # fmt: skip
            async with IvshmemServer(socket_path, region.fd) as server:
                started = time.monotonic()
                async with await Vm.start(config) as vm:
                    await vm.console_line("ring ready")
                    with Channel.open_region(region, 0, policy) as channel:
                        says = (await channel.receive()).decode()  # the guest's hello frame
                        ready = time.monotonic() - started
                        try:
                            yield GuestLink(vm, server, channel, ready, says)
                        finally:
                            channel.close()  # the guest sees end of stream and powers off
                            with anyio.move_on_after(grace, shield=True):
                                await vm.drain()
                                await vm.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
