"""A real host with its upgrade actor, a KV workload in two versions and a paced caller, for
`bench_upgrade.py` (a benchmark does not import from tests/: this follows
tests/upgrade/upgrade_kit.py).

The KV workload is `multikernel.upgrade.testing`'s, serving `kv.<deployment>` (`per_instance`),
so one image serves several instances under names of their own; it keeps its store and counter
across an upgrade through `UpgradeControl` (v1 writes `StoreV1`, v2 reads it through a
transform).

`CALLER`, an instance of its own, sends `put` to each target at `rate` calls per second (each on
its own schedule; a call is a task of its own, so a held call delays no other start), through
the retrying client (one `Retrying` per call: its `retries` are that call's), and records each
call: target, start (wall-clock ns: the upgrade events' clock), duration (monotonic ns),
failed, retries. It serves `instance.<id>.stats`: `stop` (no new calls; answers once every call
has ended) and `records` (a page of calls from an offset).
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
import anyio.abc

from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    CreateInstance,
    DeleteInstance,
    InstanceInfo,
    InstanceList,
    KillInstance,
    LoadImage,
    MultikernelError,
    RestartPolicy,
    ShowInstances,
    StartInstance,
)
from multikernel.services._host import HostConfig, run_host
from multikernel.services._image import sign_image
from multikernel.upgrade.testing import kv_image

MB = 1 << 20
PATIENCE = 90.0

POLICY = """
[[rule]]
who = "guest"
own = ["kv.*"]
call = ["kv.*"]
"""


CALLER = """
import json, os, time
import anyio
from multikernel.endpoints import connect, retrying, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
PARAMS = json.loads(os.environ["MULTIKERNEL_PARAMETERS"])
TARGETS = PARAMS["targets"]
PERIOD = 1.0 / PARAMS["rate"]
records = []  # [target index, start wall ns, duration ns, failed, retries]
acked = [0] * len(TARGETS)
last_error = [""]

async def main():
    stopping = anyio.Event()
    async with connect(name="caller") as ep, anyio.create_task_group() as tg:
        stats = ep.service(f"instance.{ID}.stats")
        running = [0]

        async def one(index, key):
            calls = retrying(ep, within=10.0)
            start_wall, t0 = time.time_ns(), time.monotonic_ns()
            failed = 0
            try:
                await calls.request(TARGETS[index], "put", [key, "x"])
            except Exception as error:
                failed = 1
                last_error[0] = repr(error)
            else:
                acked[index] += 1
            records.append([index, start_wall, time.monotonic_ns() - t0, failed, calls.retries])
            running[0] -= 1

        async def stream(index):
            i = 0
            due = time.monotonic()
            while not stopping.is_set():
                running[0] += 1
                tg.start_soon(one, index, f"c{i}")
                i += 1
                due += PERIOD
                late = time.monotonic() - due
                if late < 0:
                    await anyio.sleep(-late)
                elif late > PERIOD:
                    due = time.monotonic()  # behind (the machine is busy): no burst to catch up
                    await anyio.sleep(0)

        @stats.method
        async def stop(_: None) -> dict:
            stopping.set()
            while running[0]:  # the calls under way end within their 10 s
                await anyio.sleep(0.01)
            return {"calls": len(records), "acked": acked, "last_error": last_error[0],
                    "cpu_s": time.process_time()}

        @stats.method(name="records")
        async def page(offset: int) -> list:
            return records[offset : offset + 2000]

        await stats.start()
        for index in range(len(TARGETS)):
            tg.start_soon(stream, index)
        await anyio.sleep_forever()

runtime.run(main)
"""


def _image(root: Path, keys: tuple[bytes, bytes], name: str, body: str, extra: str) -> Path:
    image = root / name
    image.mkdir()
    (image / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "1"\nentry = ["{{python}}", "main.py"]\n{extra}'
    )
    (image / "main.py").write_text(textwrap.dedent(body))
    sign_image(image, *keys)
    return image


def make_kv(root: Path, keys: tuple[bytes, bytes], version: int) -> Path:
    """A signed image of the KV workload at `version`, serving kv.<deployment>."""
    image = kv_image(root / f"kv-v{version}", version, per_instance=True)
    sign_image(image, *keys)
    return image


def make_caller(root: Path, keys: tuple[bytes, bytes], targets: list[str], rate: float) -> Path:
    """A signed image of the caller: `rate` puts per second to each of `targets`."""
    params = f"[parameters]\ntargets = {json.dumps(targets)}\nrate = {rate:g}\n"
    return _image(root, keys, "caller", CALLER, params)


@dataclass
class BenchHost:
    ep: Endpoint
    config: HostConfig

    async def lifecycle(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.ep.request("lifecycle", method, body, response=InstanceInfo)
        return info

    async def bring_up(self, name: str, image: Path, owns: str = "") -> InstanceInfo:
        """Create, load and start an instance of `image`; return once it owns `owns` (if any)."""
        create = CreateInstance(
            name, cpu_count=1, memory=192 * MB, restart=RestartPolicy(mode="transient")
        )
        await self.lifecycle("create", create)
        await self.lifecycle("load", LoadImage(name, str(image)))
        info = await self.lifecycle("start", StartInstance(name))
        if owns:
            await owned(self.ep, owns)
        return info

    async def show(self) -> list[InstanceInfo]:
        listing = await self.ep.request("lifecycle", "show", ShowInstances(), response=InstanceList)
        return list(listing.instances)

    async def remove_all(self) -> None:
        """Kill and delete every instance (best effort: this runs on the way out)."""
        with anyio.move_on_after(30):
            for info in await self.show():
                try:
                    if info.state == "active":
                        await self.lifecycle("kill", KillInstance(info.name, force=True))
                    await self.lifecycle("delete", DeleteInstance(info.name))
                except MultikernelError:
                    pass  # the host stops what is left


async def owned(ep: Endpoint, name: str) -> None:
    """Until the well-known `name` has an owner."""
    async with await ep.subscribe(f"mk.bus.names.{name}") as changes:
        if name in (await ep.introspect()).names:
            return
        with anyio.fail_after(PATIENCE):
            async for message in changes:
                if message.value().get("new_owner"):
                    return


class Interrupted(Exception):
    """The host stopped on a signal (it handles SIGINT and SIGTERM: it stops its instances)."""


@asynccontextmanager
async def bench_host(root: Path, cert: Path, **settings: Any) -> AsyncIterator[BenchHost]:
    """A host (hub, resource, lifecycle, upgrade; no fault actor) on `root`, and an endpoint on
    it; every instance is killed and deleted and the host stopped on the way out. Ctrl-C stops
    the host, which cancels the body: `Interrupted`."""
    config = HostConfig(
        root / "bus.sock",
        root / "state",
        policy_text=POLICY,
        trusted=[cert],
        heartbeat=0.2,
        fault=False,
        metrics="",
        **{"cpu_share": 8, **settings},
    )
    stop = anyio.Event()
    host_done = anyio.Event()
    interrupted = False
    async with anyio.create_task_group() as tg:

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            nonlocal interrupted
            try:
                await run_host(config, stop, task_status=task_status)
            finally:
                host_done.set()
            if not stop.is_set():  # a signal: the body must not wait for a hub that left
                interrupted = True
                tg.cancel_scope.cancel()

        await tg.start(serve)
        try:
            async with connect(config.socket, name="bench") as ep:
                host = BenchHost(ep, config)
                try:
                    await owned(ep, "upgrade")
                    yield host
                except Exception:
                    # the actors leave before the host returns: is it stopping on a signal?
                    with anyio.move_on_after(10):
                        await host_done.wait()
                    if stop.is_set() or not host_done.is_set():
                        raise
                    interrupted = True
                finally:
                    if not interrupted:
                        with anyio.CancelScope(shield=True):
                            await host.remove_all()
        finally:
            stop.set()
    if interrupted:
        raise Interrupted("interrupted: the host stopped its instances")
