"""mkctl on the bus: run one verb's work with a connected endpoint, under uvloop when present."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from multikernel.endpoints import runtime
from multikernel.endpoints._connect import connect
from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._output import settings

T = TypeVar("T")


def with_bus(work: Callable[[Endpoint], Awaitable[T]]) -> T:
    """Attach to the host's hub (no re-attach: a CLI reports a lost hub), run `work`, detach."""
    path = settings().socket_path()

    async def attached() -> T:
        async with connect(path, name="mkctl", reconnect=False) as ep:
            return await work(ep)

    return runtime.run(attached)
