"""asyncio-specific behaviour, tested with pytest-asyncio (the design card's choice).

The rest of the suite uses anyio's plugin so trio is covered too; these tests are about asyncio
itself: which loop our entry points choose, and an endpoint driven by plain asyncio code (asyncio's
own timeouts, task cancellation and TaskGroup, on the standard loop and on uvloop), which is how
most applications will call us.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import uvloop

from multikernel.bus import Hub
from multikernel.endpoints import Endpoint, connect, runtime


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_entry_points_run_on_uvloop_when_it_is_installed() -> None:
    assert runtime.uvloop_available()
    assert runtime.run(_loop_type) is uvloop.Loop


def test_entry_points_fall_back_to_the_standard_loop_without_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert not runtime.uvloop_available()
    loop = runtime.run(_loop_type)
    assert issubclass(loop, asyncio.BaseEventLoop)
    assert loop is not uvloop.Loop


@dataclass
class Sleeps:
    """Set when a `sleep` handler starts, and when one is cancelled."""

    started: asyncio.Event
    cancelled: asyncio.Event


@asynccontextmanager
async def bus_with_sleeper(tmp_path: Path) -> AsyncIterator[tuple[Endpoint, Sleeps]]:
    """A hub, a service `svc` (methods `double`, `sleep`) and a client, all on this loop."""
    hub = Hub(tmp_path / "bus.sock")
    sleeps = Sleeps(asyncio.Event(), asyncio.Event())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with connect(hub.path, name="server") as server:
            svc = server.service("svc")

            @svc.method
            async def double(x: int) -> int:
                return 2 * x

            @svc.method
            async def sleep(seconds: float) -> None:
                sleeps.started.set()
                try:
                    await asyncio.sleep(seconds)
                except asyncio.CancelledError:
                    sleeps.cancelled.set()
                    raise

            await svc.start()
            async with connect(hub.path, name="client") as client:
                yield client, sleeps
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_an_endpoint_serves_and_calls_on_the_loop_pytest_asyncio_gives(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    expected = uvloop.Loop if "uvloop" in request.node.callspec.id else asyncio.BaseEventLoop
    assert isinstance(asyncio.get_running_loop(), expected)
    async with bus_with_sleeper(tmp_path) as (client, _):
        assert await client.request("svc", "double", 21) == 42


@pytest.mark.asyncio
async def test_asyncio_timeout_ends_a_call_and_the_server_stops_its_handler(
    tmp_path: Path,
) -> None:
    async with bus_with_sleeper(tmp_path) as (client, sleeps):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.request("svc", "sleep", 60.0)
        async with asyncio.timeout(10):  # the abandon notice reaches the server
            await sleeps.cancelled.wait()
        assert await client.request("svc", "double", 2) == 4


@pytest.mark.asyncio
async def test_a_task_cancelled_by_asyncio_leaves_the_endpoint_usable(tmp_path: Path) -> None:
    async with bus_with_sleeper(tmp_path) as (client, sleeps):
        call = asyncio.create_task(client.request("svc", "sleep", 60.0))
        async with asyncio.timeout(10):
            await sleeps.started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(10):
            await sleeps.cancelled.wait()
        async with asyncio.TaskGroup() as tg:
            answers = [tg.create_task(client.request("svc", "double", n)) for n in range(8)]
        assert [a.result() for a in answers] == [2 * n for n in range(8)]
