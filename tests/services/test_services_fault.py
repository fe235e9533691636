"""The fault actor: a failed instance is seen, reported, and replaced with the same identity."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import retrying
from multikernel.protocol import (
    CreateInstance,
    FaultEvent,
    FaultHistory,
    HistoryRequest,
    KillInstance,
    LoadImage,
    NoRespondersError,
    NotFoundError,
    PolicyGet,
    PolicyInfo,
    PolicySet,
    RestartPolicy,
    StartInstance,
)
from multikernel.services._signature import make_signing_key

from .fault_host import fault_host, next_event
from .fault_kit import (
    CRASHER,
    KV,
    MB,
    PATIENCE,
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

PERMANENT = RestartPolicy("permanent")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return make_signing_key("fault tests", algorithm="ec-p256")


@pytest.fixture
def cert(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(keys[1])
    return path


@pytest.fixture
def image(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    return make_image(tmp_path, keys, KV)


async def test_a_killed_instance_is_replaced_keeping_its_identity(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-kill")
    async with fault_host(tmp_path, cert) as host:
        before = await bring_up(host.ep, name, image, PERMANENT)
        kv = f"instance.{before.id}.kv"
        await owned(host.ep, kv)
        first = await host.ep.request(kv, "ping", None)
        async with await host.ep.subscribe(f"mk.instance.{before.id}.fault") as events:
            inject(before.pid, signal.SIGKILL)
            failed = await next_event(events, "failed")
            restarting = await next_event(events, "restarting")
            recovered = await next_event(events, "recovered")
        assert (failed.cause, failed.generation) == ("crashed", before.generation)
        assert (restarting.attempt, restarting.delay) == (1, 0.0)  # the first is immediate
        after = await show(host.ep, name)
        assert recovered.generation == after.generation == before.generation + 1
        # The same instance: name, id, resources; its well-known names are back.
        assert (after.name, after.id, after.cpus, after.memory, after.state) == (
            before.name, before.id, before.cpus, before.memory, "active",
        )  # fmt: skip
        await owned(host.ep, kv)
        second = await host.ep.request(kv, "ping", None)
        assert second["instance"] == first["instance"]  # served by the same instance...
        assert after.pid != before.pid  # ...in a new launch
        history = await host.ep.request(
            "fault", "history", HistoryRequest(name), response=FaultHistory
        )
        assert [e.event for e in history.events] == ["failed", "restarting", "recovered"]
        (status,) = (await host.status(name)).instances
        assert (status.state, status.restarts, status.recent) == ("watching", 1, 1)


async def test_a_stopped_instance_is_found_hung_and_replaced(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    """SIGSTOP: the process is there, its heartbeats are not, its agent does not answer."""
    name = unique("f-stop")
    async with fault_host(tmp_path, cert) as host:
        before = await bring_up(host.ep, name, image, PERMANENT)
        async with await host.ep.subscribe(f"mk.instance.{before.id}.fault") as events:
            inject(before.pid, signal.SIGSTOP)
            failed = await next_event(events, "failed")
            await next_event(events, "recovered")
        assert failed.cause == "hang"
        assert "phi" in failed.detail
        await exited(before.pid)  # the stopped instance was killed, not left behind
        after = await show(host.ep, name)
        assert (after.state, after.cause, after.generation) == (
            "active", "hang", before.generation + 1,
        )  # fmt: skip


async def test_garbage_on_its_ring_is_a_fault_of_the_writer(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-garb")
    async with fault_host(tmp_path, cert) as host:
        before = await bring_up(host.ep, name, image, PERMANENT)
        kv = f"instance.{before.id}.kv"
        await owned(host.ep, kv)
        async with await host.ep.subscribe(f"mk.instance.{before.id}.fault") as events:
            await host.ep.request(kv, "garble", None)
            failed = await next_event(events, "failed")
            await next_event(events, "recovered")
        assert failed.cause == "garbage"
        assert "kv" in failed.detail  # the endpoint that wrote it
        assert not alive(before.pid)


async def test_a_temporary_instance_is_reported_and_left_down(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-temp")
    async with fault_host(tmp_path, cert) as host:
        before = await bring_up(host.ep, name, image, RestartPolicy("temporary"))
        async with await host.ep.subscribe(f"mk.instance.{before.id}.fault") as events:
            inject(before.pid, signal.SIGKILL)
            failed = await next_event(events, "failed")
        assert "temporary: never restarted" in failed.detail
        assert (await show(host.ep, name)).state == "loaded"
        assert not cgroups_of(name)


async def test_the_restart_policy_is_read_and_set_over_the_bus(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-pol")
    async with fault_host(tmp_path, cert) as host:
        await bring_up(host.ep, name, image)
        got = await host.ep.request("fault", "policy_get", PolicyGet(name), response=PolicyInfo)
        assert got.policy == RestartPolicy()  # the default: transient
        wanted = RestartPolicy("permanent", intensity=2, period=10.0, backoff=0.5)
        await host.ep.request("fault", "policy_set", PolicySet(name, wanted), response=PolicyInfo)
        assert (await show(host.ep, name)).restart == wanted  # stored by the lifecycle
        (status,) = (await host.status(name)).instances
        assert status.policy == wanted
        with pytest.raises(NotFoundError, match="no instance named 'nope'"):  # mkctl: exit 3
            await host.status("nope")


# -- policies, end to end ------------------------------------------------------------------------


async def test_a_crash_loop_past_the_intensity_is_given_up_and_marked_failed(
    tmp_path: Path, cert: Path, keys: tuple[bytes, bytes]
) -> None:
    crasher = make_image(tmp_path, keys, CRASHER, name="crasher")
    name = unique("f-loop")
    policy = RestartPolicy("permanent", intensity=2, period=60.0, backoff=0.05, backoff_max=1.0)
    async with fault_host(tmp_path, cert) as host:
        create = CreateInstance(name, cpu_count=1, memory=96 * MB, restart=policy)
        await lifecycle(host.ep, "create", create)
        info = await lifecycle(host.ep, "load", LoadImage(name, str(crasher)))
        seen: list[FaultEvent] = []
        async with await host.ep.subscribe(f"mk.instance.{info.id}.fault") as events:
            await lifecycle(host.ep, "start", StartInstance(name))
            gave_up = await next_event(events, "gave-up", seen)
        kinds = [e.event for e in seen]
        assert (kinds.count("failed"), kinds.count("restarting")) == (3, 2)
        first, second = (e.delay for e in seen if e.event == "restarting")
        assert first == 0.0  # immediate...
        assert 0.025 <= second <= 0.05  # ...then backed off, with jitter
        assert "2 restarts" in gave_up.detail
        assert "intensity 2" in gave_up.detail
        after = await show(host.ep, name)
        assert (after.state, after.generation) == ("failed", 3)  # the first launch + 2 restarts
        (status,) = (await host.status(name)).instances
        assert (status.state, status.restarts) == ("gave-up", 2)
        # `mkctl kill` resets it; started again, it is watched again.
        await lifecycle(host.ep, "kill", KillInstance(name))
        assert (await show(host.ep, name)).state == "loaded"
    assert not cgroups_of(name)


async def test_one_for_all_restarts_the_whole_group_once(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    group = unique("g")
    policy = RestartPolicy("permanent", group=group, strategy="one-for-all")
    names = [unique(f"f-g{i}") for i in range(3)]
    async with fault_host(tmp_path, cert) as host:
        before = [await bring_up(host.ep, n, image, policy) for n in names]
        async with await host.ep.subscribe("mk.instance.*.fault") as events:
            inject(before[1].pid, signal.SIGKILL)
            recovered: set[str] = set()
            seen: list[FaultEvent] = []
            while recovered != set(names):
                recovered.add((await next_event(events, "recovered", seen)).name)
        assert [e.name for e in seen if e.event == "failed"] == [names[1]]
        causes = {e.name: e.cause for e in seen if e.event == "restarting"}
        assert causes == {names[0]: "group", names[1]: "crashed", names[2]: "group"}
        for old in before:
            new = await show(host.ep, old.name)
            assert (new.state, new.generation, new.id) == ("active", old.generation + 1, old.id)
            assert not alive(old.pid)
        (status,) = (await host.status(names[0])).instances
        assert status.recent == 1  # one restart of the group, counted once against it


# -- identity, and what callers see --------------------------------------------------------------


async def test_a_request_in_flight_to_a_dying_instance_fails_at_once(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-fly")
    async with fault_host(tmp_path, cert) as host:
        info = await bring_up(host.ep, name, image, RestartPolicy("temporary"))
        kv = f"instance.{info.id}.kv"
        await owned(host.ep, kv)
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await host.ep.request(kv, "hold", None)
            except NoRespondersError as exc:
                outcome.append(exc)

        with anyio.fail_after(PATIENCE):  # guards the suite: hanging here is the failure
            async with (
                await host.ep.subscribe(f"mk.instance.{info.id}.held") as held,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(call)
                await held.receive()  # the request is being served now
                inject(info.pid, signal.SIGKILL)
        assert len(outcome) == 1  # the call ended with NoRespondersError, not a hang
        with pytest.raises(NoRespondersError):  # and nobody serves the name: told at once
            await host.ep.request(kv, "ping", None)


async def test_the_replacement_serves_its_names_and_subscriptions_and_keeps_what_was_acked(
    tmp_path: Path, cert: Path, image: Path
) -> None:
    name = unique("f-ident")
    async with fault_host(tmp_path, cert) as host:
        info = await bring_up(host.ep, name, image, PERMANENT)
        kv = f"instance.{info.id}.kv"
        await owned(host.ep, kv)
        acked = [f"line{i}" for i in range(20)]
        for line in acked:
            assert await host.ep.request(kv, "append", line) == 1
        async with await host.ep.subscribe(f"mk.instance.{info.id}.noted") as noted:
            await host.ep.publish(f"mk.instance.{info.id}.in", "before")
            assert (await noted.receive()).value() == "before"
            async with await host.ep.subscribe(f"mk.instance.{info.id}.fault") as events:
                inject(info.pid, signal.SIGKILL)
                await next_event(events, "recovered")
            # Callers that opted in to retrying do not see the replacement at all.
            caller = retrying(host.ep, within=PATIENCE)
            assert (await caller.request(kv, "ping", None))["instance"] == info.id
            await host.ep.publish(f"mk.instance.{info.id}.in", "after")
            assert (await noted.receive()).value() == "after"  # its subscription is back
        journal = await host.ep.request(kv, "read", None)
        assert journal == [*acked, "in:before", "in:after"]
