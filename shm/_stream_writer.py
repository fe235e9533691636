"""The writer's side of a broadcast stream (the layout and the reader are in `_stream.py`).

The writer keeps, per reader, that reader's cursor page mapped, the write end of the doorbell
the reader sleeps on, and the read end of the one the reader rings when the writer waits for
room. Publishing costs no look at any reader while the ring has room below the slowest
reader's cursor as last read (`_limit`); only when it would pass it does the writer read every
cursor again (each checked: 8-byte aligned, never back, never past the tail; a reader that
breaks a rule is dropped, `bad`). Wake-ups are batched: a reader's sleeping flag is looked at
every `WAKE_EVERY` frames and when the caller flushes (`wake_sleepers`), not after every frame.

Slow readers: under `block` the writer waits for the slowest, up to `patience` seconds per
reader, after which that reader is *stalled*: the writer stops waiting for it (overwrites what
it has not read; it counts the gap from the sequence numbers) until it is back within half the
ring. Under `drop` every reader is stalled from the start.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Final, Literal

import anyio
import anyio.lowlevel

from multikernel.shm import _layout as L
from multikernel.shm._doorbell import check_doorbell_fd
from multikernel.shm._errors import FrameTooLargeError
from multikernel.shm._stream import (
    _DATA,
    C_CURSOR,
    C_FLAGS,
    C_MISSED,
    CLOSED,
    F_SEAL_FUTURE_WRITE,
    FRAME_SEQ,
    HEADER,
    S_FLAGS,
    S_MARK,
    S_RESERVE,
    S_SEQ,
    S_TAIL,
    WAITING,
    check_header,
    check_stream_fd,
    drain,
    fence,
    map_cursor,
    ring,
)

#: Frames between two looks at the readers' sleeping flags (and the flush at the end).
WAKE_EVERY: Final = 16
SlowReaders = Literal["block", "drop"]


@dataclass(eq=False, slots=True)
class _Reader:
    id: int
    mm: mmap.mmap
    c: memoryview
    bell: int  # write end: we ring it when the reader sleeps
    space: int  # read end: the reader rings it when we wait for room
    cursor: int
    stalled: bool = False
    blocked_since: float = 0.0
    stalls: int = field(default=0)


@dataclass(frozen=True, slots=True)
class StreamWriterStatistics:
    frames: int
    readers: int
    stalled: int  # readers the writer stopped waiting for (now)
    stalls: int  # times a reader was stalled
    full: int  # times the writer waited for room
    wakeups: int  # doorbells rung


class StreamWriter:
    """The single writer of a stream; takes ownership of `stream_fd` (and seals it)."""

    def __init__(
        self, stream_fd: int, *, slow: SlowReaders = "block", patience: float = 2.0
    ) -> None:
        try:
            size = check_stream_fd(stream_fd, writer=True)
            self._mm = mmap.mmap(stream_fd, size)
            # From now on nobody maps it writable or writes it but through this mapping.
            fcntl.fcntl(stream_fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        finally:
            os.close(stream_fd)
        self._q = memoryview(self._mm).cast("Q")
        self.capacity = check_header(self._q, size)
        self.max_body = L.max_payload(self.capacity) - FRAME_SEQ
        self._max_n = self.max_body + FRAME_SEQ
        self._mask = self.capacity - 1
        self._half = self.capacity >> 1
        self._marked = -1  # which half-ring block S_MARK points into
        q = self._q
        self._tail = q[S_TAIL] if not q[S_TAIL] & 7 else 0
        self._seq = q[S_SEQ]
        self._limit = self._tail + self.capacity
        self.slow: SlowReaders = slow
        self.patience = patience
        self._readers: dict[int, _Reader] = {}
        self.bad: list[tuple[int, str]] = []  # readers dropped for what they wrote, and why
        self.gone: list[int] = []  # readers dropped because they closed or died
        self._unwoken = 0
        self._waiting_on = -1  # the space doorbell `write` sleeps on now
        self._first_seq = self._seq
        self.full = self.wakeups = self.stalls = 0
        self.closed = False

    # -- readers ------------------------------------------------------------------------------

    def add_reader(self, reader: int, cursor_fd: int, bell_fd: int, space_fd: int) -> None:
        """A reader the hub set up: its cursor page, and its doorbell ends (ours now)."""
        try:
            check_doorbell_fd(bell_fd, sleeper=False)
            check_doorbell_fd(space_fd, sleeper=True)
            for fd in (bell_fd, space_fd):
                os.set_blocking(fd, False)
            mm, c = map_cursor(cursor_fd)
        except BaseException:
            for fd in (cursor_fd, bell_fd, space_fd):
                os.close(fd)
            raise
        os.close(cursor_fd)
        cursor = c[C_CURSOR]
        if cursor & 7 or cursor > self._tail:
            cursor = self._tail  # the hub read it from the tail: anything else is nonsense
        self._readers[reader] = _Reader(reader, mm, c, bell_fd, space_fd, cursor)
        self._readers[reader].stalled = self.slow == "drop"
        if not self._readers[reader].stalled:
            self._limit = min(self._limit, cursor + self.capacity)

    def remove_reader(self, reader: int) -> None:
        r = self._readers.pop(reader, None)
        if r is not None:
            r.c.release()
            r.mm.close()
            os.close(r.bell)
            if self._waiting_on == r.space:  # `write` waits on it in another task: wake it
                anyio.notify_closing(r.space)
            os.close(r.space)

    @property
    def readers(self) -> int:
        return len(self._readers)

    def _drop(self, r: _Reader, why: str) -> None:
        self.bad.append((r.id, why))
        self.remove_reader(r.id)

    def _scan(self) -> _Reader | None:
        """Read every cursor again; set `_limit`; the slowest reader we wait for (or None)."""
        tail, half = self._tail, self.capacity // 2
        slowest: _Reader | None = None
        for r in list(self._readers.values()):
            c = r.c
            cursor = c[C_CURSOR]
            if c[C_FLAGS] & CLOSED:
                self.gone.append(r.id)
                self.remove_reader(r.id)
                continue
            if cursor & 7 or cursor > tail or (cursor < r.cursor and not r.stalled):
                self._drop(r, f"wrote cursor {cursor} (was {r.cursor}, tail {tail})")
                continue
            if cursor != r.cursor:
                r.blocked_since = 0.0
            r.cursor = cursor
            if r.stalled and self.slow == "block" and cursor >= tail - half:
                r.stalled = False  # caught up: wait for it again
            if not r.stalled and (slowest is None or cursor < slowest.cursor):
                slowest = r
        self._limit = (slowest.cursor if slowest is not None else tail) + self.capacity
        return slowest

    # -- writing ------------------------------------------------------------------------------

    def try_write(self, body: bytes | bytearray | memoryview) -> bool:
        """Write one frame if there is room below the slowest reader we wait for; publish it."""
        n = len(body) + FRAME_SEQ
        if n > self._max_n:
            raise FrameTooLargeError(
                f"a {n - FRAME_SEQ}-byte body exceeds this stream's largest, {self.max_body}"
            )
        size = (n + 15) & ~7
        tail = self._tail
        off = tail & self._mask
        room = self.capacity - off
        if size > room:  # a padding frame fills the rest; the frame starts at offset 0
            end = tail + room + size
            if end > self._limit and not self._room(end):
                return False
            self._q[_DATA + (off >> 3)] = (room - 8) | L.FLAG_PADDING << 32
            off = 0
        else:
            end = tail + size
            if end > self._limit and not self._room(end):
                return False
        q = self._q
        q[S_RESERVE] = end  # before the bytes: a lapped reader then knows they may be new
        slot = _DATA + (off >> 3)
        seq = self._seq
        q[slot + 1] = seq
        start = HEADER + off + 16
        self._mm[start : start + n - FRAME_SEQ] = body
        q[slot] = n
        self._seq = seq = seq + 1
        q[S_SEQ] = seq
        q[S_TAIL] = self._tail = end
        if (end - size) // self._half != self._marked:  # the first frame in this half-ring
            self._marked = (end - size) // self._half
            q[S_MARK] = end - size
        self._unwoken = unwoken = self._unwoken + 1
        if unwoken >= WAKE_EVERY:
            self.wake_sleepers()
        return True

    def _room(self, end: int) -> bool:
        """Whether a frame ending at `end` fits below the slowest reader we wait for, after
        reading every cursor again."""
        if self.closed:
            raise anyio.ClosedResourceError
        self._scan()
        if end > self._limit:
            self.full += 1
            return False
        return True

    def wake_sleepers(self) -> None:
        """Fence, then ring every reader that said it sleeps (after a batch of frames)."""
        self._unwoken = 0
        fence()
        for r in self._readers.values():
            if r.c[C_FLAGS] & WAITING:
                self.wakeups += 1
                ring(r.bell)

    @property
    def unwoken(self) -> int:
        """Frames published since the readers' sleeping flags were last looked at."""
        return self._unwoken

    async def write(self, body: bytes | bytearray | memoryview) -> None:
        """Write one frame, waiting for room under `block` (at most `patience` per reader)."""
        while not self.try_write(body):
            await self._wait_room()

    async def _wait_room(self) -> None:
        q = self._q
        q[S_FLAGS] = WAITING
        try:
            fence()
            self.wake_sleepers()  # whoever we wait for may be asleep on frames we wrote
            slowest = self._scan()
            if slowest is None:
                return
            now = time.monotonic()
            if not slowest.blocked_since:
                slowest.blocked_since = now
            left = slowest.blocked_since + self.patience - now
            if left <= 0:
                slowest.stalled = True
                slowest.stalls += 1
                self.stalls += 1
                return
            self._waiting_on = slowest.space
            try:
                with anyio.move_on_after(left):
                    await anyio.wait_readable(slowest.space)
            except anyio.ClosedResourceError:
                return  # removed meanwhile (the hub said it went): look again
            finally:
                self._waiting_on = -1
            if slowest.id in self._readers and not drain(slowest.space):
                self.gone.append(slowest.id)  # its process is gone: stop waiting for it
                self.remove_reader(slowest.id)
        finally:
            if not self.closed:
                q[S_FLAGS] = 0

    def statistics(self) -> StreamWriterStatistics:
        stalled = sum(r.stalled for r in self._readers.values()) if self.slow == "block" else 0
        return StreamWriterStatistics(
            self._seq - self._first_seq, len(self._readers), stalled, self.stalls, self.full,
            self.wakeups,
        )  # fmt: skip

    def reader_missed(self, reader: int) -> int:
        r = self._readers.get(reader)
        return 0 if r is None else r.c[C_MISSED]

    def close(self) -> None:
        """Mark the stream closed, wake every reader (they read what is left, then end)."""
        if self.closed:
            return
        self.closed = True
        self._limit = -1
        self._q[S_FLAGS] = CLOSED
        fence()
        for reader in list(self._readers):
            r = self._readers[reader]
            ring(r.bell)
            self.remove_reader(reader)
        self._q.release()
        self._mm.close()
