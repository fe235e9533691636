"""A session over a region: an endpoint with no socket attaches through a channel in memory it
shares with the hub (a memfd standing in for a guest's ivshmem memory; tests/qemu boots a real
guest), and the hub binds who it is from the region it handed over, not from what it says."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Policy
from multikernel.endpoints import connect
from multikernel.protocol import RefusedError
from multikernel.shm import Channel, Region, channel_size, format_channel
from tests.bus.conftest import hub_serving, region_peer, tell

pytestmark = pytest.mark.anyio

ANYONE_MAY_SERVE = """
[[rule]]
who = "*"
own = ["on.host", "in.guest"]
call = ["on.host", "in.guest"]
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_endpoint_attaches_over_a_region_bound_to_the_instance_the_host_says(
    tmp_path: Path,
) -> None:
    async with hub_serving(tmp_path) as (hub, tg):
        with region_peer("honest") as (channel, peer):
            tg.start_soon(hub.serve_region, 7, channel)
            endpoint = (await peer.expect("ready"))["endpoint"]
            (info,) = [e for e in hub.snapshot().endpoints if e.endpoint_id == endpoint]
            assert (info.name, info.instance, info.uid, info.pid) == ("liar", 7, os.getuid(), 0)
            same = hub.open_instance_socket(7)
            async with (
                connect(fd=same.detach(), name="in-7") as inside,
                connect(hub.path, name="host") as host,
                await inside.subscribe("from.guest") as sub,
                await host.subscribe("from.guest"),
            ):
                tell(peer, "publish from.guest")
                await peer.expect("published")
                with anyio.fail_after(10):
                    message = await sub.__anext__()
                assert (message.decode(bytes), message.source) == (b"from the region", endpoint)
                # The host's subscriber is in instance 0: the default policy keeps instance 7's
                # publication from it, as it would any local instance's.
                assert hub._sessions[endpoint].denied == 1
            await peer.stop()
            with anyio.fail_after(10):
                while endpoint in hub._sessions:  # noqa: ASYNC110 - the hub has no event for it
                    await anyio.sleep(0.01)


async def test_a_region_endpoint_calls_a_service_through_a_channel_the_hub_relays(
    tmp_path: Path,
) -> None:
    """No fd reaches it, so the hub holds its side of the direct channel and relays; when the
    service goes, the caller is told and its next call finds nobody."""
    async with hub_serving(tmp_path, Policy.from_toml(ANYONE_MAY_SERVE)) as (hub, tg):
        with region_peer("honest") as (channel, peer):
            tg.start_soon(hub.serve_region, 7, channel)
            await peer.expect("ready")
            async with connect(hub.path, name="host") as host:
                svc = host.service("on.host")

                @svc.method
                async def echo(data: bytes) -> bytes:
                    return data * 2

                await svc.start()
                for _ in range(3):  # the first opens the channel, the others reuse it
                    tell(peer, "call on.host")
                    assert (await peer.expect("answer"))["value"] == "hihi"
                (record,) = hub.snapshot().channels
                assert record.target == "on.host"
            tell(peer, "call on.host")
            assert (await peer.expect("error"))["type"] == "NoRespondersError"
            await peer.stop()


async def test_serving_from_a_region_is_refused_saying_why(tmp_path: Path) -> None:
    async with hub_serving(tmp_path, Policy.from_toml(ANYONE_MAY_SERVE)) as (hub, tg):
        with region_peer("honest") as (channel, peer):
            tg.start_soon(hub.serve_region, 7, channel)
            await peer.expect("ready")
            tell(peer, "own in.guest")
            await peer.expect("owned")
            async with connect(hub.path, name="host") as host:
                with pytest.raises(RefusedError) as refused:
                    await host.request("in.guest", "echo", b"hi")
                assert str(refused.value).startswith(
                    "calling 'in.guest' needs a direct channel to its owner, which is attached "
                    "over a region shared with another kernel"
                )
            await peer.stop()


async def test_a_region_channel_too_small_for_the_hubs_frames_is_refused(tmp_path: Path) -> None:
    """Refused before any session, and closed (the hub took it: the suite checks for leaks)."""
    with Region.create(channel_size(1 << 16)) as region:
        format_channel(region, 1 << 16)
        channel = Channel.open_region(region, 0)
        async with hub_serving(tmp_path) as (hub, _):
            with pytest.raises(ValueError, match=r"capacity of at least Limits\.session_capacity"):
                await hub.serve_region(7, channel)
