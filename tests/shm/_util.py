"""Helpers for the shm tests: rings in one process, peers in another."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from multikernel.shm import ChannelHandle, Region, RingReader, RingWriter, format_ring, ring_size
from tests._children import end

PEER = Path(__file__).with_name("peer.py")


@contextmanager
def ring_pair(capacity: int) -> Iterator[tuple[RingWriter, RingReader, Region]]:
    """A writer and a reader on one ring in a memfd region, without doorbells."""
    with Region.create(ring_size(capacity)) as region:
        format_ring(region, 0, capacity)
        with RingWriter(region, 0) as writer, RingReader(region, 0) as reader:
            yield writer, reader, region


@contextmanager
def spawn_peer(handle: ChannelHandle, role: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run tests/shm/peer.py in a child that inherits the handle's fds; always reaped."""
    proc = subprocess.Popen(
        [sys.executable, str(PEER), role, handle.to_argument(), *args],
        pass_fds=[fd for fd in handle.fds if fd >= 0],
        stdout=subprocess.PIPE,
        text=True,
    )
    handle.close()
    try:
        yield proc
    finally:
        end(proc)
        assert proc.stdout is not None
        proc.stdout.close()
