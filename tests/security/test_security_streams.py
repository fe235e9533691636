"""Broadcast streams: a reader cannot write what the others read, a reader's bad cursor and a
writer's garbage end that party alone (docs/bus.md, "Streams"; docs/security.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Limits
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import ProtocolError, StreamOpen, StreamStart
from multikernel.shm import (
    RingCorruptedError,
    StreamReader,
    StreamWriter,
    UnsafeHandleError,
    create_stream,
    reader_handles,
)
from multikernel.shm._stream import C_CURSOR, HEADER, S_TAIL
from tests._children import end

pytestmark = pytest.mark.anyio

#: A small ring, so that a few hundred publications wrap it and the writer reads every cursor.
SMALL = Limits(channel_capacity=1 << 16, session_capacity=1 << 20, max_body=8 << 10)

ATTACKS = r"""
import ctypes, json, mmap, os, sys
fd = int(sys.argv[1]); size = os.fstat(fd).st_size
out = {}
def attempt(name, f):
    try:
        f(); out[name] = "done"
    except OSError as exc:
        out[name] = exc.errno
attempt("mmap_write", lambda: mmap.mmap(fd, size))
attempt("pwrite", lambda: os.pwrite(fd, b"x", 300))
attempt("ftruncate", lambda: os.ftruncate(fd, size * 2))
attempt("reopen_write", lambda: mmap.mmap(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), size))
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]
address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
result = libc.mprotect(ctypes.c_void_p(address), size, mmap.PROT_READ | mmap.PROT_WRITE)
out["mprotect_write"] = "done" if result == 0 else ctypes.get_errno()
print(json.dumps(out))
"""


def test_a_reader_cannot_write_into_the_stream_by_any_route() -> None:
    fd = create_stream(4096)
    kept = os.dup(fd)
    writer = StreamWriter(fd)  # maps it, then seals it against writing
    theirs, ours = reader_handles(kept)
    writer.add_reader(1, *ours)
    try:
        assert writer.try_write(b"intact")
        proc = subprocess.Popen(
            [sys.executable, "-c", ATTACKS, str(theirs[0])],
            pass_fds=(theirs[0],), stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=30)
        finally:
            end(proc)
        results = json.loads(output)
        assert all(isinstance(errno, int) for errno in results.values()), results
        reader = StreamReader(*theirs)
        theirs = []
        try:
            assert reader.read() == (0, [b"intact"])
        finally:
            reader.close()
    finally:
        for held in theirs:
            os.close(held)
        writer.close()
        os.close(kept)


def test_a_reader_refuses_a_stream_it_could_write_or_fds_that_are_not_what_they_claim() -> None:
    fd = create_stream(4096)  # not sealed against writing yet: the writer has not had it
    try:
        theirs, ours = reader_handles(fd)
        for held in ours:
            os.close(held)
        with pytest.raises(UnsafeHandleError, match="a reader could write into it"):
            StreamReader(*theirs)  # it closes every fd it was given
        theirs, ours = reader_handles(fd)
        for held in ours:
            os.close(held)
        read_end, write_end = os.pipe()
        os.close(write_end)
        os.close(theirs[2])
        with pytest.raises(UnsafeHandleError):
            StreamReader(theirs[0], theirs[1], theirs[3], read_end)  # doorbell ends swapped
    finally:
        os.close(fd)


@asynccontextmanager
async def bus(tmp_path: Path) -> AsyncIterator[tuple[Hub, Path]]:
    hub = Hub(tmp_path / "bus.sock", limits=SMALL)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub, tmp_path / "bus.sock"
        tg.cancel_scope.cancel()


def _reader_of(ep: Endpoint) -> StreamReader:
    (reading,) = ep._stream_readers._reading.values()
    return reading.reader


@pytest.mark.parametrize("cursor", ["unaligned", "past the tail", "backwards"])
async def test_a_reader_writing_a_bad_cursor_is_dropped_alone(tmp_path: Path, cursor: str) -> None:
    async with (
        bus(tmp_path) as (_, path),
        connect(path, name="writer") as writer,
        connect(path, name="honest") as honest,
        connect(path, name="hostile") as hostile,
    ):
        good = await honest.subscribe("feed", max_pending=1 << 14)
        bad = await hostile.subscribe("feed", max_pending=1 << 14)
        async with writer.stream("feed") as stream:
            for i in range(3000):  # past a ring: the writer has read every cursor once
                await stream.publish(i)
            assert (await bad.receive()).value() == 0  # the hostile reader is attached
            victim = _reader_of(hostile)
            garbage = {"unaligned": 8 * 300 + 3, "past the tail": 1 << 40, "backwards": 0}[cursor]

            def scribble(max_frames: int = 0) -> tuple[int, list[bytes]]:
                victim._c[C_CURSOR] = garbage  # instead of reading: the hostile reader's cursor
                return 0, []

            victim.read = scribble  # type: ignore[method-assign]
            with anyio.fail_after(10):
                for i in range(3000, 6000):  # wraps the ring: the writer reads them again
                    await stream.publish(i)
            assert stream.statistics().readers == 1
            assert [(await good.receive()).value() for _ in range(6000)] == list(range(6000))
            with anyio.fail_after(10):  # the writer's report reaches the hub
                while not (info := (await writer.introspect()).streams[0]).dropped_readers:
                    pass
            assert info.dropped_readers == 1
            assert info.readers == (honest.id,)
        await good.aclose()
        await bad.aclose()


async def test_a_writer_writing_garbage_ends_its_stream_for_its_readers_alone(
    tmp_path: Path,
) -> None:
    async with (
        bus(tmp_path) as (_, path),
        connect(path, name="writer") as writer,
        connect(path, name="reader") as reader,
        connect(path, name="other") as other,
    ):
        sub = await reader.subscribe("feed")
        elsewhere = await reader.subscribe("news")
        async with writer.stream("feed") as stream:
            await stream.publish("fine")
            assert (await sub.receive()).value() == "fine"
            q = stream._writer._q
            tail = q[S_TAIL]
            q[(HEADER + tail) // 8] = 0xFF << 32  # a frame with unknown flags
            q[S_TAIL] = tail + 64
            stream._writer.wake_sleepers()
            with anyio.fail_after(10):  # the reader saw garbage and stopped
                while reader.statistics()["stream_readers"]:
                    await reader._stream_readers.ended.wait()
            await other.publish("news", "still here")  # the reader's endpoint is unharmed
            assert (await elsewhere.receive()).value() == "still here"
        await sub.aclose()
        await elsewhere.aclose()


@pytest.mark.parametrize(
    "garbage",
    ["unknown flags", "past the data area", "tail unaligned", "tail backwards", "padding lies"],
)
def test_every_kind_of_garbage_from_the_writer_is_a_corrupted_ring_never_a_crash(
    garbage: str,
) -> None:
    fd = create_stream(1024)
    kept = os.dup(fd)
    writer = StreamWriter(fd)
    theirs, ours = reader_handles(kept)
    writer.add_reader(1, *ours)
    reader = StreamReader(*theirs)
    try:
        assert writer.try_write(b"fine")
        assert reader.read() == (0, [b"fine"])
        q = writer._q
        tail = q[S_TAIL]
        slot = (HEADER + tail % 1024) // 8
        if garbage == "unknown flags":
            q[slot], q[S_TAIL] = 0xFF << 32 | 8, tail + 16
        elif garbage == "past the data area":  # a frame whose end is beyond the ring's end
            q[slot], q[S_TAIL] = 1000, tail + 1016
        elif garbage == "tail unaligned":
            q[S_TAIL] = tail + 3
        elif garbage == "tail backwards":
            q[S_TAIL] = tail - 8
        else:  # a padding frame that does not end at the end of the data area
            q[slot], q[S_TAIL] = 1 << 32 | 16, tail + 64
        with pytest.raises(RingCorruptedError):
            reader.read()
    finally:
        reader.close()
        writer.close()
        os.close(kept)


async def test_a_stream_is_not_started_before_its_writer_sealed_it(tmp_path: Path) -> None:
    async with bus(tmp_path) as (_, path), connect(path) as ep:
        ready, fds = await ep._link.control(StreamOpen("unsealed"))
        for fd in fds:
            os.close(fd)  # never mapped, never sealed
        with pytest.raises(ProtocolError, match="not sealed against writing"):
            await ep._link.control(StreamStart(ready.token))
        async with connect(path) as other:
            with pytest.raises(ProtocolError, match="writes no stream"):
                await other._link.control(StreamStart(ready.token))  # not its stream
