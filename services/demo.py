"""`make demo`: a multikernel host with three instances, live.

What happens, step by step (each step prints the `mkctl` command that does the same by hand):
a host starts (the bus hub and the lifecycle actor); a throwaway key signs three images; three
instances are created, loaded (signatures verified) and started, each an isolated process tree
with its own agent: `alpha` serves a key-value service, `beta` is an application that calls it
over the bus (inter-instance RPC on a direct shared-memory channel) and publishes what it sees,
`gamma` watches those publications. After a few seconds of live figures alpha is upgraded to a
new version of its image while beta goes on calling it (the upgrade actor: a successor takes its
store and its name at once), and a few more seconds of figures follow. Then every instance is
shut down (SHUTDOWN, SHUTDOWN_ACK, HALTED), deleted, and the host stops, leaving nothing behind.
With `--hold` (`make demo HOLD=1`) the instances stay up until Enter, for `mkctl` and the
README's Python snippet to talk to them through the socket it prints.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

from multikernel.endpoints import Bus, Subscription, connect, runtime
from multikernel.protocol import (
    UPGRADE_STEPS,
    CreateInstance,
    DeleteInstance,
    InstanceInfo,
    InstanceStateChanged,
    KillInstance,
    LoadImage,
    RolloutStatus,
    StartInstance,
    StartRollout,
    UpgradeEvent,
)
from multikernel.services._cgroups import CgroupLayout
from multikernel.services._host import HostConfig, cgroup_group, run_host
from multikernel.services._image import sign_image
from multikernel.services._signature import make_signing_key
from multikernel.shm import ENV_TAG, name_prefix

SECONDS = 6

POLICY = """
# The demo's guests (instances 1..) may serve, call and talk about demo.* across instances.
[[rule]]
who = "guest"
own = ["demo.>"]
call = ["demo.>"]
publish = ["demo.>"]
subscribe = ["demo.>"]
"""

KV = """
import anyio
from multikernel.endpoints import connect
from multikernel.upgrade import PreservedState, Schema, UpgradeControl

STORE = Schema(dict, 1)  # the whole store, one node; a new version declares its transforms here

async def main():
    store = {}
    async with connect(name="kv-server") as bus, anyio.create_task_group() as tg:
        kv = bus.service("demo.kv", concurrency=32)

        @kv.method
        async def put(item: list) -> int:
            store[item[0]] = item[1]
            return len(store)

        @kv.method
        async def get(key: str) -> object:
            return store.get(key)

        def save():
            state = PreservedState()
            state.put("store", store, schema="dict")
            return state

        def load(state):
            store.update(state.get("store", STORE))

        # an upgrade hands the store to the next version (docs/upgrade.md)
        await tg.start(UpgradeControl(bus, [kv], preserve=save, restore=load).run)
        await kv.start()
        await anyio.sleep_forever()

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
"""

CLIENT = """
import time
import anyio
from multikernel.endpoints import connect, retrying

async def main():
    async with connect(name="kv-client") as ep:
        bus = retrying(ep, within=5.0)  # rides out the upgrade's switch (docs/upgrade.md)
        while True:  # wait until the service is up (it lives in another instance)
            try:
                await bus.request("demo.kv", "get", "nothing")
                break
            except Exception:
                await anyio.sleep(0.05)
        i = 0
        while True:
            started, latencies = time.monotonic(), []
            while time.monotonic() - started < 1.0:
                t0 = time.perf_counter_ns()
                await bus.request("demo.kv", "put", [f"key{i % 100}", i])
                assert await bus.request("demo.kv", "get", f"key{i % 100}") == i
                latencies.append((time.perf_counter_ns() - t0) / 2000)
                i += 1
            latencies.sort()
            await ep.publish("demo.stats", {
                "calls": 2 * len(latencies), "p50_us": latencies[len(latencies) // 2],
                "p99_us": latencies[int(len(latencies) * 0.99)],
            })

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
"""

WATCHER = """
import anyio
from multikernel.endpoints import connect

async def main():
    async with connect(name="watcher") as bus, await bus.subscribe("demo.stats") as stats:
        async for message in stats:
            figures = message.value()
            await bus.publish("demo.seen", {"from": message.source, **figures})

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
"""


def _image(
    root: Path, name: str, source: str, key: bytes, cert: bytes, version: str = "1.0"
) -> Path:
    image = root / f"{name}-{version}"
    image.mkdir()
    (image / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nentry = ["{{python}}", "main.py"]\n'
    )
    (image / "main.py").write_text(textwrap.dedent(source))
    sign_image(image, key, cert)
    return image


def say(text: str) -> None:
    print(text, flush=True)


async def _lifecycle(bus: Bus, method: str, body: object, command: str) -> InstanceInfo:
    say(f"$ mkctl {command}")
    info: InstanceInfo = await bus.request("lifecycle", method, body, response=InstanceInfo)
    return info


async def demo(root: Path, hold: bool = False) -> None:
    key, cert = make_signing_key("demo signing key", algorithm="ec-p256")
    (root / "cert.pem").write_bytes(cert)
    images = {
        name: _image(root, name, src, key, cert)
        for name, src in (("kv", KV), ("client", CLIENT), ("watcher", WATCHER))
    }
    images["kv-2.0"] = _image(root, "kv", KV, key, cert, version="2.0")
    say(f"signed four images with a throwaway key ({root / 'cert.pem'} is trusted)")
    # Grants are exclusive CPUs; a machine with fewer CPUs than the demo's three instances lets
    # them share (--cpu-share), as a development host may.
    share = -(-3 // (os.cpu_count() or 1))
    config = HostConfig(
        socket=root / "bus.sock",
        state_dir=root / "state",
        policy_text=POLICY,
        policy_source="demo policy",
        trusted=[root / "cert.pem"],
        cpu_share=share,
    )
    if share > 1:
        say(f"this machine has {os.cpu_count()} CPUs for 3 instances: up to {share} share each")
    stop = anyio.Event()
    async with anyio.create_task_group() as host:
        await host.start(run_host, config, stop)
        say(f"host up: bus hub, resource, lifecycle, fault, upgrade actors on {config.socket}\n")
        async with connect(config.socket, name="demo") as bus:
            await _watch(bus, images, config.socket if hold else None)
        stop.set()  # as `mkctl host down` would: instances stopped, bus drained
    say("host stopped")


async def _hold(socket: Path) -> None:
    """Keep the instances running until Enter (or end of input), for mkctl and Python to try."""
    say(
        "\nthe demo holds: in another terminal, try\n"
        f"    export MULTIKERNEL_BUS={socket}\n"
        "    .venv/bin/mkctl show; .venv/bin/mkctl bus monitor demo.stats --limit 3\n"
        "    .venv/bin/python hello.py     # the README's Python snippet\n"
        "press Enter here to stop it"
    )
    await anyio.wait_readable(sys.stdin.fileno())
    sys.stdin.readline()


async def _watch(bus: Bus, images: dict[str, Path], hold: Path | None = None) -> None:
    reached: dict[tuple[str, str], anyio.Event] = {}

    def event(name: str, state: str) -> anyio.Event:
        return reached.setdefault((name, state), anyio.Event())

    async def step(method: str, body: object, command: str, name: str) -> InstanceInfo:
        info = await _lifecycle(bus, method, body, command)
        with anyio.fail_after(10):  # the state change travels apart from the reply: show it first
            await event(name, "deleted" if method == "delete" else info.state).wait()
        return info

    async with (
        await bus.subscribe("mk.instance.*.state") as states,
        await bus.subscribe("demo.seen") as seen,
        anyio.create_task_group() as tg,
    ):

        async def print_states() -> None:
            async for message in states:
                change = message.decode(InstanceStateChanged)
                say(f"    [{change.name}] {change.old} -> {change.new}: {change.reason}")
                event(change.name, change.new).set()

        tg.start_soon(print_states)
        plan: tuple[tuple[str, str], ...] = (
            ("kv", "alpha"), ("client", "beta"), ("watcher", "gamma"),
        )  # fmt: skip
        for image, name in plan:
            create = CreateInstance(name, cpu_count=1, memory=256 << 20)
            await step("create", create, f"create {name} --cpus 1 --memory 256M", name)
            await step(
                "load", LoadImage(name, str(images[image])), f"load {name} --image {image}", name
            )
            info = await step("start", StartInstance(name), f"start {name}", name)
            say(
                f"    {name} is instance {info.id} on CPU {list(info.cpus)}, agent pid {info.pid}, "
                f"isolation: {', '.join(info.isolation) or 'none'}"
            )
        say(f"\nbeta calls alpha's demo.kv service; gamma relays beta's figures ({SECONDS} s):")
        say(f"{'second':>6} {'calls/s':>8} {'p50 us':>8} {'p99 us':>8}   relayed from endpoint")
        second = await _figures(seen, 0, SECONDS)
        say(
            "\nalpha is upgraded to kv 2.0 while beta calls it: a successor takes alpha's store "
            "and the name demo.kv at once\n$ mkctl upgrade alpha --image kv-2.0"
        )
        alpha = await _upgrade(bus, images["kv-2.0"])
        await _figures(seen, second, 3)
        plan = (("alpha", alpha), *plan[1:])
        if hold is not None:
            await _hold(hold)
        say("")
        for _, name in reversed(plan):  # the service last: its callers go first
            await step("kill", KillInstance(name), f"kill {name}", name)
            await step("delete", DeleteInstance(name), f"delete {name}", name)
        tg.cancel_scope.cancel()


async def _figures(seen: Subscription, second: int, seconds: int) -> int:
    """Print `seconds` lines of beta's figures, as gamma relays them; the last second shown."""
    with anyio.move_on_after(seconds + 1):
        for _ in range(seconds):
            figures = (await seen.receive()).value()
            second += 1
            say(
                f"{second:>6} {figures['calls']:>8} {figures['p50_us']:>8.1f} "
                f"{figures['p99_us']:>8.1f}   {figures['from']}"
            )
    return second


async def _upgrade(bus: Bus, image: Path) -> str:
    """Upgrade alpha to `image`, printing each step; the successor's name."""
    async with (
        await bus.subscribe("mk.upgrade.alpha.>") as steps,
        await bus.subscribe("mk.upgrades.*") as ends,
    ):
        await bus.request("upgrade", "rollout", StartRollout(("alpha",), str(image)))
        shown = ""
        with anyio.fail_after(60):
            async for message in steps:
                event = message.decode(UpgradeEvent)
                if event.step != shown:  # a step may publish more than once
                    shown = event.step
                    say(f"    [upgrade alpha] {event.step}: {UPGRADE_STEPS[event.step]}")
                if event.outcome != "running":
                    break
            status = (await ends.receive()).decode(RolloutStatus)
    (item,) = status.instances
    if status.outcome != "done":
        raise SystemExit(f"the demo's upgrade {status.outcome}: {status.error}")
    say(
        f"    alpha is now {item.successor} (kv 2.0) with alpha's store; demo.kv was held "
        f"{item.held_ms:.1f} ms, beta's calls waited, then went on:"
    )
    return item.successor


def _leftovers(state_dir: Path) -> list[str]:
    """What this demo's host left: its tagged /dev/shm files and its own cgroup group.

    Only this demo's: a test run or another host on the machine has its own tag and group.
    """
    found = [str(p) for p in Path("/dev/shm").glob(f"{name_prefix()}*")]
    if state_dir.exists():
        group = CgroupLayout.discover(cgroup_group(state_dir))
        found += [str(p) for p in group.parents if p.exists()]
    return found


def main() -> None:
    os.environ.setdefault("MULTIKERNEL_LOG_LEVEL", "WARNING")  # the story is on stdout
    os.environ[ENV_TAG] = f"demo{os.getpid()}"  # its host's and instances' /dev/shm names
    root = Path(tempfile.mkdtemp(prefix="multikernel-demo-"))
    started = time.monotonic()
    try:
        runtime.run(demo, root, "--hold" in sys.argv[1:])
        left = _leftovers(root / "state")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    say(
        f"done in {time.monotonic() - started:.1f} s; "
        + ("nothing left behind" if not left else f"LEFT BEHIND: {left}")
    )
    if os.geteuid() != 0:
        say("(not root: instances ran without namespaces and cgroups; see docs/platform.md)")
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
