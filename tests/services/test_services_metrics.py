"""The host's Prometheus metrics: per host, on a port of its own, read from the live state."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import _serve, mkctl

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def _get(url: str) -> tuple[str, str]:
    """A plain HTTP GET: the status line and the body."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        with anyio.fail_after(30):
            try:
                while True:
                    answer += await stream.receive()
            except anyio.EndOfStream:
                pass
    head, _, body = answer.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_host_exports_hub_endpoint_actor_and_instance_metrics(host: Path) -> None:
    url = (host / "state" / "metrics").read_text().strip()
    assert url.startswith("http://127.0.0.1:")
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    status, body = await _get(url)
    assert status == "HTTP/1.1 200 OK"
    samples = _samples(body)
    names = {name for name, _ in samples}
    assert {
        "multikernel_hub_uptime_seconds", "multikernel_hub_sessions_total",
        "multikernel_endpoint_frames_in_total", "multikernel_endpoint_ring_depth_bytes",
        "multikernel_actor_requests_served_total", "multikernel_instance_state",
    } <= names  # fmt: skip
    assert samples["multikernel_instance_state", (("id", "1"), ("instance", "web"),
                                                  ("state", "ready"))] == 1.0  # fmt: skip
    assert samples["multikernel_instance_memory_bytes", (("id", "1"), ("instance", "web"))] == (
        128 << 20
    )
    served = samples["multikernel_actor_requests_served_total", (("service", "lifecycle"),)]
    assert served >= 1
    assert (await mkctl(host, "show"))[0] == 0
    _, body = await _get(url)
    again = _samples(body)["multikernel_actor_requests_served_total", (("service", "lifecycle"),)]
    assert again == served + 1
    status, _ = await _get(url.replace("/metrics", "/elsewhere"))
    assert status == "HTTP/1.1 404 Not Found"
    code, out, _ = await mkctl(host, "--state-dir", str(host / "state"), "host", "status",
                               "-o", "json")  # fmt: skip
    assert (code, json.loads(out)["metrics"]) == (0, url)


async def _second_host(root: Path) -> AsyncIterator[Path]:
    await anyio.Path(root).mkdir()
    async for served in _serve(root, isolate=False):
        yield served


async def test_two_hosts_on_one_machine_export_apart(host: Path, tmp_path: Path) -> None:
    first = (host / "state" / "metrics").read_text().strip()
    async for other in _second_host(tmp_path / "other"):
        second = (other / "state" / "metrics").read_text().strip()
        assert second != first
        for url in (first, second):
            assert (await _get(url))[0] == "HTTP/1.1 200 OK"
    assert not (tmp_path / "other" / "state" / "metrics").exists()  # gone with its host
