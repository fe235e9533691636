"""The consumer side of a ring."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from multikernel.shm import _core
from multikernel.shm import _layout as L
from multikernel.shm._errors import PeerDiedError
from multikernel.shm._ring import _RingSide
from multikernel.shm._wait import cancel_pending, cancel_point

if TYPE_CHECKING:
    import mmap

    from multikernel.shm._core import Implementation, ReaderCore


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
    _core: ReaderCore

    @staticmethod
    def _make_core(
        mm: mmap.mmap, offset: int, capacity: int, bell: int, impl: Implementation | None
    ) -> ReaderCore:
        return _core.reader_core(mm, offset, capacity, bell, impl)

    def try_receive(self) -> bytes | None:
        """The next frame if one is there now, else None."""
        return self._core.try_receive()

    def try_receive_many(self, max_frames: int = 256) -> list[bytes]:
        """Up to `max_frames` frames that are there now (maybe none), consumed in one publish."""
        return self._core.try_receive_many(max_frames)

    def _end_check(self) -> bytes | None:
        """Before sleeping: a closed or dead writer ends the stream once the ring is drained."""
        if self._peer_closed():
            frame = self._core.try_receive()  # the close flag is stored after the last tail
            if frame is None:
                raise anyio.EndOfStream
            return frame
        if self._peer_died():
            frame = self._core.try_receive()
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
        frame = self._core.try_receive()
        if frame is None:  # n = -1: the core hands over the frame as soon as it wakes
            frame = self._wait(self._core.try_receive, self._end_check, timeout, -1)
        return frame

    async def receive(self) -> bytes:
        """The next frame, waiting without blocking the event loop (beyond the spin window)."""
        if cancel_pending():
            await cancel_point()
        frame = self._core.try_receive()
        if frame is None:  # n = -1: under asyncio the core hands over the frame as it wakes
            frame = await self._await(self._core.try_receive, self._end_check, -1)
        return frame

    async def receive_many(self, max_frames: int = 256) -> list[bytes]:
        """At least one and up to `max_frames` frames, waiting for the first one if needed."""
        if cancel_pending():
            await cancel_point()
        core = self._core
        frames = core.try_receive_many(max_frames)
        if not frames:
            frames = await self._await(
                lambda: core.try_receive_many(max_frames) or None, self._end_check_many
            )
        return frames
