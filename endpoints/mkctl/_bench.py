"""`mkctl bus bench`: request/reply latency and pub/sub throughput on this host's bus.

Like `nats bench`: a server endpoint in a second process (this same command with `--serve`)
answers an echo method and counts publications; this process sends `--requests` requests back to
back (after a warm-up) and reports the round-trip percentiles, then publishes `--messages`
messages and reports how many a second reached the subscriber, and how many were dropped.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import click

from multikernel.endpoints import runtime
from multikernel.endpoints._connect import connect
from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import CommandError
from multikernel.endpoints.mkctl._output import emit, output_options, settings, table

WARMUP = 200
QUIET_S = 2.0  # the subscriber gives up counting after this long without a message


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


@click.command()
@click.option("--requests", type=int, default=5000, show_default=True, help="Requests to time.")
@click.option("--messages", type=int, default=50000, show_default=True, help="Messages to publish.")
@click.option("--size", type=int, default=64, show_default=True, help="Body size in bytes.")
@click.option("--serve", default="", hidden=True, help="(internal) be the bench's server.")
@output_options
def bench(requests: int, messages: int, size: int, serve: str) -> int:
    """Measure request latency (percentiles) and pub/sub throughput on this bus."""
    if serve:
        return runtime.run(_serve, settings().socket_path(), serve)
    name = f"mkctl.bench.{os.getpid()}"
    argv = [sys.executable, "-m", "multikernel.endpoints.mkctl"]
    argv += ["--socket", str(settings().socket_path()), "bus", "bench", "--serve", name]
    server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        if server.stdout.readline() != b"ready\n":
            raise CommandError("the bench's server did not start; run mkctl bus bench --debug")
        result = with_bus(lambda ep: _measure(ep, name, requests, messages, size))
    finally:
        assert server.stdin is not None
        server.stdin.close()  # the server exits when its stdin closes
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    emit(result, lambda wide: _show(result))
    return 0


async def _measure(ep: Endpoint, name: str, requests: int, messages: int, size: int) -> Any:
    body = b"x" * size
    for _ in range(WARMUP):
        await ep.request(name, "echo", body)
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter_ns()
        await ep.request(name, "echo", body)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    elapsed = time.perf_counter() - start
    latencies.sort()
    rpc = {
        "count": requests, "size": size, "per_s": round(requests / elapsed),
        "p50_us": percentile(latencies, 50), "p90_us": percentile(latencies, 90),
        "p99_us": percentile(latencies, 99), "p999_us": percentile(latencies, 99.9),
        "max_us": latencies[-1] if latencies else 0.0,
        "mean_us": round(statistics.fmean(latencies), 1) if latencies else 0.0,
    }  # fmt: skip
    subject = f"{name}.pub"
    start = time.perf_counter()
    for _ in range(messages):
        await ep.publish(subject, body)
    received = await ep.request(name, "received", messages)
    elapsed = time.perf_counter() - start
    pub = {
        "count": messages, "size": size, "received": received,
        "dropped": messages - received, "per_s": round(received / elapsed) if elapsed else 0,
    }  # fmt: skip
    return {"rpc": rpc, "pubsub": pub}


def _show(result: Any) -> None:
    rpc, pub = result["rpc"], result["pubsub"]
    table(
        ("pattern", "count", "msgs/s", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"),
        [("request/reply", rpc["count"], rpc["per_s"], f"{rpc['p50_us']:.1f}",
          f"{rpc['p90_us']:.1f}", f"{rpc['p99_us']:.1f}", f"{rpc['p999_us']:.1f}",
          f"{rpc['max_us']:.1f}")],
    )  # fmt: skip
    click.echo(
        f"pub/sub: {pub['received']} of {pub['count']} messages of {pub['size']} B received, "
        f"{pub['per_s']} msgs/s, {pub['dropped']} dropped"
    )


async def _serve(socket: Any, name: str) -> int:
    """The server side: echo, and count what arrives on <name>.pub until asked how many."""
    async with connect(socket, name="mkctl-bench", reconnect=False) as ep:
        count = 0
        progress = anyio.Event()
        svc = ep.service(name)

        @svc.method
        async def echo(body: bytes) -> bytes:
            return body

        @svc.method
        async def received(expected: int) -> int:
            while count < expected:
                with anyio.move_on_after(QUIET_S) as quiet:
                    await progress.wait()
                if quiet.cancelled_caught:
                    break  # the rest were dropped
            return count

        async with await ep.subscribe(f"{name}.pub", max_pending=1 << 20) as sub:
            await svc.start()
            async with anyio.create_task_group() as tg:

                async def counting() -> None:
                    nonlocal count, progress
                    async for _ in sub:
                        count += 1
                        progress.set()
                        progress = anyio.Event()

                async def until_stdin_closes() -> None:
                    await anyio.wait_readable(0)
                    tg.cancel_scope.cancel()

                tg.start_soon(counting)
                sys.stdout.write("ready\n")
                sys.stdout.flush()
                tg.start_soon(until_stdin_closes)
    return 0
