"""How our entry points run: asyncio, on uvloop's event loop when uvloop is installed.

Every entry point (`python -m multikernel.bus`, the host, the instance agent, the demo, mkctl)
calls `run(main, *args)`, so the choice of event loop is made in one place: uvloop when it imports
(a dependency on Linux; its loop wakes on a doorbell fd with less overhead), the standard asyncio
loop otherwise, never an error. Library code never chooses a loop: an application that uses our
endpoints keeps its own event loop, asyncio, uvloop or trio (all go through anyio).
"""

from __future__ import annotations

import importlib.util
import os
import resource
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def uvloop_available() -> bool:
    """Whether uvloop can be imported here (None in sys.modules blocks it, as Python's own rule)."""
    return importlib.util.find_spec("uvloop") is not None


def run(main: Callable[[Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T:
    """Run `main(*args)` to completion on a new event loop, as our entry points do."""
    return anyio.run(
        main, *args, backend="asyncio", backend_options={"use_uvloop": uvloop_available()}
    )


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the limit.

    For processes that hold file descriptors for others (the hub holds several per attached
    endpoint, as systemd raises it for its services): the default soft limit of 1,024 would cap a
    hub at ~100 endpoints. Entry points call it; libraries never change process limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def until_eof(fd: int, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the pipe `fd` reaches EOF: an actor's lifeline, whose only writer is
    its host, ends when the host does, however it went."""
    os.set_blocking(fd, False)
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                if not os.read(fd, 64):
                    break
            except BlockingIOError:
                continue
    finally:
        os.close(fd)
    scope.cancel()
