"""Schema evolution: an old decoder reads a newer message and a newer decoder reads an old one."""

import msgspec
import pytest

from multikernel.protocol import CONTROL_DECODER, Hello, Kind, decode, encode


class StatusV1(msgspec.Struct, frozen=True, tag="status"):
    instance: int
    state: str


class StatusV2(msgspec.Struct, frozen=True, tag="status"):
    instance: int
    state: str
    cpus: list[int] = []  # added in v2, with a default
    reason: str | None = None  # added in v2, with a default


class PingV1(msgspec.Struct, frozen=True, tag="ping"):
    seq: int


UnionV1 = StatusV1 | PingV1
UnionV2 = StatusV2 | PingV1
DECODER_V1 = msgspec.msgpack.Decoder(UnionV1)
DECODER_V2 = msgspec.msgpack.Decoder(UnionV2)


def test_old_decoder_reads_a_newer_message_skipping_new_fields() -> None:
    frame = encode(Kind.PUBLISH, StatusV2(3, "active", cpus=[4, 5], reason="grown"), subject="s")
    assert decode(frame, DECODER_V1)[1] == StatusV1(3, "active")


def test_newer_decoder_reads_an_old_message_filling_defaults() -> None:
    frame = encode(Kind.PUBLISH, StatusV1(3, "active"), subject="s")
    assert decode(frame, DECODER_V2)[1] == StatusV2(3, "active", cpus=[], reason=None)


def test_other_union_members_are_unaffected_by_an_evolved_member() -> None:
    frame = encode(Kind.PUBLISH, PingV1(7), subject="s")
    assert decode(frame, DECODER_V1)[1] == decode(frame, DECODER_V2)[1] == PingV1(7)


def test_new_field_without_default_breaks_old_senders_which_is_why_the_rule_exists() -> None:
    class StatusBad(msgspec.Struct, frozen=True, tag="status"):
        instance: int
        state: str
        cpus: list[int]

    with pytest.raises(msgspec.ValidationError, match="missing required field `cpus`"):
        msgspec.msgpack.Decoder(StatusBad).decode(msgspec.msgpack.encode(StatusV1(3, "x")))


def test_our_hello_reads_a_hello_from_a_newer_peer() -> None:
    newer = {"type": "hello", "min_version": 1, "max_version": 2, "features": 1, "zone": "eu"}
    assert decode(encode(Kind.CONTROL, newer), CONTROL_DECODER)[1] == Hello(1, 2, features=1)


def test_a_minimal_hello_from_an_older_peer_gets_defaults() -> None:
    older = {"type": "hello", "min_version": 1, "max_version": 1}
    assert decode(encode(Kind.CONTROL, older), CONTROL_DECODER)[1] == Hello(1, 1)
