"""A peer that writes garbage gets the ring quarantined; the reader never crashes or overreads."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.shm import RingCorruptedError

from ._util import ring_pair

CAPACITY = 1024
HEAD, TAIL = 8, 16  # header slots
DATA = 32  # first slot of the data area


def poke(region_mmap: object, slot: int, value: int) -> None:
    with memoryview(region_mmap) as whole, whole.cast("Q") as q:  # type: ignore[arg-type]
        q[slot] = value


@pytest.mark.parametrize(
    "tail",
    [8, 2**63, CAPACITY + 64, 20],
    ids=["backwards", "huge", "more-than-capacity", "unaligned"],
)
def test_impossible_tail_quarantines_the_reader(tail: int) -> None:
    with ring_pair(CAPACITY) as (writer, reader, region):
        writer.try_send(b"ok")
        assert reader.try_receive() == b"ok"
        poke(region.mmap, TAIL, tail)
        with pytest.raises(RingCorruptedError, match="quarantined"):
            reader.try_receive()
        with pytest.raises(RingCorruptedError):  # and it stays that way
            reader.try_receive()


@pytest.mark.parametrize(
    "word",
    [CAPACITY, 2**32 - 1, (7 << 32) | 4, (1 << 32) | 4],
    ids=["length-past-data", "length-max", "unknown-flags", "padding-not-to-end"],
)
def test_bad_frame_header_quarantines_the_reader(word: int) -> None:
    with ring_pair(CAPACITY) as (writer, reader, region):
        writer.try_send(b"a frame of some length")
        poke(region.mmap, DATA, word)
        with pytest.raises(RingCorruptedError):
            reader.try_receive()


def test_head_moving_backwards_quarantines_the_writer() -> None:
    with ring_pair(CAPACITY) as (writer, reader, region):
        for _ in range(40):
            writer.try_send(bytes(40))
            reader.try_receive()
        poke(region.mmap, HEAD, 0)

        def fill() -> None:
            while writer.try_send(bytes(400)):
                pass

        with pytest.raises(RingCorruptedError):
            fill()


def test_quarantined_ring_still_closes_cleanly() -> None:
    with ring_pair(CAPACITY) as (writer, reader, region):
        writer.try_send(b"x")
        poke(region.mmap, TAIL, 3)
        with pytest.raises(RingCorruptedError):
            reader.try_receive()
        reader.close()


@settings(max_examples=300, deadline=None)
@given(
    sent=st.lists(st.binary(max_size=200), max_size=8),
    garbage=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=(256 + CAPACITY) // 8 - 1),
            st.integers(min_value=0, max_value=2**64 - 1),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_random_garbage_yields_frames_or_a_typed_error_only(
    sent: list[bytes], garbage: list[tuple[int, int]]
) -> None:
    with ring_pair(CAPACITY) as (writer, reader, region):
        writer.try_send_many(sent)
        for slot, value in garbage:
            if slot not in (0, 1, 2, 3):  # the immutable header is checked at attach instead
                poke(region.mmap, slot, value)
        try:
            for _ in range(CAPACITY):  # bounded: a reader can never loop forever
                frame = reader.try_receive()
                if frame is None:
                    break
                assert len(frame) <= reader.max_payload
        except (RingCorruptedError, anyio.EndOfStream):
            pass
