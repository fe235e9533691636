"""The ring's frame format, wrap-around and flow control, in one process."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.shm import FrameTooLargeError, LayoutError, Region, RingWriter, max_payload

from ._util import ring_pair


@settings(max_examples=200, deadline=None)
@given(
    capacity_log=st.integers(min_value=6, max_value=12),
    sizes=st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=400),
    batch=st.integers(min_value=1, max_value=16),
)
def test_frames_round_trip_byte_exact_across_many_wraps(
    capacity_log: int, sizes: list[int], batch: int
) -> None:
    capacity = 1 << capacity_log
    limit = max_payload(capacity)
    frames = [bytes((i + j) & 0xFF for j in range(s % (limit + 1))) for i, s in enumerate(sizes)]
    received: list[bytes] = []
    with ring_pair(capacity) as (writer, reader, _):
        sent = 0
        while len(received) < len(frames):
            sent += writer.try_send_many(frames[sent : sent + batch])
            received.extend(reader.try_receive_many(max_frames=batch))
        assert reader.try_receive() is None
        assert writer.statistics().frames == reader.statistics().frames == len(frames)
    assert received == frames


def test_full_ring_refuses_without_overwriting() -> None:
    with ring_pair(256) as (writer, reader, _):
        accepted = 0
        while writer.try_send(bytes([accepted]) * 40):
            accepted += 1
        assert accepted == 256 // 48
        assert writer.statistics().full_events == 1
        assert [reader.try_receive() for _ in range(accepted)] == [
            bytes([i]) * 40 for i in range(accepted)
        ]
        assert reader.try_receive() is None


def test_largest_frame_always_fits_once_reader_catches_up() -> None:
    with ring_pair(1024) as (writer, reader, _):
        # An empty frame (8 bytes) plus a largest one (512) advance the ring by 520 bytes, so
        # 128 rounds start the largest frame at every 8-byte offset of the data area once.
        for i in range(128):
            big = bytes([i]) * max_payload(1024)
            assert writer.try_send(b"")
            assert reader.try_receive() == b""
            assert writer.try_send(big)
            assert reader.try_receive() == big


def test_oversized_frame_is_refused_with_a_clear_error() -> None:
    with ring_pair(1024) as (writer, _, _), pytest.raises(FrameTooLargeError, match="maximum"):
        writer.try_send(bytes(max_payload(1024) + 1))


def test_batch_with_an_oversized_frame_publishes_the_ones_before_it() -> None:
    with ring_pair(1024) as (writer, reader, _):
        with pytest.raises(FrameTooLargeError):
            writer.try_send_many([b"a", b"b", bytes(2000), b"c"])
        assert reader.try_receive_many() == [b"a", b"b"]


def test_reader_sees_end_of_stream_after_draining_a_closed_writer() -> None:
    with ring_pair(1024) as (writer, reader, _):
        writer.try_send(b"last words")
        writer.close()
        assert reader.receive_blocking(timeout=5) == b"last words"
        with pytest.raises(anyio.EndOfStream):
            reader.receive_blocking(timeout=5)


def test_writer_to_a_closed_reader_is_told_the_frame_was_not_delivered() -> None:
    with ring_pair(1024) as (writer, reader, _):
        reader.close()
        with pytest.raises(anyio.BrokenResourceError):
            writer.try_send(b"into the void")


def test_sides_refuse_use_after_close() -> None:
    with ring_pair(1024) as (writer, reader, _):
        writer.close()
        reader.close()
        with pytest.raises(anyio.ClosedResourceError):
            writer.try_send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            reader.try_receive()


def test_blocking_receive_times_out_without_a_doorbell() -> None:
    with ring_pair(1024) as (_, reader, _), pytest.raises(TimeoutError):
        reader.receive_blocking(timeout=0.01)


def test_attach_refuses_a_region_without_a_ring() -> None:
    with Region.create(4096) as region, pytest.raises(LayoutError, match="no ring"):
        RingWriter(region, 0)


def test_attach_refuses_a_ring_larger_than_its_region() -> None:
    with ring_pair(1024) as (_, _, region):
        with memoryview(region.mmap) as whole, whole[:64].cast("Q") as q:
            q[2] = 1 << 20
        with pytest.raises(LayoutError, match="past the region"):
            RingWriter(region, 0)


def test_statistics_report_backlog() -> None:
    with ring_pair(1024) as (writer, reader, _):
        writer.try_send(b"12345678")
        assert writer.statistics().backlog == 16
        reader.try_receive()
        assert reader.statistics().backlog == 0
