"""Preserved state: the image round-trips, damage is refused, older versions read through their
transforms, and a preserved region can be changed by nobody once written."""

from __future__ import annotations

import fcntl
import os
import struct
import zlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.upgrade import (
    IncompatibleStateError,
    PreservedState,
    PreservedStateError,
    Schema,
    preserve,
    restore,
)
from multikernel.upgrade._preserved import ENTRY_SIZE, HEADER_SIZE


class CounterV1(msgspec.Struct, frozen=True):
    value: int


class StoreV1(msgspec.Struct, frozen=True):
    items: dict[str, str]


class StoreV2(msgspec.Struct, frozen=True):
    """v2 keeps when each key was written: the schema change between versions."""

    items: dict[str, tuple[str, int]]


class StoreV3(msgspec.Struct, frozen=True):
    items: dict[str, tuple[str, int]]
    generation: int


def v1_to_v2(old: dict[str, object]) -> dict[str, object]:
    items = old["items"]
    assert isinstance(items, dict)
    return {"items": {k: (v, 0) for k, v in items.items()}}


def v2_to_v3(old: dict[str, object]) -> dict[str, object]:
    return {**old, "generation": 1}


STORE = Schema(StoreV3, 3, {1: v1_to_v2, 2: v2_to_v3}, name="StoreV3")

names = st.lists(st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True), min_size=1, max_size=3).map(
    "/".join
)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip
trees = st.dictionaries(
    names, st.tuples(values, st.integers(1, 9), st.sampled_from(["A", "b.c", "Kv_1"])), max_size=8
)


def build(tree: dict[str, tuple[object, int, str]]) -> PreservedState:
    state = PreservedState()
    for name, (value, version, schema) in tree.items():
        state.put(name, value, version=version, schema=schema)
    return state


@given(trees)
def test_any_tree_round_trips_through_its_image(tree: dict[str, tuple[object, int, str]]) -> None:
    state = build(tree)
    again = PreservedState.decode(state.encode())
    assert again == state
    for name, (value, version, schema) in tree.items():
        node = again.node(name)
        assert node is not None
        assert (node.schema, node.version, node.value()) == (schema, version, value)


@settings(max_examples=60)
@given(trees.filter(bool), st.data())
def test_any_damaged_byte_is_refused_never_read_as_other_state(
    tree: dict[str, tuple[object, int, str]], data: st.DataObject
) -> None:
    image = bytearray(build(tree).encode())
    at = data.draw(st.integers(0, len(image) - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    image[at] ^= flip
    with pytest.raises(PreservedStateError):
        PreservedState.decode(bytes(image))


@settings(max_examples=40)
@given(trees, st.data())
def test_a_truncated_or_extended_image_is_refused(
    tree: dict[str, tuple[object, int, str]], data: st.DataObject
) -> None:
    image = build(tree).encode()
    cut = data.draw(st.integers(0, len(image) - 1), label="cut")
    with pytest.raises(PreservedStateError):
        PreservedState.decode(image[:cut])
    with pytest.raises(PreservedStateError):
        PreservedState.decode(image + b"\0")


def test_a_consistent_lie_in_the_table_is_still_refused() -> None:
    """A writer that fixes up the CRC after pointing a node past the end gets nowhere."""
    state = PreservedState()
    state.put("counter", CounterV1(7))
    image = bytearray(state.encode())
    name_at, name_len, schema_len, version, payload_at, payload_len, crc = struct.unpack_from(
        "<IHHIIII", image, HEADER_SIZE
    )
    struct.pack_into(
        "<IHHIIII", image, HEADER_SIZE, name_at, name_len, schema_len, version, payload_at,
        payload_len + 4096, crc,
    )  # fmt: skip
    struct.pack_into("<I", image, 16, 0)
    struct.pack_into("<I", image, 16, zlib.crc32(image))  # a "valid" image CRC
    with pytest.raises(PreservedStateError, match="past the end"):
        PreservedState.decode(bytes(image))
    assert len(image) == HEADER_SIZE + ENTRY_SIZE + name_len + schema_len + payload_len


def test_a_header_that_hides_nodes_is_refused() -> None:
    """Fewer nodes in the count would silently drop state: the CRC covers the header too."""
    state = PreservedState()
    state.put("a", 1)
    state.put("b", 2)
    image = bytearray(state.encode())
    struct.pack_into("<I", image, 8, 1)  # count: 2 -> 1
    with pytest.raises(PreservedStateError, match="CRC-32"):
        PreservedState.decode(bytes(image))


def test_a_new_version_reads_older_state_through_its_transforms() -> None:
    old = PreservedState()
    old.put("kv/store", StoreV1({"a": "1", "b": "2"}), version=1)
    old.put("counter", CounterV1(41))
    handed = PreservedState.decode(old.encode())
    store = handed.get("kv/store", STORE)
    assert store == StoreV3({"a": ("1", 0), "b": ("2", 0)}, generation=1)
    assert handed.get("counter", Schema(CounterV1)) == CounterV1(41)
    assert [n.name for n in handed.children("kv")] == ["kv/store"]


def test_state_a_version_cannot_read_is_refused_with_the_reason() -> None:
    state = PreservedState()
    state.put("kv/store", StoreV3({}, 5), version=4, schema="StoreV3")
    with pytest.raises(IncompatibleStateError, match="newer than this version reads"):
        state.get("kv/store", STORE)
    state.put("kv/store", StoreV1({"a": "1"}), version=1)
    with pytest.raises(IncompatibleStateError, match="no transform from v1 to v2"):
        state.get("kv/store", Schema(StoreV3, 3, {2: v2_to_v3}, name="StoreV3"))
    state.put("kv/store", {"items": "not a dict"}, version=3, schema="StoreV3")
    with pytest.raises(IncompatibleStateError, match="does not read as StoreV3 v3"):
        state.get("kv/store", STORE)
    state.put("kv/store", CounterV1(1), version=3)
    with pytest.raises(IncompatibleStateError, match="is not a StoreV3"):
        state.get("kv/store", STORE)
    with pytest.raises(
        IncompatibleStateError, match=r"no preserved node 'nope' \(nodes: kv/store\)"
    ):
        state.get("nope", STORE)


@pytest.mark.parametrize("name", ["", "A", "a//b", "a/", "/a", "a b", "x" * 65, "a."])
def test_bad_node_names_are_refused_when_written(name: str) -> None:
    with pytest.raises(ValueError, match="bad node name"):
        PreservedState().put(name, 1)


def test_a_preserved_region_is_sealed_and_outlives_its_writer() -> None:
    state = PreservedState()
    state.put("counter", CounterV1(3))
    fd = preserve(state)
    try:
        with pytest.raises(PermissionError):  # sealed against writing: the old version too
            os.pwrite(fd, b"\xff", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # what the new version is handed
    finally:
        os.close(fd)  # the writer goes; the state stays while a holder has it
    try:
        assert restore(reader).get("counter", Schema(CounterV1)) == CounterV1(3)
    finally:
        os.close(reader)


def test_restore_refuses_a_region_its_writer_could_still_change() -> None:
    image = PreservedState().encode()
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, image)
        with pytest.raises(PreservedStateError, match="lacks seals"):
            restore(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(PreservedStateError, match="lacks seals"):
            restore(fd)  # not sealed against writing: a mapping could change under us
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        with pytest.raises(PreservedStateError, match="not one"):
            restore(read)
    finally:
        os.close(read)
        os.close(write)
