"""A real host with its upgrade actor, and a stateful service in two versions, for upgrade tests.

`KV` is the workload of the test images: it serves the well-known name `kv` (`put`, `get`,
`count`, `version`, `slow`) and keeps a store and a counter across upgrades through
`UpgradeControl`. Version 1 writes the store as `StoreV1` (key -> value); version 2 reads it
through a transform into `StoreV2` (key -> Entry(value, length)). A manifest parameter `mode`
makes an image misbehave: `crash` (exits at start), `unhealthy` (says it is not healthy),
`reject` (cannot read version 1 state: no transform). `per_instance` serves `kv.<deployment>`
instead of `kv` (the instance's name without an `-r<N>` suffix), so one image serves several
instances under names of their own; `health_after` seconds makes its health check say no
until then.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from multikernel.endpoints import Endpoint, Subscription, connect
from multikernel.protocol import (
    CreateInstance,
    InstanceInfo,
    InstanceList,
    LoadImage,
    RestartPolicy,
    RolloutRef,
    RolloutStatus,
    ShowInstances,
    StartInstance,
    StartRollout,
)
from multikernel.services._host import HostConfig, run_host
from multikernel.services._image import sign_image

MB = 1 << 20
PATIENCE = 90.0

POLICY = """
[[rule]]
who = "guest"
own = ["kv", "kv.*"]
call = ["kv", "kv.*"]
"""

KV = """
import json, os, re, sys
import anyio, msgspec
from multikernel.endpoints import connect, runtime
from multikernel.upgrade import IncompatibleStateError, PreservedState, Schema, UpgradeControl

VERSION = int(os.environ["KV_VERSION"])
PARAMS = json.loads(os.environ.get("MULTIKERNEL_PARAMETERS") or "{}")
MODE = PARAMS.get("mode", "")
NAMES = PARAMS.get("names", ["kv"])
if PARAMS.get("per_instance"):  # one name per deployment: kv.<first instance's name>
    NAMES = ["kv." + re.sub(r"-r[0-9]+$", "", os.environ["MULTIKERNEL_INSTANCE_NAME"])]

class StoreV1(msgspec.Struct):
    items: dict[str, str]

class Entry(msgspec.Struct):
    value: str
    length: int

class StoreV2(msgspec.Struct):
    items: dict[str, Entry]

class Counter(msgspec.Struct):
    value: int

def v1_to_v2(old):
    return {"items": {k: {"value": v, "length": len(v)} for k, v in old["items"].items()}}

if VERSION == 1:
    STORE = Schema(StoreV1, 1)
elif MODE == "reject":
    STORE = Schema(StoreV2, 2)  # no transform from version 1: refuses it
else:
    STORE = Schema(StoreV2, 2, {1: v1_to_v2})
COUNTER = Schema(Counter, 1)

items = {}
count = Counter(0)

def value_of(entry):
    return entry if VERSION == 1 else entry.value

def save():
    state = PreservedState()
    state.put("kv/store", (StoreV1 if VERSION == 1 else StoreV2)(items), version=VERSION)
    state.put("counter", count)
    return state

def load(state):
    global count
    items.update(state.get("kv/store", STORE).items)
    count = state.get("counter", COUNTER)

async def main():
    if MODE == "crash":
        sys.exit("crashing at start, as asked")
    async with connect(name="kv") as ep, anyio.create_task_group() as tg:
        services = [ep.service(name) for name in NAMES]
        for kv in services:
            @kv.method
            async def put(pair: list) -> int:
                key, value = pair
                items[key] = value if VERSION == 1 else Entry(value, len(value))
                count.value += 1
                return count.value

            @kv.method
            async def get(key: str) -> str | None:
                entry = items.get(key)
                return None if entry is None else value_of(entry)

            @kv.method(name="count")
            async def count_value(_: None) -> int:
                return count.value

            @kv.method
            async def version(_: None) -> int:
                return VERSION

            @kv.method
            async def slow(seconds: float) -> int:
                await anyio.sleep(seconds)
                count.value += 1
                return count.value

        born = anyio.current_time()

        def health():
            if anyio.current_time() - born < PARAMS.get("health_after", 0):
                return False
            return MODE != "unhealthy"

        control = UpgradeControl(ep, services, preserve=save, restore=load, health=health)
        await tg.start(control.run)
        for kv in services:
            await kv.start()
        print(f"kv v{VERSION} serving", flush=True)
        await anyio.sleep_forever()

runtime.run(main)
"""


def make_image(
    root: Path,
    keys: tuple[bytes, bytes],
    version: int,
    *,
    mode: str = "",
    tag: str = "",
    **params: Any,
) -> Path:
    """A signed image of the KV workload at `version` (see the module docstring)."""
    image = root / f"kv-v{version}{'-' + mode if mode else ''}{'-' + tag if tag else ''}"
    image.mkdir()
    parameters = json.dumps({"mode": mode, **params})
    (image / "manifest.toml").write_text(
        f'name = "kv"\nversion = "{version}"\nentry = ["{{python}}", "main.py"]\n'
        f'[env]\nKV_VERSION = "{version}"\n'
        f"[parameters]\n{_toml_table(json.loads(parameters))}"
    )
    (image / "main.py").write_text(textwrap.dedent(KV))
    sign_image(image, *keys)
    return image


def _toml_table(values: dict[str, Any]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


@dataclass
class UpgradeHost:
    ep: Endpoint
    root: Path
    config: HostConfig

    async def lifecycle(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.ep.request("lifecycle", method, body, response=InstanceInfo)
        return info

    async def show(self, name: str = "") -> list[InstanceInfo]:
        listing = await self.ep.request(
            "lifecycle", "show", ShowInstances(name), response=InstanceList
        )
        return list(listing.instances)

    async def bring_up(self, name: str, image: Path) -> InstanceInfo:
        """Create, load and start a KV instance; return once it owns its first name."""
        info = await self.bring_up_plain(name, image)
        await owned(self.ep, self.first_name(image, name))
        return info

    async def bring_up_plain(self, name: str, image: Path) -> InstanceInfo:
        """Create, load and start an instance of `image`."""
        create = CreateInstance(
            name, cpu_count=1, memory=192 * MB, restart=RestartPolicy(mode="transient")
        )
        await self.lifecycle("create", create)
        await self.lifecycle("load", LoadImage(name, str(image)))
        return await self.lifecycle("start", StartInstance(name))

    @staticmethod
    def first_name(image: Path, instance: str) -> str:
        """The first well-known name the KV workload of `image` serves in `instance`."""
        manifest = (image / "manifest.toml").read_text()
        if "per_instance = true" in manifest:
            return f"kv.{instance}"
        return "kv" if "names" not in manifest else manifest.split('names = ["')[1].split('"')[0]

    async def rollout(self, names: list[str], image: Path, **settings: Any) -> RolloutStatus:
        """Start a rollout and wait until it ends; its final status."""
        async with await self.ep.subscribe("mk.upgrades.*") as events:
            status = await self.ep.request(
                "upgrade",
                "rollout",
                StartRollout(tuple(names), str(image), **settings),
                response=RolloutStatus,
            )
            return await finished(self.ep, events, status.rollout)


async def finished(ep: Endpoint, events: Subscription, rollout: int) -> RolloutStatus:
    """The rollout's status once it has ended (`events`: a subscription to mk.upgrades.*)."""
    with anyio.fail_after(PATIENCE):
        status = await ep.request("upgrade", "status", RolloutRef(rollout), response=RolloutStatus)
        if status.outcome not in ("running", "paused"):
            return status
        async for message in events:
            ended = message.decode(RolloutStatus)
            if ended.rollout == rollout and ended.outcome not in ("running", "paused"):
                return ended
    raise AssertionError("the subscription ended")


async def owned(ep: Endpoint, name: str) -> None:
    """Until the well-known `name` has an owner."""
    async with await ep.subscribe(f"mk.bus.names.{name}") as changes:
        if name in (await ep.introspect()).names:
            return
        with anyio.fail_after(PATIENCE):
            async for message in changes:
                if message.value().get("new_owner"):
                    return


@asynccontextmanager
async def upgrade_host(root: Path, cert: Path, **settings: Any) -> AsyncIterator[UpgradeHost]:
    """A host (hub, resource, lifecycle, fault, upgrade) on `root`, and a test endpoint on it."""
    config = HostConfig(
        root / "bus.sock",
        root / "state",
        policy_text=POLICY,
        trusted=[cert],
        heartbeat=0.2,
        **{"cpu_share": 8, **settings},
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        try:
            async with connect(config.socket, name="test") as ep:
                await owned(ep, "upgrade")
                yield UpgradeHost(ep, root, config)
        finally:
            stop.set()


#: A client in an instance of its own: calls `put` on each of its `targets` in turn, without a
#: pause, through the retrying client, and serves its counts on instance.<id>.stats (`stats`,
#: and `stop`, which ends the stream and answers the final counts).
CALLER = """
import json, os, time
import anyio
from multikernel.endpoints import connect, retrying, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
TARGETS = json.loads(os.environ["MULTIKERNEL_PARAMETERS"])["targets"]
counts = {"ok": 0, "errors": 0, "acked": {t: 0 for t in TARGETS}, "worst_ms": 0.0,
          "last_error": ""}
latencies = []

async def main():
    stopped = anyio.Event()
    async with connect(name="caller") as ep, anyio.create_task_group() as tg:
        calls = retrying(ep, within=10.0)
        stats = ep.service(f"instance.{ID}.stats")

        @stats.method
        async def read(_: None) -> dict:
            return {**counts, "retries": calls.retries, "latencies": latencies[-20000:]}

        @stats.method
        async def stop(_: None) -> dict:
            stopped.set()
            return {**counts, "retries": calls.retries}

        await stats.start()

        async def stream():
            i = 0
            while not stopped.is_set():
                target = TARGETS[i % len(TARGETS)]
                t0 = time.perf_counter()
                try:
                    await calls.request(target, "put", [f"c{i}", "x"])
                except Exception as error:
                    counts["errors"] += 1
                    counts["last_error"] = repr(error)
                else:
                    counts["ok"] += 1
                    counts["acked"][target] += 1
                ms = (time.perf_counter() - t0) * 1000
                latencies.append(ms)
                counts["worst_ms"] = max(counts["worst_ms"], ms)
                i += 1
                await anyio.sleep(0.002)

        tg.start_soon(stream)
        await stopped.wait()
        tg.cancel_scope.cancel()

runtime.run(main)
"""


def make_caller(root: Path, keys: tuple[bytes, bytes], targets: list[str]) -> Path:
    image = root / "caller"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "caller"\nversion = "1"\nentry = ["{python}", "main.py"]\n'
        f"[parameters]\ntargets = {json.dumps(targets)}\n"
    )
    (image / "main.py").write_text(textwrap.dedent(CALLER))
    sign_image(image, *keys)
    return image
