"""The producer side of a ring."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import _fence_acquire, _fence_release
from multikernel.shm._errors import FrameTooLargeError, PeerDiedError
from multikernel.shm._layout import (
    FLAG_PADDING,
    FRAME_HEADER,
    SIDE_CLOSED,
    SIDE_SLEEPING,
    SLOT_CONSUMER_FLAGS,
    SLOT_TAIL,
)
from multikernel.shm._ring import _DATA_SLOT, _RingSide

if TYPE_CHECKING:
    from collections.abc import Sequence

    from multikernel.shm._ring import Buffer


_PADDING_WORD = FLAG_PADDING << 32


class RingWriter(_RingSide):
    """Writes frames into a ring; exactly one writer per ring, in any process.

    `try_send` never blocks; `send_blocking` waits (spin, then doorbell) for the reader to make
    room; `send` does the same without blocking the event loop. A full ring makes the sender wait,
    bounded by the caller's cancel scope or timeout; nothing is ever overwritten.
    """

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
            q[_DATA_SLOT + (off >> 3)] = (pad - FRAME_HEADER) | _PADDING_WORD
            tail += pad
            off = 0
        start = self._data + off + FRAME_HEADER
        self._mm[start : start + n] = data
        q[_DATA_SLOT + (off >> 3)] = n
        self._tail = tail + size
        self._frames += 1
        self._bytes += n
        return True

    def _publish(self) -> None:
        """Publish the local tail with one 8-byte store, then wake the reader if it sleeps.

        The fence orders our tail store before the load of the reader's flags (see _ring.py).
        """
        q = self._q
        q[SLOT_TAIL] = self._tail
        _fence_acquire()
        _fence_release()
        flags = q[SLOT_CONSUMER_FLAGS]
        if flags:
            if flags & SIDE_SLEEPING and self._peer_bell is not None:
                self._wakeups += 1
                self._peer_bell.ring()
            if flags & SIDE_CLOSED:
                raise anyio.BrokenResourceError(
                    "the reader closed its side of the ring; frames sent now are not delivered"
                )

    def _too_large(self, n: int) -> FrameTooLargeError:
        return FrameTooLargeError(
            f"a {n}-byte frame exceeds this ring's maximum payload of {self.max_payload} bytes "
            f"(capacity {self.capacity}); split it or create a larger ring"
        )

    def try_send(self, data: Buffer) -> bool:
        """Send one frame if there is room now; False (nothing written) if the ring is full."""
        if self._unusable:
            self._check_usable()
        n = len(data)
        if n > self.max_payload:
            raise self._too_large(n)
        if not self._put(data, n):
            self._full += 1
            return False
        self._publish()
        return True

    def try_send_many(self, frames: Sequence[Buffer], start: int = 0) -> int:
        """Send as many of `frames[start:]` as fit now, publishing once; returns how many."""
        if self._unusable:
            self._check_usable()
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
                self._full += 1
                break
            count += 1
        if count:
            self._publish()
        return count

    def _end_check(self) -> None:
        """Before sleeping for room: a reader that closed or died will never make any."""
        if self._q[L.SLOT_CONSUMER_FLAGS] & L.SIDE_CLOSED:
            raise anyio.BrokenResourceError("the reader closed its side of the ring")
        if self._peer_died():
            raise PeerDiedError(
                "the reader is gone (its process died or it dropped its end of the channel); "
                "the ring will never drain"
            )

    def _sent_one(self, data: Buffer) -> bool | None:
        n = len(data)
        if not self._put(data, n):
            return None
        self._publish()
        return True

    def _send_some(self, frames: Sequence[Buffer], start: int) -> int | None:
        return self.try_send_many(frames, start) or None

    def send_blocking(self, data: Buffer, timeout: float | None = None) -> None:
        """Send one frame, waiting up to `timeout` seconds for room (TimeoutError after)."""
        if not self.try_send(data):
            self._wait(lambda: self._sent_one(data), self._end_check, timeout)

    async def send(self, data: Buffer) -> None:
        """Send one frame, waiting for room without blocking the event loop."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self.try_send(data):
            await self._await(lambda: self._sent_one(data), self._end_check)

    async def send_many(self, frames: Sequence[Buffer]) -> None:
        """Send every frame in order, publishing in batches and waiting for room as needed."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if any(len(f) > self.max_payload for f in frames):
            raise self._too_large(max(len(f) for f in frames))
        done = self.try_send_many(frames)
        while done < len(frames):
            done += await self._await(
                functools.partial(self._send_some, frames, done), self._end_check
            )
