"""Frames for people: who sent them, what they carry, decoded through the schemas the bus knows.

The monitor (`bus monitor`), `bus capture` and `bus replay` show each frame as one line: its
times, path, kind, sender and receiver by name, subject, and its body. Bodies are msgpack; every
one is decoded (to JSON-like values), and labelled with its type where the bus says what it is:
control and error frames have one union each, the well-known subjects carry lifecycle and kernel
messages, and a request's or reply's type comes from the schema its service published
(`bus introspect`), found through the direct channel it travelled on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from multikernel.protocol import (
    CONTROL_DECODER,
    ERROR_DECODER,
    KERNEL_DECODER,
    AgentHello,
    BusSnapshot,
    Header,
    InstanceStateChanged,
    Kind,
    MonitorRecord,
    ProtocolError,
    decode_header,
    subject_matches,
)

#: Subjects whose bodies have a type everyone knows.
KNOWN_SUBJECTS: tuple[tuple[str, Any], ...] = (
    ("mk.instance.*.state", msgspec.msgpack.Decoder(InstanceStateChanged)),
    ("mk.instance.*.hello", msgspec.msgpack.Decoder(AgentHello)),
    ("mk.instance.*.system", KERNEL_DECODER),
)


_MAX_PENDING = 4096  # requests remembered until their reply, to name the reply's type


def _type_name(schema: str) -> str:
    """The type a method's JSON schema names (its `$ref`, or its `type`)."""
    if not schema:
        return ""
    try:
        parsed = json.loads(schema)
    except ValueError:
        return ""
    ref = parsed.get("$ref", "")
    return str(ref.rpartition("/")[2] if ref else parsed.get("type", ""))


def is_heartbeat(header: Header, body: Any) -> bool:
    """Heartbeats (an agent's on mk.instance.<id>.system, an endpoint's to the hub)."""
    return type(body).__name__ in ("SystemHeartbeat", "Heartbeat")


@dataclass
class Names:
    """What the bus knows of its endpoints, channels and services (from a `BusSnapshot`)."""

    endpoints: dict[int, str] = field(default_factory=dict)
    channels: dict[int, str] = field(default_factory=dict)  # token -> service
    methods: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    pending: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    def learn(self, snap: BusSnapshot) -> None:
        self.endpoints.update({e.endpoint_id: e.name for e in snap.endpoints})
        self.channels.update({c.token: c.target for c in snap.channels})
        for service in snap.services:
            for method in service.methods:
                types = (_type_name(method.request_schema), _type_name(method.response_schema))
                self.methods[service.name, method.name] = types

    def context(self) -> dict[str, Any]:
        """What it knows, as JSON values (stored in a capture for its replay)."""
        return {
            "endpoints": {str(k): v for k, v in self.endpoints.items()},
            "channels": {str(k): v for k, v in self.channels.items()},
            "methods": {f"{svc}/{m}": list(types) for (svc, m), types in self.methods.items()},
        }

    @classmethod
    def from_context(cls, context: dict[str, Any]) -> Names:
        names = cls()
        try:
            names.endpoints = {int(k): str(v) for k, v in context.get("endpoints", {}).items()}
            names.channels = {int(k): str(v) for k, v in context.get("channels", {}).items()}
            for key, (request, response) in context.get("methods", {}).items():
                service, _, method = str(key).rpartition("/")
                names.methods[service, method] = (str(request), str(response))
        except (AttributeError, TypeError, ValueError):
            return cls()  # a context we cannot read: frames are shown by id
        return names

    def who(self, endpoint: int) -> str:
        if not endpoint:
            return "*"
        name = self.endpoints.get(endpoint)
        return f"{name}({endpoint})" if name else str(endpoint)

    def knows(self, record: MonitorRecord) -> bool:
        ids = (record.source, record.destination)
        return all(i in self.endpoints for i in ids if i) and (
            not record.channel or bool(record.service) or record.channel in self.channels
        )


@dataclass(frozen=True)
class Shown:
    """One frame, ready to print or to dump as JSON."""

    ts_ns: int  # CLOCK_MONOTONIC, as recorded
    wall_ns: int  # the same instant on the wall clock
    path: str
    kind: str
    source: str
    destination: str
    subject: str
    service: str
    type: str
    body: Any
    size: int
    heartbeat: bool

    def line(self) -> str:
        wall = time.strftime("%H:%M:%S", time.localtime(self.wall_ns / 1e9))
        micros = self.wall_ns // 1000 % 1_000_000
        what = f"{self.service}.{self.subject}" if self.service and self.subject else self.subject
        what = what or self.service
        body = json.dumps(self.body, separators=(",", ":"), default=_text)
        label = f"{self.type} " if self.type else ""
        return (
            f"{wall}.{micros:06d} +{self.ts_ns / 1e9:.6f} {self.path:6} {self.kind:7} "
            f"{self.source} -> {self.destination} {what} {self.size}B {label}{body}"
        )

    def record(self) -> dict[str, Any]:
        return {
            "ts_ns": self.ts_ns, "wall_ns": self.wall_ns, "path": self.path, "kind": self.kind,
            "source": self.source, "destination": self.destination, "subject": self.subject,
            "service": self.service, "type": self.type, "body": self.body, "size": self.size,
        }  # fmt: skip


def _text(value: object) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace") if len(value) <= 64 else f"<{len(value)} bytes>"
    return str(value)


def show(record: MonitorRecord, names: Names, clock_offset_ns: int) -> Shown:
    """Decode one monitor record for people."""
    frame = record.frame
    try:
        header = decode_header(frame)
    except ProtocolError as exc:
        return Shown(record.ts_ns, record.ts_ns + clock_offset_ns, record.path, "?",
                     names.who(record.source), names.who(record.destination), "", "", "",
                     f"undecodable frame: {exc}", len(frame), False)  # fmt: skip
    raw = frame[header.body_offset :]
    service = record.service or (names.channels.get(record.channel, "") if record.channel else "")
    body, type_name = _decode(header, raw, service, record, names)
    if record.source_name and record.source not in names.endpoints:
        names.endpoints[record.source] = record.source_name  # the hub said who sent it
    return Shown(
        record.ts_ns, record.ts_ns + clock_offset_ns, record.path, header.kind.name.lower(),
        names.who(record.source), names.who(record.destination or header.destination),
        header.subject, service, type_name, _builtins(body), len(frame),
        is_heartbeat(header, body),
    )  # fmt: skip


def _decode(
    header: Header, raw: bytes, service: str, record: MonitorRecord, names: Names
) -> tuple[Any, str]:
    typed: Any = None
    if header.kind == Kind.CONTROL:
        typed = _try(CONTROL_DECODER, raw)
    elif header.kind == Kind.ERROR:
        typed = _try(ERROR_DECODER, raw)
    elif header.kind == Kind.PUBLISH:
        for pattern, decoder in KNOWN_SUBJECTS:
            if subject_matches(pattern, header.subject):
                typed = _try(decoder, raw)
                break
    if typed is not None:
        return typed, type(typed).__name__
    body = _try(msgspec.msgpack.Decoder(), raw)
    type_name = ""
    if header.kind == Kind.REQUEST and service:
        request, response = names.methods.get((service, header.subject), ("", ""))
        type_name = request
        if len(names.pending) >= _MAX_PENDING:  # requests never answered: forget the oldest
            del names.pending[next(iter(names.pending))]
        names.pending[record.channel, header.correlation] = (header.subject, response)
    elif header.kind == Kind.REPLY and service:
        _, type_name = names.pending.get((record.channel, header.correlation), ("", ""))
    return body, type_name if type_name not in ("null", "object") else ""


def _try(decoder: Any, raw: bytes) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _builtins(body: Any) -> Any:
    try:
        return msgspec.to_builtins(body, builtin_types=(bytes,))
    except TypeError:
        return repr(body)
