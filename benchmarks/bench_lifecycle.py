"""How long instances take to come up and to go away, on the local platform.

    python benchmarks/bench_lifecycle.py [--runs 20] [--quick]

Per run: `start` (launch the agent in its namespaces and cgroups, wait for its AgentHello on the
bus), then `kill` (negotiated: SHUTDOWN, SHUTDOWN_ACK, exit) and, separately, `kill --force`.
Reported: p50 and p99 of start → hello, of the kill requests, and of reclaim (cgroups removed,
fds closed) after the agent exits, as the lifecycle actor measured them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.protocol import (
    CreateInstance,
    InstanceInfo,
    KillInstance,
    LoadImage,
    StartInstance,
)
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._resource_process import ResourceConfig, serve_resource
from multikernel.services._signature import make_signing_key


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


async def main(runs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="mk-bench-lifecycle-"))
    key, cert = make_signing_key("bench", algorithm="ec-p256")
    image = root / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "b"\nversion = "1"\nentry = ["{python}", "m.py"]\n'
    )
    (image / "m.py").write_text("import time\ntime.sleep(300)\n")
    sign_image(image, key, cert)
    hub = Hub(root / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    platform = LocalPlatform()
    timings: dict[str, list[float]] = {
        "start (request)": [],
        "kill (negotiated)": [],
        "kill --force": [],
    }
    resource = ResourceConfig(socket=str(hub.path), state_dir=str(root / "state"))
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        await tg.start(serve_resource, resource)  # the lifecycle actor asks it for CPUs
        async with connect(hub.path, name="lifecycle") as ep, connect(hub.path) as bus:
            actor = LifecycleActor(
                ep,
                platform,
                open_instance_socket=hub.open_instance_socket,
                state_dir=root / "state",
                trusted_certs=[cert],
            )
            async with anyio.create_task_group() as actors:
                await actors.start(actor.run)

                async def call(method: str, body: object) -> float:
                    t0 = time.perf_counter()
                    await bus.request("lifecycle", method, body, response=InstanceInfo)
                    return time.perf_counter() - t0

                await call("create", CreateInstance("bench", cpu_count=1, memory=128 << 20))
                await call("load", LoadImage("bench", str(image)))
                for i in range(runs):
                    timings["start (request)"].append(await call("start", StartInstance("bench")))
                    kind = "kill --force" if i % 2 else "kill (negotiated)"
                    timings[kind].append(
                        await call("kill", KillInstance("bench", force=bool(i % 2)))
                    )
                actors.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    timings["start → agent hello"] = actor.timings["hello"]
    timings["agent exit → reclaimed"] = actor.timings["reclaim"]
    caps = platform.capabilities()
    print(
        f"local platform, {runs} runs; isolation: namespaces={caps.namespaces} "
        f"cpuset={caps.cpuset} memory={caps.memory_limit} affinity={caps.affinity}"
    )
    print(f"{'measure':28} {'n':>3} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, values in timings.items():
        print(
            f"{name:28} {len(values):>3} {pct(values, 0.5):>8.1f} {pct(values, 0.99):>8.1f} "
            f"{statistics.fmean(values) * 1000:>8.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 runs")
    args = parser.parse_args()
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")
    anyio.run(
        main,
        4 if args.quick else args.runs,
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )
