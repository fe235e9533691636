"""The host's metrics in Prometheus text format (prometheus_client), on a local HTTP port.

`serve_metrics` listens on the host's own address (by default 127.0.0.1 and a port the kernel
picks, so several hosts on one machine never collide) and writes the address it got to
`<state dir>/metrics`, where `mkctl host status` finds it. Each scrape is computed in the event
loop, between two steps of the hub, from the same state `mkctl bus stats` and `mkctl show` read:
no thread ever touches the hub's tables. Families (all `multikernel_`):

- hub: `hub_uptime_seconds`, `hub_<counter>_total` (sessions, published, delivered, dropped,
  denied, channels, errors), `hub_endpoints`, `hub_direct_channels`;
- per endpoint (`endpoint`, `name`, `instance`): `endpoint_frames_{in,out}_total`,
  `endpoint_bytes_{in,out}_total`, `endpoint_dropped_total`, `endpoint_pending`,
  `endpoint_ring_depth_bytes`, `endpoint_ring_full_total`, `endpoint_wakeups_total`;
- per actor service (`service`): `actor_requests_served_total`, `actor_requests_failed_total`,
  `actor_requests_in_flight`;
- per instance (`instance`, `id`): `instance_state` (1 for its state), `instance_restarts_total`,
  `instance_cpus`, `instance_memory_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from multikernel.endpoints.log import get_logger
from multikernel.protocol import BusSnapshot, InstanceInfo

log = get_logger("multikernel.host")

STATES = ("empty", "ready", "loaded", "active", "failed")
_ENDPOINT_COUNTERS = {
    "frames_in": "frames the endpoint sent the hub",
    "frames_out": "frames the hub sent the endpoint",
    "bytes_in": "bytes the endpoint sent the hub",
    "bytes_out": "bytes the hub sent the endpoint",
    "dropped": "publications dropped for the endpoint (slow consumer)",
    "ring_full": "times the hub found the endpoint's ring full",
    "wakeups": "doorbells the hub rang for the endpoint",
}


class HostCollector(Collector):
    """Reads the hub, the actors' services and the instances at each scrape."""

    def __init__(
        self,
        snapshot: Callable[[], BusSnapshot],
        services: Callable[[], Mapping[str, Mapping[str, int]]],
        instances: Callable[[], list[InstanceInfo]],
    ) -> None:
        self._snapshot = snapshot
        self._services = services
        self._instances = instances

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield GaugeMetricFamily(
            "multikernel_hub_uptime_seconds", "seconds since the hub started", snap.uptime_s
        )
        for name, value in snap.counters.items():
            yield CounterMetricFamily(f"multikernel_hub_{name}", f"hub: {name}", value=value)
        yield GaugeMetricFamily(
            "multikernel_hub_endpoints", "endpoints attached", len(snap.endpoints)
        )
        yield GaugeMetricFamily(
            "multikernel_hub_direct_channels", "direct channels set up", len(snap.channels)
        )
        labels = ["endpoint", "name", "instance"]
        for field, help in _ENDPOINT_COUNTERS.items():
            family = CounterMetricFamily(f"multikernel_endpoint_{field}", help, labels=labels)
            for e in snap.endpoints:
                family.add_metric([str(e.endpoint_id), e.name, str(e.instance)], getattr(e, field))
            yield family
        for field, help in (("pending", "publications queued for the endpoint"),
                            ("ring_depth", "bytes in its ring not yet read")):  # fmt: skip
            suffix = "_bytes" if field == "ring_depth" else ""
            gauge = GaugeMetricFamily(f"multikernel_endpoint_{field}{suffix}", help, labels=labels)
            for e in snap.endpoints:
                gauge.add_metric([str(e.endpoint_id), e.name, str(e.instance)], getattr(e, field))
            yield gauge
        yield from self._actors()
        yield from self._instance_families()

    def _actors(self) -> Iterator[Metric]:
        served = CounterMetricFamily(
            "multikernel_actor_requests_served", "requests served", labels=["service"]
        )
        failed = CounterMetricFamily(
            "multikernel_actor_requests_failed", "requests failed", labels=["service"]
        )
        busy = GaugeMetricFamily(
            "multikernel_actor_requests_in_flight", "requests running", labels=["service"]
        )
        for name, counts in self._services().items():
            served.add_metric([name], counts.get("served", 0))
            failed.add_metric([name], counts.get("failed", 0))
            busy.add_metric([name], counts.get("in_flight", 0))
        yield from (served, failed, busy)

    def _instance_families(self) -> Iterator[Metric]:
        labels = ["instance", "id"]
        state = GaugeMetricFamily(
            "multikernel_instance_state", "1 for the instance's state", labels=[*labels, "state"]
        )
        restarts = CounterMetricFamily(
            "multikernel_instance_restarts", "crashes after it was active", labels=labels
        )
        cpus = GaugeMetricFamily("multikernel_instance_cpus", "CPUs it holds", labels=labels)
        memory = GaugeMetricFamily(
            "multikernel_instance_memory_bytes", "memory it holds", labels=labels
        )
        for info in self._instances():
            ids = [info.name, str(info.id)]
            for name in STATES:
                state.add_metric([*ids, name], 1.0 if info.state == name else 0.0)
            restarts.add_metric(ids, info.restarts)
            cpus.add_metric(ids, len(info.cpus))
            memory.add_metric(ids, info.memory)
        yield from (state, restarts, cpus, memory)


def registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own per host (never prometheus_client's process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port or 0)


async def serve_metrics(
    registry: CollectorRegistry,
    address: str,
    state_dir: Path,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics on `address` ("HOST:PORT", port 0: any) until cancelled."""
    host, port = parse_address(address)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)
    url = f"http://{bound[0]}:{bound[1]}/metrics"
    marker = state_dir / "metrics"
    _write(marker, url + "\n")
    log.info("metrics", url=url)
    task_status.started(url)
    try:
        async with listener:
            await listener.serve(lambda stream: _answer(stream, registry))
    finally:
        with contextlib.suppress(OSError):
            _remove(marker)


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _remove(path: Path) -> None:
    path.unlink()


async def _answer(stream: anyio.abc.SocketStream, registry: CollectorRegistry) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(5):  # a client that says nothing is cut off
            while b"\r\n\r\n" not in request and len(request) < 8192:
                try:
                    request += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) < 2 or line[0] != b"GET":
            await _send(stream, b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain")
        elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
            await _send(stream, b"404 Not Found", b"see /metrics\n", b"text/plain")
        else:
            body = generate_latest(registry)
            await _send(stream, b"200 OK", body, b"text/plain; version=0.0.4; charset=utf-8")


async def _send(stream: Any, status: bytes, body: bytes, content_type: bytes) -> None:
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status,
        content_type,
        len(body),
    )
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(head + body)
