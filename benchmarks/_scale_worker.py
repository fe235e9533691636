"""One client process of the scale benchmark (see bench_scale.py), for our bus or for NATS.

    python benchmarks/_scale_worker.py ROLE SYSTEM ADDRESS CMD_FD RESULT_FD CPU

ROLE is `client` (subscribes and unsubscribes in bulk, publishes) or `sub` (holds the
subscriptions a routing phase delivers to, and counts). Commands arrive as JSON lines on CMD_FD,
results leave on RESULT_FD (the same pipes as _bus_worker.py). anyio under uvloop.

- ``{"op": "subscribe", "n": N, "prefix": P, "batched": B}``: subscribe to ``P.0`` ... ``P.N-1``
  and answer once the server has them all: ours with ``subscribe_many`` (B) or with ``subscribe``
  from 64 tasks at once; NATS with ``nc.subscribe`` for each, then ``flush`` (a round trip, so
  the server has processed them). ``{"op": "unsubscribe"}`` drops every one of them the same way.
- ``{"op": "publish", "n": N, "distinct": D, "prefix": P}``: publish N 64-byte messages on
  ``P.<i mod D>``, then flush.
- ``{"op": "wildcard", "prefix": P}``: subscribe to ``P.>`` and count what arrives.
- ``{"op": "count"}``: what the subscriptions received so far.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bus_worker import PAYLOAD, Pipe, die_with_parent

CONCURRENCY = 64  # tasks subscribing one at a time (ours without subscribe_many)


async def subscribe_each(bus: Any, patterns: list[str]) -> list[Any]:
    """`bus.subscribe` for each pattern, from CONCURRENCY tasks (their Subscribes pipeline)."""
    made: list[Any] = [None] * len(patterns)

    async def some(k: int) -> None:
        for i in range(k, len(patterns), CONCURRENCY):
            made[i] = await bus.subscribe(patterns[i])

    async with anyio.create_task_group() as group:
        for k in range(CONCURRENCY):
            group.start_soon(some, k)
    return made


class Ours:
    def __init__(self, path: str) -> None:
        self.path = path

    async def run(self, pipe: Pipe) -> None:
        from multikernel.endpoints import connect

        received = 0
        async with connect(self.path, name="bench-scale") as bus, anyio.create_task_group() as tg:
            subs: list[Any] = []

            async def consume(sub: Any) -> None:
                nonlocal received
                async for _ in sub:
                    received += 1

            while (cmd := await pipe.command())["op"] != "quit":
                started = time.perf_counter()
                match cmd["op"]:
                    case "subscribe":
                        patterns = [f"{cmd['prefix']}.{i}" for i in range(cmd["n"])]
                        if cmd["batched"]:
                            subs += await bus.subscribe_many(patterns)
                        else:
                            subs += await subscribe_each(bus, patterns)
                        if cmd.get("consume"):
                            for sub in subs:
                                tg.start_soon(consume, sub)
                    case "wildcard":
                        tg.start_soon(consume, await bus.subscribe(f"{cmd['prefix']}.>"))
                    case "unsubscribe":
                        await bus.unsubscribe_many(subs)
                        subs = []
                    case "publish":
                        prefix, distinct = cmd["prefix"], cmd["distinct"]
                        for i in range(cmd["n"]):
                            await bus.publish(f"{prefix}.{i % distinct}", PAYLOAD)
                        await bus.introspect()  # a round trip: the hub has routed them all
                    case "count":
                        pass
                pipe.send(ev="done", seconds=time.perf_counter() - started, received=received)
            tg.cancel_scope.cancel()


class Nats:
    def __init__(self, url: str) -> None:
        self.url = url

    async def run(self, pipe: Pipe) -> None:
        import nats

        nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
        received = 0

        async def count(msg: Any) -> None:
            nonlocal received
            received += 1

        try:
            subs: list[Any] = []
            while (cmd := await pipe.command())["op"] != "quit":
                started = time.perf_counter()
                match cmd["op"]:
                    case "subscribe":
                        for i in range(cmd["n"]):
                            subs.append(await nc.subscribe(f"{cmd['prefix']}.{i}", cb=count))
                        await nc.flush()
                    case "wildcard":
                        await nc.subscribe(f"{cmd['prefix']}.>", cb=count)
                        await nc.flush()
                    case "unsubscribe":
                        for sub in subs:
                            await sub.unsubscribe()
                        subs = []
                        await nc.flush()
                    case "publish":
                        prefix, distinct = cmd["prefix"], cmd["distinct"]
                        for i in range(cmd["n"]):
                            await nc.publish(f"{prefix}.{i % distinct}", PAYLOAD)
                        await nc.flush()
                    case "count":
                        pass
                pipe.send(ev="done", seconds=time.perf_counter() - started, received=received)
        finally:
            await nc.close()


if __name__ == "__main__":
    die_with_parent()
    role, system, address, cmd_fd, res_fd, cpu = sys.argv[1:7]
    if int(cpu) >= 0:
        os.sched_setaffinity(0, {int(cpu)})
    pipe = Pipe(int(cmd_fd), int(res_fd))
    impl = Ours(address) if system == "ours" else Nats(address)
    try:
        anyio.run(impl.run, pipe, backend="asyncio", backend_options={"use_uvloop": True})
    except Exception as exc:  # the driver shows it; the traceback goes to the log
        import traceback

        traceback.print_exc()
        pipe.send(ev="error", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
