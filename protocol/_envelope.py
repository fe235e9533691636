"""The envelope: a fixed 48-byte binary header, the subject, then a msgpack body.

::

    +--------------------+--------------------+----------------------------+
    | header (48 bytes)  | subject (ASCII,    | body (msgpack, body_len    |
    | little-endian      |  subject_len bytes)|  bytes, opaque to the hub) |
    +--------------------+--------------------+----------------------------+

The hub routes on the header and the subject and forwards the frame's bytes unchanged: reading
the header is one ``struct.unpack_from`` with a precompiled ``struct.Struct``, and the body stays
undecoded until the endpoint that owns it calls ``decode_body``. Field offsets and meanings are
specified in docs/protocol.md (a test checks that table against ``HEADER_FIELDS``).

Deadlines are absolute ``CLOCK_MONOTONIC`` nanoseconds (``time.monotonic_ns()`` on Linux); every
endpoint of one bus runs on one host, so the clock is shared. 0 means "no deadline".
"""

from __future__ import annotations

import struct
import time
from operator import index as _index
from typing import Final, TypeVar

import msgspec

from multikernel.protocol._codes import MAGIC, PROTOCOL_VERSION, SUPPORTED_VERSIONS, Kind
from multikernel.protocol._errors import (
    InvalidSubjectError,
    MalformedFrameError,
    ProtocolError,
    TooLargeError,
    UnsupportedVersionError,
)
from multikernel.protocol._subjects import MAX_SUBJECT_BYTES

T = TypeVar("T")

#: Wire order of the header: (field name, ``struct`` format character). Little-endian, packed.
HEADER_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("magic", "H"),
    ("version", "B"),
    ("kind", "B"),
    ("flags", "H"),
    ("subject_len", "H"),
    ("body_len", "I"),
    ("reserved", "I"),
    ("source", "Q"),
    ("destination", "Q"),
    ("correlation", "Q"),
    ("deadline_ns", "Q"),
)
HEADER_FORMAT: Final = "<" + "".join(code for _, code in HEADER_FIELDS)
_HEADER: Final = struct.Struct(HEADER_FORMAT)
HEADER_SIZE: Final = _HEADER.size
_SOURCE: Final = struct.Struct("<Q")


def _offset_of(field: str) -> int:
    names = [name for name, _ in HEADER_FIELDS]
    return struct.calcsize("<" + "".join(code for _, code in HEADER_FIELDS[: names.index(field)]))


#: Where the source endpoint id sits, for ``stamp_source``.
SOURCE_OFFSET: Final = _offset_of("source")

#: Where the destination sits: a delivery's subscription id, or a relayed channel's token.
DESTINATION_OFFSET: Final = _offset_of("destination")

#: Where the hub writes a delivery's gap (``Header.missed``): the reserved word (a ``<I``).
MISSED_OFFSET: Final = _offset_of("reserved")

#: Default limit on a body, in bytes; both encode and decode_header take ``max_body``.
DEFAULT_MAX_BODY: Final = 1 << 20

_KINDS: Final = {kind.value: kind for kind in Kind}
_encode: Final = msgspec.msgpack.Encoder().encode
_unpack_from = _HEADER.unpack_from
_COPY_BELOW: Final = 512
_pack = _HEADER.pack


class Header(msgspec.Struct, frozen=True, gc=False):
    """A decoded envelope header: everything the hub needs to route a frame."""

    version: int
    kind: Kind
    flags: int
    subject: str
    body_len: int
    source: int
    destination: int
    correlation: int
    deadline_ns: int
    #: On a publication the hub delivers: how many publications for the same subscription it
    #: dropped just before this one (the reserved word; 0 on everything else).
    missed: int = 0

    @property
    def body_offset(self) -> int:
        """Where the body starts in the frame."""
        return HEADER_SIZE + len(self.subject)

    @property
    def frame_len(self) -> int:
        """The length of the whole frame."""
        return HEADER_SIZE + len(self.subject) + self.body_len


def encode(
    kind: Kind,
    body: object,
    *,
    subject: str = "",
    source: int = 0,
    destination: int = 0,
    correlation: int = 0,
    deadline_ns: int = 0,
    flags: int = 0,
    max_body: int = DEFAULT_MAX_BODY,
) -> bytes:
    """Build one frame: header, subject and ``body`` encoded as msgpack.

    ``body`` is any msgspec-encodable object, usually a frozen Struct; wrap already-encoded
    msgpack in ``msgspec.Raw`` to forward it verbatim. The subject is checked for length and
    ASCII only; its grammar is the hub's to check (``validate_subject``).
    """
    try:
        subject_bytes = subject.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidSubjectError(
            f"subject {subject!r} is not ASCII; tokens may use only A-Z a-z 0-9 _ -"
        ) from None
    subject_len = len(subject_bytes)
    if subject_len > MAX_SUBJECT_BYTES:
        raise InvalidSubjectError(
            f"subject is {subject_len} bytes, longer than the limit of {MAX_SUBJECT_BYTES}"
        )
    try:
        payload = _encode(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode a {type(body).__name__} body: {exc}") from None
    body_len = len(payload)
    if body_len > max_body:
        raise TooLargeError(
            f"{Kind(kind).name.lower()} body is {body_len} bytes, over the limit of {max_body}; "
            "send large data through a shared region and put its name in the message",
            details={"size": body_len, "limit": max_body},
        )
    try:
        # _index: struct packs an IntEnum/IntFlag through a slow path (~0.4 µs more, measured);
        # operator.index turns them into plain ints for a few ns.
        header = _pack(
            MAGIC, PROTOCOL_VERSION, _index(kind), _index(flags), subject_len, body_len, 0,
            source, destination, correlation, deadline_ns,
        )  # fmt: skip
    except struct.error as exc:
        raise ProtocolError(f"a header field is out of range: {exc}") from None
    # Three small buffers and one join measured faster than encode_into a preallocated
    # bytearray (benchmarks/bench_protocol.py), and the body is copied once either way.
    return b"".join((header, subject_bytes, payload))


def decode_header(
    frame: bytes | bytearray | memoryview, *, max_body: int = DEFAULT_MAX_BODY
) -> Header:
    """Read and check a frame's header and subject, leaving the body untouched.

    Raises MalformedFrameError (short frame, wrong magic, lengths that disagree with the frame),
    UnsupportedVersionError (unknown version or kind) or TooLargeError (body over ``max_body``).
    """
    try:
        (
            magic, version, kind, flags, subject_len, body_len, reserved,
            source, destination, correlation, deadline_ns,
        ) = _unpack_from(frame)  # fmt: skip
    except struct.error:
        raise MalformedFrameError(
            f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header"
        ) from None
    if magic != MAGIC:
        raise MalformedFrameError(
            f"frame does not start with the envelope magic b'MK' (got {magic:#06x}); "
            "the peer is not speaking the multikernel protocol, or the stream lost its framing"
        )
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"frame has protocol version {version}; this side speaks versions "
            f"{sorted(SUPPORTED_VERSIONS)}; negotiate a common version at attach (Hello/Welcome)",
            details={"version": version},
        )
    known_kind = _KINDS.get(kind)
    if known_kind is None:
        raise UnsupportedVersionError(
            f"frame kind {kind} is unknown to protocol version {version}; "
            "a newer peer must not send it before negotiating it at attach",
            details={"kind": kind},
        )
    if subject_len > MAX_SUBJECT_BYTES:
        raise MalformedFrameError(
            f"header claims a {subject_len}-byte subject, over the limit of {MAX_SUBJECT_BYTES}"
        )
    if body_len > max_body:
        raise TooLargeError(
            f"header claims a {body_len}-byte body, over the limit of {max_body}",
            details={"size": body_len, "limit": max_body},
        )
    expected = HEADER_SIZE + subject_len + body_len
    if len(frame) != expected:
        raise MalformedFrameError(
            f"frame is {len(frame)} bytes but its header says {expected} "
            f"({HEADER_SIZE} header + {subject_len} subject + {body_len} body)"
        )
    if subject_len:
        try:
            subject = str(frame[HEADER_SIZE : HEADER_SIZE + subject_len], "ascii")
        except UnicodeDecodeError:
            raise MalformedFrameError("frame subject is not ASCII") from None
    else:
        subject = ""
    return Header(
        version, known_kind, flags, subject, body_len, source, destination, correlation,
        deadline_ns, reserved,
    )  # fmt: skip


def body_view(header: Header, frame: bytes | bytearray | memoryview) -> memoryview:
    """The body bytes of a frame whose header was decoded, without copying."""
    start = HEADER_SIZE + len(header.subject)
    return memoryview(frame)[start : start + header.body_len]


def decode_body(
    header: Header, frame: bytes | bytearray | memoryview, decoder: msgspec.msgpack.Decoder[T]
) -> T:
    """Decode a frame's body with ``decoder`` (one decoder per message union).

    A body that is not valid msgpack or does not match the union (including an unknown tag)
    raises MalformedFrameError. If the decoded type holds ``msgspec.Raw``, it references
    ``frame``: copy it before the frame's memory is reused.
    """
    start = HEADER_SIZE + len(header.subject)
    end = start + header.body_len
    # A small body is cheaper to copy than to wrap in a memoryview (measured: ~50 vs ~170 ns).
    body = frame[start:end] if end - start <= _COPY_BELOW else memoryview(frame)[start:end]
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedFrameError(
            f"cannot decode the {header.kind.name.lower()} body: {exc}"
        ) from None


def decode(
    frame: bytes | bytearray | memoryview,
    decoder: msgspec.msgpack.Decoder[T],
    *,
    max_body: int = DEFAULT_MAX_BODY,
) -> tuple[Header, T]:
    """Decode a whole frame: ``decode_header`` then ``decode_body``."""
    header = decode_header(frame, max_body=max_body)
    return header, decode_body(header, frame, decoder)


def stamp_source(frame: bytearray | memoryview, source: int) -> None:
    """Overwrite a frame's source endpoint id in place (the hub binds identity, not the sender).

    Do it before the frame is published to a peer: ``pack_into`` is not a single atomic store.
    """
    _SOURCE.pack_into(frame, SOURCE_OFFSET, source)


def deadline_after(seconds: float) -> int:
    """The absolute deadline (CLOCK_MONOTONIC ns) ``seconds`` from now."""
    return time.monotonic_ns() + max(0, round(seconds * 1e9))


def seconds_left(deadline_ns: int) -> float | None:
    """Seconds until ``deadline_ns`` (negative once passed), or None for "no deadline" (0)."""
    if deadline_ns == 0:
        return None
    return (deadline_ns - time.monotonic_ns()) / 1e9
