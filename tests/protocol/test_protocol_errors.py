"""Errors cross the bus as ErrorBody and come back as the same exception class."""

import msgspec
import pytest

from multikernel.protocol import (
    ERROR_DECODER,
    AccessDeniedError,
    BusyError,
    DeadlineExceededError,
    ErrorBody,
    ErrorCode,
    InvalidSubjectError,
    Kind,
    MalformedFrameError,
    MultikernelError,
    NoRespondersError,
    NotFoundError,
    ProtocolError,
    RefusedError,
    RemoteError,
    TooLargeError,
    UnsupportedVersionError,
    decode,
    encode,
    error_from_body,
    error_to_body,
    raise_for_error,
)

CODED = [
    RemoteError,
    ProtocolError,
    MalformedFrameError,
    UnsupportedVersionError,
    TooLargeError,
    InvalidSubjectError,
    NoRespondersError,
    DeadlineExceededError,
    AccessDeniedError,
    BusyError,
    NotFoundError,
    RefusedError,
]


def _over_the_wire(exc: BaseException) -> MultikernelError:
    _, body = decode(encode(Kind.ERROR, error_to_body(exc), correlation=1), ERROR_DECODER)
    return error_from_body(body)


@pytest.mark.parametrize("cls", CODED)
def test_each_error_class_comes_back_as_itself(cls: type[MultikernelError]) -> None:
    received = _over_the_wire(cls("it went wrong", details={"n": 3}))
    assert type(received) is cls
    assert (received.message, received.details, received.code) == (
        "it went wrong",
        {"n": 3},
        cls.code,
    )


@pytest.mark.parametrize("cls", CODED)
def test_each_error_class_has_its_own_code(cls: type[MultikernelError]) -> None:
    assert [c.code for c in CODED].count(cls.code) == 1


def test_every_error_code_maps_to_a_class() -> None:
    assert {c.code for c in CODED} == set(ErrorCode)


def test_all_errors_share_one_root() -> None:
    assert all(issubclass(cls, MultikernelError) for cls in CODED)
    assert issubclass(MultikernelError, Exception)


def test_malformed_input_errors_are_protocol_errors() -> None:
    for cls in (MalformedFrameError, UnsupportedVersionError, TooLargeError, InvalidSubjectError):
        assert issubclass(cls, ProtocolError)


def test_deadline_exceeded_is_also_a_timeout_error() -> None:
    assert isinstance(_over_the_wire(DeadlineExceededError("late")), TimeoutError)


def test_access_denied_is_also_a_permission_error() -> None:
    assert isinstance(_over_the_wire(AccessDeniedError("no")), PermissionError)


def test_received_error_is_marked_remote_and_local_error_is_not() -> None:
    local = BusyError("full")
    assert not local.is_remote
    assert _over_the_wire(local).is_remote


def test_foreign_exception_arrives_as_remote_error_keeping_type_and_message() -> None:
    received = _over_the_wire(KeyError("cpu 3"))
    assert type(received) is RemoteError
    assert received.remote_type == "KeyError"
    assert received.message == "'cpu 3'"
    assert str(received) == "'cpu 3' (remote KeyError)"


def test_exception_without_message_travels_with_its_type_name() -> None:
    assert _over_the_wire(RuntimeError()).message == "RuntimeError"


def test_subclass_from_another_layer_keeps_its_type_name_and_parent_code() -> None:
    class LeaseLostError(BusyError):
        pass

    received = _over_the_wire(LeaseLostError("lease lost"))
    assert type(received) is BusyError
    assert received.remote_type == "LeaseLostError"


def test_relayed_error_keeps_the_original_remote_type() -> None:
    once = _over_the_wire(ValueError("bad"))
    twice = _over_the_wire(once)
    assert twice.remote_type == "ValueError"


def test_unknown_code_arrives_as_remote_error_keeping_the_code() -> None:
    received = error_from_body(ErrorBody(code=999, message="new thing", type="QuotaError"))
    assert type(received) is RemoteError
    assert (received.code, received.remote_type) == (999, "QuotaError")


def test_raise_for_error_raises_the_mapped_class() -> None:
    with pytest.raises(NoRespondersError, match="nobody serves"):
        raise_for_error(ErrorBody(code=ErrorCode.NO_RESPONDERS, message="nobody serves resource"))


def test_error_body_with_details_of_non_scalars_is_refused() -> None:
    raw = msgspec.msgpack.encode({"code": 1, "message": "x", "details": {"a": [1]}})
    with pytest.raises(msgspec.ValidationError):
        ERROR_DECODER.decode(raw)


def test_error_code_outside_u16_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        ERROR_DECODER.decode(msgspec.msgpack.encode({"code": 70000, "message": "x"}))
