"""RPC through the bus with guests: host <-> guest and guest <-> guest (QEMU, ivshmem), next to
the same RPC between two local processes, in the same run (issue 17).

One hub (this process) and a `qemu` platform on it, as a host has. Two guests boot our agent
(the `qemu` image, cached per user; `-accel tcg -smp 1 -m 256`, pinned to CPUs 0 and 1), each
with a workload attached over its own session channel in its ivshmem memory: guest `a` serves
`svc.a.echo`, guest `b` calls it on request. Two local processes (attached on sockets bound to
an instance, as a local instance's workload is) do the same: `lo1` serves `svc.lo1.echo`, `lo2`
calls it. Every call from or to a guest goes through the hub's relay (docs/bus.md, "Sessions
over a region"); between the local processes the channel is direct, as always.

Guests run in polling mode (the hub polls their session channels), then, after a reboot of
both, in interrupt mode (a guest rings the hub through its doorbell register after a send that
finds the hub's reader asleep, and the hub sleeps on the eventfd QEMU writes:
`LaunchSpec.interrupts`). In each mode, each round (A B C, `--rounds` of them) times `--calls`
echo calls of `--size` bytes, after a tenth as many to warm up: host -> guest a (from this
process), guest b -> guest a (timed in guest b with `perf_counter_ns`), lo2 -> lo1 (timed in
lo2). Prints the boot time of each guest (QEMU started -> its agent attached), the CPU time
the hub and the two QEMUs use in `--idle` seconds with nothing called, then per set-up
the median over rounds of p50 and p99 (min-max) in microseconds, their ratio to local <-> local
measured in the same round, the host's CPU idle share during the round (/proc/stat: other load
shows there) and this process's CPU time (the hub: it relays every call of a guest, and polls
the guests' session channels in polling mode). Asserts nothing.

Usage: ``python benchmarks/bench_qemu_rpc.py [--quick] [--rounds N] [--calls N] [--size B]
[--modes polling,interrupts]``.
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
from multikernel.endpoints import Subscription, connect
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
from multikernel.endpoints import Subscription, connect
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


def cpu_time(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats(times_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(times_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) / 1e3, p99 / 1e3


def idle_share() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


async def wait_ready(ready: Subscription, names: set[str]) -> None:
    with anyio.fail_after(300):
        async for message in ready:
            names.discard(message.decode(bytes).decode())
            if not names:
                return


def guest_spec(name: str, instance: int, cpu: int, argv: list[str], interrupts: bool) -> LaunchSpec:
    env = {
        "MULTIKERNEL_INSTANCE": str(instance),
        "MULTIKERNEL_INSTANCE_NAME": name,
        "MULTIKERNEL_WORKLOAD": json.dumps(["/bin/python3", "-c", PEER, *argv]),
        "MULTIKERNEL_LOAD_PERIOD": "0",
        "PATH": "/bin",
    }
    agent = ["/bin/python3", "-m", "multikernel.services.agent"]
    return LaunchSpec(
        name, instance, agent, env, (), Resources(frozenset({cpu}), 256 << 20), platform="qemu",
        interrupts=interrupts,
    )  # fmt: skip


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
            await wait_ready(ready, {"lo1", "lo2"})
            warmup = max(1, args.calls // 10)
            ask = json.dumps({"calls": args.calls, "warmup": warmup, "size": args.size}).encode()
            rows: dict[str, list[tuple[float, float, float, float, float]]] = {}

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

            for mode in args.modes.split(","):
                guests = []
                for name, instance, cpu, argv in (
                    ("a", 1, cpus[0], ["serve", "a"]),
                    ("b", 2, cpus[-1], ["call", "b", "a"]),
                ):
                    started = time.monotonic()
                    launch = guest_spec(name, instance, cpu, argv, mode == "interrupts")
                    guests.append(await qemu.launch(launch))
                    print(f"{mode}: boot -> agent attached, guest {name}: "
                          f"{time.monotonic() - started:.1f} s")  # fmt: skip
                await wait_ready(ready, {"a", "b"})
                cpu0, qemu0 = time.process_time(), sum(cpu_time(g.pid) for g in guests)
                await anyio.sleep(args.idle)  # what idle guests cost: nothing is called
                print(
                    f"{mode}: {args.idle:g} s idle (agents beating each second): hub CPU "
                    f"{time.process_time() - cpu0:.2f} s, the two QEMUs "
                    f"{sum(cpu_time(g.pid) for g in guests) - qemu0:.2f} s"
                )
                for _ in range(args.rounds):
                    round_rows = {}
                    for label, measure in (
                        (f"host <-> guest, {mode}", host_to_guest),
                        (f"guest <-> guest, {mode}", lambda: remote("b")),
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
                for guest in guests:
                    await qemu.reclaim(guest)
            print(
                f"{args.calls} calls of {args.size} B per set-up and round, {args.rounds} rounds"
                " per mode (medians over rounds, min-max in brackets; x local: p50 over the"
                " local p50 of the same round):"
            )
            print(f"{'set-up':<28} {'p50 us':>20} {'p99 us':>22} {'x local':>7} "
                  f"{'idle':>5} {'hub cpu s':>9}")  # fmt: skip
            for label, values in rows.items():
                p50s, p99s, ratios, idles, cpus_ = zip(*values, strict=True)
                print(
                    f"{label:<28} {statistics.median(p50s):>7.0f} [{min(p50s):.0f}-{max(p50s):.0f}]"
                    f" {statistics.median(p99s):>8.0f} [{min(p99s):.0f}-{max(p99s):.0f}]"
                    f" {statistics.median(ratios):>7.1f} {statistics.median(idles):>5.0%}"
                    f" {statistics.median(cpus_):>9.2f}"
                )
            for proc in locals_:
                proc.kill()
                await proc.wait()
        tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 50 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle guests timed")
    parser.add_argument(
        "--modes", default="polling,interrupts", help="guest modes, in order (comma-separated)"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls, args.idle = 2, 50, 2.0
    anyio.run(run, args)


if __name__ == "__main__":
    main()
