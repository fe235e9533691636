"""What callers see during a rolling upgrade (issue 16): failed calls and latency, before and
during each switch, and how long the names were held.

    python benchmarks/bench_upgrade.py [--rounds 3] [--rate 500] [--baseline 5] [--after 2]
                                       [--outliers 5] [--quick]

Each round runs a fresh host in this process (hub, resource, lifecycle and upgrade actors; no
fault actor), three KV instances at version 1, each serving `kv.<its name>`, and a caller (an
instance of its own) sending `put` to each name at `--rate` calls per second, each call a task of
its own through the retrying client, recording its start, duration, failure and retries. After a
1 s warm-up and a `--baseline` window, the three are upgraded to version 2 by one rollout with
`max_surge=1`; `--after` seconds later the caller stops. Windows (by each call's start):

- before: the baseline window;
- during switch: calls to an instance whose start falls between its upgrade's `freeze` event
  (before its names are held) and its `switch` done (names moved), from `mk.upgrade.<name>.*`;
- whole rollout: from the rollout request to the rollout's end;
- after: from the rollout's end to the caller's stop.

Per instance: how long its names were held (`held_ms` in the rollout status) and each step's
duration from the events' times. Targets: no failed call; p99 during the switch <= 50 ms. Then
each KV's final `count` must equal the puts the caller saw acknowledged (nothing lost or twice).
With `--rounds N`, the medians (min-max) over the rounds follow. Percentiles are nearest-rank;
the during-switch window holds only some 40-70 calls per round at the default rate, so its p99
is its worst call.

To say where the time goes, each round also prints each instance's CPUs, the hub's own view of
each hold (`mk.bus.holds.<name>`, timed here: the hub runs in this process), the slowest calls
with the upgrade step under way when they started, when each instance's held calls were answered
after the hub ended its hold, and stalls of this process's event loop (the hub's, shared with the
lifecycle actor) over 20 ms with the stack they were in.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _upgrade_kit import Interrupted, bench_host, make_caller, make_kv, owned

from multikernel.protocol import RolloutStatus, StartRollout, UpgradeEvent
from multikernel.services._signature import make_signing_key

STEPS = ("verify", "start", "freeze", "restore", "health", "switch", "drain")
WINDOWS = ("before", "during switch", "whole rollout", "after")
TARGET_P99_MS = 50.0
WARMUP = 1.0


@dataclass
class Window:
    calls: int = 0
    failed: int = 0
    retried: int = 0
    ms: list[float] = field(default_factory=list)

    def add(self, duration_ns: int, failed: int, retries: int) -> None:
        self.calls += 1
        self.failed += failed
        self.retried += retries > 0
        self.ms.append(duration_ns / 1e6)

    def pct(self, q: float) -> float:
        if not self.ms:
            return float("nan")
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class LoopWatch:
    """Notes when this process's event loop (the hub's and the lifecycle actor's) stalls for more
    than `limit` seconds: a thread samples the main thread's stack while the loop's heartbeat is
    late, so a stall here is told from one in the caller or an instance (other processes)."""

    def __init__(self, limit: float = 0.02) -> None:
        self.limit = limit
        self.beat = time.monotonic()
        self.stalls: list[tuple[int, float, str]] = []  # (wall ns at its start, ms, where)
        self._offset = time.time_ns() - time.monotonic_ns()
        self._main = threading.get_ident()
        self._done = threading.Event()

    async def run(self) -> None:
        thread = threading.Thread(target=self._watch, daemon=True)
        thread.start()
        try:
            while True:
                self.beat = time.monotonic()
                await anyio.sleep(0.002)
        finally:
            self._done.set()

    def _watch(self) -> None:
        began = 0.0
        where: list[str] = []
        while not self._done.wait(0.005):
            beat = self.beat
            if time.monotonic() - beat > self.limit:
                began = began or beat
                frame = sys._current_frames().get(self._main)
                where.append(_innermost(frame) if frame is not None else "?")
            elif began:
                common = max(set(where), key=where.count)
                self.stalls.append((self._offset + int(began * 1e9), (beat - began) * 1000, common))
                began, where = 0.0, []


def _innermost(frame: FrameType) -> str:
    """The innermost frames of a stack, inner first, as file:line function."""
    return " < ".join(
        f"{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in reversed(traceback.extract_stack(frame)[-4:])
    )


@dataclass
class Round:
    windows: dict[str, Window]
    held_ms: dict[str, float]  # instance -> names held, as the actor timed it
    hub_held_ms: dict[str, float]  # instance -> its name held, NameHeld to NameHoldEnded at the hub
    steps: dict[str, dict[str, float]]  # instance -> step -> ms
    counts: dict[str, tuple[int, int, int]]  # target -> (acked, final count, final version)
    rate: float  # calls per second the caller achieved, all targets
    caller_cpu: float  # share of a core the caller used
    busy: float  # share of the machine's CPUs busy during the round
    loadavg: str
    outcome: str
    slowest: list[str]  # the slowest calls, each with where the rollout was at its start
    slowest_switch: list[str]  # the slowest calls during a switch, timed from its events
    stalls: list[str]  # this process's event loop (the hub's) late by more than 20 ms
    cpus: dict[str, tuple[int, ...]]  # instance -> its CPUs


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def one_round(
    root: Path, keys: tuple[bytes, bytes], cert: Path, args: argparse.Namespace
) -> Round:
    tag = secrets.token_hex(2)
    instances = [f"{letter}-{tag}" for letter in "abc"]
    targets = [f"kv.{name}" for name in instances]
    v1, v2 = make_kv(root, keys, 1), make_kv(root, keys, 2)
    caller_image = make_caller(root, keys, targets, args.rate)
    events: list[UpgradeEvent] = []
    hub_holds: dict[tuple[str, str], int] = {}  # (name, held/ended) -> when the hub said so
    watch = LoopWatch()
    cpus: dict[str, tuple[int, ...]] = {}
    async with (
        bench_host(root, cert, placement=args.placement) as host,
        anyio.create_task_group() as watching,
    ):
        ep = host.ep
        for name, target in zip(instances, targets, strict=True):
            cpus[name] = (await host.bring_up(name, v1, target)).cpus
        caller = await host.bring_up(f"caller-{tag}", caller_image)
        cpus[caller.name] = caller.cpus
        watching.start_soon(watch.run)
        stats = f"instance.{caller.id}.stats"
        await owned(ep, stats)
        cpu0, wall0 = cpu_times(), time.monotonic()
        await anyio.sleep(WARMUP)
        begin = time.time_ns()
        await anyio.sleep(args.baseline)
        async with (
            await ep.subscribe("mk.upgrade.>") as updates,
            await ep.subscribe("mk.bus.holds.>") as holds,
            await ep.subscribe("mk.upgrades.*") as ends,
            anyio.create_task_group() as tg,
        ):

            async def collect() -> None:
                async for message in updates:
                    events.append(message.decode(UpgradeEvent))

            async def collect_holds() -> None:  # the hub is in this process: its own time
                async for message in holds:
                    kind = "ended" if "reason" in message.value() else "held"
                    hub_holds[(message.subject.removeprefix("mk.bus.holds."), kind)] = (
                        time.time_ns()
                    )

            tg.start_soon(collect)
            tg.start_soon(collect_holds)
            rollout_at = time.time_ns()
            started = await ep.request(
                "upgrade", "rollout", StartRollout(tuple(instances), str(v2), max_surge=1),
                response=RolloutStatus,
            )  # fmt: skip
            with anyio.fail_after(120):
                async for message in ends:
                    status = message.decode(RolloutStatus)
                    if status.rollout == started.rollout:
                        break
            await anyio.sleep(0.1)  # the last events, published before the status
            tg.cancel_scope.cancel()
        rollout_end = status.ended_ns or time.time_ns()
        await anyio.sleep(args.after)
        final = await ep.request(stats, "stop")
        cpu1, wall1 = cpu_times(), time.monotonic()
        records: list[list[int]] = []
        while len(records) < final["calls"]:
            records += await ep.request(stats, "records", len(records))
        counts = {}
        for i, target in enumerate(targets):
            count = await ep.request(target, "count")
            version = await ep.request(target, "version")
            counts[target] = (final["acked"][i], count, version)
        for info in await host.show():
            cpus.setdefault(info.name, info.cpus)
        watching.cancel_scope.cancel()

    by_name: dict[str, list[UpgradeEvent]] = {name: [] for name in instances}
    for event in sorted(events, key=lambda e: e.time_ns):
        if event.name in by_name:
            by_name[event.name].append(event)
    steps: dict[str, dict[str, float]] = {}
    switch: dict[int, tuple[int, int]] = {}  # target index -> (freeze, switched) ns
    for i, name in enumerate(instances):
        mine = by_name[name]
        first: dict[str, int] = {}
        for event in mine:
            first.setdefault(event.step, event.time_ns)
        ends_at = mine[-1].time_ns if mine else 0
        marks = [first.get(step, 0) for step in STEPS] + [ends_at]
        steps[name] = {
            step: (marks[k + 1] - marks[k]) / 1e6 if marks[k] and marks[k + 1] else float("nan")
            for k, step in enumerate(STEPS)
        }
        switched = max((e.time_ns for e in mine if e.step == "switch"), default=0)
        if "freeze" in first and switched:
            switch[i] = (first["freeze"], switched)

    phases = []  # (from ns, to ns, instance, step)
    for name in instances:
        mine = by_name[name]
        for event, following in itertools.pairwise(mine):
            phases.append((event.time_ns, following.time_ns, name, event.step))

    def where(start: int) -> str:
        found = {f"{name}:{step}" for t0, t1, name, step in phases if t0 <= start < t1}
        return ",".join(sorted(found)) or "-"

    slowest = [
        f"{duration / 1e6:7.1f} ms {targets[index]:<10} at {(start - rollout_at) / 1e6:+8.0f} ms "
        f"(rollout: {where(start)}) retries {retries} failed {failed}"
        for index, start, duration, failed, retries in sorted(
            (r for r in records if r[1] >= begin), key=lambda r: -r[2]
        )[: args.outliers]
    ]
    in_switch = [
        r for r in records if r[0] in switch and switch[r[0]][0] <= r[1] <= switch[r[0]][1]
    ]
    slowest_switch = [
        f"{duration / 1e6:7.1f} ms {targets[index]:<10} started freeze+"
        f"{(start - switch[index][0]) / 1e6:.1f} ms, answered switched"
        f"{(start + duration - switch[index][1]) / 1e6:+.1f} ms, hub's hold end"
        f"{(start + duration - hub_holds.get((targets[index], 'ended'), 0)) / 1e6:+.1f} ms; "
        f"retries {retries}"
        for index, start, duration, _, retries in sorted(in_switch, key=lambda r: -r[2])[:3]
    ]
    released = []  # per instance: when its held calls were answered, from the hub's hold end
    for index, target in enumerate(targets):
        end = hub_holds.get((target, "ended"), 0)
        held = sorted(
            (r[1] + r[2] - end) / 1e6
            for r in in_switch
            if r[0] == index and end and r[1] < end and r[1] + r[2] > end
        )
        if held:
            released.append(
                f"{instances[index]}: {len(held)} held calls answered {held[0]:+.1f} .. "
                f"{held[-1]:+.1f} ms after the hub's hold end"
            )
    stalls = [
        f"{ms:7.1f} ms at {(start - rollout_at) / 1e6:+8.0f} ms (rollout: {where(start)}) in {at}"
        for start, ms, at in sorted(watch.stalls, key=lambda s: -s[1])
        if start >= begin
    ]
    windows = {name: Window() for name in WINDOWS}
    for index, start, duration, failed, retries in records:
        if start < begin:
            continue  # the warm-up
        if start < rollout_at:
            windows["before"].add(duration, failed, retries)
        elif start <= rollout_end:
            windows["whole rollout"].add(duration, failed, retries)
        else:
            windows["after"].add(duration, failed, retries)
        if index in switch and switch[index][0] <= start <= switch[index][1]:
            windows["during switch"].add(duration, failed, retries)
    busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1)
    hub_held = {
        name: (hub_holds.get((t, "ended"), 0) - hub_holds.get((t, "held"), 0)) / 1e6
        for name, t in zip(instances, targets, strict=True)
    }
    return Round(
        windows=windows,
        held_ms={i.name: i.held_ms for i in status.instances},
        hub_held_ms=hub_held,
        steps=steps,
        counts=counts,
        rate=len(records) / (wall1 - wall0),
        caller_cpu=final["cpu_s"] / (wall1 - wall0),
        busy=busy,
        loadavg=loadavg(),
        outcome=status.outcome + (f" ({status.error})" if status.error else ""),
        slowest=slowest,
        slowest_switch=slowest_switch + released,
        stalls=stalls,
        cpus=cpus,
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_round(number: int, r: Round) -> None:
    print(
        f"\nround {number}: rollout {r.outcome}; caller {r.rate:.0f} calls/s, "
        f"{r.caller_cpu:.0%} of a core; machine {r.busy:.0%} busy; loadavg {r.loadavg}"
    )
    print(f"  {'window':<14} {'calls':>6} {'failed':>6} {'retried':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")  # fmt: skip
    for name, w in r.windows.items():
        print(
            f"  {name:<14} {w.calls:>6} {w.failed:>6} {w.retried:>7} "
            f"{w.pct(0.5):>7.2f} {w.pct(0.99):>7.2f} {max(w.ms, default=float('nan')):>7.2f}"
        )
    print(f"  {'instance':<14} {'held ms':>7} {'at hub':>7} " + " ".join(f"{s:>7}" for s in STEPS))
    for name, held in r.held_ms.items():
        durations = " ".join(f"{r.steps[name][s]:>7.1f}" for s in STEPS)
        print(f"  {name:<14} {held:>7.1f} {r.hub_held_ms[name]:>7.1f} {durations}")
    print("  acked vs count: " + ", ".join(
        f"{t} {a}/{c} v{v} {'ok' if a == c else 'DIFFERS'}" for t, (a, c, v) in r.counts.items()
    ))  # fmt: skip
    failed = sum(w.failed for w in r.windows.values())
    p99 = r.windows["during switch"].pct(0.99)
    print(
        f"  targets: failed == 0: {failed} {verdict(failed == 0)}; "
        f"p99 during switch <= {TARGET_P99_MS:g} ms: {p99:.2f} {verdict(p99 <= TARGET_P99_MS)}"
    )
    print("  CPUs: " + ", ".join(f"{n} {list(c)}" for n, c in r.cpus.items()))
    if r.slowest:
        print("  slowest calls (start from the rollout request; the upgrade step then):")
        for line in r.slowest:
            print("   " + line)
    if r.slowest_switch:
        print("  slowest calls during a switch (freeze: its event; switched: names moved):")
        for line in r.slowest_switch:
            print("   " + line)
    print(f"  hub loop stalls > 20 ms: {len(r.stalls)}")
    for line in r.stalls[:5]:
        print("   " + line)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def print_medians(rounds: list[Round]) -> None:
    print(f"\nmedians (min-max) over {len(rounds)} rounds (failed, retried: totals)")
    print(f"  {'window':<14} {'calls':>6} {'failed':>6} {'retried':>7} "
          f"{'p50 ms':>18} {'p99 ms':>18} {'max ms':>20}")  # fmt: skip
    for name in WINDOWS:
        ws = [r.windows[name] for r in rounds]
        print(
            f"  {name:<14} {statistics.median(w.calls for w in ws):>6.0f} "
            f"{sum(w.failed for w in ws):>6} {sum(w.retried for w in ws):>7} "
            f"{spread([w.pct(0.5) for w in ws]):>18} {spread([w.pct(0.99) for w in ws]):>18} "
            f"{spread([max(w.ms, default=float('nan')) for w in ws]):>20}"
        )
    print(f"  {'instance':<14} {'held ms':>7} {'at hub':>7} " + " ".join(f"{s:>7}" for s in STEPS))
    for position in range(3):
        held = statistics.median(list(r.held_ms.values())[position] for r in rounds)
        at_hub = statistics.median(list(r.hub_held_ms.values())[position] for r in rounds)
        durations = " ".join(
            f"{statistics.median(list(r.steps.values())[position][s] for r in rounds):>7.1f}"
            for s in STEPS
        )
        print(f"  {'abc'[position] + ' (median)':<14} {held:>7.1f} {at_hub:>7.1f} {durations}")
    failed = sum(w.failed for r in rounds for w in r.windows.values())
    lost = sum(a != c for r in rounds for a, c, _ in r.counts.values())
    p99 = statistics.median(r.windows["during switch"].pct(0.99) for r in rounds)
    print(
        f"  targets: failed == 0: {failed} {verdict(failed == 0)}; acked == count: "
        f"{verdict(lost == 0)}; median p99 during switch <= {TARGET_P99_MS:g} ms: {p99:.2f} "
        f"{verdict(p99 <= TARGET_P99_MS)}"
    )


async def main(args: argparse.Namespace) -> None:
    keys = make_signing_key("bench upgrade", algorithm="ec-p256")
    print(
        f"rolling upgrade of 3 KV instances (max_surge=1) under {args.rate:g} puts/s per name; "
        f"baseline {args.baseline:g} s, after {args.after:g} s; placement {args.placement}; "
        f"loadavg {loadavg()}"
    )
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        root = Path(tempfile.mkdtemp(prefix="mk-bench-upgrade-"))
        try:
            cert = root / "cert.pem"
            cert.write_bytes(keys[1])
            result = await one_round(root, keys, cert, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rounds.append(result)
        print_round(number, result)
    if len(rounds) > 1:
        print_medians(rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate", type=float, default=500.0, help="puts per second per name")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds before the rollout")
    parser.add_argument("--after", type=float, default=2.0, help="seconds after the rollout")
    parser.add_argument(
        "--placement",
        default="pack",
        help="the resource actor's: pack (the host's default), spread",
    )
    parser.add_argument("--outliers", type=int, default=5, help="slowest calls to show")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s baseline, 0.5 s after")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.baseline, args.after = 1, 1.0, 0.5
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")  # the actors' and agents' logs
    try:
        anyio.run(main, args, backend_options={"use_uvloop": True})
    except (KeyboardInterrupt, Interrupted):
        sys.exit("interrupted: the host and its instances were stopped")
