"""Attack 9: the old version of a service, the one being replaced, writes the state its successor
reads. It may be broken or hostile, so it writes images whose CRCs are right and whose contents
lie. Every lie is refused before any state is believed (upgrade/_preserved.py)."""

from __future__ import annotations

import struct
import zlib

import pytest

from multikernel.upgrade import PreservedState, PreservedStateError
from multikernel.upgrade._preserved import HEADER_SIZE, MAX_NODES

ENTRY = struct.Struct("<IHHIIII")


def signed(image: bytearray) -> bytes:
    """The image with a correct CRC, as a liar who knows the format would write it."""
    struct.pack_into("<I", image, 16, 0)
    struct.pack_into("<I", image, 16, zlib.crc32(image))
    return bytes(image)


def one_node() -> bytearray:
    state = PreservedState()
    state.put("counter", 7)
    return bytearray(state.encode())


def with_entry(image: bytearray, **changes: int) -> bytes:
    fields = dict(zip(
        ("name_at", "name_len", "schema_len", "version", "payload_at", "payload_len", "crc"),
        ENTRY.unpack_from(image, HEADER_SIZE), strict=True,
    ))  # fmt: skip
    fields.update(changes)
    ENTRY.pack_into(image, HEADER_SIZE, *fields.values())
    return signed(image)


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ({"payload_len": 1 << 20}, "past the end"),
        ({"name_at": 0}, "overlaps the header"),
        ({"payload_at": 4}, "overlaps the header"),
        ({"name_len": 60_000}, "past the end"),
        ({"version": 0}, "bad node"),
        ({"crc": 1}, "CRC-32 does not match"),
    ],
)
def test_a_table_that_lies_is_refused(lie: dict[str, int], message: str) -> None:
    with pytest.raises(PreservedStateError, match=message):
        PreservedState.decode(with_entry(one_node(), **lie))


def test_huge_counts_and_sizes_are_refused_before_anything_is_read() -> None:
    image = one_node()
    struct.pack_into("<I", image, 8, MAX_NODES + 1)
    with pytest.raises(PreservedStateError, match="do not fit"):
        PreservedState.decode(signed(image))
    image = one_node()
    struct.pack_into("<I", image, 12, 1 << 30)
    with pytest.raises(PreservedStateError, match="were handed over"):
        PreservedState.decode(signed(image))


def test_a_name_that_is_not_a_node_name_is_refused() -> None:
    image = one_node()
    name_at = ENTRY.unpack_from(image, HEADER_SIZE)[0]
    image[name_at : name_at + 2] = b"\xff/"
    with pytest.raises(PreservedStateError, match="not ASCII"):
        PreservedState.decode(signed(image))
    image = one_node()
    image[name_at : name_at + 2] = b"../"[:2]
    with pytest.raises(PreservedStateError, match="bad node"):
        PreservedState.decode(signed(image))


def test_the_same_node_twice_is_refused() -> None:
    state = PreservedState()
    state.put("a", 1)
    state.put("b", 1)
    image = bytearray(state.encode())
    first = ENTRY.unpack_from(image, HEADER_SIZE)
    ENTRY.pack_into(image, HEADER_SIZE + ENTRY.size, *first)  # b's entry now says a
    with pytest.raises(PreservedStateError, match="appears twice"):
        PreservedState.decode(signed(image))
