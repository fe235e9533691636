"""The single-producer single-consumer ring: one writer and one reader, in different processes.

`format_ring` lays a ring into a region; `RingWriter` and `RingReader` attach to it, one per side.
Frames are variable length; each side publishes its counter with one aligned 8-byte store after
the payload is written. Everything read from the peer's side of the header and from frame headers
is validated before use, so a peer that writes garbage gets the ring quarantined with
`RingCorruptedError`, never an out-of-bounds read, a crash or a hang. What happens on every
message (frames in and out, publishing, fencing, ringing a sleeping peer, validation) is a side's
*core*: the C one (`_native.c`) where it was built, else the pure-Python reference
(`_pycore.py`); `_core.py` chooses. This module and `_writer.py`, `_reader.py` build the
blocking and async APIs on top of either.

Waiting is in `_RingSide._wait` (sync) and `_await` (async): spin with `os.sched_yield` for the
policy's window, then announce sleep in the header, fence, re-check, and sleep on the wait set.
The announce/re-check handshake, with a fence on both sides, is what makes the doorbell free
while the peer is awake (io_uring's NEED_WAKEUP): a producer rings only when the flag is set.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, TypeVar

import anyio
import anyio.lowlevel

from multikernel.shm import _layout as L
from multikernel.shm._core import Buffer as Buffer
from multikernel.shm._core import Core, Implementation
from multikernel.shm._doorbell import Doorbell, WaitSet, running_loop
from multikernel.shm._errors import LayoutError
from multikernel.shm._pycore import (
    WAIT_PEER_CLOSED,
    WAIT_READY,
    WAIT_READY_SLEPT,
    WAIT_SLEEP,
    WAIT_TIMEOUT,
    WAIT_WOKEN_EMPTY,
)
from multikernel.shm._wait import SpinGovernor, WaitPolicy, checkpoint_for_spin

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable

    from multikernel.shm._region import Region

T = TypeVar("T")

_now = time.perf_counter_ns
#: How long an async spin stays in the native core before it lets the event loop run again.
SLICE_NS = 5_000


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
    _core: Core

    def __init__(
        self,
        region: Region,
        offset: int,
        *,
        bell: Doorbell | None = None,
        peer_bell: Doorbell | None = None,
        liveness_fd: int | None = None,
        policy: WaitPolicy | None = None,
        implementation: Implementation | None = None,
    ) -> None:
        self._region = region
        self._offset = offset
        self._mm = region.mmap
        if offset % 64 or offset < 0 or offset + L.HEADER_SIZE > region.size:
            raise LayoutError(f"no room for a ring header at offset {offset} of {region}")
        with memoryview(self._mm) as whole, whole[offset : offset + L.HEADER_SIZE].cast("Q") as q:
            magic, version = q[L.SLOT_MAGIC], q[L.SLOT_VERSION]
            capacity, header = q[L.SLOT_CAPACITY], q[L.SLOT_HEADER]
            head, tail = q[L.SLOT_HEAD], q[L.SLOT_TAIL]
        if magic != L.RING_MAGIC:
            raise LayoutError(f"no ring at offset {offset} of {region} (magic {magic:#x})")
        if version != L.RING_VERSION or header != L.HEADER_SIZE:
            raise LayoutError(
                f"ring at offset {offset} has version {version} and header size {header}; "
                f"this build speaks version {L.RING_VERSION} with a {L.HEADER_SIZE}-byte header"
            )
        try:
            L.check_capacity(capacity)
        except ValueError as exc:
            raise LayoutError(f"ring at offset {offset}: {exc}") from None
        if offset + L.ring_size(capacity) > region.size:
            raise LayoutError(f"ring at offset {offset} claims {capacity} bytes past the region")
        if not head <= tail <= head + capacity or (head | tail) & 7:
            raise LayoutError(f"ring at offset {offset} has impossible counters")
        self.capacity = capacity
        self.max_payload = L.max_payload(capacity)
        self._core = self._make_core(
            self._mm, offset, capacity, -1 if peer_bell is None else peer_bell.fd, implementation
        )
        #: "native" (the C core) or "python" (the reference core); see `_core.py`.
        self.implementation: str = self._core.implementation
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
        self._busy = False
        self._waits = self._spins = 0

    @staticmethod
    def _make_core(
        mm: mmap.mmap, offset: int, capacity: int, bell: int, impl: Implementation | None
    ) -> Core:
        raise NotImplementedError

    # -- shared plumbing ----------------------------------------------------------------------

    @property
    def _broken(self) -> BaseException | None:
        return self._core.broken

    def _check_usable(self) -> None:
        core = self._core
        if core.broken is not None:
            raise core.broken
        if self._closed:
            raise anyio.ClosedResourceError

    def _peer_closed(self) -> bool:
        return bool(self._core.peer_flags() & L.SIDE_CLOSED)

    def _peer_died(self) -> bool:
        return self._waitset.peer_gone() if self._waitset is not None else False

    def _wants_spin(self) -> bool:
        """Whether this wait spins first: the gate allows it and the governor expects an answer."""
        gate = self.spin_gate
        return (gate is None or gate()) and self._governor.should_spin()

    def _spin(self, attempt: Callable[[], T | None], n: int = 0) -> T | None:
        """Spin (the core yields the CPU each turn) until `attempt` succeeds or the window ends.

        `n` is the payload size a writer waits to make room for. The caller asked `_wants_spin`.
        """
        spin = self._core.spin
        deadline = _now() + self._governor.spin_ns
        while (left := deadline - _now()) > 0 and spin(left, n):
            result = attempt()
            if result is not None:
                self._spins += 1
                return result
        return None

    async def _spin_async(self, attempt: Callable[[], T | None], n: int = 0) -> T | None:
        """Spin in slices of `SLICE_NS` (in the core, yielding the CPU each turn), going back to
        the event loop between slices so that other tasks run: the answer is often produced by
        one of them (a handler in this very process). A turn of the event loop costs several
        times a turn of the native spin, so a slice is a few microseconds, not one turn. The
        first slice comes before the first turn of the loop: an answer from another process
        is caught without paying one. The caller asked `_wants_spin`.
        """
        if not self.policy.cooperative:
            return self._spin(attempt, n)
        checkpoint = checkpoint_for_spin()
        spin = self._core.spin
        self._nudged = False
        deadline = _now() + self._governor.spin_ns
        while (left := deadline - _now()) > 0:
            if spin(min(left, SLICE_NS), n):
                result = attempt()
                if result is not None:
                    self._spins += 1
                    return result
            await checkpoint()
            if self._nudged:  # something was just sent that the peer will answer: spin on
                self._nudged = False
                deadline = _now() + self._governor.spin_ns
        return None

    def _announce_sleep(
        self, attempt: Callable[[], T | None], at_end: Callable[[], T | None]
    ) -> T | None:
        """Set our sleeping flag, fence, and re-check; returns a result if sleeping is moot.

        `at_end` runs when the re-check found nothing: it raises if the peer closed or died (or
        returns a last result that raced with that), else returns None and we go to sleep.
        """
        core = self._core
        core.announce()
        try:
            result = attempt()
            if result is None:
                result = at_end()
        except BaseException:
            core.unannounce()
            raise
        if result is not None:
            core.unannounce()
        return result

    def _woken(self) -> None:
        if self._closed:  # closed while we slept: the views and the doorbell are gone
            return
        self._waits += 1
        waitset = self._waitset
        if waitset is None:
            self._core.unannounce()
        else:
            self._core.woken(waitset.bell.fd)  # clears our flag, drains the doorbell
            waitset.drain_own()

    def _wait(
        self,
        attempt: Callable[[], T | None],
        at_end: Callable[[], T | None],
        timeout: float | None,
        n: int = 0,
    ) -> T:
        """Block until `attempt` returns a result (sync API), or raise TimeoutError.

        `n`: the payload size a writer waits to make room for (0 for a reader).
        """
        started = _now()
        result = self._spin(attempt, max(n, 0)) if self._wants_spin() else None
        if result is not None:
            self._governor.learn(_now() - started, caught=True)
            return result
        result = self._sleep(attempt, at_end, timeout, n)
        self._governor.learn(_now() - started, caught=False)
        return result

    def _sleep(
        self,
        attempt: Callable[[], T | None],
        at_end: Callable[[], T | None],
        timeout: float | None,
        n: int,
    ) -> T:
        waitset = self._waitset
        if waitset is None:
            return self._poll(attempt, at_end, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._core
        bell_fd = waitset.bell.fd
        while True:
            timeout_ms = -1
            if deadline is not None:
                timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            # Announce, look again, sleep, clear the flag (the bell is drained next time): one call.
            wait_fd, live_fd = waitset.sleep_fds()
            outcome = core.wait(wait_fd, bell_fd, timeout_ms, n, live_fd)
            if outcome.__class__ is bytes:  # a reader's frame, taken as soon as it woke
                self._waits += 1
                waitset.drain_own()
                return typing.cast("T", outcome)
            if outcome not in (WAIT_READY, WAIT_PEER_CLOSED):
                self._waits += 1
                waitset.drain_own()
            if outcome in (WAIT_READY, WAIT_READY_SLEPT):
                result = attempt()
            elif outcome == WAIT_TIMEOUT:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("timed out waiting on the ring")
                continue
            else:  # the peer closed, or we woke to nothing (the peer may be gone)
                result = attempt()
                if result is None:
                    result = at_end()
            if result is not None:
                return result
            self._check_usable()

    def _poll(
        self,
        attempt: Callable[[], T | None],
        at_end: Callable[[], T | None],
        timeout: float | None,
    ) -> T:
        """Without a doorbell: look, sleep with back-off, look again."""
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
                time.sleep(backoff if remaining is None else min(backoff, remaining))
                backoff = min(backoff * 2, self.policy.poll_max)
            finally:
                self._woken()
            self._check_usable()
            result = attempt()
            if result is not None:
                return result

    async def _await(
        self, attempt: Callable[[], T | None], at_end: Callable[[], T | None], n: int = 0
    ) -> T:
        """Wait until `attempt` returns a result, never blocking the event loop.

        The spin goes back to the event loop between short native slices (`_spin_async`), so
        the task that will produce what we wait for (often in this very process: a handler about
        to reply) runs while we spin. `n`: the payload size a writer waits to make room for; a
        reader passing -1 gets its frame from the core as it wakes (`attempt` is try_receive).

        Under an asyncio loop the loop itself watches the doorbell (`WaitSet`), and the core
        announces sleep and looks again in one call, then after the wake clears the flag and
        looks again (taking a reader's frame) in another: as little Python as possible runs on
        a CPU that was just woken, its caches cold. Other loops sleep on the wait set's fd.
        """
        if self._busy:
            raise anyio.BusyResourceError("waiting on this ring side")
        self._busy = True
        started = _now()
        caught = True
        waitset = self._waitset
        loop = running_loop() if waitset is not None else None
        core = self._core
        try:
            backoff = self.policy.poll_min
            while True:
                if self._wants_spin():
                    result = await self._spin_async(attempt, max(n, 0))
                    if result is not None:
                        break
                caught = False
                if loop is not None:
                    assert waitset is not None
                    outcome = core.prepare_sleep(n)
                    if outcome == WAIT_SLEEP:
                        try:
                            await waitset.sleep(loop)
                        except BaseException:
                            if not self._closed:
                                core.unannounce()
                            raise
                        self._waits += 1
                        outcome = core.after_sleep(n)
                    if outcome.__class__ is bytes:
                        result = typing.cast("T", outcome)
                        break
                    if outcome == WAIT_WOKEN_EMPTY:
                        self._check_usable()
                    # `attempt` validates what the peer wrote (a bogus counter reads as "not
                    # ready" to the core's quick look); woken to nothing, the peer may be gone.
                    result = attempt()
                    if result is None and outcome in (WAIT_PEER_CLOSED, WAIT_WOKEN_EMPTY):
                        result = at_end()
                    if result is not None:
                        break
                    continue
                result = self._announce_sleep(attempt, at_end)
                if result is not None:
                    break
                try:
                    if waitset is not None:
                        await waitset.wait()
                    else:
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, self.policy.poll_max)
                finally:
                    self._woken()
                self._check_usable()
                result = attempt()
                if result is not None:
                    break
            self._governor.learn(_now() - started, caught=caught)
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
            and self._core.my_flags() & L.SIDE_SLEEPING
        ):
            self._waitset.wake()

    def close(self) -> None:
        """Tell the peer we are gone and release our view of the mapping. Idempotent.

        The doorbells, liveness fd and region belong to whoever created them (the channel).
        """
        if self._closed:
            return
        self._closed = True
        core = self._core
        try:
            if core.broken is None:
                core.set_closed()
        finally:
            if self._waitset is not None:
                self._waitset.close()
            core.release()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> RingStatistics:
        core = self._core
        return RingStatistics(
            frames=core.frames,
            bytes=core.bytes,
            waits=self._waits,
            wakeups_sent=core.wakeups,
            full_events=core.full,
            spins=self._spins,
            backlog=core.backlog(),
        )
