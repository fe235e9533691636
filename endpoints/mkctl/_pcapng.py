"""Captures of the bus as pcapng files that Wireshark and tshark open (`bus capture`, `replay`).

One section, one interface of link type USER0 (147, "DLT_USER0": ours to define; the Lua
dissector in docs/wireshark/multikernel.lua registers for it), nanosecond timestamps (the wall
clock). Each frame the monitor saw is one Enhanced Packet Block whose data is a capture
pseudo-header (what the hub recorded about the frame) followed by the envelope frame itself:

| offset | size | field | meaning |
|---|---|---|---|
| 0 | 4 | magic | `MKCP` |
| 4 | 1 | path | 1 hub (routed by the hub), 2 direct (mirrored from a direct channel) |
| 5 | 1 | source_name_len | bytes of the sender's name, after the fixed part |
| 6 | 2 | service_len | bytes of the direct channel's service name, after the sender's name |
| 8 | 8 | source | the sender's endpoint id |
| 16 | 8 | destination | the receiver's endpoint id (0: every subscriber) |
| 24 | 8 | channel | the direct channel's token (0 on the hub path) |
| 32 | 8 | monotonic_ns | CLOCK_MONOTONIC when the hub (or the endpoint) saw it |
| 40 | n | names | the sender's name, then the service's, then zero padding to 8 bytes |

All integers little-endian. The interface's comment holds what the bus knew of its endpoints,
channels and methods when the capture started (JSON), so a replay names and types frames as the
live monitor did.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO, Final

from multikernel.endpoints.mkctl._errors import CommandError
from multikernel.protocol import MonitorRecord

LINKTYPE_USER0: Final = 147
MAGIC: Final = b"MKCP"
PATHS: Final = {"hub": 1, "direct": 2}
_PSEUDO: Final = struct.Struct("<4sBBHQQQQ")
_SHB: Final = 0x0A0D0D0A
_IDB: Final = 0x00000001
_EPB: Final = 0x00000006
_BYTE_ORDER: Final = 0x1A2B3C4D


def _pad(data: bytes, to: int = 4) -> bytes:
    return data + b"\0" * (-len(data) % to)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def packet(record: MonitorRecord) -> bytes:
    """The pseudo-header and the frame: one packet's data."""
    source_name = record.source_name.encode()[:255]
    service = record.service.encode()[:65535]
    path = PATHS.get(record.path, 0)
    ids = (record.source, record.destination, record.channel, record.ts_ns)
    head = _PSEUDO.pack(MAGIC, path, len(source_name), len(service), *ids)
    return _pad(head + source_name + service, 8) + record.frame


def unpack(data: bytes) -> MonitorRecord:
    """A packet's data back into the record the monitor saw."""
    if len(data) < _PSEUDO.size or data[:4] != MAGIC:
        raise ValueError("not a multikernel capture packet (no MKCP pseudo-header)")
    _, path, name_len, service_len, source, destination, channel, ts_ns = _PSEUDO.unpack_from(data)
    names_end = _PSEUDO.size + name_len + service_len
    source_name = data[_PSEUDO.size : _PSEUDO.size + name_len].decode(errors="replace")
    service = data[_PSEUDO.size + name_len : names_end].decode(errors="replace")
    frame = data[names_end + (-names_end % 8) :]
    where = {number: name for name, number in PATHS.items()}.get(path, "?")
    return MonitorRecord(ts_ns, where, source, destination, frame, channel, service, source_name)


class Writer:
    """Writes a pcapng capture; every block is flushed as it is written (Ctrl-C loses none)."""

    def __init__(self, file: BinaryIO, context: dict[str, Any]) -> None:
        self.file = file
        self.count = 0
        shb = struct.pack("<IHHq", _BYTE_ORDER, 1, 0, -1)
        shb += _option(4, b"mkctl bus capture") + _option(0, b"")  # shb_userappl
        idb = struct.pack("<HHI", LINKTYPE_USER0, 0, 0)
        idb += _option(2, b"multikernel bus")  # if_name
        idb += _option(9, bytes([9]))  # if_tsresol: 10^-9 s
        idb += _option(1, json.dumps(context, separators=(",", ":")).encode())  # opt_comment
        idb += _option(0, b"")
        self._write(_block(_SHB, shb) + _block(_IDB, idb))

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def write(self, record: MonitorRecord, wall_ns: int) -> None:
        data = packet(record)
        body = struct.pack("<IIIII", 0, wall_ns >> 32, wall_ns & 0xFFFFFFFF, len(data), len(data))
        self._write(_block(_EPB, body + _pad(data)))
        self.count += 1


def read(file: BinaryIO) -> tuple[dict[str, Any], Iterator[tuple[int, MonitorRecord]]]:
    """The capture's context and its (wall ns, record) pairs, in order."""
    data = file.read()
    if len(data) < 12 or struct.unpack_from("<I", data)[0] != _SHB:
        raise CommandError(f"{getattr(file, 'name', 'the file')} is not a pcapng capture")
    if struct.unpack_from("<I", data, 8)[0] != _BYTE_ORDER:
        raise CommandError("the capture was written big-endian; mkctl reads its own captures")
    context: dict[str, Any] = {}
    records: list[tuple[int, MonitorRecord]] = []
    offset = 0
    while offset + 12 <= len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        if length < 12 or offset + length > len(data):
            raise CommandError(f"the capture is truncated or corrupt at byte {offset}")
        body = data[offset + 8 : offset + length - 4]
        if kind == _IDB:
            context = _comment(body[8:])
        elif kind == _EPB:
            _, high, low, captured, _ = struct.unpack_from("<IIIII", body)
            records.append(((high << 32) | low, unpack(body[20 : 20 + captured])))
        offset += length
    return context, iter(records)


def _comment(options: bytes) -> dict[str, Any]:
    offset = 0
    while offset + 4 <= len(options):
        code, length = struct.unpack_from("<HH", options, offset)
        if code == 0:
            break
        if code == 1:
            try:
                value = json.loads(options[offset + 4 : offset + 4 + length])
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
        offset += 4 + length + (-length % 4)
    return {}
