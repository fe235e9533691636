"""The async channel API under asyncio, uvloop and trio (both ends in this process)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.shm import (
    Channel,
    ChannelHandle,
    RingCorruptedError,
    WaitPolicy,
    create_channel,
    max_payload,
)
from multikernel.shm._layout import SLOT_HEAD

pytestmark = pytest.mark.anyio

NO_SPIN = WaitPolicy(spin=0)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    ours, handle = create_channel(1024, policy=NO_SPIN)
    theirs = Channel.attach(handle, policy=NO_SPIN)
    async with ours, theirs:
        yield ours, theirs


async def test_frames_flow_both_ways(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    await a.send(b"ping")
    assert await b.receive() == b"ping"
    await b.send(b"pong")
    assert await a.receive() == b"pong"


async def test_receiver_sleeps_until_the_doorbell_rings(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    received: list[bytes] = []

    async def receive_one() -> None:
        received.append(await b.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive_one)
        await anyio.wait_all_tasks_blocked()
        await a.send(b"wake up")
    assert received == [b"wake up"]
    assert a.statistics().sent.wakeups_sent == 1
    assert b.statistics().received.waits == 1


async def test_busy_receiver_costs_the_sender_no_doorbell(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    for i in range(20):
        await a.send(bytes([i]))
        assert await b.receive() == bytes([i])
    assert a.statistics().sent.wakeups_sent == 0


async def test_a_reader_that_woke_up_costs_the_sender_no_more_doorbells(
    pair: tuple[Channel, Channel],
) -> None:
    """Waking clears the reader's sleeping flag: the doorbell is rung for one sleep only."""
    a, b = pair
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.receive)
        await anyio.wait_all_tasks_blocked()  # asleep on its doorbell
        await a.send(b"wake up")
    for i in range(10):
        await a.send(bytes([i]))
    assert a.statistics().sent.wakeups_sent == 1
    assert await b.receive_many(10) == [bytes([i]) for i in range(10)]


async def test_full_ring_makes_the_sender_wait_until_room(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    frames = [bytes([i]) * 100 for i in range(30)]  # far more than a 1 KiB ring holds
    got: list[bytes] = []

    async def drain() -> None:
        async for frame in b:
            got.append(frame)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        for frame in frames:
            await a.send(frame)
        await a.send_eof()
    assert got == frames
    assert a.statistics().sent.full_events > 0


async def test_cancel_scope_bounds_a_blocked_sender_and_nothing_is_lost(
    pair: tuple[Channel, Channel],
) -> None:
    a, b = pair
    accepted = []
    scope = anyio.CancelScope()

    async def send_until_cancelled() -> None:
        with scope:
            for i in range(100):
                await a.send(bytes([i]) * 100)
                accepted.append(bytes([i]) * 100)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_until_cancelled)
        await anyio.wait_all_tasks_blocked()  # the ring is full and the sender waits for room
        scope.cancel()
    assert scope.cancelled_caught
    assert 0 < len(accepted) < 100
    assert await b.receive_many(100) == accepted


async def test_batches_round_trip(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    frames = [bytes([i]) * (i % 50) for i in range(200)]
    got: list[bytes] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send_many, frames)
        while len(got) < len(frames):
            got.extend(await b.receive_many(16))
    assert got == frames


async def test_closing_wakes_a_waiting_receiver(pair: tuple[Channel, Channel]) -> None:
    _, b = pair
    with pytest.RaisesGroup(anyio.ClosedResourceError):
        async with anyio.create_task_group() as tg:

            async def close_soon() -> None:
                await anyio.wait_all_tasks_blocked()
                await b.aclose()

            tg.start_soon(close_soon)
            await b.receive()


async def test_two_tasks_cannot_wait_on_one_receiver(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    with pytest.RaisesGroup(anyio.BusyResourceError):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.receive)
            await anyio.wait_all_tasks_blocked()
            await b.receive()
    await a.aclose()


async def test_iteration_ends_when_the_peer_sends_eof(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    await a.send(b"one")
    await a.send(b"two")
    await a.send_eof()
    assert [frame async for frame in b] == [b"one", b"two"]


async def test_handle_travels_over_a_unix_socket() -> None:
    ours, handle = create_channel(4096)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        handle.send_over(left)
        handle.close()
        theirs = Channel.attach(ChannelHandle.receive_from(right))
    async with ours, theirs:
        await theirs.send(b"via SCM_RIGHTS")
        assert await ours.receive() == b"via SCM_RIGHTS"


async def test_channel_without_doorbells_polls_any_mmapable_file(tmp_path: Path) -> None:
    from multikernel.shm import Region, channel_size, format_channel

    path = tmp_path / "dax-like-region"
    path.write_bytes(bytes(channel_size(4096)))
    with Region.open(path) as region:
        format_channel(region, 4096)
    policy = WaitPolicy(spin=0, poll_max=2e-3)
    async with Channel.open_path(path, 0, policy) as a, Channel.open_path(path, 1, policy) as b:
        got: list[bytes] = []

        async def receive_two() -> None:
            got.append(await b.receive())
            got.append(await b.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive_two)
            await a.send(b"polled")
            await anyio.wait_all_tasks_blocked()
            await a.send(b"again")
        assert got == [b"polled", b"again"]
        assert b.statistics().received.waits >= 1


async def test_channel_over_a_region_we_hold_maps_its_own_copy() -> None:
    """`open_region` polls a channel in a region the caller keeps (an ivshmem device's memory),
    and closing either the channel or the caller's region leaves the other usable."""
    from multikernel.shm import Region, channel_size, format_channel

    region = Region.create(channel_size(4096))
    format_channel(region, 4096)
    policy = WaitPolicy(spin=0, poll_max=2e-3)
    a, b = Channel.open_region(region, 0, policy), Channel.open_region(region, 1, policy)
    region.close()
    async with a, b:
        await a.send(b"over the region")
        assert await b.receive() == b"over the region"
    with Region.create(channel_size(64)) as other, pytest.raises(ValueError):
        Channel.open_region(other, 2)


async def test_maximum_payload_is_half_the_capacity(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    big = b"m" * max_payload(1024)
    await a.send(big)
    assert await b.receive() == big


async def test_a_broker_can_create_both_ends_and_keep_nothing() -> None:
    from multikernel.shm import create_channel_handles

    left, right = create_channel_handles(4096)
    async with Channel.attach(left) as a, Channel.attach(right) as b:
        await a.send(b"brokered")
        assert await b.receive() == b"brokered"
        await b.send(b"reply")
        assert await a.receive() == b"reply"


async def test_a_sender_waiting_for_room_is_quarantined_by_a_bogus_head(
    pair: tuple[Channel, Channel],
) -> None:
    """The core's quick "is there room" look reads a bogus head as "no room"; the wake-up the
    peer rings must still reach the validation, or the sender would sleep forever."""
    a, b = pair
    while a.try_send(bytes(100)):
        pass
    writer = a.writer
    with pytest.RaisesGroup(RingCorruptedError):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, bytes(100))
            await anyio.wait_all_tasks_blocked()  # asleep, waiting for room
            head = writer._offset + SLOT_HEAD * 8
            with memoryview(writer._mm)[head : head + 8].cast("Q") as slot:
                slot[0] = slot[0] + (1 << 40)  # consumed more than was ever published
            bell = b.reader._peer_bell  # b reads what a writes: it rings a's "room" bell
            assert bell is not None
            bell.ring()
    await b.aclose()


async def test_a_receiver_cancelled_in_its_sleep_takes_no_frame(
    pair: tuple[Channel, Channel],
) -> None:
    a, b = pair
    got: list[bytes] = []
    scope = anyio.CancelScope()

    async def receiver() -> None:
        with scope:
            got.append(await b.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await anyio.wait_all_tasks_blocked()  # asleep on its doorbell
        scope.cancel()
        await a.send(b"after")  # rings the bell of a receiver that is being cancelled
    assert scope.cancelled_caught
    assert got == []
    assert b.reader.statistics().frames == 0
    assert await b.receive() == b"after"  # the next receive gets it, and sleeps fine again
    await a.send(b"again")
    assert await b.receive() == b"again"
