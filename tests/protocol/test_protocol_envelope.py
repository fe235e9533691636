"""The envelope: header encoding, header-only decoding, bodies left untouched, limits."""

import struct
import time

import msgspec
import pytest

from multikernel.protocol import (
    CONTROL_DECODER,
    DEFAULT_MAX_BODY,
    HEADER_SIZE,
    KERNEL_DECODER,
    MAGIC,
    PROTOCOL_VERSION,
    Flag,
    Header,
    InvalidSubjectError,
    Kind,
    MalformedFrameError,
    MemAdd,
    ProtocolError,
    Subscribe,
    TooLargeError,
    UnsupportedVersionError,
    body_view,
    deadline_after,
    decode,
    decode_header,
    encode,
    seconds_left,
    stamp_source,
)
from multikernel.protocol._envelope import HEADER_FORMAT

REQUEST = MemAdd(instance=3, start_pfn=0x10_0000, nr_pages=32768)


def _frame(**overrides: object) -> bytearray:
    fields: dict[str, object] = {
        "subject": "mk.resource.grant",
        "source": 7,
        "destination": 9,
        "correlation": 42,
        "deadline_ns": 123_456_789,
        "flags": Flag.MORE,
    }
    fields.update(overrides)
    return bytearray(encode(Kind.REQUEST, REQUEST, **fields))  # type: ignore[arg-type]


def test_header_is_48_bytes_and_8_byte_aligned() -> None:
    assert HEADER_SIZE == 48
    assert HEADER_SIZE % 8 == 0


def test_frame_round_trips_every_header_field() -> None:
    header, body = decode(_frame(), KERNEL_DECODER)
    assert header == Header(
        version=PROTOCOL_VERSION,
        kind=Kind.REQUEST,
        flags=Flag.MORE,
        subject="mk.resource.grant",
        body_len=header.body_len,
        source=7,
        destination=9,
        correlation=42,
        deadline_ns=123_456_789,
    )
    assert body == REQUEST


def test_frame_starts_with_magic_version_and_kind_little_endian() -> None:
    frame = _frame()
    assert bytes(frame[:4]) == b"MK" + bytes([PROTOCOL_VERSION, Kind.REQUEST])
    assert struct.unpack_from("<H", frame)[0] == MAGIC


def test_frame_is_header_then_subject_then_msgpack_body() -> None:
    frame = _frame()
    subject = b"mk.resource.grant"
    assert bytes(frame[HEADER_SIZE : HEADER_SIZE + len(subject)]) == subject
    assert bytes(frame[HEADER_SIZE + len(subject) :]) == msgspec.msgpack.encode(REQUEST)


def test_header_decodes_from_bytes_bytearray_and_memoryview_alike() -> None:
    frame = _frame()
    assert decode_header(bytes(frame)) == decode_header(frame) == decode_header(memoryview(frame))


def test_header_decode_does_not_look_at_the_body() -> None:
    frame = _frame()
    header = decode_header(frame)
    frame[header.body_offset :] = b"\xc1" * header.body_len  # 0xc1 is never valid msgpack
    assert decode_header(frame) == header


def test_body_view_is_the_exact_body_bytes_without_copying() -> None:
    frame = _frame()
    header = decode_header(frame)
    view = body_view(header, frame)
    assert view.obj is frame
    assert bytes(view) == msgspec.msgpack.encode(REQUEST)


def test_raw_body_is_forwarded_verbatim() -> None:
    original = _frame()
    header = decode_header(original)
    forwarded = encode(
        header.kind,
        msgspec.Raw(body_view(header, original)),
        subject=header.subject,
        source=header.source,
        destination=header.destination,
        correlation=header.correlation,
        deadline_ns=header.deadline_ns,
        flags=header.flags,
    )
    assert forwarded == original


def test_frame_without_subject_routes_by_destination() -> None:
    frame = encode(Kind.REPLY, REQUEST, destination=5, correlation=1)
    header = decode_header(frame)
    assert (header.subject, header.destination, header.body_offset) == ("", 5, HEADER_SIZE)


def test_frame_len_matches_the_buffer() -> None:
    frame = _frame()
    assert decode_header(frame).frame_len == len(frame)


def test_stamp_source_overwrites_only_the_source() -> None:
    frame = _frame(source=7)
    before = decode_header(frame)
    stamp_source(frame, 1234)
    assert decode_header(frame) == msgspec.structs.replace(before, source=1234)


def test_wrong_magic_is_refused_as_malformed() -> None:
    frame = _frame()
    frame[0:2] = b"XX"
    with pytest.raises(MalformedFrameError, match="magic"):
        decode_header(frame)


def test_unknown_version_is_refused_with_the_supported_versions() -> None:
    frame = _frame()
    frame[2] = 99
    with pytest.raises(UnsupportedVersionError, match=r"version 99.*\[1\]"):
        decode_header(frame)


@pytest.mark.parametrize("kind", [0, 6, 255])
def test_unknown_kind_is_refused_as_unsupported(kind: int) -> None:
    frame = _frame()
    frame[3] = kind
    with pytest.raises(UnsupportedVersionError, match=f"kind {kind}"):
        decode_header(frame)


def test_frame_shorter_than_header_is_malformed() -> None:
    with pytest.raises(MalformedFrameError, match="shorter than the 48-byte header"):
        decode_header(_frame()[:47])


def test_truncated_body_is_malformed() -> None:
    with pytest.raises(MalformedFrameError, match="header says"):
        decode_header(_frame()[:-1])


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(MalformedFrameError, match="header says"):
        decode_header(_frame() + b"\x00")


def test_body_length_over_the_limit_is_too_large_before_reading_it() -> None:
    frame = _frame()
    struct.pack_into("<I", frame, 8, DEFAULT_MAX_BODY + 1)
    with pytest.raises(TooLargeError) as caught:
        decode_header(frame)
    assert caught.value.details == {"size": DEFAULT_MAX_BODY + 1, "limit": DEFAULT_MAX_BODY}


def test_receiver_chooses_its_body_limit() -> None:
    frame = _frame()
    with pytest.raises(TooLargeError):
        decode_header(frame, max_body=decode_header(frame).body_len - 1)


def test_encoding_a_body_over_the_limit_is_too_large() -> None:
    with pytest.raises(TooLargeError, match="over the limit of 100"):
        encode(Kind.PUBLISH, b"x" * 200, subject="a", max_body=100)


def test_subject_length_over_255_in_a_header_is_malformed() -> None:
    frame = _frame()
    struct.pack_into("<H", frame, 6, 256)
    with pytest.raises(MalformedFrameError, match="256-byte subject"):
        decode_header(frame)


def test_non_ascii_subject_in_a_frame_is_malformed() -> None:
    frame = _frame(subject="abc")
    frame[HEADER_SIZE] = 0xFF
    with pytest.raises(MalformedFrameError, match="ASCII"):
        decode_header(frame)


def test_encoding_a_non_ascii_subject_is_refused() -> None:
    with pytest.raises(InvalidSubjectError, match="not ASCII"):
        encode(Kind.PUBLISH, 1, subject="mk.état")


def test_encoding_a_subject_over_255_bytes_is_refused() -> None:
    with pytest.raises(InvalidSubjectError, match="256 bytes"):
        encode(Kind.PUBLISH, 1, subject="a" * 256)


def test_encoding_an_out_of_range_header_field_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        encode(Kind.PUBLISH, 1, subject="a", source=-1)


def test_encoding_an_unencodable_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot encode a object body"):
        encode(Kind.PUBLISH, object(), subject="a")


def test_body_of_the_wrong_union_is_malformed() -> None:
    frame = encode(Kind.CONTROL, Subscribe("a.>"))
    with pytest.raises(MalformedFrameError, match="control body"):
        decode(frame, KERNEL_DECODER)


def test_body_of_the_right_union_decodes() -> None:
    assert decode(encode(Kind.CONTROL, Subscribe("a.>")), CONTROL_DECODER)[1] == Subscribe("a.>")


def test_deadline_is_absolute_monotonic_nanoseconds() -> None:
    before = time.monotonic_ns()
    deadline = deadline_after(2.0)
    assert before + 2_000_000_000 <= deadline <= time.monotonic_ns() + 2_000_000_000


def test_seconds_left_counts_down_to_the_deadline() -> None:
    left = seconds_left(deadline_after(5.0))
    assert left is not None
    assert 4.0 < left <= 5.0


def test_passed_deadline_has_negative_seconds_left() -> None:
    left = seconds_left(time.monotonic_ns() - 1_000_000_000)
    assert left is not None
    assert left < 0


def test_zero_deadline_means_none() -> None:
    assert seconds_left(0) is None


def test_header_format_is_little_endian_and_packed() -> None:
    assert HEADER_FORMAT.startswith("<")
    assert struct.calcsize(HEADER_FORMAT) == HEADER_SIZE
