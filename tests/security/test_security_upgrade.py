"""An upgrade between instances that lie: the predecessor's state and the successor's claims.

The upgrade actor trusts neither side. A predecessor may stream state that does not add up (out
of order, larger than it said, larger than any image, damaged) or never finish its freeze; a
successor may name someone else's endpoint as its services' owner (to hand the names to an
accomplice waiting in their queue) or never answer its health check. Each time the upgrade rolls
back: the predecessor keeps its names and serves, and nobody else gets them.

The lifecycle here is a fake on the in-memory bus (instances are tasks with endpoints bound to
their instance ids), so each hostile workload is a few lines; `Upgrade` is the actor's own code.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from multikernel.bus import Policy
from multikernel.bus.testing import MemoryBus, MemoryEndpoint
from multikernel.protocol import (
    ControlInfo,
    CreateInstance,
    Deadlines,
    DeleteInstance,
    Freeze,
    Health,
    InstanceInfo,
    InstanceList,
    InstanceUpgrade,
    KillInstance,
    LoadImage,
    NotFoundError,
    ShowInstances,
    StartInstance,
    StateChunk,
    UpdateInstance,
    control_name,
)
from multikernel.upgrade import PreservedState, UpgradeControl
from multikernel.upgrade._handover import UpgradeFailed
from multikernel.upgrade._steps import Upgrade
from multikernel.upgrade._store import UpgradeStore

pytestmark = pytest.mark.anyio

POLICY = Policy.from_toml('[[rule]]\nwho = "*"\ncall = [">"]\nown = [">"]\npublish = [">"]\n')
Workload = Callable[[MemoryEndpoint, int], Awaitable[None]]


class FakeLifecycle:
    """`lifecycle` on the in-memory bus: an instance's workload is a task with its endpoint."""

    def __init__(self, bus: MemoryBus, tg: anyio.abc.TaskGroup, images: dict[str, Workload]):
        self.bus, self.tg, self.images = bus, tg, images
        self.instances: dict[str, InstanceInfo] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.ids = itertools.count(1)

    async def serve(self, ep: MemoryEndpoint) -> None:
        service = ep.service("lifecycle")
        for method in (self.create, self.load, self.start, self.show, self.kill, self.delete,
                       self.update):  # fmt: skip
            service.method(method)
        await service.start()

    def _set(self, name: str, **changes: object) -> InstanceInfo:
        info = self.instances[name] = msgspec.structs.replace(self.instances[name], **changes)
        return info

    async def create(self, request: CreateInstance) -> InstanceInfo:
        self.instances[request.name] = InstanceInfo(
            request.name, next(self.ids), "ready", memory=request.memory
        )
        return self.instances[request.name]

    async def load(self, request: LoadImage) -> InstanceInfo:
        return self._set(request.name, state="loaded", image_source=request.image)

    async def start(self, request: StartInstance) -> InstanceInfo:
        info = self.instances[request.name]
        workload = self.images[info.image_source]
        started = anyio.Event()

        async def run() -> None:
            with anyio.CancelScope() as scope:
                self.scopes[info.name] = scope
                async with self.bus.connect(info.name, instance=info.id) as ep:
                    started.set()
                    await workload(ep, info.id)

        self.tg.start_soon(run)
        await started.wait()
        return self._set(request.name, state="active")

    async def show(self, request: ShowInstances) -> InstanceList:
        if request.name and request.name not in self.instances:
            raise NotFoundError(f"no instance {request.name!r}")
        wanted = [request.name] if request.name else list(self.instances)
        return InstanceList(tuple(self.instances[name] for name in wanted))

    async def kill(self, request: KillInstance) -> InstanceInfo:
        self.scopes.pop(request.name).cancel()
        return self._set(request.name, state="loaded")

    async def delete(self, request: DeleteInstance) -> InstanceInfo:
        return self.instances.pop(request.name)

    async def update(self, request: UpdateInstance) -> InstanceInfo:
        return self.instances[request.name]


async def honest(
    ep: MemoryEndpoint, instance: int, preserve: object = None, health: object = None
) -> None:
    """A stateful workload serving `kv` (ping answers its instance) with an honest control
    (unless given a `preserve` or a `health` of its own)."""
    kv = ep.service("kv")

    @kv.method
    async def ping(_: None) -> int:
        return instance

    def save() -> PreservedState:
        state = PreservedState()
        state.put("pings", {"n": 1}, schema="Pings")
        return state

    async with anyio.create_task_group() as tg:
        upgrade = UpgradeControl(
            ep, [kv], preserve=preserve or save, restore=lambda state: None,  # type: ignore[arg-type]
            health=health, instance=instance,  # type: ignore[arg-type]
        )  # fmt: skip
        await tg.start(upgrade.run)
        await kv.start()
        await anyio.sleep_forever()


@asynccontextmanager
async def world(
    tmp_path: Path, successor: Workload, predecessor: Workload = honest
) -> AsyncIterator[tuple[MemoryEndpoint, FakeLifecycle, Upgrade]]:
    bus = MemoryBus(POLICY)
    async with (
        anyio.create_task_group() as tg,
        bus.connect("lifecycle") as lifecycle_ep,
        bus.connect("upgrade") as actor,
    ):
        lifecycle = FakeLifecycle(bus, tg, {"old": predecessor, "new": successor})
        await lifecycle.serve(lifecycle_ep)
        await lifecycle.create(CreateInstance("web", memory=1 << 20))
        await lifecycle.load(LoadImage("web", "old"))
        async with await actor.subscribe("mk.bus.names.kv") as names:
            await lifecycle.start(StartInstance("web"))
            with anyio.fail_after(10):
                await names.__anext__()  # the predecessor owns kv

        async def save(record: InstanceUpgrade) -> None:
            upgrade.record = record

        store = UpgradeStore(tmp_path / "upgrade.db")
        deadlines = Deadlines(start=5, freeze=1, restore=1, health=0.5, hold=5, drain=1)
        upgrade = Upgrade(
            actor, store, tmp_path, deadlines, InstanceUpgrade("web"), save, image="new"
        )
        try:
            yield actor, lifecycle, upgrade
        finally:
            store.close()
            tg.cancel_scope.cancel()


async def rolled_back(actor: MemoryEndpoint, lifecycle: FakeLifecycle, upgrade: Upgrade) -> str:
    """Run the upgrade, which must roll back; the predecessor keeps `kv`; the error."""
    with pytest.raises(UpgradeFailed) as failed:
        await upgrade.run()
    assert upgrade.record.outcome == "rolled-back"
    assert list(lifecycle.instances) == ["web"], "the successor is gone"
    assert await actor.request("kv", "ping") == lifecycle.instances["web"].id
    return str(failed.value)


async def test_a_successor_naming_an_accomplice_as_owner_gets_nothing(tmp_path: Path) -> None:
    accomplice_id: list[int] = []

    async def liar(ep: MemoryEndpoint, instance: int) -> None:
        kv = ep.service("kv")
        await kv.start()  # waits in kv's queue like a successor
        control = ep.service(control_name(instance))

        @control.method
        async def describe(_: None) -> ControlInfo:
            return ControlInfo(("kv",), endpoint=accomplice_id[0], stateful=False)

        @control.method
        async def health(_: None) -> Health:
            return Health(True)

        await control.start()
        await anyio.sleep_forever()

    async with (
        world(tmp_path, liar) as (actor, lifecycle, upgrade),
        lifecycle.bus.connect("accomplice", instance=99) as accomplice,
    ):
        accomplice_id.append(accomplice.id)
        await accomplice.service("kv").start()  # also queued for kv
        error = await rolled_back(actor, lifecycle, upgrade)
        assert f"endpoint {accomplice.id}" in error
        assert "not on instance" in error
        assert lifecycle.bus.snapshot().names["kv"][0] != accomplice.id


def streaming(chunks: list[StateChunk]) -> Workload:
    """A predecessor whose freeze streams `chunks` (whatever they say)."""

    async def workload(ep: MemoryEndpoint, instance: int) -> None:
        kv = ep.service("kv")

        @kv.method
        async def ping(_: None) -> int:
            return instance

        control = ep.service(control_name(instance))

        @control.method
        async def describe(_: None) -> ControlInfo:
            return ControlInfo(("kv",), endpoint=ep.id)

        @control.method
        async def freeze(_: Freeze) -> AsyncIterator[StateChunk]:
            for chunk in chunks:
                yield chunk

        @control.method
        async def thaw(_: None) -> None:
            pass

        await control.start()
        await kv.start()
        await anyio.sleep_forever()

    return workload


GOOD = PreservedState()
GOOD.put("pings", {"n": 1}, schema="Pings")
IMAGE = GOOD.encode()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([StateChunk(0, len(IMAGE), IMAGE[:10]), StateChunk(20, len(IMAGE), IMAGE[20:])],
         "does not add up"),
        ([StateChunk(0, 10, IMAGE)], "does not add up"),
        ([StateChunk(0, 2 << 30, b"x" * 100)], "does not add up"),
        ([StateChunk(0, 50, IMAGE[:10]), StateChunk(10, 60, IMAGE[10:20])], "does not add up"),
        ([StateChunk(0, len(IMAGE), IMAGE[:-1])], "ended at"),
        ([StateChunk(0, len(IMAGE), IMAGE[:-1] + b"\x00")], "CRC"),
    ],
    ids=["gap", "overrun", "huge", "total-changes", "short", "damaged"],
)  # fmt: skip
async def test_a_predecessor_whose_state_does_not_add_up_is_refused(
    tmp_path: Path, chunks: list[StateChunk], expected: str
) -> None:
    async with world(tmp_path, honest, streaming(chunks)) as (actor, lifecycle, upgrade):
        error = await rolled_back(actor, lifecycle, upgrade)
        assert "freeze" in error
        assert expected in error


async def test_a_predecessor_that_never_finishes_its_freeze_is_left_at_the_deadline(
    tmp_path: Path,
) -> None:
    async def stuck(ep: MemoryEndpoint, instance: int) -> None:
        async def never() -> PreservedState:
            await anyio.sleep_forever()
            raise AssertionError

        await honest(ep, instance, preserve=never)

    async with world(tmp_path, honest, stuck) as (actor, lifecycle, upgrade):
        error = await rolled_back(actor, lifecycle, upgrade)
        assert error.startswith("freeze")


async def test_a_successor_that_never_answers_health_is_removed(tmp_path: Path) -> None:
    async def silent(ep: MemoryEndpoint, instance: int) -> None:
        async def hang() -> bool:
            await anyio.sleep_forever()
            return True

        await honest(ep, instance, health=hang)

    async with world(tmp_path, silent) as (actor, lifecycle, upgrade):
        error = await rolled_back(actor, lifecycle, upgrade)
        assert "health" in error
        assert "not healthy within" in error


async def test_a_switch_the_hub_refuses_is_rolled_back_not_taken_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(moves: object) -> None:
        raise NotFoundError("the new owner is not attached")

    async with world(tmp_path, honest) as (actor, lifecycle, upgrade):
        monkeypatch.setattr(actor, "switch_names", refused)
        error = await rolled_back(actor, lifecycle, upgrade)
        assert error.startswith("switch: the new owner is not attached")
        assert not upgrade.switched
