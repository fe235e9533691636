"""How our entry points run: asyncio, on uvloop's event loop when uvloop is installed.

Every entry point (`python -m multikernel.bus`, the host, the instance agent, the demo, mkctl)
calls `run(main, *args)`, so the choice of event loop is made in one place: uvloop when it imports
(a dependency on Linux; its loop wakes on a doorbell fd with less overhead), the standard asyncio
loop otherwise, never an error. Library code never chooses a loop: an application that uses our
endpoints keeps its own event loop, asyncio, uvloop or trio (all go through anyio).
"""

from __future__ import annotations

import importlib.util
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
