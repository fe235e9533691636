"""Preserved state: what a service hands its next version, as a tree of named, versioned nodes.

Like Kexec HandOver's tree of named nodes, a service's state is a set of **nodes**: each has a
path-like name (``kv/store``, ``counter``), the name of its schema (the msgspec type it was
written as), that schema's version, and its payload (msgpack). `PreservedState` builds and reads
such a tree; `encode` lays it out as one image (docs/upgrade.md has the byte layout) and
`decode` checks every byte of one before believing any of it: the image comes from the old
instance, which is exactly the one that may be broken.

An image is handed over in a **preserved region** (`preserve`): a memfd holding the image, sealed
against writing, resizing and further seals, so once the old version has written it nobody can
change it, the old version included, and it lives as long as someone holds its fd (the upgrade
actor does, so it outlives the old instance). `restore` accepts only a memfd sealed like that.

A new version reads older state through `Schema`: the type it reads now, its version, and one
transform per older version (``{1: v1_to_v2, 2: v2_to_v3}``, each from the builtins of one version
to the builtins of the next). State it cannot read (a newer version, no transform, a payload that
does not decode as the type) raises `IncompatibleStateError`, and the upgrade rolls back.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import msgspec

from multikernel.protocol import MalformedFrameError, RefusedError

T = TypeVar("T")

MAGIC: Final = b"MKPS"
LAYOUT_VERSION: Final = 1
#: magic, layout version, flags, node count, image size, CRC-32 of the whole image (taken with
#: this field zero, so the header's own fields are covered too), 12 reserved bytes.
_HEADER: Final = struct.Struct("<4sHHIII12s")  # the last 12 bytes are reserved: zero
#: per node: name offset, name length, schema length, schema version, payload offset, payload
#: length, payload CRC-32 (the name and the schema name are stored together at the name offset).
_ENTRY: Final = struct.Struct("<IHHIIII")
HEADER_SIZE: Final = _HEADER.size
ENTRY_SIZE: Final = _ENTRY.size
MAX_NODES: Final = 4096
MAX_IMAGE: Final = 1 << 30
#: A node name: tokens of lower-case letters, digits, '_' and '-', separated by '/'.
_NAME: Final = re.compile(r"[a-z0-9_-]{1,64}(/[a-z0-9_-]{1,64}){0,15}")
_SCHEMA: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class PreservedStateError(MalformedFrameError):
    """An image or a preserved region that is not what it claims: refused, nothing read from it."""


class IncompatibleStateError(RefusedError):
    """State this version cannot read (too new, no transform, the wrong shape): the upgrade that
    brought it rolls back, and the old version keeps running with its state."""


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the tree: its name, the schema and version it was written as, its payload."""

    name: str
    schema: str
    version: int
    payload: bytes

    def value(self) -> Any:
        """The payload as builtins (no schema)."""
        return msgspec.msgpack.decode(self.payload)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"bad node name {name!r}: tokens of a-z 0-9 _ - (1-64 each) separated by '/'"
        )
    return name


class PreservedState:
    """A tree of nodes, built by the old version (`put`) and read by the new one (`get`)."""

    def __init__(self, nodes: Mapping[str, Node] | None = None) -> None:
        self._nodes: dict[str, Node] = dict(nodes or {})

    def put(self, name: str, value: object, *, version: int = 1, schema: str = "") -> None:
        """Store `value` (any msgspec-encodable value, usually a Struct) as node `name`."""
        if not 1 <= version <= 0xFFFFFFFF:
            raise ValueError(f"a schema version is 1 or more, not {version}")
        schema = schema or type(value).__name__
        if not _SCHEMA.fullmatch(schema):
            raise ValueError(f"bad schema name {schema!r}")
        payload = msgspec.msgpack.encode(value)
        self._nodes[check_name(name)] = Node(name, schema, version, payload)

    def get(self, name: str, schema: Schema[T]) -> T:
        """Node `name` read as `schema` says (older versions through its transforms)."""
        node = self._nodes.get(name)
        if node is None:
            known = ", ".join(sorted(self._nodes)) or "none"
            raise IncompatibleStateError(f"no preserved node {name!r} (nodes: {known})")
        return schema.read(node)

    def node(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def children(self, prefix: str) -> Iterator[Node]:
        """The nodes under `prefix/` (the whole tree for "")."""
        start = f"{prefix}/" if prefix else ""
        for name in sorted(self._nodes):
            if name.startswith(start):
                yield self._nodes[name]

    def __len__(self) -> int:
        return len(self._nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PreservedState) and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]

    # -- the image ----------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The image: header, node table, names, payloads (docs/upgrade.md)."""
        nodes = [self._nodes[name] for name in sorted(self._nodes)]
        if len(nodes) > MAX_NODES:
            raise ValueError(f"{len(nodes)} nodes; an image holds at most {MAX_NODES}")
        strings = bytearray()
        payloads = bytearray()
        table_end = HEADER_SIZE + ENTRY_SIZE * len(nodes)
        names_at: list[int] = []
        for node in nodes:
            names_at.append(len(strings))
            strings += node.name.encode() + node.schema.encode()
        payload_base = table_end + len(strings)
        entries = bytearray()
        for node, at in zip(nodes, names_at, strict=True):
            offset = payload_base + len(payloads)
            payloads += node.payload
            entries += _ENTRY.pack(
                table_end + at,
                len(node.name),
                len(node.schema),
                node.version,
                offset,
                len(node.payload),
                zlib.crc32(node.payload),
            )
        body = bytes(entries + strings + payloads)
        size = HEADER_SIZE + len(body)
        if size > MAX_IMAGE:
            raise ValueError(f"a {size}-byte image is over the {MAX_IMAGE}-byte limit")
        fields = (MAGIC, LAYOUT_VERSION, 0, len(nodes), size)
        crc = zlib.crc32(body, zlib.crc32(_HEADER.pack(*fields, 0, bytes(12))))
        return _HEADER.pack(*fields, crc, bytes(12)) + body

    @classmethod
    def decode(cls, image: bytes | bytearray | memoryview) -> PreservedState:
        """Check an image through and through, then read it; PreservedStateError if anything
        in it is off (magic, version, sizes, CRCs, offsets, names, duplicates)."""
        data = memoryview(image)
        if len(data) < HEADER_SIZE:
            raise PreservedStateError(f"a {len(data)}-byte image is shorter than its header")
        magic, version, flags, count, size, crc, reserved = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise PreservedStateError(f"not a preserved-state image (magic {bytes(magic)!r})")
        if version != LAYOUT_VERSION or flags or any(reserved):
            raise PreservedStateError(
                f"preserved-state layout {version} (flags {flags:#x}, reserved bytes "
                f"{bytes(reserved).hex() or '-'}); this side reads layout {LAYOUT_VERSION} without "
                "flags, reserved bytes zero"
            )
        if size != len(data):
            raise PreservedStateError(f"the image says {size} bytes, {len(data)} were handed over")
        if count > MAX_NODES or HEADER_SIZE + count * ENTRY_SIZE > size:
            raise PreservedStateError(f"{count} nodes do not fit a {size}-byte image")
        unsigned = _HEADER.pack(magic, version, flags, count, size, 0, reserved)
        if zlib.crc32(data[HEADER_SIZE:], zlib.crc32(unsigned)) != crc:
            raise PreservedStateError("the image's CRC-32 does not match: it was damaged")
        nodes: dict[str, Node] = {}
        for i in range(count):
            entry = _ENTRY.unpack_from(data, HEADER_SIZE + i * ENTRY_SIZE)
            node = _read_node(data, *entry)
            if node.name in nodes:
                raise PreservedStateError(f"node {node.name!r} appears twice")
            nodes[node.name] = node
        return cls(nodes)


def _read_node(
    data: memoryview,
    name_at: int,
    name_len: int,
    schema_len: int,
    version: int,
    payload_at: int,
    payload_len: int,
    crc: int,
) -> Node:
    size = len(data)
    if name_at + name_len + schema_len > size or payload_at + payload_len > size:
        raise PreservedStateError("a node's name or payload lies past the end of the image")
    if name_at < HEADER_SIZE or payload_at < HEADER_SIZE:
        raise PreservedStateError("a node's name or payload overlaps the header")
    try:
        name = str(data[name_at : name_at + name_len], "ascii")
        schema = str(data[name_at + name_len : name_at + name_len + schema_len], "ascii")
    except UnicodeDecodeError:
        raise PreservedStateError("a node's name is not ASCII") from None
    if not _NAME.fullmatch(name) or not _SCHEMA.fullmatch(schema) or not version:
        raise PreservedStateError(f"bad node {name!r} (schema {schema!r} version {version})")
    payload = bytes(data[payload_at : payload_at + payload_len])
    if zlib.crc32(payload) != crc:
        raise PreservedStateError(f"node {name!r}: its payload's CRC-32 does not match")
    return Node(name, schema, version, payload)


class Schema(Generic[T]):
    """How this version reads a node: as `kind`, version `version`, older ones transformed.

    `transforms[v]` turns the builtins of version v into the builtins of version v + 1; reading
    version 1 state with version 3 code runs transforms 1 and 2, then decodes as `kind`.
    """

    def __init__(
        self,
        kind: type[T],
        version: int = 1,
        transforms: Mapping[int, Callable[[Any], Any]] | None = None,
        *,
        name: str = "",
    ) -> None:
        self.kind = kind
        self.version = version
        self.transforms = dict(transforms or {})
        self.name = name or getattr(kind, "__name__", str(kind))

    def read(self, node: Node) -> T:
        where = f"node {node.name!r} ({node.schema} v{node.version})"
        if node.version > self.version:
            raise IncompatibleStateError(
                f"{where} is newer than this version reads ({self.name} v{self.version}): "
                "a rollback to older code needs state written by it"
            )
        if node.schema != self.name and node.version == self.version:
            raise IncompatibleStateError(f"{where} is not a {self.name}")
        try:
            if node.version == self.version:
                return msgspec.msgpack.decode(node.payload, type=self.kind)
            value = node.value()
            for v in range(node.version, self.version):
                transform = self.transforms.get(v)
                if transform is None:
                    raise IncompatibleStateError(
                        f"{where}: this version ({self.name} v{self.version}) has no transform "
                        f"from v{v} to v{v + 1}"
                    )
                value = transform(value)
            return msgspec.convert(value, type=self.kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise IncompatibleStateError(
                f"{where} does not read as {self.name} v{self.version}: {error}"
            ) from None


# -- the preserved region ---------------------------------------------------------------------


def preserve(state: PreservedState) -> int:
    """The image in a new memfd sealed against writing and resizing; returns its fd (ours to
    close, or to hand over: whoever holds it keeps the state alive)."""
    image = state.encode()
    fd = os.memfd_create("multikernel-preserved", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        written = 0
        view = memoryview(image)
        while written < len(image):
            written += os.pwrite(fd, view[written:], written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restore(fd: int) -> PreservedState:
    """Read the state a preserved region holds (the fd stays open: close it when done).

    Only a memfd sealed with `SEALS` is read: anything its writer could still change under us
    (while we check it, or after) is refused with PreservedStateError.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise PreservedStateError(
            "a preserved region is a sealed memfd; this fd is not one"
        ) from None
    if missing := SEALS & ~seals:
        raise PreservedStateError(
            f"the preserved region lacks seals {missing:#x}: its writer could still change it"
        )
    size = os.fstat(fd).st_size
    if not HEADER_SIZE <= size <= MAX_IMAGE:
        raise PreservedStateError(f"a {size}-byte preserved region cannot hold an image")
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
        return PreservedState.decode(memoryview(mapped)[:size].tobytes())
