"""Two real processes on one channel: volume, trio, peer death, idle cost, orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import pytest

from multikernel.shm import (
    PeerDiedError,
    create_channel,
    find_orphans,
    name_prefix,
    remove_orphans,
)
from tests._run import SHM_PREFIX

from ._util import PEER, spawn_peer


def check_sequence(frames: list[bytes], start: int) -> int:
    from .peer import frame

    for offset, got in enumerate(frames):
        assert got == frame(start + offset)
    return start + len(frames)


def test_a_million_frames_arrive_in_order_and_intact() -> None:
    ours, handle = create_channel(1 << 16)
    with ours, spawn_peer(handle, "produce", "1000000") as proc:
        expected = 0
        try:
            while True:
                first = ours.receive_blocking(timeout=30)
                expected = check_sequence([first, *ours.reader.try_receive_many(4096)], expected)
        except anyio.EndOfStream:
            pass
        assert expected == 1_000_000
        assert proc.wait(timeout=30) == 0
        stats = ours.statistics().received
        print(f"\n1M frames: {stats.waits} sleeps, {stats.spins} waits ended while spinning")


@pytest.mark.parametrize("anyio_backend", [pytest.param(("trio", {}), id="trio")])
@pytest.mark.anyio
async def test_frames_from_a_trio_producer_reach_a_trio_consumer() -> None:
    ours, handle = create_channel(1 << 14)
    async with ours:
        with spawn_peer(handle, "produce-trio", "200000") as proc:
            expected = 0
            with anyio.fail_after(60):
                async for frame in ours:
                    expected = check_sequence([frame, *ours.reader.try_receive_many()], expected)
            assert expected == 200_000
            assert proc.wait(timeout=30) == 0


@pytest.mark.anyio
async def test_echo_round_trips_between_processes() -> None:
    ours, handle = create_channel(1 << 12)
    async with ours:
        with spawn_peer(handle, "echo") as proc:
            with anyio.fail_after(30):
                for i in range(2000):
                    await ours.send(i.to_bytes(4, "little") * 16)
                    assert await ours.receive() == i.to_bytes(4, "little") * 16
            await ours.send_eof()
            assert proc.wait(timeout=30) == 0


@pytest.mark.anyio
async def test_producer_killed_mid_stream_ends_in_peer_died_after_its_frames() -> None:
    ours, handle = create_channel(1 << 14)
    async with ours:
        with spawn_peer(handle, "produce-forever") as proc:
            expected = 0
            with anyio.fail_after(30):
                while expected < 5000:
                    expected = check_sequence(await ours.receive_many(), expected)
                proc.send_signal(signal.SIGKILL)

                async def drain() -> None:
                    nonlocal expected
                    while True:  # every frame it published before dying still arrives, in order
                        expected = check_sequence(await ours.receive_many(), expected)

                with pytest.raises(PeerDiedError):
                    await drain()
            assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.anyio
async def test_sender_blocked_on_a_killed_reader_is_released() -> None:
    ours, handle = create_channel(1 << 12)
    async with ours:
        with spawn_peer(handle, "stall") as proc:
            assert proc.stdout is not None
            proc.stdout.readline()  # attached, and never reads

            async def send_until_blocked() -> None:
                while True:
                    await ours.send(b"x" * 100)

            with anyio.fail_after(30), pytest.RaisesGroup(PeerDiedError):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_until_blocked)
                    await anyio.wait_all_tasks_blocked()  # asleep on a full ring
                    assert ours.statistics().sent.full_events > 0
                    proc.send_signal(signal.SIGKILL)


def test_idle_endpoint_costs_almost_no_cpu() -> None:
    seconds = 3.0
    ours, handle = create_channel(1 << 12)
    with ours, spawn_peer(handle, "idle", str(seconds)) as proc:
        assert proc.stdout is not None
        before = float(proc.stdout.readline())
        after = float(proc.stdout.readline())
        assert proc.wait(timeout=30) == 0
    share = (after - before) / seconds
    print(f"\nidle endpoint used {share:.3%} of a core over {seconds:.0f} s")
    assert share < 0.05


def test_orphaned_named_region_is_found_and_removed() -> None:
    """Only this run's orphans (its tag's prefix) are looked at: never another run's files."""
    proc = subprocess.Popen([sys.executable, str(PEER), "orphan", "-"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().decode().strip()
        assert os.path.basename(path).startswith(SHM_PREFIX)  # the peer inherited our tag
        assert os.path.exists(path)
        assert path not in {str(p) for p in find_orphans(prefix=SHM_PREFIX)}  # creator alive
    finally:
        proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert path in {str(p) for p in find_orphans()}  # untagged search: every run's orphans
    assert [str(p) for p in remove_orphans(prefix=SHM_PREFIX)] == [path]
    assert not os.path.exists(path)


def test_a_tag_must_not_be_able_to_match_another_tags_names() -> None:
    assert name_prefix("run1") == "multikernel-run1-"
    assert name_prefix("") == "multikernel-"
    for bad in ("1run", "a-b", "a/b", "x" * 40):
        with pytest.raises(ValueError, match="bad shared-memory tag"):
            name_prefix(bad)
