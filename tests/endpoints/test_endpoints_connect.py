"""`connect()` hands the caller's own exceptions back as themselves (DESIGN §9), every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.protocol import NoRespondersError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def socket_path(tmp_path: Path) -> AsyncIterator[Path]:
    """A hub serving on a temporary socket, in this test's event loop (whichever backend)."""
    hub = Hub(tmp_path / "bus.sock", policy=Policy.default())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub.path
        tg.cancel_scope.cancel()


async def test_except_no_responders_around_the_block_matches(socket_path: Path) -> None:
    """The lesson of STYLE.md, written as users write it: `except NoRespondersError` matches."""
    caught: NoRespondersError | None = None
    try:
        async with connect(socket_path, reconnect=False) as ep:
            await ep.request("absent", "anything", None)
    except NoRespondersError as exc:
        caught = exc
    assert caught is not None
    assert "nobody owns" in str(caught)


async def test_any_exception_raised_in_the_block_is_itself(socket_path: Path) -> None:
    class Mine(Exception):
        pass

    mine = Mine("from the caller's block")
    with pytest.raises(Mine) as info:
        async with connect(socket_path, reconnect=False):
            raise mine
    assert info.value is mine


async def test_cancellation_in_the_block_is_not_swallowed(socket_path: Path) -> None:
    reached_after = False
    with anyio.CancelScope() as scope:
        async with connect(socket_path, reconnect=False):
            scope.cancel()
            await anyio.sleep_forever()
        reached_after = True  # the cancellation must not stop at the `async with`
    assert scope.cancelled_caught
    assert not reached_after


async def test_a_timeout_around_the_block_still_fires(socket_path: Path) -> None:
    async def block_forever() -> None:
        with anyio.fail_after(0.05):
            async with connect(socket_path, reconnect=False):
                await anyio.sleep_forever()

    with pytest.raises(TimeoutError):
        await block_forever()


async def test_the_endpoint_still_works_after_a_caught_error(socket_path: Path) -> None:
    async with connect(socket_path, reconnect=False) as ep:
        with pytest.raises(NoRespondersError):
            await ep.request("absent", "anything", None)
        snapshot = await ep.introspect()
    assert any(e.endpoint_id == ep.id for e in snapshot.endpoints)
