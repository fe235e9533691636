"""Broadcast streams: one writer, many readers, each at its own pace (docs/bus.md, "Streams").

A stream is a ring of frames in a memfd that the writer maps read-write and every reader maps
read-only: the writer seals it with `F_SEAL_FUTURE_WRITE` once it has mapped it, so nobody can
map it writable again (nor `write` it). Each reader has a *cursor page* of its own, a small memfd
only it and the writer map: the reader publishes there how far it has read and whether it sleeps,
and nothing there can reach the data or another reader. This is Aeron's log buffer and
iceoryx2's publish-subscribe on our ring's rules (docs/shm.md): 8-byte aligned frames that never
wrap, counters that only grow and are published with one aligned store, a full fence between
publishing and looking at the other side's sleeping flag.

Frames carry a sequence number (the first 8 bytes of the payload), so a reader that the writer
lapped (under `drop`, or once it stalled under `block`) counts what it missed. Before writing a
frame the writer publishes `reserve` (where the frame ends): a reader checks it after copying,
and a frame whose bytes may have been overwritten meanwhile is not delivered but counted as a
gap, like a seqlock. Everything the reader reads from the writer is validated; a violation that is
not explained by a lap raises `RingCorruptedError`.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Final

from multikernel.shm import _core
from multikernel.shm import _layout as L
from multikernel.shm._doorbell import (
    _fence_acquire,
    _fence_release,
    check_doorbell_fd,
    doorbell_fds,
)
from multikernel.shm._errors import LayoutError, RingCorruptedError, UnsafeHandleError
from multikernel.shm._region import SEALS

STREAM_MAGIC: Final = int.from_bytes(b"MKSTREAM", "little")
CURSOR_MAGIC: Final = int.from_bytes(b"MKCURSOR", "little")
VERSION: Final = 1
HEADER: Final = 256
CURSOR_SIZE: Final = 4096
F_SEAL_FUTURE_WRITE: Final = 0x10  # Linux 5.1; Python's fcntl module does not name it
READER_SEALS: Final = SEALS | F_SEAL_FUTURE_WRITE

# Stream header slots (index = byte offset / 8). Line 0: written once by the hub.
S_MAGIC, S_VERSION, S_CAPACITY, S_HEADER = 0, 1, 2, 3
S_TAIL = 8  # line 1, the writer: bytes published since creation
S_SEQ = 9  # the sequence number of the next frame (stored before `tail`)
S_MARK = 10  # where the first frame in the tail's half of the ring starts: a lapped reader
# resumes there (it is always less than a ring behind the tail)
S_RESERVE = 16  # line 2, the writer: bytes written or being written (stored before the data)
S_FLAGS = 24  # line 3, the writer: bit 0 waiting for room, bit 1 closed
# Cursor page slots. Line 0: written once by the hub.
C_MAGIC, C_VERSION = 0, 1
C_CURSOR = 8  # line 1, the reader: bytes consumed (a frame boundary)
C_SEQ = 9  # the sequence number the reader expects next
C_FLAGS = 16  # line 2, the reader: bit 0 asleep on its doorbell, bit 1 closed
C_MISSED = 17  # frames this reader was told it missed (for introspection)

_DATA: Final = HEADER // 8  # the slot where the data area starts
WAITING: Final = L.SIDE_SLEEPING
CLOSED: Final = L.SIDE_CLOSED
FRAME_SEQ: Final = 8  # bytes of sequence number at the start of every payload


def stream_size(capacity: int) -> int:
    return HEADER + capacity


def max_body(capacity: int) -> int:
    """The largest body a stream of `capacity` bytes carries in one frame."""
    return L.max_payload(capacity) - FRAME_SEQ


def create_stream(capacity: int) -> int:
    """A memfd holding an empty stream (the hub makes it); sealed against resizing, not yet
    against writing: the writer maps it, then seals it (`StreamWriter`)."""
    L.check_capacity(capacity)
    fd = os.memfd_create("multikernel-stream", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, stream_size(capacity))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with mmap.mmap(fd, HEADER) as mm, memoryview(mm) as whole, whole.cast("Q") as q:
            q[S_VERSION], q[S_CAPACITY], q[S_HEADER] = VERSION, capacity, HEADER
            q[S_MAGIC] = STREAM_MAGIC  # last: a header with a magic is complete
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_cursor(tail: int, seq: int) -> int:
    """A reader's cursor page (the hub makes it), starting at the stream's `tail`: the reader
    sees what is published from then on."""
    fd = os.memfd_create("multikernel-cursor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, CURSOR_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        with mmap.mmap(fd, HEADER) as mm, memoryview(mm) as whole, whole.cast("Q") as q:
            q[C_VERSION], q[C_CURSOR], q[C_SEQ] = VERSION, tail, seq
            q[C_MAGIC] = CURSOR_MAGIC
    except BaseException:
        os.close(fd)
        raise
    return fd


def reader_handles(stream_fd: int) -> tuple[list[int], list[int]]:
    """The fds of a new reader of the stream `stream_fd` (the hub makes them): the reader's
    (the stream, its cursor page starting at the tail, the read end of its doorbell, the write
    end of the writer's) and the writer's (the cursor page, the two other ends). The caller
    hands each list over and closes it; on failure nothing is left open."""
    made: list[int] = []
    try:
        made.append(create_cursor(*stream_position(stream_fd)))
        made += doorbell_fds()  # bell: the reader sleeps on [1], the writer rings [2]
        made += doorbell_fds()  # space: the writer sleeps on [3], the reader rings [4]
        made += [os.dup(stream_fd), os.dup(made[0])]
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    cursor, bell_r, bell_w, space_r, space_w, stream, cursor_copy = made
    return [stream, cursor, bell_r, space_w], [cursor_copy, bell_w, space_r]


def sealed_for_readers(fd: int) -> bool:
    """Whether nobody can map the stream `fd` writable or write it any more."""
    return not READER_SEALS & ~_seals(fd, "stream")


def stream_position(fd: int) -> tuple[int, int]:
    """(tail, next sequence number) of a sealed stream, read without trusting the writer: a
    tail that is not a multiple of 8 counts as 0. The sequence number is read after the tail
    and stored before it, so it is never less than that of the frame at the tail."""
    with (
        mmap.mmap(fd, HEADER, prot=mmap.PROT_READ) as mm,
        memoryview(mm) as whole,
        whole.cast("Q") as q,
    ):
        tail = q[S_TAIL]
        seq = q[S_SEQ]
    return (0, 0) if tail & 7 else (tail, seq)


def _seals(fd: int, what: str) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise UnsafeHandleError(f"the {what} fd {fd} is not a memfd ({exc.strerror})") from None


def check_stream_fd(fd: int, *, writer: bool) -> int:
    """The stream's size if `fd` is safe for this side; else `UnsafeHandleError`.

    Both sides need a memfd that cannot be resized. A reader also needs it sealed against
    writing (`F_SEAL_FUTURE_WRITE`, with `F_SEAL_SEAL` so it stays so): then no reader can
    write into what the others read. The writer gets it before that seal, and adds it itself.
    """
    seals = _seals(fd, "stream")
    need = READER_SEALS if not writer else fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if need & ~seals:
        raise UnsafeHandleError(
            f"the stream fd {fd} has seals {seals:#x}, needs {need:#x}: "
            + ("a reader could write into it" if not writer else "a peer could resize it")
        )
    if writer and seals & (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise UnsafeHandleError(f"the stream fd {fd} is sealed already (seals {seals:#x})")
    size = os.fstat(fd).st_size
    if size < HEADER + L.MIN_CAPACITY:
        raise UnsafeHandleError(f"the stream fd {fd} holds {size} bytes, too few for a stream")
    return size


def check_cursor_fd(fd: int) -> None:
    if SEALS & ~_seals(fd, "cursor") or os.fstat(fd).st_size != CURSOR_SIZE:
        raise UnsafeHandleError(f"the cursor fd {fd} is not a sealed {CURSOR_SIZE}-byte memfd")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise UnsafeHandleError(f"the cursor fd {fd} is not open for reading and writing")


def check_header(q: memoryview, size: int) -> int:
    """The capacity a stream header claims, checked against the mapping's `size`."""
    if q[S_MAGIC] != STREAM_MAGIC or q[S_VERSION] != VERSION or q[S_HEADER] != HEADER:
        raise LayoutError("no stream (magic, version or header size) in the stream memfd")
    capacity = q[S_CAPACITY]
    try:
        L.check_capacity(capacity)
    except ValueError as exc:
        raise LayoutError(f"stream: {exc}") from None
    if stream_size(capacity) > size:
        raise LayoutError(f"stream claims {capacity} bytes past its memfd of {size}")
    return capacity


def map_cursor(fd: int) -> tuple[mmap.mmap, memoryview]:
    """Map a cursor page (checked) read-write: (the mapping, its slots as u64)."""
    check_cursor_fd(fd)
    mm = mmap.mmap(fd, CURSOR_SIZE)
    q = memoryview(mm).cast("Q")
    if q[C_MAGIC] != CURSOR_MAGIC or q[C_VERSION] != VERSION:
        q.release()
        mm.close()
        raise LayoutError("no cursor (magic or version) in the cursor memfd")
    return mm, q


def ring(fd: int) -> None:
    """Ring a doorbell pipe: full means already woken, no reader means nobody to wake."""
    try:  # noqa: SIM105 (the hot path)
        os.write(fd, b"\x01")
    except (BlockingIOError, BrokenPipeError):
        pass


def drain(fd: int) -> bool:
    """Empty a doorbell pipe (bounded); False at end of file: whoever rang it is gone."""
    try:
        for _ in range(16):
            data = os.read(fd, 4096)
            if not data:
                return False
            if len(data) < 4096:
                return True
    except BlockingIOError:
        pass
    return True


def fence() -> None:
    _fence_acquire()
    _fence_release()


@dataclass(frozen=True, slots=True)
class StreamReaderStatistics:
    frames: int
    missed: int  # frames the writer overwrote before this reader read them (told as gaps)
    waits: int  # sleeps on the doorbell
    backlog: int  # bytes published and not yet read


class StreamReader:
    """A reader's side: the stream mapped read-only, its own cursor page, its two doorbell ends
    (`bell`: the read end the writer rings; `space`: the write end it rings when the writer
    waits for room). Takes ownership of the four fds; `close` releases them."""

    def __init__(self, stream_fd: int, cursor_fd: int, bell_fd: int, space_fd: int) -> None:
        fds = (stream_fd, cursor_fd, bell_fd, space_fd)
        try:
            size = check_stream_fd(stream_fd, writer=False)
            check_doorbell_fd(bell_fd, sleeper=True)
            check_doorbell_fd(space_fd, sleeper=False)
            for fd in (bell_fd, space_fd):
                os.set_blocking(fd, False)
            self._cmm, self._c = map_cursor(cursor_fd)
            self._mm = mmap.mmap(stream_fd, size, prot=mmap.PROT_READ)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(stream_fd)  # each mapping holds its file
        os.close(cursor_fd)
        self._fds = (bell_fd, space_fd)
        self.bell, self.space = bell_fd, space_fd
        self.closed = False
        self._q = memoryview(self._mm).cast("Q")
        try:
            self.capacity = check_header(self._q, size)
        except BaseException:
            self.close()
            raise
        self._mask = self.capacity - 1
        self._max = L.max_payload(self.capacity)
        self._cursor = self._c[C_CURSOR]
        self._expected = self._c[C_SEQ]
        self._first = True  # the first frame may be older than C_SEQ says (`stream_position`)
        self._native = _core.native_stream_frames()
        if self._cursor & 7:
            self.close()
            raise LayoutError("cursor page holds an unaligned cursor")
        self._tail = self._cursor
        self.frames = self.missed = self.waits = 0

    def _corrupt(self, what: str) -> RingCorruptedError:
        return RingCorruptedError(f"the stream's writer wrote garbage: {what}")

    def _load_tail(self) -> int:
        tail = self._q[S_TAIL]
        if tail < self._tail or tail & 7:
            raise self._corrupt(f"tail moved from {self._tail} to {tail}")
        self._tail = tail
        return tail

    def writer_closed(self) -> bool:
        return bool(self._q[S_FLAGS] & CLOSED)

    def pending(self) -> bool:
        """Whether the writer published something this reader has not read."""
        return self._q[S_TAIL] != self._cursor

    def read(self, max_frames: int = 256) -> tuple[int, list[bytes]]:
        """(gap, bodies): up to `max_frames` bodies published since the last read, in order,
        and how many frames were lost just before the first (only the first of one read can
        follow a gap: the frames it keeps are consecutive). Publishes the new cursor once."""
        if self.closed:
            raise RuntimeError("this stream reader is closed")
        tail = self._load_tail()
        cursor = self._cursor
        if tail == cursor:
            return 0, []
        if tail - cursor > self.capacity:  # lapped: resume at a recent frame (or the tail)
            mark = self._q[S_MARK]
            ok = tail - self.capacity < mark <= tail and not mark & 7
            self._moved(mark if ok else tail)
            cursor = self._cursor
            if cursor == tail:
                return 0, []
        if self._native is not None:  # the same loop in C (_native.c, stream_frames)
            pos, seq, bodies, drop, bad, lapped = self._native(
                self._mm, self.capacity, cursor, tail, max_frames
            )
            if bad and not lapped:
                raise self._corrupt(bad)
            if bad:
                pos = tail  # the garbage was an overwrite in progress: start again at the tail
            if drop:
                del bodies[:drop]
        else:
            pos, seq, bodies = self._copy(cursor, tail, max_frames)
        gap = 0
        if bodies:
            first = seq - len(bodies) + 1
            if first != self._expected:
                if first < self._expected and not self._first:
                    raise self._corrupt(f"sequence number went back to {first}")
                gap = max(0, first - self._expected)
            self._first = False
            self._expected = seq + 1
            self.missed += gap
            self.frames += len(bodies)
        self._moved(pos)
        return gap, bodies

    def _copy(self, cursor: int, tail: int, max_frames: int) -> tuple[int, int, list[bytes]]:
        """The copy loop in Python (the reference for `_native.stream_frames`): (where the
        reader is now, the last frame's sequence number, the bodies it can trust)."""
        q, mm, mask, capacity, most = self._q, self._mm, self._mask, self.capacity, self._max
        bodies: list[bytes] = []
        starts: list[int] = []
        keep, take = bodies.append, starts.append
        pos = cursor
        seq = 0
        left = max_frames
        bad = ""
        while pos < tail and left:
            off = pos & mask
            slot = _DATA + (off >> 3)
            word = q[slot]
            if word >> 32:
                if word >> 32 != L.FLAG_PADDING or off + 8 + (word & 0xFFFFFFFF) != capacity:
                    bad = f"bad frame header {word:#x} at {pos}"
                    break
                pos += capacity - off
                continue
            size = (word + 15) & ~7
            if word < FRAME_SEQ or word > most or pos + size > tail or off + size > capacity:
                bad = f"frame length {word} at {pos}"
                break
            seq = q[slot + 1]
            start = HEADER + off + 16
            keep(mm[start : start + word - FRAME_SEQ])
            take(pos)
            pos += size
            left -= 1
        reserve = q[S_RESERVE]  # after the copies (x86: loads are not reordered with loads)
        lapped_before = reserve - capacity  # frames starting before this may be overwritten
        if bad and pos >= lapped_before:
            raise self._corrupt(bad)
        if bad:
            pos = tail  # the garbage was an overwrite in progress: start again at the tail
        if starts and starts[0] < lapped_before:
            drop = bisect.bisect_left(starts, lapped_before)
            del bodies[:drop]
        return pos, seq, bodies

    def _moved(self, pos: int) -> None:
        """Publish the cursor; fence; ring the writer if it waits for room."""
        self._cursor = pos
        c = self._c
        c[C_CURSOR] = pos
        c[C_SEQ] = self._expected
        c[C_MISSED] = self.missed
        fence()
        if self._q[S_FLAGS] & WAITING:
            ring(self.space)

    def announce(self) -> bool:
        """Set the sleeping flag, fence, look again: True if there is nothing to read and the
        caller may sleep on `bell` (then call `woken`)."""
        c = self._c
        c[C_FLAGS] = WAITING
        fence()
        if self._q[S_TAIL] != self._cursor or self.writer_closed():
            c[C_FLAGS] = 0
            return False
        return True

    def woken(self) -> bool:
        """Clear the sleeping flag and drain the doorbell; False if the writer is gone."""
        self.waits += 1
        if not self.closed:
            self._c[C_FLAGS] = 0
        return drain(self.bell)

    def statistics(self) -> StreamReaderStatistics:
        backlog = 0 if self.closed else max(0, self._q[S_TAIL] - self._cursor)
        return StreamReaderStatistics(self.frames, self.missed, self.waits, backlog)

    def close(self) -> None:
        """Say we are gone (the writer stops waiting for us), unmap, close our fds."""
        if self.closed:
            return
        self.closed = True
        try:
            self._c[C_FLAGS] = CLOSED
            fence()
            if self._q[S_FLAGS] & WAITING:
                ring(self.space)
        finally:
            self._q.release()
            self._c.release()
            self._mm.close()
            self._cmm.close()
            for fd in self._fds:
                os.close(fd)
