"""mkctl and the fault actor: restart policies on create/update, the fault columns of `show`,
`mkctl fault status|history|policy`, and the exit statuses of the errors they meet."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.endpoints import connect
from multikernel.protocol import (
    FaultEvent,
    FaultHistory,
    FaultStatusList,
    InstanceInfo,
    PolicyInfo,
    RestartPolicy,
)
from multikernel.services._host import HostConfig, run_host

from .conftest import fails, mkctl
from .fault_kit import PATIENCE

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def _loaded(host: Path, name: str, *options: str) -> InstanceInfo:
    code, out, err = await mkctl(
        host, "create", name, "--cpus", "1", "--memory", "128M", *options, "-o", "json"
    )
    assert code == 0, err
    code, out, err = await mkctl(host, "load", name, "--image", str(host / "image"), "-o", "json")
    assert code == 0, err
    return msgspec.json.decode(out, type=InstanceInfo)


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def _cells(out: str) -> list[dict[str, str]]:
    """A table's rows by column name (columns start where their headers start; two spaces
    separate headers, one may be inside one, as in LAST EXIT)."""
    header, *lines = out.splitlines()
    names = re.split(r"\s{2,}", header.strip())
    starts, at = [], 0
    for name in names:  # in order: GEN is also the end of AGENT
        at = header.index(name, at)
        starts.append(at)
        at += len(name)
    ends = [*starts[1:], None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(names, starts, ends, strict=True)}
        for line in lines
    ]


async def test_create_and_update_take_a_restart_policy_and_show_it(host: Path) -> None:
    info = await _loaded(host, "web", "--restart", "permanent,intensity=3,period=30,standby")
    assert info.restart == RestartPolicy("permanent", intensity=3, period=30.0, standby=True)
    code, out, _ = await mkctl(host, "show")
    (row,) = _cells(out)
    assert row["RESTART"] == "permanent,intensity=3,period=30,standby"
    # --restart alone is an update too; the rest of the instance is untouched
    code, out, _ = await mkctl(host, "update", "web", "--restart", "temporary", "-o", "json")
    assert code == 0
    updated = msgspec.json.decode(out, type=InstanceInfo)
    assert (updated.restart, updated.memory, updated.state) == (
        RestartPolicy("temporary"), 128 << 20, "loaded",
    )  # fmt: skip
    code, out, _ = await mkctl(host, "show", "-o", "wide")
    (row,) = _cells(out)
    assert {"RESTART", "GEN", "RESTARTS", "CAUSE", "STANDBY", "FAULT"} <= set(row)
    assert (row["RESTART"], row["GEN"], row["FAULT"]) == ("temporary", "-", "idle")


async def test_a_bad_restart_policy_is_a_usage_error(host: Path) -> None:
    code, line = await fails(host, "create", "web", "--restart", "sometimes")
    assert code == 2
    assert "start with one of permanent, transient, temporary" in line
    code, line = await fails(host, "create", "web", "--restart", "permanent,intensity=x")
    assert code == 2
    assert "intensity needs a number" in line
    assert (await mkctl(host, "show", "web"))[0] == 3  # nothing was created


async def test_fault_policy_status_and_history(host: Path) -> None:
    await _loaded(host, "web", "--restart", "permanent")
    code, out, _ = await mkctl(host, "fault", "policy", "web")
    assert (code, _rows(out)) == (0, [["NAME", "RESTART"], ["web", "permanent"]])
    code, out, _ = await mkctl(host, "fault", "policy", "web", "transient,backoff=0.5", "--json")
    assert code == 0
    assert msgspec.json.decode(out, type=PolicyInfo).policy == RestartPolicy(backoff=0.5)
    code, out, _ = await mkctl(host, "fault", "status", "web", "-o", "json")
    assert code == 0
    (status,) = msgspec.json.decode(out, type=FaultStatusList).instances
    assert (status.name, status.state, status.policy) == ("web", "idle", RestartPolicy(backoff=0.5))
    code, out, _ = await mkctl(host, "fault", "history")
    assert (code, out) == (0, "no fault events\n")
    assert await fails(host, "fault", "status", "nope") == (
        3, "error: no instance named 'nope' (known: web)",
    )  # fmt: skip
    code, line = await fails(host, "fault", "policy", "nope")
    assert code == 3
    assert "no instance named 'nope'" in line


async def test_history_shows_a_crash_and_its_restart(host: Path) -> None:
    await _loaded(host, "web", "--restart", "permanent")
    code, out, err = await mkctl(host, "-o", "json", "start", "web")  # options before NAME
    assert code == 0, err
    first = msgspec.json.decode(out, type=InstanceInfo)
    async with (
        connect(host / "bus.sock", name="test") as ep,
        await ep.subscribe(f"mk.instance.{first.id}.fault") as events,
    ):
        os.kill(first.pid, signal.SIGKILL)
        with anyio.fail_after(PATIENCE):
            async for message in events:
                if message.decode(FaultEvent).event == "recovered":
                    break
    code, out, _ = await mkctl(host, "fault", "history", "web", "-o", "json")
    assert code == 0
    events_seen = msgspec.json.decode(out, type=FaultHistory).events
    assert [e.event for e in events_seen] == ["failed", "restarting", "recovered"]
    assert events_seen[0].cause == "crashed"
    code, out, _ = await mkctl(host, "fault", "history", "web")
    rows = _cells(out)
    assert list(rows[0]) == ["TIME", "NAME", "EVENT", "CAUSE", "GEN", "DETAIL"]
    assert [(r["EVENT"], r["CAUSE"], r["GEN"]) for r in rows] == [
        ("failed", "crashed", "1"), ("restarting", "crashed", "1"), ("recovered", "-", "2"),
    ]  # fmt: skip
    code, out, _ = await mkctl(host, "show", "web", "-o", "wide")
    (row,) = _cells(out)
    assert (row["GEN"], row["RESTARTS"], row["CAUSE"], row["FAULT"]) == (
        "2", "1", "crashed", "watching",
    )  # fmt: skip
    assert (await mkctl(host, "kill", "web"))[0] == 0


async def test_restart_and_fail_errors_have_their_exit_status(host: Path) -> None:
    """lifecycle.restart/fail on an unknown instance: not found (3); on one that cannot: 4."""
    code, line = await fails(host, "bus", "call", "lifecycle", "restart", '{"name": "nope"}')
    assert code == 3
    assert "no instance named 'nope'" in line
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    code, line = await fails(host, "bus", "call", "lifecycle", "restart", '{"name": "web"}')
    assert code == 4
    assert "cannot restart 'web': it is ready" in line
    code, line = await fails(host, "bus", "call", "lifecycle", "fail", '{"name": "web"}')
    assert code == 4
    assert "cannot fail 'web': it is ready" in line
    _, out, _ = await mkctl(host, "show", "web", "-o", "json")
    assert json.loads(out)[0]["state"] == "ready"  # untouched


@pytest.fixture
async def faultless_host(tmp_path: Path) -> AsyncIterator[Path]:
    """A host started without its fault actor (`--no-fault`)."""
    config = HostConfig(tmp_path / "bus.sock", tmp_path / "state", fault=False)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        yield tmp_path
        stop.set()


async def test_fault_verbs_on_a_host_without_a_fault_actor(faultless_host: Path) -> None:
    code, line = await fails(faultless_host, "fault", "status")
    assert code == 3
    assert line.startswith("error: no fault actor on this host (was it started with --no-fault?)")
    assert (await mkctl(faultless_host, "create", "web", "--memory", "64M"))[0] == 0
    code, out, _ = await mkctl(faultless_host, "show", "-o", "wide")
    (row,) = _cells(out)
    assert row["FAULT"] == "-"
