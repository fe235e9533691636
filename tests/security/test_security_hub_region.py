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

from multikernel.bus import Policy
from multikernel.endpoints import connect
from multikernel.protocol import ChannelReady
from multikernel.shm import Channel
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


ANYONE_MAY_SERVE = """
[[rule]]
who = "*"
own = ["on.host"]
call = ["on.host"]
"""


@pytest.mark.parametrize("garbage", [b"abc", b"\x00" * 64], ids=["short", "not-an-envelope"])
async def test_garbage_from_a_server_ends_the_relay_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    """A server that writes garbage on a channel the hub relays for a region caller ends that
    relay (the caller is told and opens another on its next call), never the caller's session
    or the hub."""
    policy = Policy.from_toml(ANYONE_MAY_SERVE)
    async with hub_serving(tmp_path, policy) as (hub, tg), connect(hub.path) as server:
        svc = server.service("on.host")

        @svc.method
        async def echo(data: bytes) -> bytes:
            return data

        await svc.start()
        served: list[Channel] = []
        on_server_channel = server._on_server_channel

        def keep(ready: ChannelReady, channel: Channel) -> None:
            served.append(channel)
            on_server_channel(ready, channel)

        server._on_server_channel = keep  # type: ignore[method-assign]
        with region_peer("honest") as (channel, caller):
            tg.start_soon(hub.serve_region, 7, channel)
            endpoint = (await caller.expect("ready"))["endpoint"]
            tell(caller, "call on.host")
            assert (await caller.expect("answer"))["value"] == "hi"
            (first,) = hub.snapshot().channels
            served[0].try_send(garbage)
            await wait_until(lambda: not hub.snapshot().channels)  # the relay ended
            tell(caller, "call on.host")
            assert (await caller.expect("answer"))["value"] == "hi"  # on a new channel
            (second,) = hub.snapshot().channels
            assert second.token != first.token
            assert endpoint in hub._sessions
            assert cut_offs(caplog) == []
            await caller.stop()


async def test_a_request_for_a_relay_it_was_never_given_is_refused_not_forwarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A region endpoint can name any token in a frame; the hub looks it up among that
    session's own relays only, so another caller's channel is out of reach: the frame is
    answered with a protocol error and the session goes on."""
    policy = Policy.from_toml(ANYONE_MAY_SERVE)
    async with hub_serving(tmp_path, policy) as (hub, tg), connect(hub.path) as server:
        svc = server.service("on.host")

        @svc.method
        async def echo(data: bytes) -> bytes:
            return data

        await svc.start()
        with region_peer("honest") as (good, honest), region_peer("honest") as (bad, forger):
            tg.start_soon(hub.serve_region, 7, good)
            tg.start_soon(hub.serve_region, 8, bad)
            await honest.expect("ready")
            forger_id = (await forger.expect("ready"))["endpoint"]
            tell(honest, "call on.host")
            assert (await honest.expect("answer"))["value"] == "hi"
            (relayed,) = hub.snapshot().channels
            calls_served = hub._sessions[forger_id].frames_in
            errors = hub.counters["errors"]
            tell(forger, f"forge {relayed.token}")
            await forger.expect("forged")
            await wait_until(lambda: hub.counters["errors"] == errors + 1)
            assert hub._sessions[forger_id].frames_in == calls_served + 1
            tell(forger, "publish still.here")
            await forger.expect("published")
            tell(honest, "call on.host")
            assert (await honest.expect("answer"))["value"] == "hi"
            assert cut_offs(caplog) == []
            await honest.stop()
            await forger.stop()
