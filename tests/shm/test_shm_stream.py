"""Broadcast streams in one process: frames of any size across wraps, readers at their own
pace, `block` never overwriting what a reader has not read, `drop` telling each gap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.shm import (
    FrameTooLargeError,
    StreamReader,
    StreamWriter,
    create_stream,
    reader_handles,
)
from multikernel.shm._stream import max_body


@contextmanager
def stream(
    capacity: int, readers: int = 1, slow: str = "block", patience: float = 2.0
) -> Iterator[tuple[StreamWriter, list[StreamReader]]]:
    """A writer and `readers` readers, made the way the hub makes them."""
    fd = create_stream(capacity)
    kept = os.dup(fd)  # the hub's copy: readers get theirs from it
    writer = StreamWriter(fd, slow="drop" if slow == "drop" else "block", patience=patience)
    writer.kept_fd = kept  # type: ignore[attr-defined]  # for a test that adds a reader later
    made: list[StreamReader] = []
    try:
        for i in range(readers):
            theirs, ours = reader_handles(kept)
            writer.add_reader(i, *ours)
            made.append(StreamReader(*theirs))
        yield writer, made
    finally:
        for reader in made:
            reader.close()
        writer.close()
        os.close(kept)


def pairs(reader: StreamReader, max_frames: int = 256) -> list[tuple[int, bytes]]:
    """What one read gives, as (gap, body) pairs: the gap comes with the first body only."""
    gap, bodies = reader.read(max_frames)
    return [(gap if i == 0 else 0, data) for i, data in enumerate(bodies)]


def body(i: int, size: int) -> bytes:
    return i.to_bytes(4, "little") + bytes((i + j) & 0xFF for j in range(size))


@settings(max_examples=150, deadline=None)
@given(
    capacity_log=st.integers(min_value=7, max_value=12),
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=300),
    paces=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=4),
)
def test_block_delivers_every_frame_to_every_reader_in_order(
    capacity_log: int, sizes: list[int], paces: list[int]
) -> None:
    capacity = 1 << capacity_log
    frames = [body(i, s % (max_body(capacity) - 3)) for i, s in enumerate(sizes)]
    with stream(capacity, len(paces)) as (writer, readers):
        got: list[list[bytes]] = [[] for _ in readers]
        sent = 0
        while any(len(g) < len(frames) for g in got):
            while sent < len(frames) and writer.try_write(frames[sent]):
                sent += 1
            for reader, pace, mine in zip(readers, paces, got, strict=True):
                for gap, data in pairs(reader, pace):  # each at its own pace
                    assert gap == 0
                    mine.append(data)
        assert all(mine == frames for mine in got)
        assert writer.statistics().stalls == 0


@settings(max_examples=150, deadline=None)
@given(
    capacity_log=st.integers(min_value=7, max_value=12),
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=400),
    reads=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=400),
)
def test_drop_never_waits_and_a_lapped_reader_counts_each_gap(
    capacity_log: int, sizes: list[int], reads: list[int]
) -> None:
    capacity = 1 << capacity_log
    frames = [body(i, s % (max_body(capacity) - 3)) for i, s in enumerate(sizes)]
    with stream(capacity, 1, slow="drop") as (writer, (reader,)):
        received: list[tuple[int, bytes]] = []
        for i, data in enumerate(frames):
            assert writer.try_write(data)  # a reader never holds the writer up
            received += pairs(reader, reads[i % len(reads)])  # sometimes not at all
        while batch := pairs(reader, 1000):
            received += batch
        last = -1
        for gap, data in received:
            index = int.from_bytes(data[:4], "little")
            assert data == frames[index]  # intact, never a torn frame
            assert gap == index - last - 1  # every frame lost just before it, counted
            last = index
        assert last == len(frames) - 1  # what follows the last gap is delivered
        assert reader.statistics().missed == len(frames) - len(received)


def test_a_reader_added_later_starts_at_the_tail() -> None:
    with stream(1024) as (writer, (first,)):
        assert writer.try_write(b"old")
        theirs, ours = reader_handles(writer.kept_fd)  # type: ignore[attr-defined]
        writer.add_reader(9, *ours)
        late = StreamReader(*theirs)
        try:
            assert writer.try_write(b"new")
            assert [d for _, d in pairs(first)] == [b"old", b"new"]
            assert pairs(late) == [(0, b"new")]
        finally:
            late.close()


def test_a_body_larger_than_half_the_ring_is_refused_before_anything_is_written() -> None:
    with stream(1024) as (writer, (reader,)):
        with pytest.raises(FrameTooLargeError):
            writer.try_write(bytes(max_body(1024) + 1))
        assert writer.try_write(bytes(max_body(1024)))
        assert [len(d) for _, d in pairs(reader)] == [max_body(1024)]


@pytest.mark.anyio
async def test_block_waits_for_a_slow_reader_then_stalls_it_and_it_hears_its_gap() -> None:
    with stream(1024, 2, patience=0.05) as (writer, (stuck, reading)):
        sent = 0
        with anyio.fail_after(10):
            while sent < 200:
                await writer.write(body(sent, 20))
                sent += 1
                pairs(reading, 1000)  # this one keeps up; `stuck` never reads
        assert writer.statistics().stalls == 1
        got = pairs(stuck, 1000)
        assert got[0][0] > 0  # its first frame says how many it missed
        assert int.from_bytes(got[-1][1][:4], "little") == 199


@pytest.mark.anyio
async def test_a_reader_that_closes_stops_holding_the_writer() -> None:
    with stream(1024, 2) as (writer, (gone, reading)):
        gone.close()
        with anyio.fail_after(10):
            for i in range(200):
                await writer.write(body(i, 20))
                pairs(reading, 1000)
        assert writer.readers == 1
        assert writer.gone == [0]
