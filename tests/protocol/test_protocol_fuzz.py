"""Bad input raises only ProtocolError subclasses, never anything else.

The number of examples is bounded for the normal suite; set MK_FUZZ_EXAMPLES (e.g. 50000) for
a long fuzz run.
"""

import contextlib
import os

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multikernel.protocol import (
    CONTROL_DECODER,
    ERROR_DECODER,
    HEADER_SIZE,
    KERNEL_DECODER,
    CpuAdd,
    Flag,
    Hello,
    Kind,
    ProtocolError,
    decode,
    decode_header,
    encode,
    error_to_body,
)

EXAMPLES = int(os.environ.get("MK_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODERS: list[msgspec.msgpack.Decoder[object]] = [CONTROL_DECODER, KERNEL_DECODER, ERROR_DECODER]  # type: ignore[list-item]

VALID_FRAMES = [
    encode(Kind.CONTROL, Hello(1, 1, name="x"), source=1),
    encode(Kind.REQUEST, CpuAdd(instance=1, cpu_id=2), subject="mk.res", correlation=5),
    encode(Kind.ERROR, error_to_body(ValueError("no")), flags=Flag.MORE),
    encode(Kind.PUBLISH, msgspec.Raw(b""), subject="a.b"),
]


def _decode_fully(frame: bytes) -> None:
    """Decode ``frame`` with every decoder; only ProtocolError may escape."""
    for decoder in DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(frame, decoder)


@fuzz
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _decode_fully(data)


@fuzz
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 64))
def test_random_bytes_behind_a_valid_magic_and_version_raise_only_protocol_errors(
    data: bytes,
) -> None:
    _decode_fully(b"MK\x01" + data[3:])


@fuzz
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_mutated_valid_frames_raise_only_protocol_errors(frame: bytes, data: st.DataObject) -> None:
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    _decode_fully(bytes(mutated))


@fuzz
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_truncated_or_extended_frames_raise_only_protocol_errors(
    frame: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(frame)))
    tail = data.draw(st.binary(max_size=16))
    _decode_fully(frame[:cut] + tail)


@fuzz
@given(
    st.sampled_from(VALID_FRAMES),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF_FFFF),
)
def test_lying_lengths_raise_only_protocol_errors(
    frame: bytes, subject_len: int, body_len: int
) -> None:
    mutated = bytearray(frame)
    mutated[6:8] = subject_len.to_bytes(2, "little")
    mutated[8:12] = body_len.to_bytes(4, "little")
    _decode_fully(bytes(mutated))


@fuzz
@given(st.sampled_from(VALID_FRAMES), st.binary(max_size=64))
def test_random_bodies_behind_a_valid_header_raise_only_protocol_errors(
    frame: bytes, body: bytes
) -> None:
    header = decode_header(frame)
    _decode_fully(encode(header.kind, msgspec.Raw(body), subject=header.subject))


@fuzz
@given(st.sampled_from(VALID_FRAMES))
def test_valid_frames_still_decode(frame: bytes) -> None:
    assert decode_header(frame).frame_len == len(frame)
