"""Whatever a peer does with its doorbell ends, our rings and drains never block or fault."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

from multikernel.shm import (
    Channel,
    ChannelHandle,
    PeerDiedError,
    UnsafeHandleError,
    WaitPolicy,
    create_channel_handles,
)

from ._util import Hostile, hostile

pytestmark = pytest.mark.anyio

NO_SPIN = WaitPolicy(spin=0)
SIDES = pytest.mark.parametrize("hostile_side", [0, 1], ids=["hostile-side-0", "hostile-side-1"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def attacked(attack: str, hostile_side: int, capacity: int) -> Iterator[tuple[Channel, Hostile]]:
    """Our end of a fresh channel, and the attacker holding the other end."""
    handles = create_channel_handles(capacity)
    theirs = handles[hostile_side]
    try:
        with Channel.attach(handles[1 - hostile_side], NO_SPIN) as ours:
            argument, fds = theirs.to_argument(), [fd for fd in theirs.fds if fd >= 0]
            with hostile(attack, argument, fds) as peer:
                theirs.close()
                yield ours, peer
    finally:
        theirs.close()


@SIDES
async def test_a_jammed_doorbell_never_blocks_the_honest_side(hostile_side: int) -> None:
    """The eventfd attack: O_NONBLOCK cleared, pipes full, "asleep" for good; we never block.

    The peer shrank the pipes we ring to one page and never drains them, so every ring past
    the first page finds them full; it flooded the pipes we sleep on and made its ends
    blocking. All of it stays on its side of the pipes.
    """
    with attacked("doorbells", hostile_side, 1 << 16) as (ours, peer):
        jammed = await peer.report()
        assert jammed["flooded"] > 0

        def consume_then_publish() -> tuple[int, int]:
            received = 0  # the peer filled its ring; every frame we consume rings its doorbell
            while ours.try_receive() is not None:
                received += 1
            sent = 0  # and every frame we publish rings its other doorbell
            while ours.try_send(b""):
                sent += 1
            return received, sent

        # In a thread: a ring that blocked in the kernel would block the event loop, and the
        # deadline could not fire. This way a blocked ring fails the test instead of hanging it.
        with anyio.fail_after(10):
            received, sent = await anyio.to_thread.run_sync(
                consume_then_publish, abandon_on_cancel=True
            )
        stats = ours.statistics()
        assert received == jammed["sent"] == stats.received.wakeups_sent > jammed["pipe_size"]
        assert sent == stats.sent.wakeups_sent > jammed["pipe_size"]

        def sleep_on_the_flooded_doorbell() -> str:
            try:
                ours.receive_blocking(timeout=0.2)
            except TimeoutError:
                return "slept, woke, drained, slept again until the timeout"
            return "received something"

        # It wakes us at once; draining the flood never blocks; then we truly sleep.
        with anyio.fail_after(10):
            outcome = await anyio.to_thread.run_sync(
                sleep_on_the_flooded_doorbell, abandon_on_cancel=True
            )
        assert outcome.startswith("slept")
        assert ours.statistics().received.waits >= 1
        # The attacker exits holding everything: we are told, and nothing blocks.
        await peer.exit()
        with anyio.fail_after(10):
            with pytest.raises(PeerDiedError):
                await ours.receive()
            with pytest.raises(PeerDiedError):
                await ours.send(b"the ring is full and its reader is gone")


@SIDES
async def test_a_peer_that_drops_its_doorbells_is_reported_gone(hostile_side: int) -> None:
    """A closed ringer end reads as end of file forever: that ends the channel, not a spin."""
    with attacked("hangup", hostile_side, 1 << 12) as (ours, peer):
        await peer.report()
        before = ours.statistics().received.waits
        with anyio.fail_after(10), pytest.raises(PeerDiedError, match="dropped its end"):
            await ours.receive()
        assert ours.statistics().received.waits - before <= 1
        assert ours.try_send(b"nobody reads this, and ringing its closed pipe is harmless")
        await peer.exit()


async def test_a_peer_writing_into_its_liveness_end_only_ends_its_own_channel() -> None:
    with attacked("liveness", 1, 1 << 12) as (ours, peer):
        await peer.report()
        with anyio.fail_after(10), pytest.raises(PeerDiedError):
            await ours.receive()
        await peer.exit()
    left, right = create_channel_handles(1 << 12)  # everything else works as before
    with Channel.attach(left) as a, Channel.attach(right) as b:
        await a.send(b"still fine")
        assert await b.receive() == b"still fine"


def _swap_doorbell(handle: ChannelHandle, slot: int, fd: int) -> None:
    os.close(handle.fds[1 + slot])
    handle.fds[1 + slot] = fd


def test_a_handle_whose_doorbell_is_an_eventfd_is_refused_and_closed() -> None:
    handle, other = create_channel_handles(1 << 12)
    other.close()
    _swap_doorbell(handle, 0, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    with pytest.raises(UnsafeHandleError, match="is not a pipe"):
        Channel.attach(handle)
    assert handle.fds == [-1] * ChannelHandle.FDS


@pytest.mark.parametrize("slot", [0, 1], ids=["write-end-expected", "read-end-expected"])
def test_a_doorbell_end_the_side_should_not_hold_is_refused(slot: int) -> None:
    """Side 0 rings ring A's data doorbell (slot 0) and sleeps on its space doorbell (slot 1)."""
    handle, other = create_channel_handles(1 << 12)
    other.close()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wrong, spare = (read_end, write_end) if slot == 0 else (write_end, read_end)
    os.close(spare)
    _swap_doorbell(handle, slot, wrong)
    with pytest.raises(UnsafeHandleError, match=r"is not the (write|read) end"):
        Channel.attach(handle)


def test_a_blocking_doorbell_end_is_made_non_blocking_on_our_description() -> None:
    left, right = create_channel_handles(1 << 12)
    bells = left.fds[1:5]
    for fd in bells:
        os.set_blocking(fd, True)
    with Channel.attach(left), Channel.attach(right):
        assert not any(os.get_blocking(fd) for fd in bells)


def test_sigpipe_at_its_default_action_is_refused_before_we_ring_anyone() -> None:
    """With SIGPIPE at SIG_DFL, ringing a pipe whose reader closed would kill us."""
    left, right = create_channel_handles(1 << 12)
    right.close()
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        with pytest.raises(RuntimeError, match="leave SIGPIPE ignored"):
            Channel.attach(left)
    finally:
        signal.signal(signal.SIGPIPE, previous)
    assert left.fds == [-1] * ChannelHandle.FDS
