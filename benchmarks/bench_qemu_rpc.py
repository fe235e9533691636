"""RPC through the bus with guests: host <-> guest and guest <-> guest (QEMU, ivshmem), next to
the same RPC between two local processes, in the same run (issue 17).

One hub (this process) and a `qemu` platform on it, as a host has. Two guests boot our agent
(the `qemu` image, cached per user; `-accel tcg -smp 1 -m 256`, pinned to CPUs 0 and 1), each
with a workload attached over its own session channel in its ivshmem memory: guest `a` serves
`svc.a.echo`, guest `b` calls it on request. Two local processes (attached on sockets bound to
an instance, as a local instance's workload is) do the same: `lo1` serves `svc.lo1.echo`, `lo2`
calls it. Every call from or to a guest goes through the hub's relay (docs/bus.md, "Sessions
over a region"); between the local processes the channel is direct, as always.

Each round (A B C, `--rounds` of them) times `--calls` echo calls of `--size` bytes, after a
tenth as many to warm up: host -> guest a (from this process), guest b -> guest a (timed in guest
b with `perf_counter_ns`), lo2 -> lo1 (timed in lo2). Prints the boot time of each guest (QEMU
started -> its agent attached), then per set-up the median over rounds of p50 and p99 (min-max)
in microseconds, their ratio to local <-> local measured in the same round, the host's CPU idle
share during the round (/proc/stat: other load shows there) and this process's CPU time (the hub
polls every guest session). Asserts nothing.

Usage: ``python benchmarks/bench_qemu_rpc.py [--quick] [--rounds N] [--calls N] [--size B]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.services._platform import LaunchSpec, Resources
from multikernel.services._qemu_platform import QemuPlatform

POLICY = """
[[rule]]
who = "*"
own = ["svc.>"]
call = ["svc.>"]
publish = ["bench.>"]
subscribe = ["bench.>"]
"""

#: The workload of every peer: `serve NAME` or `call NAME TARGET` (on `bench.go.NAME` with
#: {"calls", "warmup", "size"}, times that many calls and answers on `bench.done.NAME`).
PEER = """\
import json, sys, time
import anyio
from multikernel.endpoints import connect
from multikernel.protocol import NoRespondersError

async def main(role, name, target=""):
    async with connect(name=name) as ep:
        if role == "serve":
            svc = ep.service("svc." + name)

            @svc.method
            async def echo(data: bytes) -> bytes:
                return data

            await svc.start()
            await ep.publish("bench.ready", name.encode())
            await anyio.sleep_forever()
        async with await ep.subscribe("bench.go." + name) as go:
            await ep.publish("bench.ready", name.encode())
            async for message in go:
                ask = json.loads(message.decode(bytes))
                body = b"x" * ask["size"]
                times = []
                for n in range(ask["warmup"] + ask["calls"]):
                    start = time.perf_counter_ns()
                    while True:
                        try:
                            await ep.request("svc." + target, "echo", body)
                            break
                        except NoRespondersError:
                            await anyio.sleep(0.1)
                    if n >= ask["warmup"]:
                        times.append(time.perf_counter_ns() - start)
                await ep.publish("bench.done." + name, json.dumps(times).encode())

anyio.run(main, *sys.argv[1:])
"""


def stats(times_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(times_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) / 1e3, p99 / 1e3


def idle_share() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def guest_spec(name: str, instance: int, cpu: int, argv: list[str]) -> LaunchSpec:
    env = {
        "MULTIKERNEL_INSTANCE": str(instance),
        "MULTIKERNEL_INSTANCE_NAME": name,
        "MULTIKERNEL_WORKLOAD": json.dumps(["/bin/python3", "-c", PEER, *argv]),
        "MULTIKERNEL_LOAD_PERIOD": "0",
        "PATH": "/bin",
    }
    agent = ["/bin/python3", "-m", "multikernel.services.agent"]
    return LaunchSpec(
        name, instance, agent, env, (), Resources(frozenset({cpu}), 256 << 20), platform="qemu"
    )


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-qemu-rpc-"))
    hub = Hub(workdir / "bus.sock", policy=Policy.from_toml(POLICY))
    cpus = sorted(os.sched_getaffinity(0))
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with (
            QemuPlatform(serve_region=hub.serve_region) as qemu,
            connect(hub.path, name="bench") as host,
            await host.subscribe("bench.ready") as ready,
            await host.subscribe("bench.done.>") as done,
        ):
            boots = {}
            guests = []
            for name, instance, cpu, argv in (
                ("a", 1, cpus[0], ["serve", "a"]),
                ("b", 2, cpus[-1], ["call", "b", "a"]),
            ):
                started = time.monotonic()
                guests.append(await qemu.launch(guest_spec(name, instance, cpu, argv)))
                boots[name] = time.monotonic() - started
            locals_ = []
            for instance, cpu, argv in (
                (3, cpus[0], ["serve", "lo1"]),
                (4, cpus[-1], ["call", "lo2", "lo1"]),
            ):
                sock = hub.open_instance_socket(instance)
                env = {**os.environ, "MULTIKERNEL_BUS_FD": str(sock.fileno())}
                proc = await anyio.open_process(
                    [sys.executable, "-c", PEER, *argv], env=env, pass_fds=[sock.fileno()]
                )
                sock.close()
                os.sched_setaffinity(proc.pid, {cpu})
                locals_.append(proc)
            with anyio.fail_after(300):
                names = set()
                async for message in ready:
                    names.add(message.decode(bytes).decode())
                    if names == {"a", "b", "lo1", "lo2"}:
                        break
            print(f"boot -> agent attached: a {boots['a']:.1f} s, b {boots['b']:.1f} s")
            warmup = max(1, args.calls // 10)
            ask = json.dumps({"calls": args.calls, "warmup": warmup, "size": args.size}).encode()
            rows: dict[str, list[tuple[float, float, float, float]]] = {}

            async def host_to_guest() -> list[int]:
                body = b"x" * args.size
                times = []
                for n in range(warmup + args.calls):
                    start = time.perf_counter_ns()
                    await host.request("svc.a", "echo", body)
                    if n >= warmup:
                        times.append(time.perf_counter_ns() - start)
                return times

            async def remote(caller: str) -> list[int]:
                await host.publish(f"bench.go.{caller}", ask)
                with anyio.fail_after(600):
                    message = await done.__anext__()
                times: list[int] = json.loads(message.decode(bytes))
                return times

            for _ in range(args.rounds):
                round_rows = {}
                for label, measure in (
                    ("host <-> guest", host_to_guest),
                    ("guest <-> guest", lambda: remote("b")),
                    ("local <-> local", lambda: remote("lo2")),
                ):
                    idle0, total0 = idle_share()
                    cpu0 = time.process_time()
                    p50, p99 = stats(await measure())
                    idle1, total1 = idle_share()
                    idle = (idle1 - idle0) / max(1, total1 - total0)
                    round_rows[label] = (p50, p99, idle, time.process_time() - cpu0)
                base = round_rows["local <-> local"][0]
                for label, (p50, p99, idle, cpu) in round_rows.items():
                    rows.setdefault(label, []).append((p50, p99, p50 / base, idle, cpu))
            print(
                f"{args.calls} calls of {args.size} B per set-up and round, {args.rounds} rounds"
                " (medians over rounds, min-max in brackets):"
            )
            print(f"{'set-up':<16} {'p50 us':>22} {'p99 us':>24} {'x local':>7} "
                  f"{'idle':>5} {'hub cpu s':>9}")  # fmt: skip
            for label, values in rows.items():
                p50s, p99s, ratios, idles, cpus_ = zip(*values, strict=True)
                print(
                    f"{label:<16} {statistics.median(p50s):>8.0f} [{min(p50s):.0f}-{max(p50s):.0f}]"
                    f" {statistics.median(p99s):>9.0f} [{min(p99s):.0f}-{max(p99s):.0f}]"
                    f" {statistics.median(ratios):>7.1f} {statistics.median(idles):>5.0%}"
                    f" {statistics.median(cpus_):>9.2f}"
                )
            for proc in locals_:
                proc.kill()
                await proc.wait()
            for guest in guests:
                await qemu.reclaim(guest)
        tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 50 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 50
    anyio.run(run, args)


if __name__ == "__main__":
    main()
