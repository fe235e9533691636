"""What docs/bus.md promises and no other test checked: name-request edge cases, the per-endpoint
limits, a policy reload that revokes a monitor, re-registration after a hub restart, and the
hub process's signals (SIGTERM drains within --grace, SIGHUP keeps the old policy on a bad file,
a second hub is refused on a live socket)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Limits, Policy
from multikernel.endpoints import connect
from multikernel.protocol import (
    BusyError,
    MonitorRecord,
    NameFlag,
    NameRelease,
    NameReleaseReply,
    NameRequest,
    NameRequestReply,
    ReleaseNameResult,
    RequestNameResult,
)

from .conftest import PATIENCE
from .test_bus_restart import hub_process, listening

pytestmark = pytest.mark.anyio


async def test_do_not_queue_fails_at_once_and_already_owner_is_said(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path) as owner, connect(socket_path) as other:
        first = await owner._link.control(NameRequest("svc", 0))
        assert first == NameRequestReply("svc", RequestNameResult.PRIMARY_OWNER)
        again = await owner._link.control(NameRequest("svc", 0))
        assert again == NameRequestReply("svc", RequestNameResult.ALREADY_OWNER)
        refused = await other._link.control(NameRequest("svc", int(NameFlag.DO_NOT_QUEUE)))
        assert refused == NameRequestReply("svc", RequestNameResult.EXISTS)
        assert (await other.introspect()).names == {"svc": (owner.id,)}  # not queued
        release = await other._link.control(NameRelease("svc"))
        assert release == NameReleaseReply("svc", ReleaseNameResult.NOT_OWNER)
        nothing = await other._link.control(NameRelease("nobody"))
        assert nothing == NameReleaseReply("nobody", ReleaseNameResult.NON_EXISTENT)


@asynccontextmanager
async def hub_with(socket_path: Path, **kwargs: object) -> AsyncIterator[Hub]:
    hub = Hub(socket_path, **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()


async def test_names_and_subscriptions_per_endpoint_are_limited(socket_path: Path) -> None:
    async with (
        hub_with(socket_path, limits=Limits(max_names=2, max_subscriptions=3)),
        connect(socket_path) as ep,
    ):
        for name in ("a", "b"):
            await ep._link.control(NameRequest(name, 0))
        with pytest.raises(BusyError, match="at most 2 names"):
            await ep._link.control(NameRequest("c", 0))
        for n in range(3):
            await ep.subscribe(f"s.{n}")
        with pytest.raises(BusyError):
            await ep.subscribe("s.3")


async def test_a_policy_reload_revokes_a_monitor_it_no_longer_grants(
    tmp_path: Path, socket_path: Path
) -> None:
    grant = tmp_path / "grant.toml"
    grant.write_text('[[rule]]\nwho = "uid:1000"\nmonitor = true\n')
    async with hub_with(socket_path, policy=Policy.load(grant)) as hub:
        # The privileged test process acts as uid 1000 through a socket bound to that uid.
        sock = hub.open_instance_socket(0, uid=1000)
        async with (
            connect(fd=sock.detach(), name="watcher") as watcher,
            watcher.monitor(">"),
        ):
            hub.reload_policy(Policy.default())  # uid 1000 may no longer monitor
            async with connect(socket_path) as talker:
                await talker.publish("after.reload", 1)
                await talker.introspect()  # the hub has routed the publication
            await watcher.introspect()  # a record would have come before this answer
            monitor = watcher._monitor
            assert monitor is not None
            assert monitor.statistics().delivered == 0


async def test_subscriptions_and_monitors_come_back_after_a_hub_restart(
    socket_path: Path,
) -> None:
    with hub_process(socket_path) as first:
        await listening(first)
        async with (
            connect(socket_path, name="sub") as sub,
            await sub.subscribe("again.>") as messages,
            sub.monitor("again.>") as records,
        ):
            first.kill()
            first.wait(timeout=20)
            with hub_process(socket_path) as second:
                await listening(second)
                async with connect(socket_path, name="pub") as pub:
                    # Nothing announces a monitor coming back, so publish until a record comes
                    # (the repeat is only the stimulus; what passes the test is the record).
                    # The endpoint restores its subscriptions before its monitor, in order on
                    # its session, so the publication recorded has reached the subscription too.
                    # (A wait on `records` is not cancelled: that would end the generator.)
                    got: list[MonitorRecord] = []
                    recorded = anyio.Event()

                    async def first_record() -> None:
                        got.append(await anext(records))
                        recorded.set()

                    with anyio.fail_after(PATIENCE):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(first_record)
                            while not recorded.is_set():
                                await pub.publish("again.x", "hello")
                                with anyio.move_on_after(0.1):
                                    await recorded.wait()
                        assert got[0].path == "hub"
                        assert (await messages.receive()).value() == "hello"


def _hub(socket_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "multikernel.bus", "--socket", str(socket_path), *args],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _events(stderr: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]


async def test_a_second_hub_is_refused_on_a_live_socket(socket_path: Path) -> None:
    with hub_process(socket_path) as first:
        await listening(first)
        second = await anyio.run_process(
            [sys.executable, "-m", "multikernel.bus", "--socket", str(socket_path)],
            check=False,
        )
        assert second.returncode == 1
        assert second.stderr.decode().splitlines()[-1] == (
            f"error: a hub is already running on {socket_path}; stop it first"
        )
        assert first.poll() is None


async def test_sighup_with_a_bad_policy_file_keeps_the_old_policy(
    tmp_path: Path, socket_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nwho = "uid:1000"\nmonitor = true\n')
    proc = _hub(socket_path, "--policy", str(policy))
    try:
        await listening(proc)
        policy.write_text("[[rule]\nthis is not toml")
        proc.send_signal(signal.SIGHUP)
        async with connect(socket_path) as ep:  # still serving, under the old policy
            await ep.introspect()
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=PATIENCE)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0
    (kept,) = [e for e in _events(stderr) if e["event"] == "policy not reloaded; the old one stays"]
    assert "policy.toml" in str(kept["error"])


async def hub_exit(proc: subprocess.Popen[bytes]) -> bytes:
    """Wait for a hub process to exit by itself (a pidfd: no polling); its stderr."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        with anyio.fail_after(PATIENCE):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.communicate(timeout=PATIENCE)[1]


@pytest.mark.parametrize("polite", [True, False])
async def test_sigterm_drains_then_exits_within_the_grace_period(
    socket_path: Path, polite: bool
) -> None:
    """Endpoints are asked to drain; the hub exits when they have left, or when --grace ends."""
    proc = _hub(socket_path, "--grace", "1")
    try:
        await listening(proc)
        async with connect(socket_path, name="drained", reconnect=False) as ep:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(PATIENCE):
                await ep.drain_requested.wait()
            if not polite:  # stays attached: the hub stops waiting after its grace period
                stderr = await hub_exit(proc)
        if polite:
            stderr = await hub_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, stderr
    assert not socket_path.exists()  # noqa: ASYNC240 - after the hub is gone, nothing to wait for


async def test_subscribe_many_makes_all_or_none(socket_path: Path) -> None:
    """A batch that would pass the limit is refused whole: nothing of it stays at the hub or in
    the endpoint, and the subscriptions made before it still work."""
    async with (
        hub_with(socket_path, limits=Limits(max_subscriptions=700)),
        connect(socket_path) as ep,
    ):
        first = await ep.subscribe_many([f"s.{n}" for n in range(100)])
        with pytest.raises(BusyError):
            await ep.subscribe_many([f"t.{n}" for n in range(1000)])  # the 2nd of two frames fails
        assert len((await ep.introspect()).subscriptions) == 100
        assert len(ep.statistics()["subscriptions"]) == 100
        await ep.publish("s.7", 7)
        assert (await first[7].receive()).value() == 7
        await ep.unsubscribe_many(first)
        assert not (await ep.introspect()).subscriptions
        assert not any(sub.active for sub in first)
