"""Which implementation of the ring's hot path a ring side uses: native (C) or pure Python.

The native core (`_native.c`, built by `pip install` where a C compiler and Python's headers
exist) and the Python one (`_pycore.py`, the reference) implement one interface, rule for rule,
over one binary layout: a ring may have a writer of one kind and a reader of the other, in any
two processes. A side uses the native core when it was built, unless the environment variable
`MULTIKERNEL_SHM_RING` says `python`; `native` makes a missing native core an error instead
of a fallback. When the native core is wanted but cannot be imported, the first ring says so on
stderr in one line and the Python core is used.
"""

from __future__ import annotations

import builtins
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import anyio

from multikernel.shm import _pycore
from multikernel.shm._errors import FrameTooLargeError, RingCorruptedError

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Sequence
    from types import ModuleType

Buffer = bytes | bytearray | memoryview
Implementation = Literal["native", "python"]
ENV = "MULTIKERNEL_SHM_RING"


@dataclass(frozen=True, slots=True)
class Errors:
    """The exception types a core raises (the C core is handed them once, at import)."""

    corrupted: Callable[[str], BaseException]
    too_large: Callable[[str], BaseException]
    broken: Callable[[str], BaseException]
    closed: Callable[[], BaseException]


ERRORS = Errors(
    RingCorruptedError, FrameTooLargeError, anyio.BrokenResourceError, anyio.ClosedResourceError
)


class Core(Protocol):
    """What `RingWriter` and `RingReader` need from either implementation of either side."""

    implementation: str
    capacity: int
    max_payload: int
    frames: int
    bytes: int
    wakeups: int
    full: int
    broken: BaseException | None
    closed: bool

    def announce(self) -> None: ...
    def unannounce(self) -> None: ...
    def my_flags(self) -> int: ...
    def peer_flags(self) -> int: ...
    def backlog(self) -> int: ...
    def set_closed(self) -> None: ...
    def release(self) -> None: ...
    def spin(self, ns: int, n: int = 0) -> bool: ...
    def woken(self, bell: int) -> None: ...
    def wait(
        self, wait_fd: int, bell: int, timeout_ms: int, n: int, live_fd: int = -1
    ) -> builtins.bytes | int: ...
    def prepare_sleep(self, n: int) -> builtins.bytes | int: ...
    def after_sleep(self, n: int) -> builtins.bytes | int: ...


class WriterCore(Core, Protocol):
    def try_send(self, data: Buffer) -> bool: ...
    def try_send_many(self, frames: Sequence[Buffer], start: int = 0) -> int: ...


class ReaderCore(Core, Protocol):
    def try_receive(self) -> bytes | None: ...
    def try_receive_many(self, max_frames: int = 256) -> list[bytes]: ...


def _load_native() -> tuple[ModuleType | None, str]:
    try:
        from multikernel.shm import _native
    except ImportError as exc:
        return None, str(exc)
    _native.init(ERRORS.corrupted, ERRORS.too_large, ERRORS.broken, ERRORS.closed)
    return _native, ""


_native, _native_error = _load_native()
_noticed = False


def native_available() -> bool:
    """Whether the native core was built and imports."""
    return _native is not None


def chosen(wanted: Implementation | None = None) -> Implementation:
    """The implementation a new ring side gets: `wanted`, else what the environment says."""
    global _noticed
    setting = wanted or os.environ.get(ENV, "") or "auto"
    if setting == "python":
        return "python"
    if setting not in ("native", "auto"):
        raise ValueError(f"{ENV} must be 'native', 'python' or unset, not {setting!r}")
    if _native is not None:
        return "native"
    if setting == "native":
        raise ImportError(
            f"the native ring core is not available ({_native_error}); reinstall with a C "
            f"compiler and Python's headers, or set {ENV}=python"
        )
    if not _noticed:
        _noticed = True
        print(
            f"multikernel.shm: native ring core unavailable ({_native_error}); "
            "using the pure-Python ring",
            file=sys.stderr,
        )
    return "python"


def native_stream_frames() -> Callable[..., tuple[int, int, list[bytes], int, str, bool]] | None:
    """A stream reader's copy loop in C (`_native.stream_frames`) when a new side gets the
    native core (`chosen`), else None: the reader then runs the Python one."""
    if chosen() == "native" and _native is not None:
        frames: Callable[..., tuple[int, int, list[bytes], int, str, bool]] = _native.stream_frames
        return frames
    return None


def writer_core(
    mm: mmap.mmap, offset: int, capacity: int, peer_bell: int, impl: Implementation | None
) -> WriterCore:
    if chosen(impl) == "native" and _native is not None:
        core: WriterCore = _native.Writer(mm, offset, capacity, peer_bell)
        return core
    return _pycore.WriterCore(mm, offset, capacity, peer_bell, ERRORS)


def reader_core(
    mm: mmap.mmap, offset: int, capacity: int, peer_bell: int, impl: Implementation | None
) -> ReaderCore:
    if chosen(impl) == "native" and _native is not None:
        core: ReaderCore = _native.Reader(mm, offset, capacity, peer_bell)
        return core
    return _pycore.ReaderCore(mm, offset, capacity, peer_bell, ERRORS)
