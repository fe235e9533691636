"""The host and a real guest kernel exchange messages over one of our rings laid out in an
ivshmem device's memory, with no doorbell (both sides poll); the guest's doorbell register
reaches the host's eventfd."""

from __future__ import annotations

import os

import anyio
import pytest

from multikernel.services._qemu_image import GuestImage
from multikernel.services._qemu_link import open_guest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.mark.timeout(120)
async def test_host_and_guest_talk_over_an_ivshmem_ring(guest_image: GuestImage) -> None:
    """Frames of every size up to the largest go to the guest and come back unchanged, in
    order; closing the host's end ends the guest's program, and the guest powers off."""
    sizes = [0, 1, 7, 8, 9, 100, 4096, 30_000, 32_760]  # 32_760: the largest for 64 KiB
    async with open_guest(guest_image) as link:
        assert link.server.peers.keys() == {1}
        assert " peer=1 " in link.guest_says  # IVPosition: the id our server gave QEMU
        with anyio.fail_after(30):  # the guest rang us once, through its doorbell register
            await anyio.wait_readable(link.server.host.vectors[0])
        assert os.eventfd_read(link.server.host.vectors[0]) == 1
        for i, size in enumerate(sizes * 3):
            frame = bytes([i % 251]) * size
            await link.channel.send(frame)
            assert await link.channel.receive() == frame
        batch = [b"%d" % i for i in range(200)]
        await link.channel.send_many(batch)
        assert [await link.channel.receive() for _ in batch] == batch
    assert link.vm.process.returncode == 0
    assert f"multikernel-guest: echoed {len(sizes) * 3 + 200}" in link.vm.console
