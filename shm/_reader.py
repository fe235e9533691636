"""The consumer side of a ring."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import _fence_acquire, _fence_release
from multikernel.shm._errors import PeerDiedError
from multikernel.shm._layout import FRAME_HEADER, SIDE_SLEEPING, SLOT_HEAD, SLOT_PRODUCER_FLAGS
from multikernel.shm._ring import _DATA_SLOT, _MASK32, _RingSide


class RingReader(_RingSide):
    """Reads frames from a ring; exactly one reader per ring, in any process.

    Frames come out as `bytes` copied out of shared memory, so nothing refers into the mapping
    after the call returns. `try_receive` never blocks; `receive_blocking` and `receive` wait
    (spin, then doorbell). When the writer closes, the remaining frames are delivered and then
    `anyio.EndOfStream` is raised; when its process dies, the remaining frames are delivered and
    then `PeerDiedError` is raised.
    """

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
        start = self._data + off + FRAME_HEADER
        frame = self._mm[start : start + word]
        self._head = head + size
        self._frames += 1
        self._bytes += word
        return frame

    def _consumed(self) -> None:
        """Publish the local head with one 8-byte store, then wake the writer if it sleeps."""
        q = self._q
        q[SLOT_HEAD] = self._head
        _fence_acquire()  # orders the head store before the load of the writer's flags
        _fence_release()
        if q[SLOT_PRODUCER_FLAGS] & SIDE_SLEEPING and self._peer_bell is not None:
            self._wakeups += 1
            self._peer_bell.ring()

    def try_receive(self) -> bytes | None:
        """The next frame if one is there now, else None."""
        if self._unusable:
            self._check_usable()
        if self._head == self._tail and self._head == self._load_tail():
            return None
        frame = self._take()
        self._consumed()
        return frame

    def try_receive_many(self, max_frames: int = 256) -> list[bytes]:
        """Up to `max_frames` frames that are there now (maybe none), consumed in one publish."""
        if self._unusable:
            self._check_usable()
        if self._head == self._tail and self._head == self._load_tail():
            return []
        frames: list[bytes] = []
        take = self._take
        while len(frames) < max_frames and self._head != self._tail:
            frames.append(take())
        self._consumed()
        return frames

    def _end_check(self) -> bytes | None:
        """Before sleeping: a closed or dead writer ends the stream once the ring is drained."""
        if self._q[L.SLOT_PRODUCER_FLAGS] & L.SIDE_CLOSED:
            frame = self.try_receive()  # the close flag is stored after the last tail
            if frame is None:
                raise anyio.EndOfStream
            return frame
        if self._peer_died():
            frame = self.try_receive()
            if frame is None:
                raise PeerDiedError(
                    "the writer is gone (its process died or it dropped its end of the "
                    "channel) and its ring is drained"
                )
            return frame
        return None

    def _end_check_many(self) -> list[bytes] | None:
        frame = self._end_check()
        return None if frame is None else [frame]

    def receive_blocking(self, timeout: float | None = None) -> bytes:
        """The next frame, waiting up to `timeout` seconds (TimeoutError after)."""
        frame = self.try_receive()
        if frame is None:
            frame = self._wait(self.try_receive, self._end_check, timeout)
        return frame

    async def receive(self) -> bytes:
        """The next frame, waiting without blocking the event loop (beyond the spin window)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        frame = self.try_receive()
        if frame is None:
            frame = await self._await(self.try_receive, self._end_check)
        return frame

    async def receive_many(self, max_frames: int = 256) -> list[bytes]:
        """At least one and up to `max_frames` frames, waiting for the first one if needed."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        frames = self.try_receive_many(max_frames)
        if not frames:
            frames = await self._await(
                lambda: self.try_receive_many(max_frames) or None, self._end_check_many
            )
        return frames
