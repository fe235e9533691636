"""Crash to serving, hang to detected, and what callers lose, with the fault actor on and off.

    python benchmarks/bench_fault.py [--crashes 20] [--hangs 20] [--heartbeat 1] [--quick]

A real host (`python -m multikernel.services.host`, its own process) runs two instances: `kv`
serves `instance.<id>.kv`, and `load`, another instance, calls its `ping` in a loop (one call,
then 1 ms of rest), counting answers and failures. Then, `--crashes` times, `kv`'s agent is
SIGKILLed (its whole instance dies with it) and the benchmark polls `ping` every 0.5 ms until a
*new* launch answers (each launch answers with a token of its own): SIGKILL -> serving. And
`--hangs` times, `kv` is SIGSTOPped: SIGSTOP -> detected is the time until the fault actor's
`failed` event (cause `hang`) arrives; the instance is then replaced. Three set-ups, each on a
fresh host:

- fault actor, warm standby: restart policy `permanent,standby`: a pre-started agent and
  workload interpreter take the instance over (docs/fault.md);
- fault actor, cold restart: `permanent`: the instance is launched again from scratch;
- fault actor off (`--no-fault`): nobody restarts anything; the benchmark plays the operator's
  script and calls `lifecycle.start` as soon as it sees the crash on `mk.instance.<id>.state`.
  A hang is never detected: after 3 heartbeat periods plus 2 s the benchmark gives up, kills and
  starts the instance itself (only min(--hangs, 5) of those).

Restart policies use `period=1` so that every injected failure is the first of its period (the
first restart of a period is immediate; the next ones back off by design). `failed / total` is
what the `load` instance counted over the whole set-up, failures included (it does not retry).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CreateInstance,
    FaultEvent,
    InstanceInfo,
    InstanceList,
    InstanceStateChanged,
    KillInstance,
    LoadImage,
    NoRespondersError,
    RestartPolicy,
    ShowInstances,
    StartInstance,
)
from multikernel.services._image import sign_image
from multikernel.services._signature import make_signing_key

MB = 1 << 20
PATIENCE = 60.0

POLICY = """
[[rule]]
who = "guest"
call = ["instance.*.kv"]
"""

KV = """
import os
import anyio
from multikernel.endpoints import connect, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
BOOT = os.urandom(4).hex()

async def main() -> None:
    async with connect(name="kv") as ep:
        svc = ep.service(f"instance.{ID}.kv")

        @svc.method
        async def ping(_: None) -> str:
            return BOOT

        await svc.start()
        await anyio.sleep_forever()

runtime.run(main)
"""

LOAD = """
import json, os
import anyio
from multikernel.endpoints import connect, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
TARGET = json.loads(os.environ["MULTIKERNEL_PARAMETERS"])["target"]
counts = {"ok": 0, "failed": 0}

async def main() -> None:
    async with connect(name="load") as ep:
        svc = ep.service(f"instance.{ID}.kv")

        @svc.method
        async def stats(_: None) -> dict:
            return dict(counts)

        await svc.start()
        while True:
            try:
                with anyio.fail_after(5):
                    await ep.request(TARGET, "ping", None)
                counts["ok"] += 1
            except Exception:
                counts["failed"] += 1
            await anyio.sleep(0.001)

runtime.run(main)
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


@dataclass
class Results:
    setup: str
    serving: list[float] = field(default_factory=list)
    detected: list[float] = field(default_factory=list)
    undetected: int = 0
    ok: int = 0
    failed: int = 0
    #: Injections that hit a launch already gone (the instance was restarted for another reason
    #: between reading its pid and the signal): retried, and said in the report.
    stale: list[str] = field(default_factory=list)


class Host:
    """A host process on a fresh state dir."""

    def __init__(self, root: Path, cert: Path, heartbeat: float, fault: bool) -> None:
        self.root = root
        self.socket = root / "bus.sock"
        (root / "policy.toml").write_text(POLICY)
        self.command = [
            sys.executable, "-m", "multikernel.services.host", "--socket", str(self.socket),
            "--state-dir", str(root / "state"), "--trusted-keys", str(cert),
            "--policy", str(root / "policy.toml"), "--heartbeat", f"{heartbeat:g}",
        ]  # fmt: skip
        if not fault:
            self.command.append("--no-fault")
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, write: int) -> None:
        with (self.root / "host.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "--ready-fd", str(write)], pass_fds=(write,),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    async def start(self) -> None:
        read, write = os.pipe()
        try:
            self.spawn(write)
        finally:
            os.close(write)
        try:
            with anyio.fail_after(PATIENCE):
                await anyio.wait_readable(read)
            if not os.read(read, 64).startswith(b"ready"):
                raise SystemExit(f"the host did not start: see {self.root / 'host.log'}")
        finally:
            os.close(read)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            fd = os.pidfd_open(self.proc.pid)
            try:
                with anyio.fail_after(PATIENCE):
                    await anyio.wait_readable(fd)
            finally:
                os.close(fd)
        if self.proc is not None:
            self.proc.wait()


def image(root: Path, key: bytes, cert: bytes, name: str, body: str, params: str = "") -> Path:
    path = root / f"image-{name}"
    path.mkdir()
    manifest = f'name = "{name}"\nversion = "1"\nentry = ["{{python}}", "main.py"]\n'
    if params:
        manifest += f"[parameters]\n{params}\n"
    (path / "manifest.toml").write_text(manifest)
    (path / "main.py").write_text(textwrap.dedent(body))
    sign_image(path, key, cert)
    return path


async def call(ep: Endpoint, method: str, body: object) -> InstanceInfo:
    return await ep.request("lifecycle", method, body, response=InstanceInfo)


async def show(ep: Endpoint, name: str) -> InstanceInfo:
    listing = await ep.request("lifecycle", "show", ShowInstances(name), response=InstanceList)
    return listing.instances[0]


async def until(check: Callable[[], Awaitable[bool]], pause: float = 0.0005) -> None:
    """Until `check()` is true (the benchmark's one poll: it measures how soon that is)."""
    with anyio.fail_after(PATIENCE):
        while not await check():  # noqa: ASYNC110 - polling is the measurement here
            await anyio.sleep(pause)


async def ping(ep: Endpoint, kv: str) -> str | None:
    try:
        with anyio.fail_after(2):
            answer: str = await ep.request(kv, "ping", None, response=str)
            return answer
    except (NoRespondersError, TimeoutError):
        return None


async def run_setup(
    setup: str, root: Path, keys: tuple[bytes, bytes], crashes: int, hangs: int, heartbeat: float
) -> Results:
    results = Results(setup)
    fault = setup != "fault actor off"
    standby = setup == "fault actor, warm standby"
    policy = RestartPolicy(
        "permanent" if fault else "temporary", intensity=1000, period=1.0, backoff=0.0,
        backoff_max=0.0, standby=standby,
    )  # fmt: skip
    (root / "cert.pem").write_bytes(keys[1])
    host = Host(root, root / "cert.pem", heartbeat, fault)
    await host.start()
    try:
        async with connect(host.socket, name="bench") as ep:
            kv_image = image(root, *keys, "kv", KV)
            create = CreateInstance("bench-kv", cpu_count=1, memory=256 * MB, restart=policy)
            kv = await call(ep, "create", create)
            target = f"instance.{kv.id}.kv"
            load_image = image(root, *keys, "load", LOAD, f'target = "{target}"')
            await call(ep, "load", LoadImage("bench-kv", str(kv_image)))
            once = RestartPolicy("temporary")
            create = CreateInstance("bench-load", cpu_count=1, memory=256 * MB, restart=once)
            load = await call(ep, "create", create)
            await call(ep, "load", LoadImage("bench-load", str(load_image)))
            async with (
                await ep.subscribe(f"mk.instance.{kv.id}.state") as states,
                await ep.subscribe(f"mk.instance.{kv.id}.fault") as faults,
            ):
                observer = Observer()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(observer.states, states)
                    tg.start_soon(observer.faults, faults)
                    await call(ep, "start", StartInstance("bench-kv"))
                    await call(ep, "start", StartInstance("bench-load"))
                    stats = f"instance.{load.id}.kv"
                    await until(lambda: _answers(ep, stats))
                    before = await ep.request(stats, "stats", None)
                    operator = not fault
                    for _ in range(crashes):
                        results.serving.append(
                            await crash(ep, target, "bench-kv", observer, standby, operator)
                        )
                    for _ in range(min(hangs, 5) if operator else hangs):
                        detected = await hang(
                            ep,
                            target,
                            "bench-kv",
                            observer,
                            standby,
                            operator,
                            heartbeat,
                            results.stale,
                        )
                        if detected is None:
                            results.undetected += 1
                        else:
                            results.detected.append(detected)
                    after = await ep.request(stats, "stats", None)
                    results.ok = after["ok"] - before["ok"]
                    results.failed = after["failed"] - before["failed"]
                    tg.cancel_scope.cancel()
            for name in ("bench-load", "bench-kv"):
                await call(ep, "kill", KillInstance(name, force=True))
    finally:
        await host.stop()
    return results


async def _answers(ep: Endpoint, target: str) -> bool:
    try:
        await ep.request(target, "stats", None)
    except NoRespondersError:
        return False
    return True


class Observer:
    """What the benchmark hears about `kv`: state changes and fault events, as they arrive."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, InstanceStateChanged]] = []
        self.events: list[tuple[float, FaultEvent]] = []
        self._wake = anyio.Event()

    async def states(self, sub: Any) -> None:
        async for message in sub:
            self.changes.append((time.monotonic(), message.decode(InstanceStateChanged)))
            self._wake.set()

    async def faults(self, sub: Any) -> None:
        async for message in sub:
            self.events.append((time.monotonic(), message.decode(FaultEvent)))
            self._wake.set()

    async def wait(self, found: Callable[[], bool]) -> None:
        with anyio.fail_after(PATIENCE):
            while not found():
                self._wake = anyio.Event()
                await self._wake.wait()

    def mark(self) -> tuple[int, int]:
        return len(self.changes), len(self.events)


async def ready(ep: Endpoint, name: str, observer: Observer, standby: bool) -> InstanceInfo:
    """Until the instance is active, its workload serves, and (if wanted) its standby is warm."""
    info = await show(ep, name)
    while info.state != "active" or (standby and not info.standby):
        mark = len(observer.changes)
        await observer.wait(lambda mark=mark: len(observer.changes) > mark)  # type: ignore[misc]
        info = await show(ep, name)
    return info


async def crash(
    ep: Endpoint, kv: str, name: str, observer: Observer, standby: bool, operator: bool
) -> float:
    for _ in range(3):
        info = await ready(ep, name, observer, standby)
        await until(lambda: _pinged(ep, kv))
        boot = await ping(ep, kv)
        changes, _ = observer.mark()
        t0 = time.monotonic()
        try:
            os.kill(info.pid, signal.SIGKILL)
            break
        except ProcessLookupError:  # restarted since `show`: read it again
            continue
    else:
        raise RuntimeError(f"{name}'s pid was gone three times before its SIGKILL")
    if operator:  # fault actor off: the operator's script restarts it when it sees the crash
        await observer.wait(lambda: any(c.new == "loaded" for _, c in observer.changes[changes:]))
        await call(ep, "start", StartInstance(name))
    await until(lambda: _new_boot(ep, kv, boot))
    return time.monotonic() - t0


async def _pinged(ep: Endpoint, kv: str) -> bool:
    return await ping(ep, kv) is not None


async def _new_boot(ep: Endpoint, kv: str, old: str | None) -> bool:
    answer = await ping(ep, kv)
    return answer is not None and answer != old


async def hang(
    ep: Endpoint, kv: str, name: str, observer: Observer, standby: bool, operator: bool,
    heartbeat: float, stale: list[str],
) -> float | None:  # fmt: skip
    for _ in range(3):
        info = await ready(ep, name, observer, standby)
        await until(lambda: _pinged(ep, kv))
        _, events = observer.mark()
        t0 = time.monotonic()
        try:
            os.kill(info.pid, signal.SIGSTOP)
        except ProcessLookupError:  # restarted since `show`: read it again
            stale.append(f"pid {info.pid} (generation {info.generation}) gone before SIGSTOP")
            continue
        current = await show(ep, name)
        if current.pid == info.pid:
            break
        os.kill(info.pid, signal.SIGCONT)  # not the launch that serves now
        stale.append(
            f"pid {info.pid} (generation {info.generation}) replaced by {current.pid} "
            f"(generation {current.generation}, cause {current.cause or '-'}) at SIGSTOP"
        )
    else:
        raise RuntimeError(f"could not SIGSTOP {name}'s current launch: {'; '.join(stale)}")
    if operator:  # nothing detects it: wait a while, then the operator steps in
        await anyio.sleep(3 * heartbeat + 2.0)
        await call(ep, "kill", KillInstance(name, force=True))
        await call(ep, "start", StartInstance(name))
        return None

    def hung() -> bool:
        since = observer.events[events:]
        return any(e.event == "failed" and e.cause == "hang" for _, e in since)

    try:
        await observer.wait(hung)
    except TimeoutError:
        now = await show(ep, name)
        seen = [f"{e.event}/{e.cause or '-'}" for _, e in observer.events[events:]]
        raise RuntimeError(
            f"SIGSTOP of pid {info.pid} (generation {info.generation}) not detected within "
            f"{PATIENCE:g} s; now pid {now.pid}, generation {now.generation}, state "
            f"{now.state}, cause {now.cause or '-'}; fault events since: {seen or 'none'}"
        ) from None
    found = next(t for t, e in observer.events[events:] if e.event == "failed")
    await observer.wait(lambda: any(e.event == "recovered" for _, e in observer.events[events:]))
    return found - t0


async def main(crashes: int, hangs: int, heartbeat: float, as_json: bool) -> None:
    keys = make_signing_key("bench fault", algorithm="ec-p256")
    all_results = []
    for setup in ("fault actor, warm standby", "fault actor, cold restart", "fault actor off"):
        root = Path(tempfile.mkdtemp(prefix="mk-bench-fault-"))
        try:
            all_results.append(await run_setup(setup, root, keys, crashes, hangs, heartbeat))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps([r.__dict__ for r in all_results]))
        return
    print(
        f"{crashes} SIGKILLs and {hangs} SIGSTOPs per set-up, heartbeat {heartbeat:g} s, "
        f"{os.cpu_count()} CPUs, under steady RPC load from another instance"
    )
    print(
        f"{'set-up':27} {'SIGKILL->serving p50':>21} {'p99':>8} "
        f"{'SIGSTOP->detected p50':>22} {'p99':>8} {'failed / total calls':>22}"
    )
    for r in all_results:
        detected = (
            f"{pct(r.detected, 0.5):>19.0f} ms {pct(r.detected, 0.99):>5.0f} ms"
            if r.detected
            else f"{'never (' + str(r.undetected) + ' tried)':>22} {'':>8}"
        )
        total = r.ok + r.failed
        print(
            f"{r.setup:27} {pct(r.serving, 0.5):>18.1f} ms {pct(r.serving, 0.99):>5.1f} ms "
            f"{detected} {r.failed:>10} / {total:<10}"
        )
        for note in r.stale:
            print(f"  {r.setup}: {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crashes", type=int, default=20)
    parser.add_argument("--hangs", type=int, default=20)
    parser.add_argument("--heartbeat", type=float, default=1.0, help="the agents' period (s)")
    parser.add_argument("--quick", action="store_true", help="3 crashes and 2 hangs per set-up")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")
    crashes, hangs = (3, 2) if args.quick else (args.crashes, args.hangs)
    anyio.run(
        main, crashes, hangs, args.heartbeat, args.json,
        backend="asyncio", backend_options={"use_uvloop": True},
    )  # fmt: skip
