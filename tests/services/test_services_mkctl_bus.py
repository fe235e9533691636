"""The bus inspector through mkctl, against a real host: list, tree, introspect, stats, monitor,
top (through a pseudo-terminal) and bench."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import sys
import termios
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from multikernel.protocol import BusSnapshot, EndpointInfo

from .conftest import fails, mkctl

pytestmark = pytest.mark.anyio
MKCTL = [sys.executable, "-m", "multikernel.endpoints.mkctl"]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


def _env(host: Path) -> dict[str, str]:
    return {**os.environ, "MULTIKERNEL_BUS": str(host / "bus.sock")}


async def _read_until(stream: anyio.abc.ByteReceiveStream, marker: bytes) -> bytes:
    seen = b""
    with anyio.fail_after(30):
        while marker not in seen:
            seen += await stream.receive()
    return seen


async def test_list_tree_and_stats(host: Path) -> None:
    code, out, _ = await mkctl(host, "bus", "list", "-o", "json")
    assert code == 0
    endpoints = msgspec.json.decode(out, type=list[EndpointInfo])
    (lifecycle,) = [e for e in endpoints if "lifecycle" in e.names]
    assert lifecycle.age_s > 0
    assert lifecycle.subscriptions == (
        "mk.instance.*.hello",
        "mk.resource.*.tx",
        "mk.instance.*.system",
    )
    _, out, _ = await mkctl(host, "bus", "list")
    assert out.splitlines()[0].split() == ["ID", "NAME", "INSTANCE", "PID", "NAMES", "SUBS",
                                           "MSGS/S"]  # fmt: skip
    _, out, _ = await mkctl(host, "bus", "tree")
    lines = out.splitlines()
    assert lines[1].endswith("instance 0 (host)")
    assert any(line.endswith("name lifecycle") for line in lines)
    assert any(line.endswith("sub mk.instance.*.hello") for line in lines)
    _, out, _ = await mkctl(host, "bus", "tree", "-o", "json")
    assert msgspec.json.decode(out, type=BusSnapshot).names["lifecycle"]
    _, out, _ = await mkctl(host, "bus", "stats", "-o", "json")
    stats = json.loads(out)
    (row,) = [e for e in stats["endpoints"] if e["name"] == "lifecycle"]
    assert row["bytes_in"] > 0
    assert row["bytes_out"] > 0
    assert stats["hub"]["sessions"] >= 2


async def test_introspect_shows_signatures_and_schemas(host: Path) -> None:
    code, out, _ = await mkctl(host, "bus", "introspect", "lifecycle")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("lifecycle (owner ")
    assert (
        "  create(name: str, cpus: list[int] = [], cpu_count: int = 0, memory: int = 0, "
        "restart: RestartPolicy = {}, queues: list[str] | None = null) -> InstanceInfo"
    ) in lines
    assert '  show(name: str = "") -> InstanceList' in lines
    _, out, _ = await mkctl(host, "bus", "introspect", "lifecycle", "-o", "json")
    (service,) = json.loads(out)
    create = next(m for m in service["methods"] if m["name"] == "create")
    assert create["request"]["$defs"]["CreateInstance"]["required"] == ["name"]
    assert create["response"]["$ref"] == "#/$defs/InstanceInfo"
    assert await fails(host, "bus", "introspect", "nope") == (
        3,
        "error: no service 'nope' on the bus (known: fault, lifecycle, resource, upgrade)",
    )


async def test_monitor_decodes_requests_and_publications(host: Path) -> None:
    argv = [*MKCTL, "bus", "monitor", "--limit", "2", "-o", "json", "--kind", "request",
            "--kind", "publish", "mk.test.>", "lifecycle.*"]  # fmt: skip
    async with await anyio.open_process(argv, env=_env(host)) as watching:
        try:
            assert watching.stderr is not None
            assert watching.stdout is not None
            await _read_until(watching.stderr, b"(Ctrl-C stops)")
            assert (await mkctl(host, "show", "web"))[0] == 3
            assert (await mkctl(host, "bus", "pub", "mk.test.hello", '{"a": 1}'))[0] == 0
            out = await _read_until(watching.stdout, b"mk.test.hello")
            with anyio.fail_after(30):
                assert await watching.wait() == 0  # --limit 2
        finally:
            if watching.returncode is None:
                watching.kill()
    request, publication = (json.loads(line) for line in out.decode().splitlines())
    assert (request["kind"], request["service"], request["subject"]) == (
        "request", "lifecycle", "show",
    )  # fmt: skip
    assert (request["type"], request["body"]) == ("ShowInstances", {"name": "web"})
    assert request["destination"].startswith("lifecycle(")
    assert (publication["kind"], publication["body"]) == ("publish", {"a": 1})
    assert publication["source"].startswith("mkctl(")
    assert publication["wall_ns"] > publication["ts_ns"]


async def test_monitor_hides_heartbeats_unless_asked(host: Path) -> None:
    for args in (("create", "web", "--cpus", "1", "--memory", "128M"),
                 ("load", "web", "--image", str(host / "image")), ("start", "web")):  # fmt: skip
        assert (await mkctl(host, *args))[0] == 0
    code, out, _ = await mkctl(
        host, "bus", "monitor", "--heartbeats", "--limit", "1", "mk.instance.*.system"
    )
    assert code == 0
    assert " SystemHeartbeat " in out
    code, out, _ = await mkctl(host, "bus", "monitor", "--timeout", "1.5", "mk.instance.*.system")
    assert (code, out) == (0, "")  # a beat a second passed meanwhile, hidden
    assert (await mkctl(host, "kill", "web"))[0] == 0


async def test_top_runs_live_on_a_terminal_and_q_quits(host: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        async with await anyio.open_process(
            [*MKCTL, "bus", "top", "--interval", "0.2"], env=_env(host),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        ) as top:  # fmt: skip
            os.close(slave)
            slave = -1
            seen = b""
            try:
                with anyio.fail_after(30):
                    while b"lifecycle" not in seen or b"q quits" not in seen:
                        await anyio.wait_readable(master)
                        seen += os.read(master, 65536)
                    os.write(master, b"q")
                    assert await top.wait() == 0
            finally:
                if top.returncode is None:
                    top.kill()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"\x1b[?1049h" in seen  # the alternate screen, as top(1) uses


async def test_top_off_a_terminal_prints_a_table_per_refresh(host: Path) -> None:
    code, out, _ = await mkctl(host, "bus", "top", "--iterations", "2", "--interval", "0.05")
    assert code == 0
    assert out.count("q quits") == 2


async def test_bench_reports_percentiles_and_throughput(host: Path) -> None:
    code, out, _ = await mkctl(host, "bus", "bench", "--requests", "300", "--messages", "2000",
                               "-o", "json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    rpc, pub = result["rpc"], result["pubsub"]
    assert rpc["count"] == 300
    assert 0 < rpc["p50_us"] <= rpc["p90_us"] <= rpc["p99_us"] <= rpc["p999_us"] <= rpc["max_us"]
    assert pub["received"] + pub["dropped"] == 2000
    assert pub["per_s"] > 0
