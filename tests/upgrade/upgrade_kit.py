"""A real host with its upgrade actor, the KV workload's images, and a caller, for upgrade tests.

The KV workload (`multikernel.upgrade.testing`) serves `kv` and keeps a store and a counter across
upgrades, with a schema change between versions 1 and 2; its manifest parameters make an image
misbehave (`mode`) or serve names of its own (`per_instance`). `CALLER` is a client in an
instance of its own that keeps calling while a rollout runs.
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
from multikernel.upgrade.testing import kv_image
from tests.services.fault_kit import owned

MB = 1 << 20
PATIENCE = 90.0

POLICY = """
[[rule]]
who = "guest"
own = ["kv", "kv.*"]
call = ["kv", "kv.*"]
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
    """A signed image of the KV workload at `version` (multikernel.upgrade.testing)."""
    name = f"kv-v{version}{'-' + mode if mode else ''}{'-' + tag if tag else ''}"
    image = kv_image(root / name, version, mode=mode, **params)
    sign_image(image, *keys)
    return image


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
#: pause, through the retrying client, and serves its counts on instance.<id>.stats (`read`,
#: and `stop`, which ends the stream and answers the final counts once its last call ended).
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
    stopped, ended = anyio.Event(), anyio.Event()
    async with connect(name="caller") as ep, anyio.create_task_group() as tg:
        calls = retrying(ep, within=10.0)
        stats = ep.service(f"instance.{ID}.stats")

        @stats.method
        async def read(_: None) -> dict:
            return {**counts, "retries": calls.retries, "latencies": latencies[-20000:]}

        @stats.method
        async def stop(_: None) -> dict:
            stopped.set()
            await ended.wait()  # its call in flight is counted (acked or not) before we answer
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
            ended.set()

        tg.start_soon(stream)
        await anyio.sleep_forever()  # until the host stops the instance

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
