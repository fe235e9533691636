"""What mkctl does with an error: one line that says what to do next, and an exit status by kind.

The kinds come from the protocol's typed errors, so a script can tell them apart without reading
the message: 0 ok, 1 failed, 2 usage (a bad command line, a body that is not JSON, a bad subject),
3 not found (no such instance, image, service or method), 4 refused or not permitted (wrong state,
resources or an image the host will not take, the access policy, a socket this user may not
open), 5 timed out. Anything else is a bug in mkctl: it says so and asks for `--debug`.
"""

from __future__ import annotations

import builtins
import json
from typing import Any, Final

from multikernel.endpoints._hublink import HubUnavailableError
from multikernel.protocol import (
    AccessDeniedError,
    DeadlineExceededError,
    InvalidSubjectError,
    MultikernelError,
    NoRespondersError,
    NotFoundError,
    RefusedError,
    RemoteError,
)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_REFUSED: Final = 4
EXIT_TIMEOUT: Final = 5

#: The exit statuses, as docs/cli.md and `mkctl --help` state them.
EXIT_CODES: Final = {
    EXIT_OK: "ok",
    EXIT_FAILED: "failed",
    EXIT_USAGE: "usage: a bad command line, a body that is not JSON, a bad subject",
    EXIT_NOT_FOUND: "not found: no such instance, image, service or method",
    EXIT_REFUSED: "refused or not permitted: wrong state, resources, an untrusted image, access",
    EXIT_TIMEOUT: "timed out",
}


class CommandError(Exception):
    """An error of mkctl's own (not the bus's), with the exit status it stands for."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class UsageError(CommandError):
    """A bad command line found after parsing (a body that is not JSON): exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def exit_code(exc: BaseException) -> int:
    """The exit status for an error, by its kind."""
    match exc:
        case CommandError(status=status):
            return status
        case InvalidSubjectError():
            return EXIT_USAGE
        case NoRespondersError() | NotFoundError() | FileNotFoundError():
            return EXIT_NOT_FOUND
        case AccessDeniedError() | RefusedError() | PermissionError():
            return EXIT_REFUSED
        case DeadlineExceededError() | TimeoutError():
            return EXIT_TIMEOUT
        case _:
            return EXIT_FAILED


def error_line(exc: BaseException) -> str:
    """The one line that describes an error to a person (never a traceback)."""
    match exc:
        case RemoteError(remote_type=str(kind)) if isinstance(getattr(builtins, kind, None), type):
            # a service's bug (KeyError, ...), not one of the errors services raise on purpose
            return f"error: the service failed with {kind}: {exc.message}"
        case MultikernelError():
            return f"error: {exc.message}"
        case CommandError() | HubUnavailableError() | OSError() | TimeoutError():
            return f"error: {exc}" if str(exc) else f"error: {type(exc).__name__}"
        case _:
            return (
                f"error: mkctl failed unexpectedly ({type(exc).__name__}: {exc}); run it again "
                "with --debug and report the traceback"
            )


def parse_json(text: str, what: str) -> Any:
    """`text` as JSON, or a UsageError saying what was wrong and what JSON looks like."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; "
            """write e.g. '{"key": 1}', '"text"' or 42"""
        ) from None
