"""The upgrade actor on a real host: state kept across an upgrade, automatic rollbacks, undo."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from multikernel.protocol import (
    CreateInstance,
    RevisionHistory,
    RevisionsQuery,
    RolloutStatus,
    UndoRollout,
)

from .upgrade_kit import MB, UpgradeHost, finished, make_image, owned, upgrade_host

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def fill(host: UpgradeHost) -> None:
    for i in range(5):
        await host.ep.request("kv", "put", [f"k{i}", "v" * (i + 1)])


async def test_state_and_names_survive_an_upgrade_with_a_schema_change(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, v2 = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2)
    name = unique("kv")
    async with upgrade_host(tmp_path, cert) as host:  # with the fault actor watching
        old = await host.bring_up(name, v1)
        await fill(host)
        status = await host.rollout([name], v2)
        assert status.outcome == "done", status
        (item,) = status.instances
        assert (item.outcome, item.mode, item.revision) == ("done", "surge", 2)
        assert item.held_ms > 0
        # the successor answers under the same name, with the state, read through v1_to_v2
        assert await host.ep.request("kv", "version") == 2
        assert await host.ep.request("kv", "get", "k3") == "vvvv"
        assert await host.ep.request("kv", "count") == 5
        assert await host.ep.request("kv", "put", ["k9", "x"]) == 6
        names = {info.name: info for info in await host.show()}
        assert name not in names, "the predecessor is deleted"
        new = names[item.successor]
        assert (new.state, new.image_version) == ("active", "2")
        assert new.id != old.id
        assert new.restart.mode == "transient", "the predecessor's restart policy is kept"
        history = await host.ep.request(
            "upgrade", "history", RevisionsQuery(item.successor), response=RevisionHistory
        )
        assert history.deployment == name
        assert [(r.revision, r.version, r.current) for r in history.revisions] == [
            (1, "1", False),
            (2, "2", True),
        ]
        # undo: back to revision 1's image (kept by the actor), as a new revision 3
        # going back to v1 by hand: v1 cannot read v2 state, so that rolls back, losing nothing
        status = await host.rollout([item.successor], Path(history.revisions[0].image))
        assert status.outcome == "failed"
        assert status.instances[0].outcome == "rolled-back"
        assert status.instances[0].step == "restore"
        assert "kv/store" in status.instances[0].error
        assert await host.ep.request("kv", "version") == 2
        assert await host.ep.request("kv", "count") == 6


@pytest.mark.parametrize("mode", ["crash", "unhealthy", "reject"])
async def test_a_bad_new_version_rolls_back_with_nothing_lost(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path, mode: str
) -> None:
    v1, bad = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2, mode=mode)
    name = unique("kv")
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        await host.bring_up(name, v1)
        await fill(host)
        deadlines = {"health": 2.0} if mode == "unhealthy" else {}
        status = await host.rollout([name], bad, deadlines=deadlines)
        assert status.outcome == "failed"
        (item,) = status.instances
        assert item.outcome == "rolled-back"
        expected_step = {"crash": "start", "unhealthy": "health", "reject": "restore"}[mode]
        assert item.step == expected_step, item
        # the predecessor thawed, kept its names and its state, and serves
        assert await host.ep.request("kv", "version") == 1
        assert await host.ep.request("kv", "count") == 5
        assert await host.ep.request("kv", "put", ["after", "x"]) == 6
        instances = [info.name for info in await host.show()]
        assert instances == [name], "the successor was deleted"
        history = await host.ep.request(
            "upgrade", "history", RevisionsQuery(name), response=RevisionHistory
        )
        assert [r.revision for r in history.revisions] == [1]


async def test_undo_returns_to_the_previous_revision(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, v1b = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 1, mode="b")
    name = unique("kv")
    async with upgrade_host(tmp_path, cert, fault=False) as host:
        await host.bring_up(name, v1)
        await fill(host)
        first = await host.rollout([name], v1b)
        assert first.outcome == "done", first
        successor = first.instances[0].successor
        async with await host.ep.subscribe("mk.upgrades.*") as events:
            started = await host.ep.request(
                "upgrade", "undo", UndoRollout(successor), response=RolloutStatus
            )
            status = await finished(host.ep, events, started.rollout)
        assert status.outcome == "done", status
        assert await host.ep.request("kv", "count") == 5
        history = await host.ep.request(
            "upgrade", "history", RevisionsQuery(name), response=RevisionHistory
        )
        assert [(r.revision, r.current) for r in history.revisions] == [
            (1, False),
            (2, False),
            (3, True),
        ]
        assert history.revisions[2].digest == history.revisions[0].digest


async def fill_the_pool(host: UpgradeHost) -> None:
    """Take the CPU left (each CPU is one instance's here: cpu_share=1), so no successor fits."""
    await host.lifecycle("create", CreateInstance(unique("filler"), cpu_count=1, memory=16 * MB))


async def test_without_room_and_no_downtime_allowed_the_upgrade_is_refused(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, v2 = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2)
    name = unique("kv")
    async with upgrade_host(tmp_path, cert, fault=False, cpu_share=1) as host:
        await host.bring_up(name, v1)
        await fill_the_pool(host)
        await fill(host)
        status = await host.rollout([name], v2)
        assert status.outcome == "failed"
        (item,) = status.instances
        assert (item.outcome, item.step) == ("rolled-back", "verify")
        assert "--max-unavailable 1" in item.error
        assert await host.ep.request("kv", "count") == 5


async def test_in_place_with_downtime_when_there_is_no_room(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, v2 = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2)
    name = unique("kv")
    async with upgrade_host(tmp_path, cert, fault=False, cpu_share=1) as host:
        await host.bring_up(name, v1)
        await fill_the_pool(host)
        await fill(host)
        status = await host.rollout([name], v2, max_unavailable=1)
        assert status.outcome == "done", status
        (item,) = status.instances
        assert (item.outcome, item.mode) == ("done", "in-place")
        assert item.down_ms > 0
        assert await host.ep.request("kv", "version") == 2
        assert await host.ep.request("kv", "get", "k4") == "vvvvv"
        assert await host.ep.request("kv", "count") == 5
        assert name not in {info.name for info in await host.show()}


async def test_a_failed_in_place_upgrade_makes_the_predecessor_again(
    tmp_path: Path, keys: tuple[bytes, bytes], cert: Path
) -> None:
    v1, bad = make_image(tmp_path, keys, 1), make_image(tmp_path, keys, 2, mode="reject")
    name = unique("kv")
    async with upgrade_host(tmp_path, cert, fault=False, cpu_share=1) as host:
        old = await host.bring_up(name, v1)
        await fill_the_pool(host)
        await fill(host)
        status = await host.rollout([name], bad, max_unavailable=1)
        assert status.outcome == "failed"
        (item,) = status.instances
        assert (item.outcome, item.mode, item.step) == ("rolled-back", "in-place", "restore")
        await owned(host.ep, "kv")
        assert await host.ep.request("kv", "version") == 1
        assert await host.ep.request("kv", "count") == 5, "its state, kept by the actor"
        again = (await host.show(name))[0]
        assert (again.state, again.image_version) == ("active", "1")
        assert again.id != old.id
