"""A guest's sessions on the hub: the agent's, then one per attachment, in slots of its memory.

The guest's ivshmem memory (`GUEST_MEMORY`, a power of two) holds session channels in slots of
whole MiBs from its start (1 MiB rings each way, `Limits.session_capacity`: 3 MiB a slot, five
slots) and the boot block in its last 64 KiB (`_qemu_boot`). Slot 0 is the agent's, laid out before
the guest boots; `attach` lays one out in a free slot when the agent asks the hub for an
attachment (for its workload) and serves it the same way, bound to the same instance; past the
last slot the agent is told `BusyError`. All of a guest's sessions are served in one task group
inside one cancel scope (`Guest.session`), which QEMU's exit cancels (`watch`): a region has no
liveness of its own.

In interrupt mode (`LaunchSpec.interrupts`) the hub's reader of each session channel sleeps on the
eventfd QEMU writes when the guest rings the vector of that channel, which is its offset in MiB
(`VECTORS` of them), instead of polling.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

from multikernel.protocol import BusyError
from multikernel.services._ivshmem import Peer
from multikernel.services._platform import LaunchSpec
from multikernel.services._qemu_boot import BOOT_SIZE
from multikernel.services._qemu_vm import Vm
from multikernel.shm import Channel, Region, WaitPolicy, channel_size, format_channel

#: The guest's ivshmem memory: a power of two, room for five session channels and a boot block.
GUEST_MEMORY: Final = 16 << 20
#: Doorbell vectors: in interrupt mode the guest rings vector OFFSET >> 20 (the MiB a session
#: channel starts at) after a send that finds the host's reader of that channel asleep.
VECTORS: Final = GUEST_MEMORY >> 20


class ServeRegion(Protocol):
    """`Hub.serve_region`: serve a session over a channel in a region, bound to `instance`."""

    async def __call__(
        self,
        instance: int,
        channel: Channel,
        *,
        pid: int = 0,
        attach: Callable[[], Awaitable[int]] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None: ...


class Guest(Protocol):
    """What serving a guest's sessions needs of it (a `QemuInstance`)."""

    name: str
    instance_id: int
    pid: int
    spec: LaunchSpec
    vm: Vm
    region: Region
    host_peer: Peer | None
    session: anyio.CancelScope
    served: anyio.Event
    sessions: anyio.abc.TaskGroup | None
    taken: set[int]


class GuestSessions:
    """Serves guests' session channels on the hub (`serve_region`, the hub's); `policy` is how
    the hub's end of each waits (polling, or sleeping on a doorbell in interrupt mode)."""

    def __init__(
        self, serve_region: ServeRegion | None, policy: WaitPolicy | None, session_capacity: int
    ) -> None:
        self.serve_region = serve_region
        self.policy = policy
        self.session_capacity = session_capacity
        self.slot = -(-channel_size(session_capacity) // (1 << 20)) << 20  # whole MiBs
        self.slots = (GUEST_MEMORY - BOOT_SIZE) // self.slot

    def agent_channel(self, guest: Guest) -> Channel:
        """The hub's end of the agent's session channel, slot 0 (laid out before boot)."""
        return Channel.open_region(
            guest.region, 0, self.policy, size=self.slot, doorbell=doorbell(guest, 0)
        )

    async def serve(
        self,
        guest: Guest,
        channel: Channel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The guest's sessions on the hub: its agent's (started once the agent is attached),
        then those of its attachments, until they end or QEMU exits (`watch` cancels them)."""
        assert self.serve_region is not None
        attach = functools.partial(self.attach, guest)
        try:
            with guest.session:
                async with anyio.create_task_group() as sessions:
                    guest.sessions = sessions
                    await sessions.start(
                        functools.partial(
                            self.serve_region,
                            guest.instance_id,
                            channel,
                            pid=guest.pid,
                            attach=attach,
                        )
                    )
                    task_status.started()
        finally:
            channel.close()
            guest.served.set()

    async def attach(self, guest: Guest) -> int:
        """A session channel for a process the guest's agent starts (its workload), laid out
        in a free slot of the guest's memory and served like the agent's; its offset."""
        free = next((k for k in range(1, self.slots) if k not in guest.taken), None)
        if free is None or guest.sessions is None:
            raise BusyError(
                f"every session channel of guest {guest.name!r} is in use ({self.slots - 1} "
                "attachments besides its agent's): end a process that holds one"
            )
        offset = free * self.slot
        with Region(os.dup(guest.region.fd), self.slot, offset=offset) as part:
            format_channel(part, self.session_capacity)
        channel = Channel.open_region(
            guest.region,
            0,
            self.policy,
            offset=offset,
            size=self.slot,
            doorbell=doorbell(guest, offset),
        )
        guest.taken.add(free)
        assert self.serve_region is not None
        serve = self.serve_region
        attach = functools.partial(self.attach, guest)

        async def session() -> None:
            try:
                await serve(guest.instance_id, channel, pid=guest.pid, attach=attach)
            finally:
                channel.close()
                guest.taken.discard(free)

        guest.sessions.start_soon(session)
        await anyio.lowlevel.checkpoint()
        return offset

    @staticmethod
    async def watch(guest: Guest) -> None:
        """QEMU's exit ends the guest's sessions: nothing else would tell the hub."""
        await guest.vm.wait()
        guest.session.cancel()


def doorbell(guest: Guest, offset: int) -> int | None:
    """In interrupt mode, the eventfd QEMU writes when the guest rings the vector of the session
    channel at `offset` (its MiB); the hub's reader of that channel sleeps on it."""
    if not guest.spec.interrupts or guest.host_peer is None:
        return None
    return guest.host_peer.vectors[offset >> 20]
