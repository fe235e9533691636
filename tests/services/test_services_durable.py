"""The host survives itself: what it knows is stored, a restarted host takes its instances back."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import msgspec
import pytest

from multikernel.bus import Hub
from multikernel.endpoints import Endpoint, HubUnavailableError, connect, retrying
from multikernel.protocol import (
    AgentStatus,
    CreateInstance,
    DeleteInstance,
    GrantList,
    GrantsQuery,
    InstanceInfo,
    InstanceList,
    LoadImage,
    LogLines,
    ReadLogs,
    RestartPolicy,
    ShowInstances,
    StartInstance,
)
from multikernel.services._instance_store import InstanceStore, StoredInstance
from multikernel.services._signature import make_signing_key
from multikernel.services._sqlite import StateStoreError

from .fault_kit import (
    KV,
    MB,
    PATIENCE,
    HostProcess,
    alive,
    bring_up,
    cgroups_of,
    exited,
    inject,
    lifecycle,
    make_image,
    owned,
    show,
    unique,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return make_signing_key("durable tests", algorithm="ec-p256")


@pytest.fixture
def cert(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(keys[1])
    return path


# -- the store ---------------------------------------------------------------------------------


def test_an_instance_row_survives_a_reopen(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "lifecycle.db")
    policy = RestartPolicy("permanent")
    row = StoredInstance("web", store.allocate_id(), "ready", (0,), 64 * MB, restart=policy)
    store.save(row)
    store.close()
    store = InstanceStore(tmp_path / "lifecycle.db")
    try:
        assert store.load() == [row]
    finally:
        store.close()


def test_instance_ids_are_never_reused_even_after_a_delete(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "lifecycle.db")
    try:
        first = store.allocate_id()
        store.save(StoredInstance("a", first, "empty"))
        store.delete("a")
        assert store.allocate_id() == first + 1
    finally:
        store.close()


def test_one_host_per_state_dir(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "lifecycle.db")
    try:
        with pytest.raises(StateStoreError, match="another host"):
            InstanceStore(tmp_path / "lifecycle.db")
    finally:
        store.close()


# -- endpoints and a restarted hub ---------------------------------------------------------------


@pytest.fixture
def hub_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.sock"


async def test_an_endpoint_on_an_inherited_socket_reattaches_by_path(hub_path: Path) -> None:
    async with anyio.create_task_group() as outer:
        first = Hub(hub_path)
        async with anyio.create_task_group() as hub_tg:
            await hub_tg.start(first.serve)
            inherited = first.open_instance_socket(0).detach()
            async with (
                connect(hub_path, fd=inherited, name="inherited") as ep,
                await ep.subscribe("after.restart") as sub,
            ):
                hub_tg.cancel_scope.cancel()  # the hub goes away
                async with anyio.create_task_group() as second_tg:
                    await second_tg.start(Hub(hub_path).serve)
                    async with connect(hub_path, name="publisher") as publisher:
                        with anyio.fail_after(PATIENCE):
                            while True:  # until the inherited endpoint re-subscribed
                                await publisher.publish("after.restart", "back")
                                with anyio.move_on_after(0.1):
                                    assert (await sub.receive()).value() == "back"
                                    break
                    second_tg.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_an_endpoint_that_cannot_reattach_fails_its_next_publish(hub_path: Path) -> None:
    async with anyio.create_task_group() as hub_tg:
        hub = Hub(hub_path)
        await hub_tg.start(hub.serve)
        inherited = hub.open_instance_socket(0).detach()
        async with connect(fd=inherited, name="no-path") as ep:
            await ep.publish("before", 1)
            hub_tg.cancel_scope.cancel()
            with anyio.fail_after(PATIENCE), pytest.raises(HubUnavailableError):  # noqa: PT012
                while True:  # the frames already in the ring may still go; then it fails
                    await ep.publish("after", 2)
                    await anyio.lowlevel.checkpoint()


# -- a host killed and started again --------------------------------------------------------------


async def test_a_killed_host_comes_back_adopts_what_runs_and_reclaims_the_rest(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    image = make_image(tmp_path, keys, KV)
    host = HostProcess(tmp_path, cert)
    survivor, victim, idle = unique("f-surv"), unique("f-vict"), unique("f-idle")
    await host.start()
    try:
        async with connect(host.socket, name="test") as ep:
            never = RestartPolicy("temporary")  # the host alone here: the fault actor stays out
            a = await bring_up(ep, survivor, image, never)
            b = await bring_up(ep, victim, image, never)
            await lifecycle(ep, "create", CreateInstance(idle, cpu_count=1, memory=96 * MB))
            await lifecycle(ep, "load", LoadImage(idle, str(image)))
            await owned(ep, f"instance.{a.id}.kv")
            before = await ep.request(f"instance.{a.id}.kv", "ping", None)

            host.kill()  # the whole host: hub, lifecycle, everything
            assert alive(a.pid)
            # Instances talk without the hub: the direct channel made before still works.
            assert (await ep.request(f"instance.{a.id}.kv", "ping", None)) == before
            inject(b.pid, signal.SIGKILL)  # one instance dies while nobody watches
            await exited(b.pid)

            await host.start()  # the same state dir; `ep` re-attaches on its own
            # `ep`'s direct channel to the dead host's lifecycle fails at once (NoRespondersError):
            # the retrying caller opens one to the new owner.
            calls = retrying(ep, within=PATIENCE)
            after = await show(calls, survivor)
            assert (after.state, after.pid, after.generation) == ("active", a.pid, a.generation)
            lost = await show(calls, victim)
            assert (lost.state, lost.cause) == ("loaded", "lost")
            assert not cgroups_of(victim)
            assert (await show(calls, idle)).state == "loaded"
            # lifecycle.db and resource.db agree: every instance (adopted, reclaimed or idle)
            # kept its grant, the same CPUs and memory, and nothing else holds one.
            await grants_match_show(calls, {survivor: a, victim: b})

            # The survivor's agent and workload re-attached to the new hub, as themselves.
            await owned(ep, f"instance.{a.id}.agent")
            status = await ep.request(
                f"instance.{a.id}.agent", "status", None, response=AgentStatus
            )
            assert status.instance == a.id
            await owned(ep, f"instance.{a.id}.kv")
            assert (await ep.request(f"instance.{a.id}.kv", "ping", None))["pid"] == before["pid"]
            # Re-attached by path, they are bound to their instance from kernel facts, not 0.
            snapshot = await ep.introspect()
            mine = (f"agent-{survivor}", "kv")
            bound = {e.name: e.instance for e in snapshot.endpoints if e.name in mine}
            assert bound == {f"agent-{survivor}": a.id, "kv": a.id}

            # The lost one starts again; a name is reused after the crash.
            assert (await lifecycle(ep, "start", StartInstance(victim))).state == "active"
            await lifecycle(ep, "delete", DeleteInstance(idle))
            await lifecycle(ep, "create", CreateInstance(idle, cpu_count=1, memory=96 * MB))
            assert (await lifecycle(ep, "load", LoadImage(idle, str(image)))).state == "loaded"
            pids = [(await show(ep, n)).pid for n in (survivor, victim)]
            await grants_match_show(ep, {})
    finally:
        await host.finish()
    for pid in pids:
        assert not alive(pid)
    for name in (survivor, victim, idle):
        assert not cgroups_of(name)


async def grants_match_show(calls: Any, before: dict[str, InstanceInfo]) -> None:
    """`mkctl resources grants` names the instances `mkctl show` does, with the same CPUs and
    memory; those in `before` still have what they had then."""
    shown = await calls.request("lifecycle", "show", ShowInstances(), response=InstanceList)
    grants = await calls.request("resource", "grants", GrantsQuery(), response=GrantList)
    held = {g.instance: (g.instance_id, tuple(g.cpus), g.memory) for g in grants.grants}
    assert held == {i.name: (i.id, tuple(i.cpus), i.memory) for i in shown.instances if i.cpus}
    for name, info in before.items():
        assert held[name] == (info.id, tuple(info.cpus), info.memory)


async def _logged(ep: Endpoint, name: str, text: str) -> None:
    """Until `text` is a line of the instance's output, as the host collected it."""
    with anyio.fail_after(PATIENCE):
        stream = ep.request_stream("lifecycle", "logs", ReadLogs(name, follow=True))
        async for batch in cast(AsyncIterator[Any], stream):
            if text in [line.text for line in msgspec.convert(batch, LogLines).lines]:
                return
    raise AssertionError(f"{text!r} never showed in {name}'s output")


async def test_a_restarted_host_collects_the_output_of_what_it_adopted(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    """The agent holds its output pipe open: a workload that writes while no host runs does
    not fail (no EPIPE), and the new host collects what it wrote, then what it writes next."""
    image = make_image(tmp_path, keys, KV)
    name = unique("f-out")
    host = HostProcess(tmp_path, cert)
    await host.start()
    try:
        async with connect(host.socket, name="test") as ep:
            info = await bring_up(ep, name, image, RestartPolicy("temporary"))
            kv = f"instance.{info.id}.kv"
            await owned(ep, kv)
            await ep.request(kv, "say", "before")
            await _logged(ep, name, "before")
            host.kill()
            assert await ep.request(kv, "say", "while the host is down") == 1  # direct channel
            await host.start()
            assert (await show(retrying(ep, within=PATIENCE), name)).pid == info.pid  # adopted
            await _logged(ep, name, "while the host is down")
            await owned(ep, kv)
            await retrying(ep, within=PATIENCE).request(kv, "say", "after")
            await _logged(ep, name, "after")
    finally:
        await host.finish()
    assert not alive(info.pid)
    assert not cgroups_of(name)


async def test_a_host_that_died_mid_launch_leaves_nothing_behind(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    """The launch is stored before it starts: whatever the dead host began is found and ended."""
    image = make_image(tmp_path, keys, KV)
    name = unique("f-mid")
    host = HostProcess(tmp_path, cert)
    await host.start()
    try:
        async with connect(host.socket, name="test") as ep:
            await lifecycle(ep, "create", CreateInstance(name, cpu_count=1, memory=96 * MB))
            await lifecycle(ep, "load", LoadImage(name, str(image)))
            async with (
                await ep.subscribe("mk.instance.*.hello") as hellos,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(_start_quietly, ep, name)
                with anyio.fail_after(PATIENCE):
                    await hellos.receive()  # the agent runs; `start` has not answered
                host.kill()
                tg.cancel_scope.cancel()
            await host.start()
            info = await show(retrying(ep, within=PATIENCE), name)
            # Adopted (it was launched and recorded) or reclaimed: never an orphan.
            assert info.state in ("active", "loaded")
    finally:
        await host.finish()
    assert not cgroups_of(name)


async def _start_quietly(ep: object, name: str) -> None:
    try:
        await lifecycle(ep, "start", StartInstance(name))  # type: ignore[arg-type]
    except Exception:  # the host died under it
        return
