"""`bus capture` writes pcapng that `bus replay` reads back as the monitor saw it, and tshark
parses with our Lua dissector."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest

from multikernel.endpoints.mkctl import _pcapng
from multikernel.protocol import Kind, MonitorRecord, encode

from .conftest import fails, mkctl

pytestmark = pytest.mark.anyio
MKCTL = [sys.executable, "-m", "multikernel.endpoints.mkctl"]
DISSECTOR = Path(__file__).resolve().parents[2] / "docs" / "wireshark" / "multikernel.lua"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def _read_until(stream: anyio.abc.ByteReceiveStream, marker: bytes) -> bytes:
    seen = b""
    with anyio.fail_after(30):
        while marker not in seen:
            seen += await stream.receive()
    return seen


def test_a_packet_holds_the_record_the_monitor_saw() -> None:
    frame = encode(Kind.PUBLISH, {"a": 1}, subject="mk.test.x", source=7)
    record = MonitorRecord(123, "direct", 7, 9, frame, 42, "lifecycle", "mkctl")
    assert _pcapng.unpack(_pcapng.packet(record)) == record


async def _capture_and_monitor(host: Path) -> tuple[Path, list[dict[str, object]]]:
    """Capture and monitor the same traffic at once; the capture file and the monitor's lines."""
    env = {**os.environ, "MULTIKERNEL_BUS": str(host / "bus.sock")}
    file = host / "bus.pcapng"
    limit = ["--limit", "3"]  # a request, its reply and a publication: all there is
    async with (
        await anyio.open_process([*MKCTL, "bus", "capture", str(file), *limit], env=env) as cap,
        await anyio.open_process(
            [*MKCTL, "bus", "monitor", "-o", "json", *limit], env=env
        ) as mon,  # fmt: skip
    ):
        try:
            assert cap.stderr is not None
            assert mon.stderr is not None
            assert mon.stdout is not None
            await _read_until(cap.stderr, b"(Ctrl-C stops)")
            await _read_until(mon.stderr, b"(Ctrl-C stops)")
            assert (await mkctl(host, "show"))[0] == 0  # a request and its reply
            assert (await mkctl(host, "bus", "pub", "mk.test.hello", '{"a": [1, 2]}'))[0] == 0
            out = await _read_until(mon.stdout, b"mk.test.hello")
            with anyio.fail_after(30):
                assert await cap.wait() == 0
                assert await mon.wait() == 0
        finally:
            for proc in (cap, mon):
                if proc.returncode is None:
                    proc.kill()
    return file, [json.loads(line) for line in out.decode().splitlines()]


async def test_replay_shows_the_capture_as_the_monitor_showed_it_live(host: Path) -> None:
    file, live = await _capture_and_monitor(host)
    code, out, _ = await mkctl(host, "bus", "replay", str(file), "-o", "json")
    assert code == 0
    replayed = [json.loads(line) for line in out.splitlines()]
    for record in (*live, *replayed):
        record.pop("wall_ns")  # each process read the wall clock on its own
    assert replayed == live
    assert [r["kind"] for r in replayed] == ["request", "reply", "publish"] or [
        r["kind"] for r in replayed
    ] == ["reply", "request", "publish"]  # the two sides of a channel mirror independently
    assert replayed[-1]["body"] == {"a": [1, 2]}
    _, out, _ = await mkctl(host, "bus", "replay", str(file), "--kind", "publish")
    (line,) = out.splitlines()
    assert line.endswith(' mk.test.hello 67B {"a":[1,2]}')
    _, again, _ = await mkctl(host, "bus", "replay", str(file), "--kind", "publish")
    assert again == out  # a capture reads the same every time


@pytest.mark.skipif(
    shutil.which("tshark") is None,
    reason="tshark is not installed (Debian's tshark package; .ci/run installs it)",
)
async def test_tshark_parses_the_capture_with_our_dissector(host: Path) -> None:
    file, _ = await _capture_and_monitor(host)
    done = await anyio.run_process(
        ["tshark", "-X", f"lua_script:{DISSECTOR}", "-r", str(file), "-T", "fields",
         "-e", "mkcap.service", "-e", "multikernel.kind", "-e", "multikernel.subject"],
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    rows = sorted(line.split("\t") for line in done.stdout.decode().splitlines())
    assert rows == [["", "1", "mk.test.hello"], ["lifecycle", "2", "show"], ["lifecycle", "3", ""]]


async def test_replay_refuses_what_is_not_a_capture(tmp_path: Path) -> None:
    bogus = tmp_path / "not.pcapng"
    bogus.write_bytes(b"hello, not a capture")
    assert await fails(tmp_path, "bus", "replay", str(bogus)) == (
        1,
        f"error: {bogus} is not a pcapng capture",
    )
