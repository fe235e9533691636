"""Access control across instances, with identity bound by the hub."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.protocol import AccessDeniedError

from .conftest import spawn

pytestmark = pytest.mark.anyio

GUEST_MAY_CALL = """
[[rule]]
who = "guest"
call = ["svc"]
"""


async def test_guest_instance_may_not_call_a_host_service_by_default(
    hub: Hub, socket_path: Path
) -> None:
    with spawn("serve", socket_path, "svc") as server:
        await server.expect("ready")
        guest_socket = hub.open_instance_socket(instance=2)
        with (
            guest_socket,
            spawn("call", "-", "svc", "whoami", "null", fd=guest_socket.fileno()) as guest,
        ):
            await guest.expect("ready")
            error = await guest.expect("error")
            assert error["type"] == "AccessDeniedError"
            assert "cross-instance traffic is denied by default" in error["message"]
    assert hub.counters["denied"] == 1


async def test_a_policy_rule_lets_the_guest_call_and_the_server_sees_its_instance(
    hub: Hub, socket_path: Path
) -> None:
    hub.reload_policy(Policy.from_toml(GUEST_MAY_CALL))
    with spawn("serve", socket_path, "svc") as server:
        await server.expect("ready")
        guest_socket = hub.open_instance_socket(instance=2)
        with (
            guest_socket,
            spawn("call", "-", "svc", "whoami", "null", fd=guest_socket.fileno()) as guest,
        ):
            await guest.expect("ready")
            result = (await guest.expect("result"))["value"]
            assert result["instance"] == 2  # bound by the hub, not claimed by the guest


async def test_policy_reload_revokes_a_channel_it_no_longer_allows(
    hub: Hub, socket_path: Path
) -> None:
    hub.reload_policy(Policy.from_toml(GUEST_MAY_CALL))
    async with connect(socket_path, name="server") as server_ep:
        svc = server_ep.service("svc")

        @svc.method
        async def ping(_: None) -> str:
            return "pong"

        await svc.start()
        guest_socket = hub.open_instance_socket(instance=2)
        with guest_socket, spawn("calls", "-", "svc", fd=guest_socket.fileno()) as guest:
            await guest.expect("ready")
            # the "calls" role calls echo, which this service lacks: the error proves the
            # channel is up and allowed
            assert (await guest.expect("error"))["type"] == "NoRespondersError"
            hub.reload_policy(Policy.default())
            with anyio.fail_after(20):
                while (event := await guest.expect("error"))["type"] != "AccessDeniedError":
                    pass
            assert "denied" in event["message"]
            assert not (await server_ep.introspect()).channels


async def test_cross_instance_publications_reach_only_allowed_subscribers(
    hub: Hub, socket_path: Path
) -> None:
    guest_socket = hub.open_instance_socket(instance=3)
    async with connect(socket_path, name="host") as host:
        async with await host.subscribe("app.>") as host_sub:
            with (
                guest_socket,
                spawn("publish", "-", "app.data", "5", fd=guest_socket.fileno()) as guest,
            ):
                await guest.expect("ready")
                await guest.expect("done")
                await host.publish("app.data", "from the host itself")
                first = await host_sub.receive()
        assert first.value() == "from the host itself"  # the guest's five never arrived
        assert hub.counters["denied"] >= 5


async def test_monitor_is_refused_to_an_unprivileged_instance(hub: Hub) -> None:
    guest_socket = hub.open_instance_socket(instance=4)
    async with connect(fd=guest_socket.detach()) as guest:
        with pytest.raises(AccessDeniedError, match="monitor"):
            async with guest.monitor():
                pass


async def test_an_attachment_for_a_child_is_bound_to_the_parents_instance(
    hub: Hub, socket_path: Path
) -> None:
    hub.reload_policy(Policy.from_toml(GUEST_MAY_CALL))
    with spawn("serve", socket_path, "svc") as server:
        await server.expect("ready")
        async with connect(fd=hub.open_instance_socket(instance=7).detach()) as agent:
            child_socket = await agent.attachment()
            with (
                child_socket,
                spawn("call", "-", "svc", "whoami", "null", fd=child_socket.fileno()) as child,
            ):
                await child.expect("ready")
                assert (await child.expect("result"))["value"]["instance"] == 7


async def test_instance_sockets_carry_the_identity_the_hub_was_given(hub: Hub) -> None:
    async with connect(fd=hub.open_instance_socket(5, uid=1234).detach()) as guest:
        child_socket = await guest.attachment()
        async with connect(fd=child_socket.detach()) as child:
            snapshot = await child.introspect()
    seen = {e.endpoint_id: (e.instance, e.uid) for e in snapshot.endpoints}
    assert seen[guest.id] == (5, 1234)  # not the hub's own uid (SO_PEERCRED names the hub)
    assert seen[child.id] == (5, 1234)  # an attachment never widens who it is


async def test_a_forged_monitor_record_is_not_passed_on(hub: Hub, socket_path: Path) -> None:
    from multikernel.protocol import Kind, MonitorRecord, encode

    async with (
        connect(socket_path, name="watcher") as watcher,
        connect(socket_path, name="forger") as forger,
        watcher.monitor("forged.>") as records,
    ):
        fake = encode(Kind.PUBLISH, "lies", subject="forged.claim")
        record = MonitorRecord(1, "direct", 0, 99, fake, 12345)
        await forger._link.to_hub(encode(Kind.CONTROL, record))
        await forger.publish("forged.real", "truth")  # routed by the hub: monitored
        first = await anext(records)
    from multikernel.protocol import decode_header

    assert decode_header(first.frame).subject == "forged.real"
