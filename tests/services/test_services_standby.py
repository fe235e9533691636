"""Warm standbys: a pre-started agent takes a protected instance over, and leaves nothing behind."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from multikernel.endpoints import Endpoint, Subscription
from multikernel.protocol import InstanceInfo, KillInstance, RestartPolicy

from .fault_host import fault_host, next_event, next_state
from .fault_kit import (
    KV,
    alive,
    bring_up,
    cgroups_of,
    exited,
    inject,
    lifecycle,
    make_image,
    owned,
    show,
)
from .fault_kit import unique as unique_name

pytestmark = pytest.mark.anyio

PROTECTED = RestartPolicy("permanent", standby=True)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    from multikernel.services._signature import make_signing_key

    return make_signing_key("standby tests", algorithm="ec-p256")


@pytest.fixture
def cert(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(keys[1])
    return path


async def standby_ready(
    ep: Endpoint, states: Subscription, name: str, old: int = 0
) -> InstanceInfo:
    """Until the instance has a ready standby other than `old` (announced on its state
    subject as it gets ready)."""
    info = await show(ep, name)
    while info.standby in (0, old):
        change = await next_state(states, "active")
        if "standby ready" in change.reason:
            info = await show(ep, name)
    return info


async def test_a_warm_standby_takes_a_killed_instance_over(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    image = make_image(tmp_path, keys, KV)
    name = unique_name("f-warm")
    async with fault_host(tmp_path, cert) as host:
        async with await host.ep.subscribe("mk.instance.*.state") as states:
            first = await bring_up(host.ep, name, image, PROTECTED)
            kv = f"instance.{first.id}.kv"
            await owned(host.ep, kv)
            boot = (await host.ep.request(kv, "ping", None))["boot"]
            ready = await standby_ready(host.ep, states, name)
            assert ready.standby not in (0, first.pid)
            async with await host.ep.subscribe(f"mk.instance.{first.id}.fault") as events:
                inject(first.pid, signal.SIGKILL)
                await next_event(events, "recovered")
            after = await show(host.ep, name)
            # The standby's agent is the instance now: same instance, its next generation.
            assert (after.pid, after.id, after.generation) == (
                ready.standby, first.id, first.generation + 1,
            )  # fmt: skip
            await owned(host.ep, kv)
            assert (await host.ep.request(kv, "ping", None))["boot"] != boot
            again = await standby_ready(host.ep, states, name, old=ready.standby)  # a new one
            assert again.standby not in (0, ready.standby, first.pid)
        await lifecycle(host.ep, "kill", KillInstance(name))
        await exited(again.standby)
    assert not cgroups_of(name)


async def test_a_standby_that_dies_is_replaced_and_killing_the_instance_ends_it(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    image = make_image(tmp_path, keys, KV)
    name = unique_name("f-sbd")
    async with fault_host(tmp_path, cert) as host:
        async with await host.ep.subscribe("mk.instance.*.state") as states:
            info = await bring_up(host.ep, name, image, PROTECTED)
            ready = await standby_ready(host.ep, states, name)
            inject(ready.standby, signal.SIGKILL)  # the standby, not the instance
            await exited(ready.standby)
            replaced = await standby_ready(host.ep, states, name, old=ready.standby)
        assert replaced.standby != ready.standby
        assert (replaced.pid, replaced.generation) == (info.pid, info.generation)  # untouched
        await lifecycle(host.ep, "kill", KillInstance(name))
        assert not alive(replaced.standby)
        assert not alive(info.pid)
    assert not cgroups_of(name)
