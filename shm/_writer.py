"""The producer side of a ring."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from multikernel.shm import _core
from multikernel.shm import _layout as L
from multikernel.shm._errors import FrameTooLargeError, PeerDiedError
from multikernel.shm._ring import _RingSide
from multikernel.shm._wait import cancel_pending, cancel_point

if TYPE_CHECKING:
    import mmap
    from collections.abc import Sequence

    from multikernel.shm._core import Implementation, WriterCore
    from multikernel.shm._ring import Buffer


class RingWriter(_RingSide):
    """Writes frames into a ring; exactly one writer per ring, in any process.

    `try_send` never blocks; `send_blocking` waits (spin, then doorbell) for the reader to make
    room; `send` does the same without blocking the event loop. A full ring makes the sender wait,
    bounded by the caller's cancel scope or timeout; nothing is ever overwritten.
    """

    _my_flags = L.SLOT_PRODUCER_FLAGS
    _peer_flags = L.SLOT_CONSUMER_FLAGS
    _core: WriterCore

    @staticmethod
    def _make_core(
        mm: mmap.mmap, offset: int, capacity: int, bell: int, impl: Implementation | None
    ) -> WriterCore:
        return _core.writer_core(mm, offset, capacity, bell, impl)

    def _too_large(self, n: int) -> FrameTooLargeError:
        return FrameTooLargeError(
            f"a {n}-byte frame exceeds this ring's maximum payload of {self.max_payload} bytes "
            f"(capacity {self.capacity}); split it or create a larger ring"
        )

    def try_send(self, data: Buffer) -> bool:
        """Send one frame if there is room now; False (nothing written) if the ring is full."""
        return self._core.try_send(data)

    def try_send_many(self, frames: Sequence[Buffer], start: int = 0) -> int:
        """Send as many of `frames[start:]` as fit now, publishing once; returns how many."""
        return self._core.try_send_many(frames, start)

    def _end_check(self) -> None:
        """Before sleeping for room: a reader that closed or died will never make any."""
        if self._peer_closed():
            raise anyio.BrokenResourceError("the reader closed its side of the ring")
        if self._peer_died():
            raise PeerDiedError(
                "the reader is gone (its process died or it dropped its end of the channel); "
                "the ring will never drain"
            )

    def _sent_one(self, data: Buffer) -> bool | None:
        return self._core.try_send(data) or None

    def _send_some(self, frames: Sequence[Buffer], start: int) -> int | None:
        return self._core.try_send_many(frames, start) or None

    def send_blocking(self, data: Buffer, timeout: float | None = None) -> None:
        """Send one frame, waiting up to `timeout` seconds for room (TimeoutError after)."""
        if not self._core.try_send(data):
            self._wait(lambda: self._sent_one(data), self._end_check, timeout, len(data))

    async def send(self, data: Buffer) -> None:
        """Send one frame, waiting for room without blocking the event loop."""
        if cancel_pending():
            await cancel_point()
        if not self._core.try_send(data):
            await self._await(lambda: self._sent_one(data), self._end_check, len(data))

    async def send_many(self, frames: Sequence[Buffer]) -> None:
        """Send every frame in order, publishing in batches and waiting for room as needed."""
        if cancel_pending():
            await cancel_point()
        if any(len(f) > self.max_payload for f in frames):
            raise self._too_large(max(len(f) for f in frames))
        done = self._core.try_send_many(frames)
        while done < len(frames):
            done += await self._await(
                functools.partial(self._send_some, frames, done),
                self._end_check,
                len(frames[done]),
            )
