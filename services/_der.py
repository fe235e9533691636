"""A minimal DER codec: just what the PKCS#7 ``SignedData`` of an appended signature needs.

Encoding builds elements bottom-up from bytes (``seq(integer(1), octets(value))``), always in
definite-length form, with ``set_of`` sorting its items as DER orders a SET OF. Decoding works on
whole elements as bytes, never on a parsed tree: ``elements`` splits a concatenation, ``content``
strips one element's tag and length, and ``one`` also checks its tag, so a caller compares
elements (an OID, a NULL) by their encodings. Every length is checked against the buffer before
it is used, and only DER is accepted (no indefinite lengths, no multi-byte tags), so a hostile
signature gets `DerError`, never an out-of-range slice. `DerError` knows nothing of signatures:
`_signature` turns it into `MalformedSignatureError` where it parses, once.
"""

from __future__ import annotations

from typing import Final

#: The encoding of NULL, as AlgorithmIdentifier parameters carry it.
NULL: Final = b"\x05\x00"


class DerError(ValueError):
    """The bytes are not the DER the caller expected (truncated, BER, wrong tag, bad lengths)."""


# --- encoding ------------------------------------------------------------------------------------


def tlv(tag: int, content: bytes) -> bytes:
    """One element: ``tag``, the definite length of ``content``, then ``content``."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(items)))  # DER orders SET OF by encoding


def integer(value: int) -> bytes:
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def octets(value: bytes) -> bytes:
    return tlv(0x04, value)


def oid(dotted: str) -> bytes:
    first, second, *arcs = (int(arc) for arc in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in arcs:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


# --- decoding ------------------------------------------------------------------------------------


def _bounds(buf: bytes, pos: int) -> tuple[int, int]:
    """(content start, content end) of the element at ``pos``: definite lengths only (DER)."""
    if pos + 2 > len(buf):
        raise DerError("truncated element")
    if buf[pos] & 0x1F == 0x1F:
        raise DerError("multi-byte tag")
    start, size = pos + 2, buf[pos + 1]
    if size == 0x80:
        raise DerError("indefinite length (BER, not DER)")
    if size > 0x80:
        count, size = size & 0x7F, 0
        if count > 4 or start + count > len(buf):
            raise DerError("bad length")
        size, start = int.from_bytes(buf[start : start + count], "big"), start + count
    if start + size > len(buf):
        raise DerError("truncated element")
    return start, start + size


def elements(buf: bytes) -> list[bytes]:
    """Split a concatenation of elements into each whole element (tag, length and content)."""
    items, pos = [], 0
    while pos < len(buf):
        end = _bounds(buf, pos)[1]
        items.append(buf[pos:end])
        pos = end
    return items


def content(element: bytes) -> bytes:
    """The content of ``element``, which must be exactly one element (of any tag)."""
    start, end = _bounds(element, 0)
    if end != len(element):
        raise DerError("trailing bytes after an element")
    return element[start:end]


def one(buf: bytes, tag: int) -> bytes:
    """The content of ``buf``, which must be exactly one element tagged ``tag``."""
    if not buf or buf[0] != tag:
        raise DerError(f"expected tag {tag:#04x}")
    return content(buf)


def algorithm(element: bytes) -> bytes:
    """The OID (as an element) of an AlgorithmIdentifier with absent or NULL parameters."""
    parts = elements(one(element, 0x30))
    if not parts or parts[0][0] != 0x06 or parts[1:] not in ([], [NULL]):
        raise DerError("bad algorithm identifier")
    return parts[0]
