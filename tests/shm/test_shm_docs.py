"""docs/shm.md is the layout's specification: its tables must agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

from multikernel.shm import _channel as C
from multikernel.shm import _layout as L

DOC = Path(__file__).parents[2] / "docs" / "shm.md"


def table_after(heading: str) -> dict[str, int]:
    """field name -> offset, from the first markdown table under `heading`."""
    text = DOC.read_text()
    section = text[text.index(heading) :]
    rows = {}
    for line in section.splitlines()[2:]:
        if line.startswith("## ") or line.startswith("### "):
            break
        match = re.match(r"\|\s*(\d+)\s*\|\s*(\w+)\s*\|", line)
        if match:
            rows[match.group(2)] = int(match.group(1))
    return rows


def test_ring_header_table_matches_the_layout() -> None:
    assert table_after("### Ring header") == {
        "magic": L.SLOT_MAGIC * 8,
        "version": L.SLOT_VERSION * 8,
        "capacity": L.SLOT_CAPACITY * 8,
        "header_size": L.SLOT_HEADER * 8,
        "head": L.SLOT_HEAD * 8,
        "consumer_flags": L.SLOT_CONSUMER_FLAGS * 8,
        "tail": L.SLOT_TAIL * 8,
        "producer_flags": L.SLOT_PRODUCER_FLAGS * 8,
    }


def test_channel_table_matches_the_layout() -> None:
    assert table_after("### Channel region") == {
        "magic": 0,
        "version": 8,
        "ring_a": 16,
        "ring_b": 24,
    }


def test_documented_constants_match() -> None:
    text = DOC.read_text()
    assert f"`{L.RING_MAGIC:#018x}`" in text
    assert f"Ring A starts at {C.CHANNEL_HEADER}" in text
    assert f"Frames (in the data area, starting at offset {L.HEADER_SIZE})" in text
    assert (L.FLAG_PADDING, L.SIDE_SLEEPING, L.SIDE_CLOSED) == (1, 1, 2)


def test_handle_table_matches_who_rings_each_doorbell() -> None:
    """Side s holds the write end of doorbell i exactly when it rings it (`RINGER[i] == s`)."""
    text = DOC.read_text()
    section = text[text.index("### The fds of a channel handle") :]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\|\s*\d+\s*\|", line)
    ]
    assert [int(row[0]) for row in rows] == list(range(C.ChannelHandle.FDS))
    ends = {0: ("write end", "read end"), 1: ("read end", "write end")}
    for slot, ringer in enumerate(C.RINGER):
        assert tuple(rows[1 + slot][2:]) == ends[ringer]
