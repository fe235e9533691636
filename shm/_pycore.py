"""The ring's hot operations in pure Python: the reference implementation, and the fallback.

`WriterCore` and `ReaderCore` do what happens on every message: write or copy out frames,
publish a counter with one aligned 8-byte store (a `memoryview.cast("Q")` item assignment is a
single `mov`; `struct.pack_into` is not, it zeroes the target first), fence, and ring the peer
if it announced sleep; plus the announce half of the sleep handshake, and validation of every
counter and frame header the peer wrote. `_native.c` implements the same interface, rule for
rule, in C; `_core.py` chooses between them, and the test suite runs against both, including
one ring with a writer of one kind and a reader of the other.

A core knows nothing of waiting, doorbell fds beyond the peer's write end, or anyio: `RingWriter`
and `RingReader` (in `_writer.py`, `_reader.py`, `_ring.py`) build the blocking and async APIs on
top of it. After `release()` every call raises the closed error: nothing touches the mapping.
"""

from __future__ import annotations

import os
import select
import time
from typing import TYPE_CHECKING

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import _fence_acquire, _fence_release

if TYPE_CHECKING:
    import mmap
    from collections.abc import Sequence

    from multikernel.shm._core import Buffer, Errors

_DATA_SLOT = L.HEADER_SLOTS
_MASK32 = L.LENGTH_MASK
_PADDING_WORD = L.FLAG_PADDING << 32
_now = time.perf_counter_ns
_yield = os.sched_yield

# What `wait` found (the native core returns the same numbers).
WAIT_READY = 0  # looking again after announcing found something: no sleep
WAIT_READY_SLEPT = 1  # slept, and something is there now
WAIT_TIMEOUT = 2
WAIT_PEER_CLOSED = 3  # the peer's closed flag is set: whatever is left, then the end
WAIT_WOKEN_EMPTY = 4  # slept and woke to nothing: the peer may be gone, or a spurious wake
WAIT_SLEEP = 5  # prepare_sleep: announced and nothing there: sleep now, then after_sleep


def _drain(fd: int) -> None:
    """Empty a doorbell pipe: a short read means it is empty; bounded, whatever the peer wrote."""
    try:
        if len(os.read(fd, 64)) < 64:
            return
        for _ in range(16):
            if len(os.read(fd, 65536)) < 65536:
                return
    except BlockingIOError:
        pass


def _ring(fd: int) -> None:
    # Full: the sleeper is woken already. No read end left: nobody to wake.
    try:  # noqa: SIM105 (the hot path: suppress() costs more than the write)
        os.write(fd, b"\x01")
    except (BlockingIOError, BrokenPipeError):
        pass


class _Core:
    """What both sides share: the views, the flags, the quarantine, release."""

    _my_flags: int
    _peer_flags: int
    implementation = "python"

    def __init__(
        self, mm: mmap.mmap, offset: int, capacity: int, peer_bell: int, errors: Errors
    ) -> None:
        self._errors = errors
        self._offset = offset
        self._mm = mm
        self._whole = memoryview(mm)
        self._q = self._whole[offset : offset + L.ring_size(capacity)].cast("Q")
        self.capacity = capacity
        self.max_payload = L.max_payload(capacity)
        self._mask = capacity - 1
        self._data = offset + L.HEADER_SIZE
        self._head = self._q[L.SLOT_HEAD]
        self._tail = self._q[L.SLOT_TAIL]
        self._bell = peer_bell
        self.frames = self.bytes = self.wakeups = self.full = 0
        self.broken: BaseException | None = None
        self.closed = False
        self._poller: select.poll | None = None
        self._polled: tuple[int, int, int] | None = None  # the fds `_poller` holds
        self._bell_dirty = False  # `wait` woke on the doorbell and left draining it for later

    def _corrupt(self, what: str) -> BaseException:
        self.broken = self._errors.corrupted(
            f"peer corrupted the ring at offset {self._offset}: {what}; the ring is quarantined"
        )
        return self.broken

    def _unusable(self) -> BaseException:
        return self.broken if self.broken is not None else self._errors.closed()

    def _wake_peer(self) -> None:
        """After publishing (the fence is done): ring the peer if it announced sleep."""
        if self._q[self._peer_flags] & L.SIDE_SLEEPING and self._bell >= 0:
            self.wakeups += 1
            _ring(self._bell)

    def announce(self) -> None:
        """Set our sleeping flag, then fence: the caller re-checks the ring before sleeping."""
        if self.closed:
            raise self._errors.closed()
        q, slot = self._q, self._my_flags
        q[slot] = q[slot] | L.SIDE_SLEEPING
        _fence_acquire()
        _fence_release()

    def unannounce(self) -> None:
        if not self.closed:
            q, slot = self._q, self._my_flags
            q[slot] = q[slot] & ~L.SIDE_SLEEPING

    def my_flags(self) -> int:
        return 0 if self.closed else self._q[self._my_flags]

    def peer_flags(self) -> int:
        return 0 if self.closed else self._q[self._peer_flags]

    def backlog(self) -> int:
        return 0 if self.closed else self._q[L.SLOT_TAIL] - self._q[L.SLOT_HEAD]

    def set_closed(self) -> None:
        """Mark our side closed (and awake), fence, and ring the peer whatever it announced."""
        if self.closed:
            return
        q, slot = self._q, self._my_flags
        q[slot] = (q[slot] | L.SIDE_CLOSED) & ~L.SIDE_SLEEPING
        _fence_acquire()
        _fence_release()
        if self._bell >= 0:
            _ring(self._bell)

    def woken(self, bell: int) -> None:
        """After waking: clear our sleeping flag, then empty the doorbell pipe (bounded)."""
        if self.closed:
            return
        q, slot = self._q, self._my_flags
        q[slot] = q[slot] & ~L.SIDE_SLEEPING
        self._bell_dirty = False
        if bell >= 0:
            _drain(bell)

    def _ready(self, n: int) -> bool:
        raise NotImplementedError

    def wait(
        self, wait_fd: int, bell: int, timeout_ms: int, n: int, live_fd: int = -1
    ) -> bytes | int:
        """The sleep half of a wait, after the spin; returns one of the WAIT_* outcomes.

        Announce sleep (flag, fence), look again (a frame to read, or room for `n` bytes; a
        reader that passes n = -1 gets the frame itself instead of WAIT_READY_SLEPT); unless
        that found something or the peer's closed flag, poll the doorbell and `live_fd`
        themselves when `wait_fd` is -1, else `wait_fd` (the wait set); then clear the flag and
        look again. The doorbell is drained at the start of the next wait, off the path from
        the wake-up to the frame. A signal whose handler returns is a spurious wake-up.
        """
        if self.closed or self.broken is not None:
            raise self._unusable()
        if self._bell_dirty and bell >= 0:
            self._bell_dirty = False
            _drain(bell)
        self.announce()
        if self._ready(n):
            self.unannounce()
            if self.peer_flags() & L.SIDE_CLOSED:
                return WAIT_PEER_CLOSED
            return WAIT_READY
        fds = (wait_fd, -1, -1) if wait_fd >= 0 else (-1, bell, live_fd)
        poller = self._poller
        if poller is None or self._polled != fds:
            poller = self._poller = select.poll()
            self._polled = fds
            for fd in fds:
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll(timeout_ms)
        finally:
            if not self.closed:
                self.unannounce()
                self._bell_dirty = True
        if not ready:
            return WAIT_TIMEOUT
        if self.closed:
            raise self._unusable()
        if not self._ready(n):
            return WAIT_WOKEN_EMPTY
        return self._take_one(WAIT_READY_SLEPT) if n < 0 else WAIT_READY_SLEPT

    def prepare_sleep(self, n: int) -> bytes | int:
        """The first half of `wait` for a side that sleeps elsewhere (on an event loop).

        Announce sleep and look again: if something is there, the flag is cleared and the
        outcome is `wait`'s (a reader passing n = -1 gets the frame); if not, the flag stays set
        and WAIT_SLEEP says to sleep now and then call `after_sleep`.
        """
        if self.closed or self.broken is not None:
            raise self._unusable()
        self.announce()
        if not self._ready(n):
            return WAIT_SLEEP
        self.unannounce()
        status = WAIT_PEER_CLOSED if self.peer_flags() & L.SIDE_CLOSED else WAIT_READY
        return self._take_one(status) if n < 0 else status

    def after_sleep(self, n: int) -> bytes | int:
        """The second half: clear our flag (whoever woke us drained the doorbell), look again."""
        if self.closed:
            raise self._unusable()
        self.unannounce()
        if not self._ready(n):
            return WAIT_WOKEN_EMPTY
        return self._take_one(WAIT_READY_SLEPT) if n < 0 else WAIT_READY_SLEPT

    def _take_one(self, status: int) -> bytes | int:
        raise NotImplementedError

    def release(self) -> None:
        """Let go of the mapping; every later call raises the closed (or broken) error."""
        if not self.closed:
            self.closed = True
            self._q.release()
            self._whole.release()


class WriterCore(_Core):
    """The producer's hot path."""

    _my_flags = L.SLOT_PRODUCER_FLAGS
    _peer_flags = L.SLOT_CONSUMER_FLAGS

    def _load_head(self) -> int:
        head = self._q[L.SLOT_HEAD]
        if head < self._head or head > self._tail or head & 7:
            raise self._corrupt(
                f"reader head moved to {head} (was {self._head}, tail {self._tail})"
            )
        self._head = head
        return head

    def _put(self, data: Buffer, n: int) -> bool:
        """Write one frame after the local tail without publishing it; False if it does not fit."""
        size = (n + 15) & ~7
        tail = self._tail
        capacity = self.capacity
        off = tail & self._mask
        room = capacity - off
        pad = room if size > room else 0
        if tail + pad + size - self._head > capacity and (
            tail + pad + size - self._load_head() > capacity
        ):
            return False
        q = self._q
        if pad:
            q[_DATA_SLOT + (off >> 3)] = (pad - L.FRAME_HEADER) | _PADDING_WORD
            tail += pad
            off = 0
        start = self._data + off + L.FRAME_HEADER
        self._mm[start : start + n] = data
        q[_DATA_SLOT + (off >> 3)] = n
        self._tail = tail + size
        self.frames += 1
        self.bytes += n
        return True

    def _publish(self) -> None:
        """Publish the local tail with one 8-byte store; fence; wake the reader if it sleeps."""
        q = self._q
        q[L.SLOT_TAIL] = self._tail
        _fence_acquire()  # orders the tail store before the load of the reader's flags
        _fence_release()
        flags = q[L.SLOT_CONSUMER_FLAGS]
        if flags:
            if flags & L.SIDE_SLEEPING and self._bell >= 0:
                self.wakeups += 1
                _ring(self._bell)
            if flags & L.SIDE_CLOSED:
                raise self._errors.broken(
                    "the reader closed its side of the ring; frames sent now are not delivered"
                )

    def _too_large(self, n: int) -> BaseException:
        return self._errors.too_large(
            f"a {n}-byte frame exceeds this ring's maximum payload of {self.max_payload} bytes "
            f"(capacity {self.capacity}); split it or create a larger ring"
        )

    def try_send(self, data: Buffer) -> bool:
        """Send one frame if there is room now; False (nothing written) if the ring is full."""
        if self.closed or self.broken is not None:
            raise self._unusable()
        n = len(data)
        if n > self.max_payload:
            raise self._too_large(n)
        if not self._put(data, n):
            self.full += 1
            return False
        self._publish()
        return True

    def try_send_many(self, frames: Sequence[Buffer], start: int = 0) -> int:
        """Send as many of `frames[start:]` as fit now, publishing once; returns how many."""
        if self.closed or self.broken is not None:
            raise self._unusable()
        put = self._put
        count = 0
        for i in range(start, len(frames)):
            data = frames[i]
            n = len(data)
            if n > self.max_payload:
                if count:
                    self._publish()
                raise self._too_large(n)
            if not put(data, n):
                self.full += 1
                break
            count += 1
        if count:
            self._publish()
        return count

    def _ready(self, n: int) -> bool:
        size = (n + 15) & ~7
        room = self.capacity - (self._tail & self._mask)
        pad = room if size > room else 0
        q = self._q
        return bool(
            self._tail + pad + size - q[L.SLOT_HEAD] <= self.capacity
            or q[L.SLOT_CONSUMER_FLAGS] & L.SIDE_CLOSED
        )

    def spin(self, ns: int, n: int = 0) -> bool:
        """Yield the CPU until a frame of `n` bytes may fit or the reader closed, up to `ns` ns.

        True when it is worth trying to send; the send validates what it reads.
        """
        deadline = _now() + ns
        while not self.closed:
            _yield()
            if self._ready(n):
                return True
            if _now() >= deadline:
                break
        return False


class ReaderCore(_Core):
    """The consumer's hot path."""

    _my_flags = L.SLOT_CONSUMER_FLAGS
    _peer_flags = L.SLOT_PRODUCER_FLAGS

    def _load_tail(self) -> int:
        tail = self._q[L.SLOT_TAIL]
        if tail < self._tail or tail > self._head + self.capacity or tail & 7:
            raise self._corrupt(
                f"writer tail moved to {tail} (was {self._tail}, head {self._head})"
            )
        self._tail = tail
        return tail

    def _take(self) -> bytes:
        """Copy out the frame at the local head and advance it (not yet published)."""
        head = self._head
        capacity = self.capacity
        q = self._q
        off = head & self._mask
        word = q[_DATA_SLOT + (off >> 3)]
        if word >> 32:
            if word >> 32 != L.FLAG_PADDING or off + L.FRAME_HEADER + (word & _MASK32) != capacity:
                raise self._corrupt(f"bad frame header {word:#x} at offset {off}")
            head += capacity - off
            if head >= self._tail:
                raise self._corrupt("padding frame with no frame after it")
            off = 0
            word = q[_DATA_SLOT]
            if word >> 32:
                raise self._corrupt(f"bad frame header {word:#x} at offset 0")
        size = (word + 15) & ~7
        if word > self.max_payload or head + size > self._tail or off + size > capacity:
            raise self._corrupt(f"frame length {word} at offset {off} runs past the data")
        start = self._data + off + L.FRAME_HEADER
        frame = self._mm[start : start + word]
        self._head = head + size
        self.frames += 1
        self.bytes += word
        return frame

    def _consumed(self) -> None:
        """Publish the local head with one 8-byte store; fence; wake the writer if it sleeps."""
        self._q[L.SLOT_HEAD] = self._head
        _fence_acquire()  # orders the head store before the load of the writer's flags
        _fence_release()
        self._wake_peer()

    def try_receive(self) -> bytes | None:
        """The next frame if one is there now, else None."""
        if self.closed or self.broken is not None:
            raise self._unusable()
        if self._head == self._tail and self._head == self._load_tail():
            return None
        frame = self._take()
        self._consumed()
        return frame

    def try_receive_many(self, max_frames: int = 256) -> list[bytes]:
        """Up to `max_frames` frames that are there now (maybe none), consumed in one publish."""
        if self.closed or self.broken is not None:
            raise self._unusable()
        if self._head == self._tail and self._head == self._load_tail():
            return []
        frames: list[bytes] = []
        take = self._take
        while len(frames) < max_frames and self._head != self._tail:
            frames.append(take())
        self._consumed()
        return frames

    def _take_one(self, status: int) -> bytes | int:
        frame = self.try_receive()
        return status if frame is None else frame

    def _ready(self, n: int = 0) -> bool:
        q = self._q
        return bool(q[L.SLOT_TAIL] != self._head or q[L.SLOT_PRODUCER_FLAGS] & L.SIDE_CLOSED)

    def spin(self, ns: int, n: int = 0) -> bool:
        """Yield the CPU until the writer published something or closed, up to `ns` ns."""
        deadline = _now() + ns
        while not self.closed:
            _yield()
            if self._ready():
                return True
            if _now() >= deadline:
                break
        return False
