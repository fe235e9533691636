"""A restarted host takes its instances back: adopt what still runs, reclaim what does not.

`recover` reads `lifecycle.db` and, for each instance stored: launches that were being started when
the host died (`launching`) are ended and their cgroups removed; a standby is always reclaimed (its
control socket died with the old host, so it has exited or is about to); the instance's own launch
is adopted if its processes still run (the platform checks their pids *and* start times), and
reclaimed otherwise, the instance then going back to `loaded` with cause `lost` (a restart policy
may then start it again). An image whose unpacked directory is gone is dropped, and directories
under `<state>/instances` that belong to no stored instance (a delete cut short) are removed. So a
name can be used again after any crash, and nothing a dead host started is left behind.

The host runs it before its hub listens: an agent that re-attaches by path is then already known to
the platform when the hub asks which instance it is part of. What changed is announced on the bus
once the lifecycle actor is attached (`Recovered.changes`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from multikernel.endpoints.log import get_logger
from multikernel.services._instance_store import InstanceStore, StoredInstance, restored
from multikernel.services._instances import ACTIVE, EMPTY, FAILED, LOADED, READY, Instance
from multikernel.services._platform import InstanceProcess, LaunchSpec, Platform

log = get_logger("multikernel.lifecycle")

STORE_NAME = "lifecycle.db"


@runtime_checkable
class Recoverable(Protocol):
    """What a platform offers so that a restarted host finds its instances again."""

    def adopt(self, spec: LaunchSpec, record: str) -> InstanceProcess | None: ...

    async def reclaim_record(self, record: str) -> None: ...

    async def reclaim_unit(self, unit: str) -> None: ...


@dataclass
class Change:
    """A state change made while the bus was away, to announce once it is back."""

    inst: Instance
    old: str
    new: str
    reason: str
    cause: str = ""


@dataclass
class Recovered:
    """What `recover` found: the open store, the instances, what to announce."""

    store: InstanceStore
    instances: dict[str, Instance] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def adopted(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.proc is not None]


async def recover(platform: Platform, state_dir: Path) -> Recovered:
    """Open `<state_dir>/lifecycle.db` and bring every stored instance back (module docstring)."""
    store = InstanceStore(state_dir / STORE_NAME)
    recovered = Recovered(store)
    try:
        for row in store.load():
            inst = await _recover_one(platform, row, recovered.changes)
            recovered.instances[inst.name] = inst
            store.save_instance(inst)
        _remove_orphan_images(state_dir, recovered.instances)
    except BaseException:
        store.close()
        raise
    if recovered.instances:
        log.info(
            "instances recovered",
            adopted=[i.name for i in recovered.adopted()],
            known=sorted(recovered.instances),
        )
    return recovered


async def _recover_one(platform: Platform, row: StoredInstance, changes: list[Change]) -> Instance:
    inst = restored(row)
    can = platform if isinstance(platform, Recoverable) else None
    if can is not None:
        for unit in row.launching:
            await can.reclaim_unit(unit)
        if row.standby:
            await can.reclaim_record(row.standby)
    if inst.image_dir is not None and not inst.image_dir.is_dir():
        log.warning("unpacked image gone", instance=inst.name, path=str(inst.image_dir))
        inst.image = inst.image_dir = None
    proc = None
    if row.proc and can is not None and inst.resources is not None and inst.image is not None:
        spec = LaunchSpec(inst.name, inst.id, ["(adopted)"], {}, (), inst.resources)
        proc = can.adopt(spec, row.proc)
    if proc is not None and inst.state == ACTIVE:
        inst.proc, inst.proc_record = proc, row.proc
        inst.hello.set()  # it said hello to the old host; it says it again when it re-attaches
        changes.append(
            Change(inst, ACTIVE, ACTIVE, f"adopted after a host restart (pid {proc.pid})")
        )
        return inst
    inst.output_fd = 0  # no launch of it runs
    if proc is not None:  # a launch that never became active (its start was cut short)
        await platform.kill(proc)
        await platform.reclaim(proc)
    elif row.proc and can is not None:
        await can.reclaim_record(row.proc)
    if row.proc or inst.state == ACTIVE:
        old = inst.state
        inst.cause = "lost"
        inst.last_exit = "ended while the host was down"
        inst.restarts += old == ACTIVE
        if old != FAILED:
            inst.state = LOADED if inst.image else READY if inst.resources else EMPTY
        changes.append(
            Change(
                inst, old, inst.state, "its launch ended while the host was down; reclaimed", "lost"
            )
        )
    elif inst.state == LOADED and inst.image is None:
        inst.state = READY if inst.resources else EMPTY
        changes.append(Change(inst, LOADED, inst.state, "its unpacked image is gone"))
    return inst


def _remove_orphan_images(state_dir: Path, instances: dict[str, Instance]) -> None:
    root = state_dir / "instances"
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name not in instances and entry.is_dir():
            log.info("orphan instance directory removed", path=str(entry))
            shutil.rmtree(entry, ignore_errors=True)
