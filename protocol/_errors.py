"""One root error for the whole project, the protocol's own errors, and errors on the wire.

``MultikernelError`` is defined here, in the contract layer, so every layer above (shm excepted:
it imports nothing of ours) can root its errors in it and any of them can cross the bus.

An error crosses the bus as an ``ErrorBody`` (``Kind.ERROR``): a numeric code, the remote
exception's type name, a message and a small details map. On receipt ``error_from_body`` maps the
code back to the matching class here; the instance keeps the remote type name and message, so
``except DeadlineExceededError`` works across instances and the log still says what really failed
on the other side. Unknown codes (a newer peer) become a plain ``RemoteError`` that keeps the code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NoReturn, TypeAlias

import msgspec

from multikernel.protocol._codes import ErrorCode
from multikernel.protocol._fields import U16

#: What a details map may hold: scalars only, so any peer in any language can read it.
Detail: TypeAlias = str | int | float | bool | None


class MultikernelError(Exception):
    """Root of every multikernel error.

    ``code`` is what the error travels as; ``remote_type`` is the exception type name reported by
    the peer when the error arrived over the bus, ``None`` when it was raised here.
    """

    code: int = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Detail] | None = None,
        remote_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Detail] = dict(details) if details else {}
        self.remote_type = remote_type

    @property
    def is_remote(self) -> bool:
        """True when this error was reported by a peer rather than raised locally."""
        return self.remote_type is not None

    def __str__(self) -> str:
        if self.remote_type is not None and self.remote_type != type(self).__name__:
            return f"{self.message} (remote {self.remote_type})"
        return self.message


class ProtocolError(MultikernelError):
    """Input that breaks the protocol: malformed, unsupported or out of limits."""

    code = ErrorCode.PROTOCOL


class MalformedFrameError(ProtocolError):
    """A frame or body could not be decoded: truncated, wrong magic, bad lengths, bad schema."""

    code = ErrorCode.MALFORMED_FRAME


class UnsupportedVersionError(ProtocolError):
    """The peer speaks a protocol version (or uses a kind) this side does not understand."""

    code = ErrorCode.UNSUPPORTED_VERSION


class TooLargeError(ProtocolError):
    """A body is larger than the receiver accepts."""

    code = ErrorCode.TOO_LARGE


class InvalidSubjectError(ProtocolError):
    """A subject, subscription pattern or name breaks the subject grammar."""

    code = ErrorCode.INVALID_SUBJECT


class RemoteError(MultikernelError):
    """The remote side failed in a way without a more specific class (or with an unknown code)."""

    code = ErrorCode.INTERNAL


class NoRespondersError(MultikernelError):
    """Nobody serves that subject or name right now: the request was not delivered."""

    code = ErrorCode.NO_RESPONDERS


class DeadlineExceededError(MultikernelError, TimeoutError):
    """The deadline carried in the envelope passed before the work completed."""

    code = ErrorCode.DEADLINE_EXCEEDED


class AccessDeniedError(MultikernelError, PermissionError):
    """The bus's access control forbids this endpoint that subject, name or service."""

    code = ErrorCode.ACCESS_DENIED


class BusyError(MultikernelError):
    """The receiver is saturated (full queue, slow consumer); retry later or shed load."""

    code = ErrorCode.BUSY


class NotFoundError(MultikernelError, LookupError):
    """What the request names does not exist: an instance, an image, a method."""

    code = ErrorCode.NOT_FOUND


class RefusedError(MultikernelError):
    """The receiver understood the request and will not do it as asked: the target is in the
    wrong state, the resources cannot be given, the image is not trusted. Nothing was done; the
    message says what would be accepted."""

    code = ErrorCode.REFUSED


_CLASS_BY_CODE: Final[Mapping[int, type[MultikernelError]]] = {
    ErrorCode.INTERNAL: RemoteError,
    ErrorCode.PROTOCOL: ProtocolError,
    ErrorCode.MALFORMED_FRAME: MalformedFrameError,
    ErrorCode.UNSUPPORTED_VERSION: UnsupportedVersionError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.INVALID_SUBJECT: InvalidSubjectError,
    ErrorCode.NO_RESPONDERS: NoRespondersError,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorCode.ACCESS_DENIED: AccessDeniedError,
    ErrorCode.BUSY: BusyError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.REFUSED: RefusedError,
}


def error_class(code: int) -> type[MultikernelError]:
    """The exception class an error code maps to on receipt (RemoteError when unknown)."""
    return _CLASS_BY_CODE.get(code, RemoteError)


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of a ``Kind.ERROR`` frame.

    ``type`` is the exception type name on the sending side (diagnostic only; the code decides
    the class on receipt). New fields must have defaults (docs/protocol.md, evolution rules).
    """

    code: U16
    message: str
    type: str = ""
    details: dict[str, Detail] = {}


ERROR_DECODER: Final = msgspec.msgpack.Decoder(ErrorBody)


def error_to_body(exc: BaseException) -> ErrorBody:
    """Describe an exception for the wire.

    Our errors keep their code, message and details (and the original remote type when they are
    being relayed); anything else travels as ``ErrorCode.INTERNAL`` with its type name and text.
    """
    match exc:
        case MultikernelError():
            return ErrorBody(
                code=exc.code,
                message=exc.message,
                type=exc.remote_type or type(exc).__name__,
                details=exc.details,
            )
        case _:
            return ErrorBody(
                code=ErrorCode.INTERNAL,
                message=str(exc) or type(exc).__name__,
                type=type(exc).__name__,
            )


def error_from_body(body: ErrorBody) -> MultikernelError:
    """The exception an ErrorBody stands for, marked remote, keeping the remote type name."""
    cls = error_class(body.code)
    exc = cls(body.message, details=body.details, remote_type=body.type or cls.__name__)
    exc.code = body.code
    return exc


def raise_for_error(body: ErrorBody) -> NoReturn:
    """Raise the exception an ErrorBody stands for (see ``error_from_body``)."""
    raise error_from_body(body)
