"""How long a grant takes: request → the instance has it (acknowledged) → applied and committed.

    python benchmarks/bench_resource.py [--rounds 200] [--quick]

The resource actor runs as the host runs it, in a process of its own, attached to a real hub (in
this process) over shared memory. Two parts:

1. **A synthetic 1,000-CPU machine** (4 NUMA nodes, 2 threads per core, 1 TiB in 1 GiB blocks,
   `FakeSysfs`), with 1, 10 and 100 instances, each a fake agent (`FakeAgent`: it acknowledges
   what it is sent, applying nothing) on its own bus endpoint. Each instance first gets 4 CPUs
   and 2 GiB; then, one instance after the other, CPU updates (4 ↔ 5 CPUs, placed by the pack
   policy) and memory updates (2 ↔ 3 GiB), one at a time. Then every instance at once ("burst").
2. **A real instance** (root, two CPUs or more): the lifecycle actor, the resource actor and an
   instance's real agent in its namespaces and cgroups; `mkctl update` alternately moves it
   between one CPU and two and between 128 and 256 MiB, so each grant writes the cpuset, the
   memory limit and every thread's affinity, acknowledged by the agent.

Reported per kind, p50 and p99 in ms: `grant→ack` (request sent → the agent has applied it and
answers), `ack→applied` (the agent's answer → the requester has the committed grant: the host's
end narrowed, the commit written to SQLite), and `total`. Part 2 reports only `total` (the
agent's clock is in another process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio

from multikernel.bus import Hub, Policy
from multikernel.endpoints import Endpoint, connect, runtime
from multikernel.protocol import (
    CpuSpec,
    CreateInstance,
    Grant,
    GrantRequest,
    InstanceInfo,
    LoadImage,
    ResourceTransaction,
    ResourceTransactionAck,
    StartInstance,
    UpdateInstance,
)
from multikernel.services._actors import ActorProcess
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._pool import discover_pool
from multikernel.services._resource_process import ResourceConfig, resource_argv
from multikernel.services._signature import make_signing_key
from multikernel.services.testing import FakeAgent, FakeSysfs

GiB = 1 << 30


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


class TimedAgent(FakeAgent):
    """A fake agent that notes when it answered each transaction (CLOCK_MONOTONIC)."""

    answered: dict[int, float]

    async def resource(self, request: ResourceTransaction) -> ResourceTransactionAck:
        answer = await super().resource(request)
        self.answered[request.tx] = time.monotonic()
        return answer


@asynccontextmanager
async def resource_actor(hub: Hub, state: Path, sysfs: Path) -> AsyncIterator[None]:
    config = ResourceConfig(socket=str(hub.path), state_dir=str(state), sysfs_root=str(sysfs))
    actor = ActorProcess("resource", lambda fd: resource_argv(config, ready_fd=fd))
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        yield
        tg.cancel_scope.cancel()


async def synthetic(root: Path, hub: Hub, instances: int, rounds: int) -> dict[str, list[float]]:
    machine = FakeSysfs(root / f"machine-{instances}").cpus(1000, nodes=4, threads_per_core=2)
    machine.memory(1 << 40, block_size=GiB, nodes=4)
    figures: dict[str, list[float]] = {}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            resource_actor(hub, root / f"state-{instances}", machine.root)
        )
        client = await stack.enter_async_context(connect(hub.path, name="bench"))
        answered: dict[int, float] = {}
        # Instance ids of their own per part: the previous part's agents may still be leaving.
        base = instances * 1000
        for i in range(base + 1, base + instances + 1):
            agent = TimedAgent(i)
            agent.answered = answered
            ep = await stack.enter_async_context(connect(hub.path, name=f"agent-{i}"))
            await agent.serve(ep)
            request = GrantRequest(f"i{i}", i, cpus=CpuSpec(count=4), memory=2 * GiB)
            await client.request("resource", "allocate", request, response=Grant)

        changes: dict[tuple[str, int], int] = {}

        async def grant(kind: str, i: int, label: str = "") -> None:
            step = changes[kind, i] = changes.get((kind, i), 0) + 1  # every request changes it
            if kind == "cpu":
                request = GrantRequest(f"i{i}", i, cpus=CpuSpec(count=4 + step % 2))
            else:
                request = GrantRequest(f"i{i}", i, memory=(2 + step % 2) * GiB)
            t0 = time.monotonic()
            done = await client.request("resource", "update", request, response=Grant)
            t2 = time.monotonic()
            if done.tx not in answered:
                raise RuntimeError(f"{done} was not acknowledged by an agent")
            t1 = answered.pop(done.tx)
            for name, value in (("grant→ack", t1 - t0), ("ack→applied", t2 - t1),
                                ("total", t2 - t0)):  # fmt: skip
                figures.setdefault(f"{label or kind} {name}", []).append(value)

        for step in range(1, rounds + 1):
            for kind in ("cpu", "memory"):
                await grant(kind, base + (step - 1) % instances + 1)
        if instances > 1:  # every instance at once
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(base + 1, base + instances + 1):
                    tg.start_soon(grant, "cpu", i, "burst cpu")
            figures["burst, all done"] = [time.monotonic() - t0]
    return figures


async def real(root: Path, hub: Hub, rounds: int) -> dict[str, list[float]]:
    key, cert = make_signing_key("bench", algorithm="ec-p256")
    image = root / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "b"\nversion = "1"\nentry = ["{python}", "m.py"]\n'
    )
    (image / "m.py").write_text("import time\ntime.sleep(600)\n")
    sign_image(image, key, cert)
    cpus = sorted(discover_pool().cpus)[:2]
    figures: dict[str, list[float]] = {"cpu total": [], "memory total": []}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(resource_actor(hub, root / "state-real", Path("/")))
        ep = await stack.enter_async_context(connect(hub.path, name="lifecycle"))
        bus: Endpoint = await stack.enter_async_context(connect(hub.path, name="bench"))
        actor = LifecycleActor(
            ep, LocalPlatform(), open_instance_socket=hub.open_instance_socket,
            state_dir=root / "state-real", trusted_certs=[cert],
        )  # fmt: skip
        tg = await stack.enter_async_context(anyio.create_task_group())
        await tg.start(actor.run)
        stack.callback(tg.cancel_scope.cancel)

        async def call(method: str, body: object) -> float:
            t0 = time.monotonic()
            await bus.request("lifecycle", method, body, response=InstanceInfo)
            return time.monotonic() - t0

        await call("create", CreateInstance("bench", cpus=(cpus[0],), memory=128 << 20))
        await call("load", LoadImage("bench", str(image)))
        await call("start", StartInstance("bench"))
        for step in range(rounds):
            both = tuple(cpus) if step % 2 == 0 else (cpus[0],)
            figures["cpu total"].append(await call("update", UpdateInstance("bench", cpus=both)))
            memory = (256 if step % 2 == 0 else 128) << 20
            figures["memory total"].append(
                await call("update", UpdateInstance("bench", memory=memory))
            )
    return figures


def report(title: str, figures: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"  {'measure':24} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, values in figures.items():
        print(
            f"  {name:24} {len(values):>5} {ms(values, 0.5):>8.2f} {ms(values, 0.99):>8.2f} "
            f"{statistics.fmean(values) * 1000:>8.2f}"
        )


async def main(rounds: int) -> None:
    runtime.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="mk-bench-resource-") as tmp:
        await measure(Path(tmp), rounds)


async def measure(root: Path, rounds: int) -> None:
    hub = Hub(root / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    print(f"{rounds} CPU and {rounds} memory grants per part, one at a time (pid {os.getpid()})")
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        for instances in (1, 10, 100):
            figures = await synthetic(root, hub, instances, rounds)
            report(f"synthetic 1,000-CPU pool, {instances} instance(s), fake agents", figures)
        if os.geteuid() == 0 and len(discover_pool().cpus) >= 2:
            figures = await real(root, hub, max(4, rounds // 10))
            report("a real instance (cpuset, memory limit, affinity; real agent)", figures)
        else:
            print("\na real instance: skipped (needs root and two CPUs)")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20 rounds")
    args = parser.parse_args()
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")
    sys.exit(runtime.run(main, 20 if args.quick else args.rounds))
