"""A peer on a region (a guest, standing in: another process on a memfd) cannot take the hub
down with what it writes there: garbage frames, before or after Hello, and ring counters it
forges cut off that session alone, with one logged event naming the instance the host bound it
to; the hub goes on serving another region's session and socket endpoints."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.bus.conftest import Peer, hub_serving, region_peer, tell
from tests.security.test_security_hub import (
    cut_offs,
    honest_pair,
    still_served,
    wait_until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every attack is handled where it happens, never by the hub's last line of defence."""
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def still_publishes(peer: Peer) -> None:
    tell(peer, "publish still.here")
    await peer.expect("published")


@pytest.mark.parametrize("role", ["garbage", "counters"])
async def test_garbage_from_a_region_cuts_off_that_session_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, role: str
) -> None:
    caplog.set_level(logging.INFO, logger="multikernel.bus")
    async with hub_serving(tmp_path) as (hub, tg), honest_pair(hub) as client:
        with region_peer("honest") as (good, honest), region_peer(role) as (bad, attacker):
            tg.start_soon(hub.serve_region, 8, good)
            tg.start_soon(hub.serve_region, 7, bad)
            await honest.expect("ready")
            victim = (await attacker.expect("ready"))["endpoint"]
            await wait_until(lambda: victim not in hub._sessions)
            (event,) = cut_offs(caplog)
            assert (event["endpoint"], event["instance"]) == (victim, 7)
            assert event["reason"].startswith(
                "MalformedFrameError" if role == "garbage" else "RingCorruptedError"
            ), event["reason"]
            await still_publishes(honest)
            await still_served(client)
            await honest.stop()


async def test_garbage_instead_of_hello_on_a_region_is_refused_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="multikernel.bus")
    async with hub_serving(tmp_path) as (hub, tg), honest_pair(hub) as client:
        with region_peer("early") as (bad, attacker):
            done = anyio.Event()

            async def serve_it() -> None:
                await hub.serve_region(7, bad)
                done.set()

            tg.start_soon(serve_it)
            await attacker.expect("ready")
            with anyio.fail_after(10):
                await done.wait()
            (refused,) = [
                r.getMessage() for r in caplog.records if "refused at attach" in r.getMessage()
            ]
            assert '"instance": 7' in refused
            assert '"region": true' in refused
            await still_served(client)
