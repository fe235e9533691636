"""The native core against the Python reference, on one ring: same bytes, same frames, same errors.

Both cores implement one binary layout, so a ring may have a writer of one kind and a reader of the
other; these tests drive such rings across many wraps, and feed both readers the same garbage.
"""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.shm import (
    Region,
    RingCorruptedError,
    RingReader,
    RingWriter,
    _core,
    format_ring,
    max_payload,
    native_available,
    ring_size,
)
from multikernel.shm._core import Implementation

from .conftest import REQUESTED

IMPLS: list[Implementation] = ["native", "python"]


@pytest.fixture(autouse=True)
def ring_impl() -> str:
    """These tests choose each side's core themselves (overrides the conftest's parametrization)."""
    if not native_available():
        pytest.skip("the native ring core was not built (test_native_core_is_built says why)")
    return "mixed"


def test_native_core_is_built() -> None:
    """`make install` builds the native core here; only MULTIKERNEL_SHM_RING=python excuses it."""
    if REQUESTED == "python":
        pytest.skip("MULTIKERNEL_SHM_RING=python: the pure-Python ring was asked for")
    assert native_available(), _core._native_error


def test_the_environment_chooses_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    with Region.create(ring_size(1024)) as region:
        format_ring(region, 0, 1024)
        for impl in IMPLS:
            monkeypatch.setenv(_core.ENV, impl)
            with RingWriter(region, 0) as writer:
                assert writer.implementation == impl
        monkeypatch.setenv(_core.ENV, "fortran")
        with pytest.raises(ValueError, match="MULTIKERNEL_SHM_RING"):
            RingWriter(region, 0)


def test_a_missing_native_core_falls_back_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_core, "_native", None)
    monkeypatch.setattr(_core, "_native_error", "No module named 'multikernel.shm._native'")
    monkeypatch.setattr(_core, "_noticed", False)
    monkeypatch.delenv(_core.ENV, raising=False)
    assert _core.chosen() == "python"
    assert _core.chosen() == "python"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("multikernel.shm: native ring core unavailable")
    monkeypatch.setenv(_core.ENV, "native")
    with pytest.raises(ImportError, match="MULTIKERNEL_SHM_RING=python"):
        _core.chosen()


def _frames(sizes: list[int], limit: int) -> list[bytes]:
    return [bytes((i * 31 + j) & 0xFF for j in range(s % (limit + 1))) for i, s in enumerate(sizes)]


@settings(max_examples=150, deadline=None)
@given(
    writer_impl=st.sampled_from(IMPLS),
    capacity_log=st.integers(min_value=6, max_value=12),
    sizes=st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=300),
    batches=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=20),
)
def test_a_writer_of_one_core_and_a_reader_of_the_other_agree_across_wraps(
    writer_impl: Implementation, capacity_log: int, sizes: list[int], batches: list[int]
) -> None:
    """Native writer, Python reader (and the reverse): every frame arrives byte-exact, in order.

    Batch size 0 stands for the single-frame calls (try_send / try_receive), so both forms of
    both cores meet on one ring.
    """
    reader_impl: Implementation = "python" if writer_impl == "native" else "native"
    capacity = 1 << capacity_log
    frames = _frames(sizes, max_payload(capacity))
    received: list[bytes] = []
    with Region.create(ring_size(capacity)) as region:
        format_ring(region, 0, capacity)
        writer = RingWriter(region, 0, implementation=writer_impl)
        reader = RingReader(region, 0, implementation=reader_impl)
        with writer, reader:
            sent = turn = 0
            while len(received) < len(frames):
                batch = batches[turn % len(batches)]
                turn += 1
                if batch == 0:
                    if sent < len(frames) and writer.try_send(frames[sent]):
                        sent += 1
                    frame = reader.try_receive()
                    if frame is not None:
                        received.append(frame)
                else:
                    sent += writer.try_send_many(frames, sent) if sent < len(frames) else 0
                    received.extend(reader.try_receive_many(batch))
            assert reader.try_receive() is None
            assert writer.statistics().frames == reader.statistics().frames == len(frames)
            assert writer.statistics().bytes == sum(map(len, frames))
            assert reader.statistics().backlog == 0
    assert received == frames


@settings(max_examples=100, deadline=None)
@given(
    capacity_log=st.integers(min_value=6, max_value=10),
    script=st.lists(
        st.tuples(st.integers(min_value=0, max_value=600), st.booleans()), min_size=1, max_size=60
    ),
)
def test_both_writers_leave_the_same_bytes(
    capacity_log: int, script: list[tuple[int, bool]]
) -> None:
    """The same sends (and reads in between) leave byte-identical regions: the layout is one."""
    capacity = 1 << capacity_log
    images = []
    for impl in IMPLS:
        with Region.create(ring_size(capacity)) as region:
            format_ring(region, 0, capacity)
            writer = RingWriter(region, 0, implementation=impl)
            reader = RingReader(region, 0, implementation="python")
            outcomes: list[object] = []
            with writer, reader:
                for i, (size, read) in enumerate(script):
                    data = bytes([i & 0xFF]) * (size % (max_payload(capacity) + 1))
                    outcomes.append(writer.try_send(data))
                    if read:
                        outcomes.append(reader.try_receive())
            images.append((bytes(region.mmap), outcomes))
    assert images[0] == images[1]


CAPACITY = 1024


@settings(max_examples=300, deadline=None)
@given(
    sent=st.lists(st.binary(max_size=200), max_size=8),
    garbage=st.lists(
        st.tuples(
            st.integers(min_value=4, max_value=(256 + CAPACITY) // 8 - 1),
            st.integers(min_value=0, max_value=2**64 - 1) | st.integers(0, 2 * CAPACITY),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_both_readers_see_the_same_garbage_the_same_way(
    sent: list[bytes], garbage: list[tuple[int, int]]
) -> None:
    """Fed the same corrupted ring, both readers deliver the same frames, then the same error."""
    outcomes = []
    for impl in IMPLS:
        with Region.create(ring_size(CAPACITY)) as region:
            format_ring(region, 0, CAPACITY)
            with RingWriter(region, 0, implementation="python") as writer:
                writer.try_send_many(sent)
            reader = RingReader(region, 0, implementation=impl)
            with memoryview(region.mmap) as whole, whole.cast("Q") as q:
                for slot, value in garbage:
                    q[slot] = value
            got: list[object] = []
            try:
                for _ in range(CAPACITY):
                    frame = reader.try_receive()
                    if frame is None:
                        break
                    got.append(frame)
            except (RingCorruptedError, anyio.EndOfStream) as exc:
                got.append((type(exc), str(exc)))
                with pytest.raises(type(exc)):  # quarantined: it stays that way
                    reader.try_receive()
            finally:
                reader.close()
            outcomes.append(got)
    assert outcomes[0] == outcomes[1]


def test_a_python_producer_feeds_a_native_consumer_across_processes() -> None:
    """Two processes, one core each: the layout, not the code, is the contract."""
    from multikernel.shm import create_channel

    from ._util import PEER
    from .test_shm_process import check_sequence

    ours, handle = create_channel(1 << 14)
    assert ours.reader.implementation == "native"
    env = {**__import__("os").environ, _core.ENV: "python"}
    proc = subprocess.Popen(
        [sys.executable, str(PEER), "produce", handle.to_argument(), "100000"],
        pass_fds=[fd for fd in handle.fds if fd >= 0],
        stdout=subprocess.PIPE,
        env=env,
    )
    handle.close()
    try:
        with ours:
            expected = 0
            try:
                while True:
                    first = ours.receive_blocking(timeout=30)
                    expected = check_sequence([first, *ours.reader.try_receive_many()], expected)
            except anyio.EndOfStream:
                pass
            assert expected == 100_000
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
