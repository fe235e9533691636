"""Fault injection on real processes, with other instances at work all along.

Each scenario runs a `server` instance (the victim), a `caller` instance that calls it in a loop
through the retrying client (RPC load from another instance), and a `bystander` instance that the
test calls all along. In each: the bystander and the hub keep serving (every call answered), the
caller loses no call, what was acknowledged is still there, and nothing is left behind.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from multikernel.endpoints import Endpoint, Subscription, connect, retrying
from multikernel.protocol import (
    FaultEvent,
    FaultHistory,
    HistoryRequest,
    InstanceInfo,
    RestartPolicy,
)
from multikernel.services._signature import make_signing_key

from .fault_host import fault_host, next_event, next_state
from .fault_kit import (
    CALLER,
    KV,
    PATIENCE,
    HostProcess,
    alive,
    bring_up,
    cgroups_of,
    exited,
    inject,
    make_image,
    owned,
    show,
    unique,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return make_signing_key("scenario tests", algorithm="ec-p256")


@pytest.fixture
def cert(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(keys[1])
    return path


@dataclass
class Bystander:
    """Calls an instance that has nothing to do with the fault, all along: it must answer."""

    ep: Endpoint
    target: str
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            try:
                with anyio.fail_after(PATIENCE):
                    await self.ep.request(self.target, "ping", None)
                self.calls += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            await anyio.sleep(0.005)  # paces the load; nothing waits on it


@dataclass
class Scene:
    ep: Endpoint
    server: InstanceInfo
    caller: InstanceInfo
    bystander: InstanceInfo
    progress: Subscription
    pinger: Bystander
    names: list[str]

    @property
    def kv(self) -> str:
        return f"instance.{self.server.id}.kv"

    async def caller_moves_on(self) -> dict[str, Any]:
        """The caller's counts once it made calls after this point (waited on, not polled)."""
        start = (await self.ep.request(f"instance.{self.caller.id}.kv", "stats", None))["ok"]
        with anyio.fail_after(PATIENCE):
            while True:
                counts: dict[str, Any] = (await self.progress.receive()).value()
                if counts["ok"] > start:
                    return counts

    async def check_everyone_else_served(self) -> None:
        counts = await self.caller_moves_on()
        assert counts["failed"] == 0, counts["last_error"]  # the caller lost no call
        assert self.pinger.calls > 0
        assert self.pinger.failures == []  # the bystander answered every call
        snapshot = await self.ep.introspect()  # the hub serves
        assert f"instance.{self.bystander.id}.kv" in snapshot.names


@asynccontextmanager
async def scene(
    ep: Endpoint, root: Path, keys: tuple[bytes, bytes], policy: RestartPolicy
) -> AsyncIterator[Scene]:
    kv_image = make_image(root, keys, KV)
    server = await bring_up(ep, unique("f-srv"), kv_image, policy)
    caller_image = make_image(
        root, keys, CALLER, name="caller", env=f'[env]\nTARGET = "instance.{server.id}.kv"\n'
    )
    bystander = await bring_up(ep, unique("f-by"), kv_image, RestartPolicy("temporary"))
    await owned(ep, f"instance.{bystander.id}.kv")
    await owned(ep, f"instance.{server.id}.kv")
    async with await ep.subscribe("mk.instance.*.progress") as progress:
        caller = await bring_up(ep, unique("f-call"), caller_image, RestartPolicy("temporary"))
        await owned(ep, f"instance.{caller.id}.kv")
        pinger = Bystander(ep, f"instance.{bystander.id}.kv")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pinger.run)
            names = [server.name, caller.name, bystander.name]
            yield Scene(ep, server, caller, bystander, progress, pinger, names)
            tg.cancel_scope.cancel()


def nothing_left(names: list[str], pids: list[int]) -> None:
    for name in names:
        assert not cgroups_of(name), name
    for pid in pids:
        assert not alive(pid), pid


# -- the scenarios ---------------------------------------------------------------------------------


async def test_sigkill_under_rpc_load_from_another_instance(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    async with (
        fault_host(tmp_path, cert) as host,
        scene(host.ep, tmp_path, keys, RestartPolicy("permanent")) as s,
    ):
        await s.caller_moves_on()
        for line in ("a", "b", "c"):
            await host.ep.request(s.kv, "append", line)  # acknowledged
        async with await host.ep.subscribe(f"mk.instance.{s.server.id}.fault") as events:
            inject(s.server.pid, signal.SIGKILL)
            await next_event(events, "recovered")
        await s.check_everyone_else_served()
        assert await retrying(host.ep, within=PATIENCE).request(s.kv, "read", None) == [
            "a", "b", "c",
        ]  # fmt: skip
        pids = [(await show(host.ep, n)).pid for n in s.names] + [s.server.pid]
    nothing_left(s.names, pids)


async def test_sigstop_under_load_is_a_hang_and_the_others_do_not_notice(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    async with (
        fault_host(tmp_path, cert) as host,
        scene(host.ep, tmp_path, keys, RestartPolicy("permanent")) as s,
    ):
        await s.caller_moves_on()
        async with await host.ep.subscribe(f"mk.instance.{s.server.id}.fault") as events:
            inject(s.server.pid, signal.SIGSTOP)
            failed = await next_event(events, "failed")
            await next_event(events, "recovered")
        assert failed.cause == "hang"
        assert "phi" in failed.detail
        await exited(s.server.pid)  # killed, not left stopped
        await s.check_everyone_else_served()
        pids = [(await show(host.ep, n)).pid for n in s.names] + [s.server.pid]
    nothing_left(s.names, pids)


async def test_garbage_on_its_ring_under_load(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    async with (
        fault_host(tmp_path, cert) as host,
        scene(host.ep, tmp_path, keys, RestartPolicy("permanent")) as s,
    ):
        await s.caller_moves_on()
        async with await host.ep.subscribe(f"mk.instance.{s.server.id}.fault") as events:
            await host.ep.request(s.kv, "garble", None)
            failed = await next_event(events, "failed")
            await next_event(events, "recovered")
        assert failed.cause == "garbage"
        assert "kv" in failed.detail  # names the endpoint that wrote it
        await s.check_everyone_else_served()
        pids = [(await show(host.ep, n)).pid for n in s.names] + [s.server.pid]
    nothing_left(s.names, pids)


async def test_killing_the_fault_actor_mid_restart_loses_nothing_and_restarts_once(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    # The second restart of a period waits 1 to 2 s: time to kill the fault actor meanwhile.
    policy = RestartPolicy("permanent", backoff=2.0, backoff_max=4.0)
    async with fault_host(tmp_path, cert) as host, scene(host.ep, tmp_path, keys, policy) as s:
        first = await host.status()
        seen: list[FaultEvent] = []
        async with (
            await host.ep.subscribe(f"mk.instance.{s.server.id}.fault") as events,
            await host.ep.subscribe(f"mk.instance.{s.server.id}.state") as states,
        ):
            inject(s.server.pid, signal.SIGKILL)
            await next_event(events, "recovered", seen)
            middle = await show(host.ep, s.server.name)
            inject(middle.pid, signal.SIGKILL)
            restarting = await next_event(events, "restarting", seen)
            assert restarting.delay >= 1.0
            inject(first.pid, signal.SIGKILL)  # the fault actor, while it waits to restart
            await exited(first.pid)
            await next_event(events, "recovered", seen)  # from the fault actor's next process
            activations = [(await next_state(states, "active")).generation for _ in range(2)]
        after = await show(host.ep, s.server.name)
        assert after.generation == s.server.generation + 2  # two restarts, not three
        assert activations == [s.server.generation + 1, s.server.generation + 2]
        status = await host.status(s.server.name)
        assert status.pid != first.pid
        (mine,) = status.instances
        assert (mine.state, mine.restarts, mine.recent) == ("watching", 2, 2)
        history = await host.ep.request(
            "fault", "history", HistoryRequest(s.server.name), response=FaultHistory
        )
        kinds = [e.event for e in history.events]
        assert kinds == ["failed", "restarting", "recovered"] * 2  # nothing lost, nothing twice
        await s.check_everyone_else_served()
        pids = [(await show(host.ep, n)).pid for n in s.names]
    nothing_left(s.names, pids)


async def test_a_crash_loop_is_given_up_while_the_others_keep_serving(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    policy = RestartPolicy("permanent", intensity=2, backoff=0.05)
    async with fault_host(tmp_path, cert) as host, scene(host.ep, tmp_path, keys, policy) as s:
        async with await host.ep.subscribe(f"mk.instance.{s.server.id}.fault") as events:
            for crash in range(3):  # three crashes: two restarts, then it gives up
                inject((await show(host.ep, s.server.name)).pid, signal.SIGKILL)
                await next_event(events, "failed")
                if crash < 2:
                    await next_event(events, "recovered")
            gave_up = await next_event(events, "gave-up")
        assert "intensity 2" in gave_up.detail
        assert (await show(host.ep, s.server.name)).state == "failed"
        assert s.pinger.failures == []
        assert (await host.ep.introspect()).names
        pids = [(await show(host.ep, n)).pid for n in s.names[1:]]
    nothing_left(s.names, pids)


async def test_a_host_killed_with_instances_running_comes_back_and_protects_them_again(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    host = HostProcess(tmp_path, cert, "--heartbeat", "0.2")
    await host.start()
    try:
        async with connect(host.socket, name="test") as ep:
            policy = RestartPolicy("permanent", standby=True)
            async with scene(ep, tmp_path, keys, policy) as s:
                async with await ep.subscribe("mk.instance.*.state") as states:
                    while not (await show(ep, s.server.name)).standby:
                        await next_state(states, "active")
                old_standby = (await show(ep, s.server.name)).standby
                await s.caller_moves_on()
                await ep.request(s.kv, "ping", None)  # our own direct channel to it, made now

                host.kill()  # hub, lifecycle and fault actor gone at once
                # Instances talk on their direct channels, which need no hub: the server and the
                # bystander answer, the caller is there.
                assert (await ep.request(s.kv, "ping", None))["instance"] == s.server.id
                assert (await ep.request(s.pinger.target, "ping", None))["instance"]
                assert (await ep.request(f"instance.{s.caller.id}.kv", "stats", None))["ok"]
                await host.start()
                calls = retrying(ep, within=PATIENCE)
                for info in (s.server, s.caller, s.bystander):
                    back = await show(calls, info.name)
                    assert (back.state, back.pid, back.generation) == (
                        "active", info.pid, info.generation,
                    )  # fmt: skip
                await exited(old_standby)  # the dead host's standby ended and was reclaimed

                # Protected again: the new fault actor replaces it, with a new standby.
                async with await ep.subscribe(f"mk.instance.{s.server.id}.fault") as events:
                    await owned(ep, "fault")
                    await owned(ep, f"instance.{s.server.id}.agent")  # re-attached: watched
                    inject(s.server.pid, signal.SIGKILL)
                    await next_event(events, "recovered")
                await s.check_everyone_else_served()
                pids = [(await show(calls, n)).pid for n in s.names]
    finally:
        await host.finish()
    nothing_left(s.names, [*pids, s.server.pid, old_standby])
