"""Noisy neighbours: an RPC service's latency while another instance runs a CPU and memory hog.

    python benchmarks/bench_isolation.py [--rounds 3] [--seconds 5] [--quick]

The roadmap promises that instances do not disturb each other. One host (hub, lifecycle and
resource actors, as `mkctl host up` runs them) and three scenarios, interleaved in each round:

- **quiet**: instance `srv` (a `bench.echo` service) and instance `cli` (its caller, back-to-back
  requests over the direct shared-memory channel) share their grant, CPU @1; nothing else runs.
- **isolated**: the same pair, and a neighbour instance `hog` on its own grant (CPU @0, 512 MiB)
  running `stress-ng --cpu 1 --vm 1 --vm-bytes 256M` (one busy CPU worker, one worker writing
  256 MiB over and over) inside its namespaces and cgroups.
- **unconfined**: the same pair, and the same `stress-ng` run by the host itself outside any
  grant: its workers go wherever the scheduler puts them, CPU 1 included (what "no isolation"
  means on the local platform).

The caller measures each request (send → answer) for `--seconds` after a one-second warm-up and
reports p50, p99 and p99.9 in µs; the script prints each round and the medians over rounds, and
the ratios to quiet (the target: isolated p99 ≤ 1.2 times quiet). It needs root (cgroups), two CPUs
or more, and `stress-ng` (`apt-get install stress-ng`). Where `/sys/fs/resctrl` is absent the last
level cache and the memory bandwidth stay shared with the neighbour whatever its grant says; the
script says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import anyio
import anyio.abc

from multikernel.endpoints import Bus, connect, runtime
from multikernel.protocol import (
    CreateInstance,
    DeleteInstance,
    InstanceInfo,
    KillInstance,
    LoadImage,
    StartInstance,
)
from multikernel.services._host import HostConfig, run_host
from multikernel.services._image import sign_image
from multikernel.services._signature import make_signing_key
from multikernel.shm import ENV_TAG

POLICY = """
[[rule]]
who = "guest"
own = ["bench.>"]
call = ["bench.>"]
publish = ["bench.>"]
subscribe = ["bench.>"]
"""

SERVER = """
import anyio
from multikernel.endpoints import connect

async def main():
    async with connect(name="bench-server") as bus:
        svc = bus.service("bench.echo", concurrency=4)

        @svc.method
        async def echo(payload: bytes) -> bytes:
            return payload

        await svc.start()
        await anyio.sleep_forever()

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
"""

CLIENT = """
import time
import anyio
from multikernel.endpoints import connect

SECONDS = {seconds}

async def main():
    async with connect(name="bench-client") as bus:
        while True:  # the service lives in another instance: wait until it answers
            try:
                await bus.request("bench.echo", "echo", b"x")
                break
            except Exception:
                await anyio.sleep(0.05)
        payload = bytes(64)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # warm up: the direct channel, the caches, the JIT-less loop
            await bus.request("bench.echo", "echo", payload)
        samples = []
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            t0 = time.perf_counter_ns()
            await bus.request("bench.echo", "echo", payload)
            samples.append(time.perf_counter_ns() - t0)
        samples.sort()
        pick = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))] / 1000
        await bus.publish("bench.result", {{
            "calls": len(samples), "p50": pick(0.5), "p99": pick(0.99), "p999": pick(0.999),
        }})
        await anyio.sleep_forever()

anyio.run(main, backend="asyncio", backend_options={{"use_uvloop": True}})
"""

HOG_ARGS = ["stress-ng", "--cpu", "1", "--vm", "1", "--vm-bytes", "256M", "--quiet"]

HOG = f"""
import os
os.execvp("stress-ng", {HOG_ARGS!r})
"""

SCENARIOS = ("quiet", "isolated", "unconfined")


def _image(root: Path, name: str, source: str, key: bytes, cert: bytes) -> Path:
    image = root / "images" / name
    image.mkdir(parents=True)
    (image / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "1.0"\nentry = ["{{python}}", "main.py"]\n'
    )
    (image / "main.py").write_text(textwrap.dedent(source))
    sign_image(image, key, cert)
    return image


async def _up(bus: Bus, name: str, cpus: tuple[int, ...], memory: int, image: Path) -> None:
    await bus.request(
        "lifecycle", "create", CreateInstance(name, cpus, 0, memory), response=InstanceInfo
    )
    await bus.request("lifecycle", "load", LoadImage(name, str(image)), response=InstanceInfo)
    await bus.request("lifecycle", "start", StartInstance(name), response=InstanceInfo)


async def _down(bus: Bus, name: str) -> None:
    await bus.request("lifecycle", "kill", KillInstance(name, grace=2.0), response=InstanceInfo)
    await bus.request("lifecycle", "delete", DeleteInstance(name), response=InstanceInfo)


async def _scenario(
    bus: Bus, kind: str, images: dict[str, Path], pair_cpu: int, hog_cpu: int
) -> dict[str, float]:
    """One measurement: the caller's figures while the neighbour does what `kind` says."""
    hog: anyio.abc.Process | None = None
    if kind == "isolated":
        await _up(bus, "hog", (hog_cpu,), 512 << 20, images["hog"])
    elif kind == "unconfined":
        hog = await anyio.open_process(HOG_ARGS, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        async with await bus.subscribe("bench.result") as results:
            await _up(bus, "cli", (pair_cpu,), 256 << 20, images["cli"])
            try:
                with anyio.fail_after(120):
                    figures: dict[str, float] = (await results.receive()).value()
            finally:
                await _down(bus, "cli")
    finally:
        if kind == "isolated":
            await _down(bus, "hog")
        if hog is not None:
            os.killpg(hog.pid, 9)
            await hog.wait()
    return figures


async def bench(root: Path, rounds: int, seconds: float) -> dict[str, list[dict[str, float]]]:
    key, cert = make_signing_key("bench key", algorithm="ec-p256")
    (root / "cert.pem").write_bytes(cert)
    images = {
        "srv": _image(root, "srv", SERVER, key, cert),
        "cli": _image(root, "cli", CLIENT.format(seconds=seconds), key, cert),
        "hog": _image(root, "hog", HOG, key, cert),
    }
    cpus = sorted(os.sched_getaffinity(0))
    hog_cpu, pair_cpu = cpus[0], cpus[-1]
    config = HostConfig(
        socket=root / "bus.sock",
        state_dir=root / "state",
        policy_text=POLICY,
        policy_source="bench policy",
        trusted=[root / "cert.pem"],
        cpu_share=2,  # srv and cli share the pair's CPU; the hog has its own
        metrics="",
    )
    found: dict[str, list[dict[str, float]]] = {kind: [] for kind in SCENARIOS}
    stop = anyio.Event()
    async with anyio.create_task_group() as host:
        await host.start(run_host, config, stop)
        async with connect(config.socket, name="bench") as bus:
            await _up(bus, "srv", (pair_cpu,), 256 << 20, images["srv"])
            print(f"service and caller on CPU {pair_cpu}; the neighbour on CPU {hog_cpu}")
            print(f"{'round':>5} {'scenario':>11} {'calls':>8} {'p50 us':>8} {'p99 us':>8} "
                  f"{'p99.9 us':>9}")  # fmt: skip
            for n in range(rounds):
                order = SCENARIOS[n % 3 :] + SCENARIOS[: n % 3]  # no scenario always goes first
                for kind in order:
                    f = await _scenario(bus, kind, images, pair_cpu, hog_cpu)
                    found[kind].append(f)
                    print(f"{n + 1:>5} {kind:>11} {f['calls']:>8.0f} {f['p50']:>8.1f} "
                          f"{f['p99']:>8.1f} {f['p999']:>9.1f}", flush=True)  # fmt: skip
            await _down(bus, "srv")
        stop.set()
    return found


def report(found: dict[str, list[dict[str, float]]]) -> None:
    med = {k: {q: statistics.median(r[q] for r in runs) for q in ("p50", "p99", "p999")}
           for k, runs in found.items()}  # fmt: skip
    print("\nmedians over rounds, and the ratio to quiet:")
    print(f"{'scenario':>11} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'p50 x':>7} "
          f"{'p99 x':>7} {'p99.9 x':>8}")  # fmt: skip
    quiet = med["quiet"]
    for kind in SCENARIOS:
        m = med[kind]
        print(f"{kind:>11} {m['p50']:>8.1f} {m['p99']:>8.1f} {m['p999']:>9.1f} "
              f"{m['p50'] / quiet['p50']:>7.2f} {m['p99'] / quiet['p99']:>7.2f} "
              f"{m['p999'] / quiet['p999']:>8.2f}")  # fmt: skip
    ratio = med["isolated"]["p99"] / quiet["p99"]
    print(f"\nisolated p99 / quiet p99 = {ratio:.2f} (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else 'missed'})")  # fmt: skip
    if not Path("/sys/fs/resctrl").exists():
        print("no /sys/fs/resctrl on this machine: the neighbour shares the last-level cache and "
              "the memory bandwidth whatever its grant (CPUs and memory limits only)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    if os.geteuid() != 0:
        sys.exit("bench_isolation needs root: without cgroups a grant cannot confine anything")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_isolation needs two CPUs or more: one for the pair, one for the neighbour")
    if shutil.which("stress-ng") is None:
        sys.exit("bench_isolation needs stress-ng: apt-get install stress-ng")
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")
    os.environ[ENV_TAG] = f"bi{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="multikernel-bench-isolation-"))
    try:
        report(runtime.run(bench, root, args.rounds, args.seconds))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
