"""Rolling upgrades under load, pause and resume, an upgrade actor killed mid-way, mkctl upgrade."""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from multikernel.endpoints import Endpoint
from multikernel.protocol import (
    RolloutRef,
    RolloutStatus,
    StartRollout,
    UpgradeEvent,
)
from tests.services.conftest import mkctl

from .upgrade_kit import (
    PATIENCE,
    UpgradeHost,
    finished,
    make_caller,
    make_image,
    owned,
    upgrade_host,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def names(count: int) -> list[str]:
    tag = secrets.token_hex(2)
    return [f"{chr(ord('a') + i)}-{tag}" for i in range(count)]


async def next_event(events: Any, step: str) -> UpgradeEvent:
    with anyio.fail_after(PATIENCE):
        async for message in events:
            event = message.decode(UpgradeEvent)
            if event.step == step:
                return event
    raise AssertionError("the subscription ended")


async def test_rolling_upgrade_of_three_under_a_steady_stream_of_calls(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1 = make_image(tmp_path, keys, 1, per_instance=True)
    v2 = make_image(tmp_path, keys, 2, per_instance=True)
    instances = names(3)
    targets = [f"kv.{name}" for name in instances]
    caller_image = make_caller(tmp_path, keys, targets)
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        for name in instances:
            await host.bring_up(name, v1)
        caller = await host.bring_up_plain(f"caller-{secrets.token_hex(2)}", caller_image)
        stats = f"instance.{caller.id}.stats"
        await owned(host.ep, stats)
        before = await host.ep.request(stats, "read")
        status = await host.rollout(instances, v2, max_surge=1)
        assert status.outcome == "done", status
        assert [i.outcome for i in status.instances] == ["done"] * 3
        assert all(i.held_ms > 0 for i in status.instances)
        final = await host.ep.request(stats, "stop")
        assert final["errors"] == 0, final
        assert final["ok"] > before["ok"], "the stream went on during the upgrade"
        for target in targets:
            # every acknowledged put is in the state, once: nothing lost, nothing twice
            assert await host.ep.request(target, "version") == 2
            assert await host.ep.request(target, "count") == final["acked"][target]


async def test_pause_and_resume_a_rollout(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1 = make_image(tmp_path, keys, 1, per_instance=True)
    v2 = make_image(tmp_path, keys, 2, per_instance=True)
    instances = names(2)
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        for name in instances:
            await host.bring_up(name, v1)
        async with (
            await host.ep.subscribe(f"mk.upgrade.{instances[0]}.>") as first,
            await host.ep.subscribe("mk.upgrades.*") as ends,
        ):
            started = await host.ep.request(
                "upgrade", "rollout", StartRollout(tuple(instances), str(v2)),
                response=RolloutStatus,
            )  # fmt: skip
            await next_event(first, "verify")
            paused = await host.ep.request(
                "upgrade", "pause", RolloutRef(started.rollout), response=RolloutStatus
            )
            assert paused.outcome == "paused"
            await next_event(first, "drain")  # the one under way finishes
            with anyio.fail_after(PATIENCE):
                while True:
                    now = await host.ep.request(
                        "upgrade", "status", RolloutRef(started.rollout), response=RolloutStatus
                    )
                    if now.instances[0].outcome == "done":
                        break
                    await anyio.sleep(0.05)  # the status has no event of its own for this
            assert now.outcome == "paused"
            assert now.instances[1].outcome == "waiting", "no other upgrade starts while paused"
            await host.ep.request(
                "upgrade", "resume", RolloutRef(started.rollout), response=RolloutStatus
            )
            status = await finished(host.ep, ends, started.rollout)
        assert status.outcome == "done", status
        assert [i.outcome for i in status.instances] == ["done", "done"]


async def test_the_upgrade_actor_killed_mid_upgrade_rolls_back_and_goes_on(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1 = make_image(tmp_path, keys, 1)
    v2 = make_image(tmp_path, keys, 2, health_after=1.5)
    name = f"kv-{secrets.token_hex(2)}"
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        await host.bring_up(name, v1)
        for i in range(3):
            await host.ep.request("kv", "put", [f"k{i}", "v"])
        async with (
            await host.ep.subscribe(f"mk.upgrade.{name}.>") as events,
            await host.ep.subscribe("mk.upgrades.*") as ends,
        ):
            started = await host.ep.request(
                "upgrade", "rollout", StartRollout((name,), str(v2)), response=RolloutStatus
            )
            await next_event(events, "health")  # frozen, held, restored: waiting for health
            os.kill(actor_pid(host), signal.SIGKILL)
            # the host starts the actor again; it rolls the upgrade back, then does it again
            await owned_again(host.ep)
            status = await finished(host.ep, ends, started.rollout)
        assert status.outcome == "done", status
        assert await host.ep.request("kv", "version") == 2
        assert await host.ep.request("kv", "count") == 3
        left = [info.name for info in await host.show()]
        assert left == [status.instances[0].successor], "one successor, the one that serves"


def actor_pid(host: UpgradeHost) -> int:
    """The upgrade actor's process of this host (the hub sees the host's pid: it made the
    actor's socket), found by its command line."""
    wanted = ["multikernel.upgrade.actor", "--state-dir", str(host.config.state_dir)]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if all(part in argv for part in wanted):
                found.append(int(entry.name))
    (pid,) = found
    return pid


async def owned_again(ep: Endpoint) -> None:
    """Until the upgrade actor's name has a new owner (it left when its process was killed)."""
    async with await ep.subscribe("mk.bus.names.upgrade") as changes:
        with anyio.fail_after(PATIENCE):
            async for message in changes:
                if message.value().get("new_owner"):
                    return


async def test_mkctl_upgrade_follows_a_rollout_and_reports_a_rollback(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, v2 = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2)
    bad = make_image(tmp_path, keys, 2, mode="reject")
    name = f"kv-{secrets.token_hex(2)}"
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        await host.bring_up(name, v1)
        code, out, err = await mkctl(host.root, "upgrade", name, "--image", str(bad))
        assert code == 1, (out, err)
        assert "Traceback" not in err
        assert "rolled back" in err or "restore" in err, err
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert events[-1]["outcome"] == "failed"
        assert {e.get("step") for e in events[:-1]} >= {"verify", "start", "freeze", "restore"}

        code, out, err = await mkctl(host.root, "upgrade", name, "--image", str(v2))
        assert code == 0, (out, err)
        successor = json.loads(out.splitlines()[-1])["instances"][0]["successor"]
        code, out, err = await mkctl(host.root, "upgrade", "history", successor, "-o", "json")
        assert code == 0, err
        revisions = [r["revision"] for r in json.loads(out)["revisions"]]
        assert revisions == [1, 2], "the rolled-back attempt left no revision"
        code, out, _ = await mkctl(host.root, "upgrade", "status")
        assert code == 0
        assert successor in out
        code, out, _ = await mkctl(host.root, "upgrade", "list")
        assert code == 0
        assert len(out.strip().splitlines()) == 3  # a header and two rollouts

        code, out, err = await mkctl(host.root, "upgrade", "nosuch", "--image", str(v2))
        assert code == 3, (out, err)
        assert "no instance 'nosuch'" in err
        code, out, err = await mkctl(host.root, "upgrade", successor, "--image", "/nonexistent")
        assert code == 3
        assert "no image at" in err
        code, out, err = await mkctl(host.root, "upgrade", "undo", successor, "--to-revision", "9")
        assert code == 3
        assert "no revision 9" in err
