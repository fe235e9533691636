"""The single-producer single-consumer ring: one writer and one reader, in different processes.

`format_ring` lays a ring into a region; `RingWriter` and `RingReader` attach to it, one per side.
Frames are variable length; each side publishes its counter with one aligned 8-byte store
(a `memoryview.cast("Q")` item assignment is a single `mov`; `struct.pack_into` is not, it zeroes
the target first) after the payload is written. Everything read from the peer's side of the header
and from frame headers is validated before use, so a peer that writes garbage gets the ring
quarantined with `RingCorruptedError`, never an out-of-bounds read, a crash or a hang.

Waiting is in `_RingSide._wait` (sync) and `_await` (async): spin with `os.sched_yield` for the
policy's window, then announce sleep in the header, fence, re-check, and sleep on the wait set.
The announce/re-check handshake, with a fence on both sides, is what makes the doorbell free
while the peer is awake (io_uring's NEED_WAKEUP): a producer rings only when the flag is set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, TypeVar

import anyio
import anyio.lowlevel

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import Doorbell, WaitSet, fence
from multikernel.shm._errors import (
    LayoutError,
    RingCorruptedError,
)
from multikernel.shm._wait import SpinGovernor, WaitPolicy

if TYPE_CHECKING:
    from collections.abc import Callable

    from multikernel.shm._region import Region

Buffer = bytes | bytearray | memoryview

T = TypeVar("T")

_DATA_SLOT = L.HEADER_SLOTS
_MASK32 = L.LENGTH_MASK
_now = time.perf_counter_ns
_yield = os.sched_yield


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """Counters of one side of a ring, as seen by that side.

    frames, bytes: frames and payload bytes sent (writer) or received (reader).
    waits: times this side slept (reader: ring empty; writer: ring full).
    wakeups_sent: times this side rang the peer's doorbell; the rest of the time the peer was
        awake and the doorbell was skipped.
    full_events: times the writer found the ring full (0 on the reader).
    spins: waits that ended while spinning, without a sleep.
    backlog: bytes published but not yet consumed, as seen now.
    """

    frames: int
    bytes: int
    waits: int
    wakeups_sent: int
    full_events: int
    spins: int
    backlog: int


def format_ring(region: Region, offset: int, capacity: int) -> None:
    """Lay out an empty ring of `capacity` data bytes at `offset` in `region`."""
    L.check_capacity(capacity)
    if offset % 64 or offset < 0 or offset + L.ring_size(capacity) > region.size:
        raise LayoutError(
            f"a ring of capacity {capacity} needs {L.ring_size(capacity)} bytes at a 64-byte "
            f"aligned offset; offset {offset} in a region of {region.size} bytes does not fit"
        )
    with memoryview(region.mmap) as whole, whole[offset : offset + L.HEADER_SIZE] as header:
        header[:] = bytes(L.HEADER_SIZE)
        with header.cast("Q") as q:
            q[L.SLOT_VERSION] = L.RING_VERSION
            q[L.SLOT_CAPACITY] = capacity
            q[L.SLOT_HEADER] = L.HEADER_SIZE
            q[L.SLOT_MAGIC] = L.RING_MAGIC  # last: a ring with a magic is complete


class _RingSide:
    """What the writer and the reader share: attach, validation, waiting, close."""

    _my_flags: int  # the header slot this side writes its flags into
    _peer_flags: int

    def __init__(
        self,
        region: Region,
        offset: int,
        *,
        bell: Doorbell | None = None,
        peer_bell: Doorbell | None = None,
        liveness_fd: int | None = None,
        policy: WaitPolicy | None = None,
    ) -> None:
        self._region = region
        self._offset = offset
        self._mm = region.mmap
        if offset % 64 or offset < 0 or offset + L.HEADER_SIZE > region.size:
            raise LayoutError(f"no room for a ring header at offset {offset} of {region}")
        whole = memoryview(self._mm)
        with whole[offset : offset + L.HEADER_SIZE].cast("Q") as q:
            magic, version = q[L.SLOT_MAGIC], q[L.SLOT_VERSION]
            capacity, header = q[L.SLOT_CAPACITY], q[L.SLOT_HEADER]
        if magic != L.RING_MAGIC:
            whole.release()
            raise LayoutError(f"no ring at offset {offset} of {region} (magic {magic:#x})")
        if version != L.RING_VERSION or header != L.HEADER_SIZE:
            whole.release()
            raise LayoutError(
                f"ring at offset {offset} has version {version} and header size {header}; "
                f"this build speaks version {L.RING_VERSION} with a {L.HEADER_SIZE}-byte header"
            )
        try:
            L.check_capacity(capacity)
        except ValueError as exc:
            whole.release()
            raise LayoutError(f"ring at offset {offset}: {exc}") from None
        end = offset + L.ring_size(capacity)
        if end > region.size:
            whole.release()
            raise LayoutError(f"ring at offset {offset} claims {capacity} bytes past the region")
        self._whole = whole
        self._span = whole[offset:end]
        self._q = self._span.cast("Q")
        self.capacity = capacity
        self.max_payload = L.max_payload(capacity)
        self._mask = capacity - 1
        self._data = offset + L.HEADER_SIZE  # absolute offset of the data area in the mapping
        self._head = self._q[L.SLOT_HEAD]
        self._tail = self._q[L.SLOT_TAIL]
        if not self._head <= self._tail <= self._head + capacity or (self._head | self._tail) & 7:
            self._release_views()
            raise LayoutError(f"ring at offset {offset} has impossible counters")
        self._peer_bell = peer_bell
        self._waitset = WaitSet(bell, liveness_fd) if bell is not None else None
        self._liveness_fd = liveness_fd
        self.policy = policy or WaitPolicy()
        self._governor = SpinGovernor(self.policy)
        #: If set, a wait spins only while this returns True: e.g. a requester spins only while it
        #: has requests in flight, since only then is something imminent.
        self.spin_gate: Callable[[], bool] | None = None
        self._nudged = False
        self._closed = False
        self._broken: RingCorruptedError | None = None
        self._unusable = False  # closed or broken: one check on the hot paths
        self._busy = False
        self._frames = self._bytes = self._waits = self._wakeups = self._full = self._spins = 0

    # -- shared plumbing ----------------------------------------------------------------------

    def _corrupt(self, what: str) -> RingCorruptedError:
        self._unusable = True
        self._broken = RingCorruptedError(
            f"peer corrupted the ring at offset {self._offset}: {what}; the ring is quarantined"
        )
        return self._broken

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise anyio.ClosedResourceError

    def _ring_peer(self) -> None:
        """After publishing: wake the peer if it announced sleep (a fence first, see module doc)."""
        fence()
        if self._q[self._peer_flags] & L.SIDE_SLEEPING and self._peer_bell is not None:
            self._wakeups += 1
            self._peer_bell.ring()

    def _peer_closed(self) -> bool:
        return bool(self._q[self._peer_flags] & L.SIDE_CLOSED)

    def _peer_died(self) -> bool:
        return self._waitset.peer_gone() if self._waitset is not None else False

    def _spin(self, attempt: Callable[[], T | None]) -> T | None:
        governor = self._governor
        if (self.spin_gate is not None and not self.spin_gate()) or not governor.should_spin():
            return None
        deadline = _now() + governor.spin_ns
        while _now() < deadline:
            _yield()
            result = attempt()
            if result is not None:
                governor.record(hit=True)
                self._spins += 1
                return result
        governor.record(hit=False)
        return None

    async def _spin_async(self, attempt: Callable[[], T | None]) -> T | None:
        if not self.policy.cooperative:
            return self._spin(attempt)
        governor = self._governor
        if (self.spin_gate is not None and not self.spin_gate()) or not governor.should_spin():
            return None
        checkpoint = anyio.lowlevel.checkpoint
        self._nudged = False
        deadline = _now() + governor.spin_ns
        while _now() < deadline:
            await checkpoint()
            _yield()
            if self._nudged:  # something was just sent that the peer will answer: spin on
                self._nudged = False
                deadline = _now() + governor.spin_ns
            result = attempt()
            if result is not None:
                governor.record(hit=True)
                self._spins += 1
                return result
        governor.record(hit=False)
        return None

    def _announce_sleep(
        self, attempt: Callable[[], T | None], at_end: Callable[[], T | None]
    ) -> T | None:
        """Set our sleeping flag, fence, and re-check; returns a result if sleeping is moot.

        `at_end` runs when the re-check found nothing: it raises if the peer closed or died (or
        returns a last result that raced with that), else returns None and we go to sleep.
        """
        q, slot = self._q, self._my_flags
        q[slot] = q[slot] | L.SIDE_SLEEPING
        fence()
        try:
            result = attempt()
            if result is None:
                result = at_end()
        except BaseException:
            q[slot] = q[slot] & ~L.SIDE_SLEEPING
            raise
        if result is not None:
            q[slot] = q[slot] & ~L.SIDE_SLEEPING
        return result

    def _woken(self) -> None:
        if self._closed:  # closed while we slept: the views and the doorbell are gone
            return
        q, slot = self._q, self._my_flags
        q[slot] = q[slot] & ~L.SIDE_SLEEPING
        self._waits += 1
        if self._waitset is not None:
            self._waitset.drain()

    def _wait(
        self,
        attempt: Callable[[], T | None],
        at_end: Callable[[], T | None],
        timeout: float | None,
    ) -> T:
        """Block until `attempt` returns a result (sync API), or raise TimeoutError."""
        result = self._spin(attempt)
        if result is not None:
            return result
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = self.policy.poll_min
        while True:
            result = self._announce_sleep(attempt, at_end)
            if result is not None:
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._woken()
                raise TimeoutError("timed out waiting on the ring")
            try:
                if self._waitset is not None:
                    self._waitset.wait_blocking(remaining)
                else:
                    time.sleep(backoff if remaining is None else min(backoff, remaining))
                    backoff = min(backoff * 2, self.policy.poll_max)
            finally:
                self._woken()
            self._check_usable()
            result = attempt()
            if result is not None:
                return result

    async def _await(self, attempt: Callable[[], T | None], at_end: Callable[[], T | None]) -> T:
        """Wait until `attempt` returns a result, never blocking the event loop.

        The spin yields to the event loop on every turn (a checkpoint, then `sched_yield`), so
        the task that will produce what we wait for (often in this very process: a handler about
        to reply) runs while we spin.
        """
        if self._busy:
            raise anyio.BusyResourceError("waiting on this ring side")
        self._busy = True
        try:
            backoff = self.policy.poll_min
            while (result := await self._spin_async(attempt)) is None:
                result = self._announce_sleep(attempt, at_end)
                if result is not None:
                    break
                try:
                    if self._waitset is not None:
                        await self._waitset.wait()
                    else:
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, self.policy.poll_max)
                finally:
                    self._woken()
                self._check_usable()
                result = attempt()
                if result is not None:
                    break
            return result
        finally:
            self._busy = False

    def nudge(self, *, wake: bool = True) -> None:
        """Something this side waits for is likely soon (we just sent a request or a reply).

        A wait in progress restarts its spin window. With `wake`, a side asleep on its doorbell
        is woken (a cheap, same-process wake-up through the wait set's private eventfd: we hold
        only the read end of our doorbell) so that it spins instead of sleeping: right for a
        requester, whose answer is certain; a server only guesses that another request
        follows, and waking itself for a guess costs CPU at every reply under sparse traffic.
        """
        self._nudged = True
        if (
            wake
            and self._waitset is not None
            and not self._closed
            and self._q[self._my_flags] & L.SIDE_SLEEPING
        ):
            self._waitset.wake()

    def _set_closed_flag(self) -> None:
        q, slot = self._q, self._my_flags
        q[slot] = (q[slot] | L.SIDE_CLOSED) & ~L.SIDE_SLEEPING
        fence()
        if self._peer_bell is not None:
            self._peer_bell.ring()

    def _release_views(self) -> None:
        for view in ("_q", "_span", "_whole"):
            mv = getattr(self, view, None)
            if mv is not None:
                mv.release()

    def close(self) -> None:
        """Tell the peer we are gone and release our views of the mapping. Idempotent.

        The doorbells, liveness fd and region belong to whoever created them (the channel).
        """
        if self._closed:
            return
        self._closed = self._unusable = True
        try:
            if self._broken is None:
                self._set_closed_flag()
        finally:
            if self._waitset is not None:
                self._waitset.close()
            self._release_views()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> RingStatistics:
        backlog = 0 if self._closed else self._q[L.SLOT_TAIL] - self._q[L.SLOT_HEAD]
        return RingStatistics(
            frames=self._frames,
            bytes=self._bytes,
            waits=self._waits,
            wakeups_sent=self._wakeups,
            full_events=self._full,
            spins=self._spins,
            backlog=backlog,
        )
