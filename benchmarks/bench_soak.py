"""Soak: honest RPC and pub/sub traffic while a hostile endpoint loops through every attack.

    .venv/bin/python benchmarks/bench_soak.py --minutes 5   # the attack phase lasts 5 minutes
    .venv/bin/python benchmarks/bench_soak.py --quick       # ~20 s, a smoke test

A hub (`python -m multikernel.bus`, its own process) serves an honest echo service (its own
process, tests/bus/peer.py) called back to back by this driver, and a publisher here that sends
64-byte messages at ~2,000/s to a subscriber here, which counts them. Three phases: before (quiet),
during (tests/security/hostile.py processes, one after another: a subscriber that stalls with a
backlog and is SIGKILLed, one that corrupts its session ring, an Introspect flood nobody reads, a
caller that reads no replies, a channel flood, a writer on its control socket, 60 idle sessions),
after (quiet again). Each honest call has a 2 s deadline; a call that fails or times out is an
error. The hub's RSS and open fds are sampled every 0.5 s.

Printed: per phase, honest calls, errors, p50/p99 latency, publications sent and received, the hub's
RSS and fds (min-max), and the attacks run. Targets: 0 honest errors, nothing lost, RSS and fds at
the end back where they started (flat, allowing the allocator's ~10% slack).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from multikernel.endpoints import Endpoint, connect, runtime

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "tests" / "bus" / "peer.py"
HOSTILE = ROOT / "tests" / "security" / "hostile.py"
KB = 1024


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    published: int = 0
    received: int = 0
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    attacks: int = 0


def hub_sample(pid: int, phase: Phase) -> None:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                phase.rss.append(int(line.split()[1]) // 1024)
    phase.fds.append(len(os.listdir(f"/proc/{pid}/fd")))


async def honest_calls(ep: Endpoint, state: dict[str, Phase]) -> None:
    while True:
        phase = state["now"]
        start = time.perf_counter()
        try:
            with anyio.fail_after(2):
                await ep.request("honest", "echo", b"x" * 64)
        except Exception:
            phase.errors += 1
            continue
        phase.latencies.append(time.perf_counter() - start)


async def honest_pubsub(
    pub: Endpoint, sub: Endpoint, state: dict[str, Phase], stop: anyio.Event
) -> None:
    async def receive() -> None:
        async with await sub.subscribe("soak.honest", max_pending=1 << 16) as messages:
            async for _ in messages:
                state["now"].received += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await anyio.sleep(0.1)  # subscribed before the first publication
        while not stop.is_set():
            await pub.publish("soak.honest", b"y" * 64)
            state["now"].published += 1
            await anyio.sleep(0.0005)


async def drain(stream: anyio.abc.ByteReceiveStream) -> None:
    async for _ in stream:
        pass


async def sampler(pid: int, state: dict[str, Phase]) -> None:
    while True:
        hub_sample(pid, state["now"])
        await anyio.sleep(0.5)


async def attack(path: Path, flood: Endpoint, mode: str, *args: str) -> None:
    """One hostile process through its attack; floods `flood` where the attack needs a backlog."""
    proc = await anyio.open_process(
        [sys.executable, str(HOSTILE), mode, str(path), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        with anyio.fail_after(30):
            await proc.stdout.receive()  # "ready"
        if mode in ("stall", "corrupt"):
            for _ in range(40):  # more than its 1 MiB ring takes: a backlog at the hub
                await flood.publish("soak.flood", b"z" * (60 * KB))
            if mode == "corrupt":
                await proc.stdin.send(b"go\n")
        await anyio.sleep(0.5)
        if mode == "sessions":
            await proc.stdin.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.aclose()


async def attacks(path: Path, flood: Endpoint, until: float, state: dict[str, Phase]) -> None:
    plan = [
        ("stall", "soak.flood"),
        ("corrupt", "soak.flood"),
        ("flood-introspect", "20000"),
        ("no-read", "honest", str(64 * KB), "64"),
        ("open-channels", "honest", "40"),
        ("scribble",),
        ("sessions", "60"),
    ]
    while time.monotonic() < until:
        for mode, *args in plan:
            await attack(path, flood, mode, *args)
            state["now"].attacks += 1
            if time.monotonic() >= until:
                return


def report(phases: list[Phase], counters: dict[str, int]) -> None:
    print(
        f"{'phase':<8} {'calls':>8} {'errors':>6} {'p50 µs':>8} {'p99 µs':>8} "
        f"{'pub':>8} {'recv':>8} {'lost':>5} {'hub RSS MiB':>12} {'hub fds':>9} {'attacks':>7}"
    )
    for p in phases:
        lat = sorted(p.latencies)
        p50 = statistics.median(lat) * 1e6 if lat else float("nan")
        p99 = lat[int(len(lat) * 0.99)] * 1e6 if lat else float("nan")
        rss = f"{min(p.rss)}-{max(p.rss)}" if p.rss else "-"
        fds = f"{min(p.fds)}-{max(p.fds)}" if p.fds else "-"
        print(
            f"{p.name:<8} {len(lat):>8} {p.errors:>6} {p50:>8.0f} {p99:>8.0f} "
            f"{p.published:>8} {p.received:>8} {p.published - p.received:>5} "
            f"{rss:>12} {fds:>9} {p.attacks:>7}"
        )
    published = sum(p.published for p in phases)
    received = sum(p.received for p in phases)
    print(
        f"honest totals: {sum(p.errors for p in phases)} failed calls, "
        f"{published - received} of {published} publications not received "
        "(per phase, a message counts where it was sent and where it arrived)"
    )
    print(
        f"hub counters: cut off {counters.get('cut_off', 0)}, dropped {counters.get('dropped')}, "
        f"errors {counters.get('errors')}, sessions {counters.get('sessions')}"
    )


async def main(quiet: float, attacking: float) -> None:
    with tempfile.TemporaryDirectory(prefix="mk-soak-") as tmp:
        path = Path(tmp) / "bus.sock"
        hub = await anyio.open_process(
            [sys.executable, "-m", "multikernel.bus", "--socket", str(path)],
            stderr=subprocess.PIPE,
        )
        server = None
        try:
            assert hub.stderr is not None
            said = b""
            with anyio.fail_after(30):
                while b"hub listening" not in said:
                    said += await hub.stderr.receive()
            server = await anyio.open_process(
                [sys.executable, str(PEER), "serve", str(path), "honest"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert server.stdout is not None
            with anyio.fail_after(30):
                await server.stdout.receive()  # ready
            phases = [Phase("before"), Phase("during"), Phase("after")]
            state = {"now": phases[0]}
            async with (
                connect(path, name="soak-caller") as caller,
                connect(path, name="soak-publisher") as pub,
                connect(path, name="soak-subscriber") as sub,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(drain, hub.stderr)  # its log: a full pipe would stall it
                tg.start_soon(sampler, hub.pid, state)
                tg.start_soon(honest_calls, caller, state)
                stop = anyio.Event()
                tg.start_soon(honest_pubsub, pub, sub, state, stop)
                await anyio.sleep(quiet)
                state["now"] = phases[1]
                await attacks(path, pub, time.monotonic() + attacking, state)
                state["now"] = phases[2]
                await anyio.sleep(quiet)
                stop.set()
                await anyio.sleep(0.5)  # the last publications arrive
                counters = (await caller.introspect()).counters
                tg.cancel_scope.cancel()
            report(phases, counters)
            alive = hub.returncode is None
            print(f"hub alive at the end: {alive}")
        finally:
            for proc in (server, hub):
                if proc is not None and proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(10):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                if proc is not None:
                    await proc.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="length of the attack phase")
    parser.add_argument("--quick", action="store_true", help="5 s phases: a smoke test")
    args = parser.parse_args()
    if args.quick:
        runtime.run(main, 5.0, 8.0)
    else:
        runtime.run(main, 20.0, args.minutes * 60)
