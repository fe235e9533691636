"""Transport benchmark (issue 2): our shared-memory channel against what users would pick instead.

    .venv/bin/python benchmarks/bench_transport.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_transport.py --quick    # smoke test, ~30 s
    .venv/bin/python benchmarks/bench_transport.py --only ring,os-pipe,eventfd

Two processes, pinned to different CPUs when there are two: this script as the driver and a peer
(the same script with --peer, started with subprocess; multiprocessing.Queue needs a spawn child).
Interleaved rounds (every transport once per round, in the same order), medians with min-max over
rounds, ratios computed within each round. Each phase warms up for its first 10% before timing.
Measured per transport and round:

- round trip of a 64-byte message, p50/p99: "active" (back to back) and "asleep" (a gap of a few
  ms before each request, so the echo side has gone to sleep and the doorbell path is measured;
  a plain eventfd ping-pong between the same two processes is the reference, and for (c) also
  that ping-pong awaited under uvloop, the mechanism (c) itself sleeps on);
- one-way throughput driver -> peer, 64 B and 4 KiB, per message and batched (where the transport
  has a batch form);
- CPU time per message of each process (time.process_time, all threads), the idle CPU of a
  waiting ring endpoint, and how much CPU other work used meanwhile (/proc/stat), to flag noise.

Transports: (a) the ring, raw bytes, sync API; (b) the ring carrying a msgspec Struct, encoded and
typed-decoded on each side; (c) the ring's async API under uvloop; the eventfd references;
multiprocessing.Pipe and Queue; os.pipe with a length prefix and buffered parsing; pyzmq PAIR over
ipc://; an asyncio Unix stream socket under uvloop; iceoryx2 publish/subscribe, busy polling.
Nothing is left behind: peers die with the driver (PR_SET_PDEATHSIG) and are killed on error,
every phase has a deadline, iceoryx2 runs in a private file prefix that is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _transport_kinds import KIND_BY_KEY, KINDS, Created, Kind, MpQueue, attach, attach_unix, create
from _transport_kinds import make_workdir as _make_workdir
from _transport_loops import (
    driver_phase,
    driver_phase_async,
    peer_phase,
    peer_phase_async,
)

NOISY_SHARE = 0.25  # other load above this share of all CPUs flags a round as noisy
ASLEEP_TOLERANCE = 1.10  # "adds nothing measurable": within 10% of plain eventfd
STARTUP_TIMEOUT = 30.0


# -- the plan --------------------------------------------------------------------------------


def make_plan(quick: bool) -> list[dict[str, Any]]:
    s = 0.25 if quick else 1.0
    return [
        {"kind": "rtt", "name": "rtt-active", "size": 64, "gap": 0.0, "dur": 0.4 * s},
        {"kind": "stream", "name": "stream-64", "size": 64, "batch": 1, "dur": 0.3 * s},
        {"kind": "stream", "name": "stream-64-batch", "size": 64, "batch": 256, "dur": 0.3 * s},
        {"kind": "stream", "name": "stream-4k", "size": 4096, "batch": 1, "dur": 0.3 * s},
        {"kind": "stream", "name": "stream-4k-batch", "size": 4096, "batch": 32, "dur": 0.3 * s},
        {"kind": "rtt", "name": "rtt-asleep", "size": 64, "gap": 0.002, "dur": 0.8 * s},
        {"kind": "idle", "name": "idle", "dur": 1.0 * s},
    ]


def phases_for(kind: Kind, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ph in plan:
        if kind.rtt_only and ph["kind"] != "rtt":
            continue
        if ph["kind"] == "stream" and ph["batch"] > 1 and not kind.batch:
            continue
        if ph["kind"] == "idle" and not kind.idle:
            continue
        out.append(ph)
    return out


def phase_deadline(ph: dict[str, Any]) -> float:
    return 3 * ph["dur"] + 20.0


# -- both processes: deadlines, pinning --------------------------------------------------------


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("a benchmark phase ran past its deadline")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound blocking waits in synchronous code: SIGALRM interrupts the syscall and raises."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(3)


def run_anyio(fn: Callable[..., Any], *args: Any) -> Any:
    import anyio

    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


# -- the peer -----------------------------------------------------------------------------------


def peer_main(key: str, argument: str, plan: list[dict[str, Any]], cpu: int | None) -> int:
    die_with_parent()
    pin(cpu)
    kind = KIND_BY_KEY[key]
    if kind.is_async:
        outcome = run_anyio(_peer_async, kind, argument, plan)
    else:
        t = attach(kind, argument)
        try:
            print("READY", flush=True)
            c0 = time.process_time()
            results = []
            for ph in plan:
                with deadline(phase_deadline(ph)):
                    results.append(_with_stats(t, lambda ph=ph: peer_phase(t, ph, kind.typed)))
            outcome = {"phases": results, "cpu": time.process_time() - c0}
        finally:
            t.close()
    print("RESULT " + json.dumps(outcome), flush=True)
    return 0


async def _peer_async(kind: Kind, argument: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    import anyio

    t = await attach_unix(argument) if kind.key == "unix" else attach(kind, argument)
    try:
        print("READY", flush=True)
        c0 = time.process_time()
        results = []
        for ph in plan:
            with anyio.fail_after(phase_deadline(ph)):
                results.append(await _with_stats_async(t, peer_phase_async(t, ph)))
        return {"phases": results, "cpu": time.process_time() - c0}
    finally:
        t.close()


def mp_queue_peer(
    down: Any, up: Any, plan: list[dict[str, Any]], cpu: int | None, out: Any
) -> None:
    """The peer of multiprocessing.Queue, a spawn child (a Queue cannot be handed to subprocess)."""
    die_with_parent()
    pin(cpu)
    t = MpQueue(up, down)
    try:
        out.send("READY")
        c0 = time.process_time()
        results = []
        for ph in plan:
            with deadline(phase_deadline(ph)):
                results.append(peer_phase(t, ph, typed=False))
        out.send({"phases": results, "cpu": time.process_time() - c0})
    finally:
        t.close()
        out.close()


def _with_stats(t: Any, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    before = t.stats() if hasattr(t, "stats") else None
    result = run()
    if before is not None:
        after = t.stats()
        result["ring"] = {k: after[k] - before[k] for k in after}
    return result


async def _with_stats_async(t: Any, run: Any) -> dict[str, Any]:
    before = t.stats() if hasattr(t, "stats") else None
    result: dict[str, Any] = await run
    if before is not None:
        after = t.stats()
        result["ring"] = {k: after[k] - before[k] for k in after}
    return result


# -- the driver: one block = one transport in one round --------------------------------------


def cpu_jiffies() -> int:
    """Busy jiffies of all CPUs since boot (steal counts as busy: someone else's time)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


class Watchdog:
    """Last resort if a block hangs where no alarm reaches (e.g. inside a library's C loop)."""

    def __init__(self, seconds: float, kill: Callable[[], None], cleanup: Callable[[], None]):
        self._kill = kill
        self._cleanup = cleanup
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        print("\nwatchdog: a benchmark block hung; killing the peer", file=sys.stderr, flush=True)
        self._kill()
        time.sleep(15)
        print("watchdog: still stuck; cleaning up and exiting", file=sys.stderr, flush=True)
        self._cleanup()
        os._exit(2)

    def cancel(self) -> None:
        self._timer.cancel()


def expect_ready(proc: subprocess.Popen[str]) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT)
    if not ready:
        raise TimeoutError("the peer did not start in time")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"the peer did not report READY (said {line!r})")


def peer_outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=STARTUP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"the peer exited with {proc.returncode}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("the peer reported no result")
    outcome: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return outcome


def run_block(
    kind: Kind,
    plan: list[dict[str, Any]],
    cpus: tuple[int | None, int | None],
    workdir: Path,
) -> dict[str, Any]:
    """Run every phase of `plan` over `kind` between this process and a fresh peer."""
    if kind.spawn_mp:
        return _run_block_mp_queue(plan, cpus)
    created = create(kind, workdir)
    with tempfile.TemporaryFile(mode="w+") as err:
        return _run_block_subprocess(kind, plan, cpus, workdir, created, err)


def _run_block_subprocess(
    kind: Kind,
    plan: list[dict[str, Any]],
    cpus: tuple[int | None, int | None],
    workdir: Path,
    created: Created,
    err: Any,
) -> dict[str, Any]:
    proc: subprocess.Popen[str] | None = None
    watchdog = None
    try:
        cmd = [sys.executable, __file__, "--peer", kind.key, "--arg", created.argument]
        cmd += ["--plan", json.dumps(plan)]
        if cpus[1] is not None:
            cmd += ["--cpu", str(cpus[1])]
        proc = subprocess.Popen(
            cmd, pass_fds=created.pass_fds, stdout=subprocess.PIPE, stderr=err, text=True
        )
        for close in created.after_spawn:
            close()
        budget = sum(phase_deadline(ph) for ph in plan) + 2 * STARTUP_TIMEOUT
        watchdog = Watchdog(budget, proc.kill, lambda: _cleanup_all(created.cleanup, workdir))
        expect_ready(proc)
        jiffies0, c0, w0 = cpu_jiffies(), time.process_time(), time.perf_counter()
        if kind.is_async:
            results = run_anyio(_driver_async, created.open, plan)
        else:
            t = created.open()
            try:
                results = []
                for ph in plan:
                    with deadline(phase_deadline(ph)):
                        results.append(
                            _with_stats(t, lambda ph=ph: driver_phase(t, ph, kind.typed))
                        )
            finally:
                t.close()
        jiffies1, c1, w1 = cpu_jiffies(), time.process_time(), time.perf_counter()
        peer = peer_outcome(proc)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        err.seek(0)
        sys.stderr.write(f"--- peer of {kind.key} said:\n{err.read()}---\n")
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        _cleanup_all(created.cleanup, None)
    return _block_result(results, peer, jiffies1 - jiffies0, c1 - c0, w1 - w0)


def _run_block_mp_queue(
    plan: list[dict[str, Any]], cpus: tuple[int | None, int | None]
) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    down, up = ctx.Queue(), ctx.Queue()
    result_r, result_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=mp_queue_peer, args=(down, up, plan, cpus[1], result_w))
    t = MpQueue(down, up)
    try:
        proc.start()
        result_w.close()
        if not result_r.poll(STARTUP_TIMEOUT) or result_r.recv() != "READY":
            raise RuntimeError("the multiprocessing.Queue peer did not start")
        jiffies0, c0, w0 = cpu_jiffies(), time.process_time(), time.perf_counter()
        results = []
        for ph in plan:
            with deadline(phase_deadline(ph)):
                results.append(driver_phase(t, ph, typed=False))
        jiffies1, c1, w1 = cpu_jiffies(), time.process_time(), time.perf_counter()
        if not result_r.poll(STARTUP_TIMEOUT):
            raise TimeoutError("the multiprocessing.Queue peer did not report")
        peer = result_r.recv()
        proc.join(STARTUP_TIMEOUT)
    finally:
        if proc.is_alive():
            proc.kill()
        if proc.pid is not None:
            proc.join()
            proc.close()
        t.close()
        result_r.close()
        result_w.close()
    return _block_result(results, peer, jiffies1 - jiffies0, c1 - c0, w1 - w0)


async def _driver_async(open_transport: Callable[[], Any], plan: list[dict[str, Any]]) -> Any:
    import inspect

    import anyio

    t = open_transport()
    if inspect.isawaitable(t):
        t = await t
    try:
        results = []
        for ph in plan:
            with anyio.fail_after(phase_deadline(ph)):
                results.append(await _with_stats_async(t, driver_phase_async(t, ph)))
        return results
    finally:
        t.close()


def _cleanup_all(steps: list[Callable[[], None]], workdir: Path | None) -> None:
    for step in steps:
        try:
            step()
        except Exception as exc:  # keep cleaning up; say what failed
            print(f"cleanup: {step!r} failed: {exc!r}", file=sys.stderr)
    if workdir is not None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _block_result(
    driver: list[dict[str, Any]], peer: dict[str, Any], jiffies: int, cpu: float, wall: float
) -> dict[str, Any]:
    busy = jiffies / os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    other = max(0.0, busy - cpu - peer["cpu"]) / (ncpu * wall)
    return {"driver": driver, "peer": peer["phases"], "other": other}


# -- statistics and tables ---------------------------------------------------------------------


def med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{num(statistics.median(values))} ({num(min(values))}-{num(max(values))})"


class Results:
    """Per (transport, phase): one dict per round, merged from the driver and the peer."""

    def __init__(self, kinds: list[Kind], rounds: int) -> None:
        self.kinds = kinds
        self.rounds = rounds
        self.data: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        self.other: dict[str, dict[int, float]] = defaultdict(dict)

    def add(self, kind: Kind, rnd: int, plan: list[dict[str, Any]], block: dict[str, Any]):
        for ph, d, p in zip(plan, block["driver"], block["peer"], strict=True):
            if ph["kind"] == "stream" and d["n"] != p["n"]:
                raise RuntimeError(
                    f"{kind.key} {ph['name']}: sent {d['n']} frames, received {p['n']}"
                )
        self.other[kind.key][rnd] = block["other"]
        for ph, d, p in zip(plan, block["driver"], block["peer"], strict=True):
            row = dict(d)
            row["peer_cpu_us"] = p.get("cpu_us", float("nan"))
            row["cpu_pct"] = p.get("cpu_pct", float("nan"))
            row["ring_driver"] = d.get("ring")
            row["ring_peer"] = p.get("ring")
            self.data[(kind.key, ph["name"])][rnd] = row

    def series(self, key: str, phase: str, metric: str) -> dict[int, float]:
        return {r: row[metric] for r, row in self.data.get((key, phase), {}).items()}

    def values(self, key: str, phase: str, metric: str) -> list[float]:
        return list(self.series(key, phase, metric).values())

    def best_per_round(
        self, keys: list[str], phase: str, metric: str, higher: bool
    ) -> dict[int, tuple[float, str]]:
        best: dict[int, tuple[float, str]] = {}
        for key in keys:
            for r, v in self.series(key, phase, metric).items():
                if math.isnan(v):
                    continue
                if r not in best or (v > best[r][0] if higher else v < best[r][0]):
                    best[r] = (v, key)
        return best

    def ratios(
        self, key: str, phase: str, metric: str, ref: dict[int, tuple[float, str]], higher: bool
    ) -> list[float]:
        """Per round, how many times better `key` is than `ref` (>1 = better)."""
        out = []
        for r, v in self.series(key, phase, metric).items():
            if r in ref and v > 0 and not math.isnan(v):
                out.append(v / ref[r][0] if higher else ref[r][0] / v)
        return out

    def noisy(self, key: str) -> str:
        flagged = sum(1 for v in self.other[key].values() if v > NOISY_SHARE)
        return f"{flagged}/{len(self.other[key])}"

    def alternatives(self) -> list[str]:
        return [k.key for k in self.kinds if not k.ours and not k.reference]


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def best_name(best: dict[int, tuple[float, str]]) -> str:
    names = sorted({name for _, name in best.values()})
    return ", ".join(KIND_BY_KEY[n].label for n in names) or "none"


def rtt_table(res: Results, phase: str, title: str, with_eventfd: bool) -> str:
    alts = res.alternatives()
    if with_eventfd:  # the doorbell path: alternatives that never sleep do not have one
        alts = [k for k in alts if not KIND_BY_KEY[k].never_sleeps]
    best = res.best_per_round(alts, phase, "p50", higher=False)
    eventfd = res.best_per_round(["eventfd"], phase, "p50", higher=False)
    headers = ["transport", "p50 us", "p99 us", "CPU us/msg driver", "CPU us/msg echo"]
    headers += ["x best alt (p50)"] + (["x eventfd (p50)"] if with_eventfd else []) + ["noisy"]
    rows = []
    for kind in res.kinds:
        if (kind.key, phase) not in res.data:
            continue
        row = [
            kind.label,
            spread(res.values(kind.key, phase, "p50")),
            spread(res.values(kind.key, phase, "p99")),
            spread(res.values(kind.key, phase, "cpu_us")),
            spread(res.values(kind.key, phase, "peer_cpu_us")),
            spread(res.ratios(kind.key, phase, "p50", best, higher=False)),
        ]
        if with_eventfd:
            row.append(spread(res.ratios(kind.key, phase, "p50", eventfd, higher=False)))
        rows.append([*row, res.noisy(kind.key)])
    note = "x best alt = best alternative's p50 / this p50 in the same round (>1 = faster); "
    note += f"best alternative: {best_name(best)}"
    if with_eventfd and any(k.never_sleeps for k in res.kinds):
        note += (
            "\n(iceoryx2 never sleeps, it busy-polls: not counted as a doorbell-path alternative)"
        )
    return f"{title}\n{table(headers, rows)}\n{note}\n" if rows else ""


def stream_table(res: Results, phase: str, title: str) -> str:
    alts = res.alternatives()
    best = res.best_per_round(alts, phase, "msgs", higher=True)
    headers = ["transport", "M msgs/s", "MB/s", "CPU us/msg sender", "CPU us/msg receiver"]
    headers += ["x best alt", "noisy"]
    rows = []
    for kind in res.kinds:
        if (kind.key, phase) not in res.data:
            continue
        rows.append(
            [
                kind.label,
                spread([v / 1e6 for v in res.values(kind.key, phase, "msgs")]),
                spread(res.values(kind.key, phase, "mbs")),
                spread(res.values(kind.key, phase, "cpu_us")),
                spread(res.values(kind.key, phase, "peer_cpu_us")),
                spread(res.ratios(kind.key, phase, "msgs", best, higher=True)),
                res.noisy(kind.key),
            ]
        )
    note = f"x best alt = this / best alternative in the same round; best: {best_name(best)}"
    return f"{title}\n{table(headers, rows)}\n{note}\n" if rows else ""


def ring_internals(res: Results) -> str:
    """Doorbell behaviour per phase: wake-ups sent, sleeps, spins, per frame the driver sent."""
    rows = []
    for kind in res.kinds:
        if not kind.ours:
            continue
        for ph in ("rtt-active", "rtt-asleep", "stream-64", "stream-64-batch", "stream-4k"):
            runs = list(res.data.get((kind.key, ph), {}).values())
            runs = [r for r in runs if r["ring_driver"] and r["ring_peer"]]
            if not runs:
                continue
            frames = sum(r["ring_driver"]["sent_frames"] for r in runs) or 1
            cells = []
            for side in ("ring_driver", "ring_peer"):
                total = defaultdict(int)
                for r in runs:
                    for k, v in r[side].items():
                        total[k] += v
                sleeps = total["recv_waits"] + total["send_waits"]
                cells.append(
                    f"{total['wakeups_sent'] / frames:.3f} / {sleeps / frames:.3f} / "
                    f"{total['recv_spins'] / frames:.3f} / {total['full_events']}"
                )
            rows.append([kind.label, ph, *cells])
    if not rows:
        return ""
    headers = ["transport", "phase", "driver: wakeups / sleeps / spin hits (per frame) / full"]
    headers += ["peer: same"]
    return (
        "Ring internals (statistics() deltas, summed over rounds, per frame the driver sent)\n"
        + table(headers, rows)
        + "\n"
    )


def target_rows(res: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    alts = res.alternatives()

    def verdict(values: list[float], goal: float) -> str:
        m = med(values)
        return "n/a" if math.isnan(m) else ("PASS" if m >= goal else "FAIL")

    def add(what: str, values: list[float], goal: float, goal_text: str) -> None:
        rows.append([what, spread(values), goal_text, verdict(values, goal)])

    kernel = [k for k in ("mp-pipe", "os-pipe", "zmq", "unix") if k in KIND_BY_KEY]
    best_kernel = res.best_per_round(kernel, "rtt-active", "p50", higher=False)
    add(
        "(c) async RTT p50 active: x best kernel-wake alt (Pipe/os.pipe/zmq/unix)",
        res.ratios("ring-async", "rtt-active", "p50", best_kernel, higher=False),
        10.0,
        ">= 10x",
    )
    iox = res.best_per_round(["iceoryx2"], "rtt-active", "p50", higher=False)
    add(
        "(c) async RTT p50 active: x iceoryx2 busy-poll",
        res.ratios("ring-async", "rtt-active", "p50", iox, higher=False),
        1.0 + 1e-9,
        "> 1x",
    )
    p50 = res.values("ring-async", "rtt-active", "p50")
    rows.append(
        [
            "(c) async RTT p50 active, absolute (us)",
            spread(p50),
            "<= ~10 us",
            "n/a" if not p50 else ("PASS" if med(p50) <= 10 else "FAIL"),
        ]
    )
    for key in ("ring", "ring-async"):
        eventfd = res.best_per_round(["eventfd"], "rtt-asleep", "p50", higher=False)
        ratio = [1 / x for x in res.ratios(key, "rtt-asleep", "p50", eventfd, higher=False)]
        rows.append(
            [
                f"{KIND_BY_KEY[key].label}: RTT p50 asleep / eventfd p50",
                spread(ratio),
                f"<= {ASLEEP_TOLERANCE:.2f} (no worse)",
                "n/a" if not ratio else ("PASS" if med(ratio) <= ASLEEP_TOLERANCE else "FAIL"),
            ]
        )
    best64 = res.best_per_round(alts, "stream-64", "msgs", higher=True)
    add(
        "(a) 64 B per message: x fastest alt per message (msgs/s)",
        res.ratios("ring", "stream-64", "msgs", best64, higher=True),
        1.0,
        ">= 1x",
    )
    add(
        "(a) 64 B batched: x fastest alt per message (msgs/s)",
        res.ratios("ring", "stream-64-batch", "msgs", best64, higher=True),
        1.5,
        ">= 1.5x",
    )
    best64b = res.best_per_round(alts, "stream-64-batch", "msgs", higher=True)
    add(
        "(a) 64 B batched: x fastest alt batched (like for like, stricter)",
        res.ratios("ring", "stream-64-batch", "msgs", best64b, higher=True),
        1.5,
        ">= 1.5x",
    )
    typed = [v / 1e6 for v in res.values("ring-msgspec", "stream-64", "msgs")]
    add("(b) msgspec 64 B per message (M msgs/s)", typed, 0.7, ">= 0.7")
    best4k = res.best_per_round(alts, "stream-4k", "mbs", higher=True)
    add(
        "(a) 4 KiB per message: x fastest alt per message (MB/s)",
        res.ratios("ring", "stream-4k", "mbs", best4k, higher=True),
        2.0,
        ">= 2x",
    )
    best4kb = res.best_per_round(alts, "stream-4k-batch", "mbs", higher=True)
    add(
        "(a) 4 KiB batched: x fastest alt batched (MB/s)",
        res.ratios("ring", "stream-4k-batch", "mbs", best4kb, higher=True),
        2.0,
        ">= 2x",
    )
    for key in ("ring", "ring-async"):
        idle = res.values(key, "idle", "cpu_pct")
        rows.append(
            [
                f"{KIND_BY_KEY[key].label}: idle endpoint CPU (% of a core)",
                spread(idle),
                "< 1%",
                "n/a" if not idle else ("PASS" if med(idle) < 1.0 else "FAIL"),
            ]
        )
    return [r for r in rows if r[1] != "n/a"]


def issue14_rows(res: Results) -> list[list[str]]:
    """Issue 14's transport targets, as ratios within each round (>= goal passes)."""
    rows: list[list[str]] = []
    alts = res.alternatives()

    def add(what: str, values: list[float], goal: float, goal_text: str) -> None:
        m = med(values)
        verdict = "n/a" if math.isnan(m) else ("PASS" if m >= goal else "FAIL")
        rows.append([what, spread(values), goal_text, verdict])

    best64 = res.best_per_round(alts, "stream-64", "msgs", higher=True)
    add(
        "(a) 64 B per message: x best alternative",
        res.ratios("ring", "stream-64", "msgs", best64, higher=True),
        2.0,
        ">= 2x",
    )
    pipe_batch = res.best_per_round(["os-pipe"], "stream-64-batch", "msgs", higher=True)
    add(
        "(a) 64 B batched: x os.pipe batched",
        res.ratios("ring", "stream-64-batch", "msgs", pipe_batch, higher=True),
        2.0,
        ">= 2x",
    )
    add(
        "(b) msgspec 64 B per message: x best raw-bytes alternative",
        res.ratios("ring-msgspec", "stream-64", "msgs", best64, higher=True),
        1.0,
        ">= 1x",
    )
    iox = res.best_per_round(["iceoryx2"], "rtt-active", "p50", higher=False)
    add(
        "(c) async RTT p50, both busy: iceoryx2 p50 / ours (>= 2 = ours <= 0.5x)",
        res.ratios("ring-async", "rtt-active", "p50", iox, higher=False),
        2.0,
        ">= 2x",
    )
    # The doorbell path against the mechanism under it: the blocking eventfd ping-pong for both,
    # and for (c) also the same ping-pong awaited under uvloop, which is what (c) sleeps on.
    references = [("ring", "eventfd"), ("ring-async", "eventfd"), ("ring-async", "eventfd-async")]
    for key, ref_key in references:
        ref_name = "eventfd" if ref_key == "eventfd" else "eventfd under uvloop"
        eventfd = res.best_per_round([ref_key], "rtt-asleep", "p50", higher=False)
        add(
            f"{KIND_BY_KEY[key].label}: asleep RTT p50, {ref_name} / ours (>= 0.91 = <= 1.1x)",
            res.ratios(key, "rtt-asleep", "p50", eventfd, higher=False),
            1 / ASLEEP_TOLERANCE,
            ">= 0.91",
        )
        for side, metric in (("driver", "cpu_us"), ("echo", "peer_cpu_us")):
            ref = res.best_per_round([ref_key], "rtt-asleep", metric, higher=False)
            add(
                f"{KIND_BY_KEY[key].label}: asleep CPU/msg {side}, {ref_name} / ours",
                res.ratios(key, "rtt-asleep", metric, ref, higher=False),
                1 / ASLEEP_TOLERANCE,
                ">= 0.91",
            )
    return [r for r in rows if r[1] != "n/a"]


def report(res: Results, cpus: tuple[int | None, int | None], args: argparse.Namespace) -> str:
    where = (
        f"driver pinned to CPU {cpus[0]}, peer pinned to CPU {cpus[1]}"
        if cpus[1] is not None and cpus[0] != cpus[1]
        else "SAME CPU (only one CPU available): not a cross-core figure"
    )
    parts = [
        f"Transport benchmark: {res.rounds} interleaved rounds{' (--quick)' if args.quick else ''};"
        f" {where}; {os.cpu_count()} CPUs.",
        "Figures: median (min-max) over rounds; ratios are taken within each round. "
        f"'noisy' = rounds where other processes used > {NOISY_SHARE:.0%} of all CPUs.",
        "",
        rtt_table(res, "rtt-active", "Round trip, 64 B, echo side active (back to back)", False),
        rtt_table(
            res,
            "rtt-asleep",
            "Round trip, 64 B, echo side asleep (2 ms gap before each request: doorbell path)",
            True,
        ),
        stream_table(res, "stream-64", "One-way throughput, 64 B, per message"),
        stream_table(res, "stream-64-batch", "One-way throughput, 64 B, batches of 256"),
        stream_table(res, "stream-4k", "One-way throughput, 4 KiB, per message"),
        stream_table(res, "stream-4k-batch", "One-way throughput, 4 KiB, batches of 32"),
    ]
    idle_rows = [
        [k.label, spread(res.values(k.key, "idle", "cpu_pct"))]
        for k in res.kinds
        if (k.key, "idle") in res.data
    ]
    if idle_rows:
        parts.append(
            "Idle endpoint (peer blocked in receive, default WaitPolicy)\n"
            + table(["transport", "CPU % of a core"], idle_rows)
            + "\n"
        )
    parts.append(ring_internals(res))
    other_rows = [
        [k.label, " ".join(f"{100 * res.other[k.key][r]:.0f}%" for r in sorted(res.other[k.key]))]
        for k in res.kinds
    ]
    parts.append(
        "Other load during each block (share of all CPUs, by round)\n"
        + table(["transport", "other load per round"], other_rows)
        + "\n"
    )
    targets = target_rows(res)
    if targets:
        parts.append(
            "Targets of issue 2 (ratios within each round; median (min-max))\n"
            + table(["target", "measured", "goal", "verdict"], targets)
            + "\n"
        )
    targets14 = issue14_rows(res)
    if targets14:
        parts.append(
            "Targets of issue 14 (ratios within each round, >1 = ours better; median (min-max))\n"
            + table(["target", "measured", "goal", "verdict"], targets14)
            + "\n"
        )
    notes = [k for k in res.kinds if k.key == "iceoryx2"]
    if notes:
        parts.append(
            "Notes: iceoryx2 = publish/subscribe, one service per direction, Slice[c_uint8], "
            "RetryUntilDelivered, the receiver polls with os.sched_yield(); no batch form. "
            "Stream alternatives read 64 KiB at a time and parse length prefixes; "
            "'batched' = one write of the joined frames (os.pipe, Unix socket) or "
            "send_many/receive_many (ring)."
        )
    return "\n".join(p for p in parts if p is not None)


# -- main -----------------------------------------------------------------------------------


def choose_cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return cpus[0], cpus[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 short rounds (~30 s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    p.add_argument(
        "--only",
        help="comma-separated transports: " + ", ".join(k.key for k in KINDS),
    )
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--arg", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer:
        return peer_main(args.peer, args.arg, json.loads(args.plan), args.cpu)
    kinds = KINDS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in KIND_BY_KEY]
        if unknown:
            print(f"unknown transport(s) {unknown}; known: {list(KIND_BY_KEY)}", file=sys.stderr)
            return 2
        kinds = [k for k in KINDS if k.key in wanted]
    rounds = args.rounds or (2 if args.quick else 5)
    plan = make_plan(args.quick)
    cpus = choose_cpus()
    pin(cpus[0])
    res = Results(kinds, rounds)
    failed: dict[str, str] = {}
    workdir = _make_workdir()
    started = time.perf_counter()
    try:
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}:", end="", flush=True, file=sys.stderr)
            for kind in kinds:
                if kind.key in failed:
                    continue
                phases = phases_for(kind, plan)
                print(f" {kind.key}", end="", flush=True, file=sys.stderr)
                try:
                    block = run_block(kind, phases, cpus, workdir)
                    res.add(kind, rnd, phases, block)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:
                    failed[kind.key] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    print(f" [FAILED: {failed[kind.key]}]", end="", file=sys.stderr)
                    continue
            print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    finally:
        _cleanup_all([], workdir)
    print(report(res, cpus, args))
    for key, why in failed.items():
        print(f"{KIND_BY_KEY[key].label}: no figures, it failed: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
