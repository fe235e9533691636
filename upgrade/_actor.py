"""The upgrade actor: the bus service ``upgrade``, rollouts, and what it remembers.

A **rollout** upgrades instances to one image, ``max_surge`` at a time (each `Upgrade` needs a
successor beside its predecessor), in the order given. It stops starting new upgrades at the
first one that rolls back (that one's predecessor keeps everything; those already upgraded stay
upgraded: ``undo`` takes them back) and its outcome is ``failed``. ``pause`` lets the upgrades
under way finish and starts no other until ``resume``. Every change of an instance's upgrade is
saved (`UpgradeStore`) and published (`UpgradeEvent` on ``mk.upgrade.<name>.<step>``); the end
of a rollout too (its `RolloutStatus` on ``mk.upgrades.<rollout>``).

A restarted actor (the host restarts it like any actor) recovers what the last one left: each
upgrade under way is finished if its names had moved, else rolled back and done again
(`Upgrade.recover`), and a rollout that was running goes on with the instances it had not
reached (a paused one waits for ``resume``).

``undo NAME`` is a rollout of one instance to an earlier revision of its deployment, from the copy
of that revision's image the actor kept; it makes a new revision, as Kubernetes' ``rollout undo``
does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints import Bus
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    UPGRADE_METHODS,
    InstanceList,
    InstanceUpgrade,
    ListRollouts,
    NotFoundError,
    RefusedError,
    RevisionHistory,
    RevisionsQuery,
    RolloutList,
    RolloutRef,
    RolloutStatus,
    ShowInstances,
    StartRollout,
    UndoRollout,
    UpgradeEvent,
    rollout_subject,
    upgrade_subject,
)
from multikernel.upgrade._handover import UpgradeFailed
from multikernel.upgrade._steps import Upgrade
from multikernel.upgrade._store import UpgradeStore

log = get_logger("multikernel.upgrade")


@dataclass
class _Rollout:
    request: StartRollout
    status: RolloutStatus
    resumed: anyio.Event = field(default_factory=anyio.Event)
    in_place: anyio.Semaphore | None = None  # max_unavailable upgrades in place at once

    def __post_init__(self) -> None:
        if self.request.max_unavailable:
            self.in_place = anyio.Semaphore(self.request.max_unavailable)

    def paused(self) -> bool:  # a call: mypy would keep an attribute narrowed across awaits
        return self.status.outcome == "paused"


class UpgradeActor:
    """Serves ``upgrade`` and runs its rollouts (see the module docstring)."""

    def __init__(self, bus: Bus, store: UpgradeStore, state_dir: Path) -> None:
        self.bus = bus
        self.store = store
        self.state_dir = state_dir
        self._rollouts: dict[int, _Rollout] = {}
        self._busy: dict[str, int] = {}  # instance -> the rollout upgrading it now
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        service = self.bus.service("upgrade")
        for name in UPGRADE_METHODS:
            service.method(getattr(self, f"_{name}"), name=name)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for request, status in self.store.unfinished():
                rollout = self._rollouts[status.rollout] = _Rollout(request, status)
                await self._recover(rollout)
                tg.start_soon(self._run_rollout, rollout)
            await service.start()
            log.info("upgrade actor up", pid=os.getpid())
            task_status.started()
            await anyio.sleep_forever()

    # -- the service's methods -----------------------------------------------------------------

    async def _rollout(self, request: StartRollout) -> RolloutStatus:
        if not request.names:
            raise RefusedError("name at least one instance to upgrade")
        if len(set(request.names)) != len(request.names):
            raise RefusedError("an instance is named twice")
        image = _existing(request.image, "no image at {!r} (the path is read by the host)")
        listing = await self.bus.request(
            "lifecycle", "show", ShowInstances(), response=InstanceList
        )
        known = {info.name: info for info in listing.instances}
        for name in request.names:
            if name not in known:
                raise NotFoundError(f"no instance {name!r}: mkctl show lists them")
            if known[name].state != "active":
                raise RefusedError(
                    f"{name!r} is {known[name].state}: only active instances are upgraded"
                )
            if name in self._busy:
                raise RefusedError(f"{name!r} is being upgraded by rollout {self._busy[name]}")
        request = msgspec.structs.replace(request, image=image)
        rollout_id = self.store.new_rollout(request)
        status = RolloutStatus(
            rollout_id, "running", request.image,
            instances=tuple(InstanceUpgrade(name) for name in request.names),
            max_surge=request.max_surge, max_unavailable=request.max_unavailable,
            started_ns=time.time_ns(),
        )  # fmt: skip
        self.store.save(status)
        rollout = self._rollouts[rollout_id] = _Rollout(request, status)
        for name in request.names:
            self._busy[name] = rollout_id
        assert self._tg is not None
        self._tg.start_soon(self._run_rollout, rollout)
        log.info("rollout", rollout=rollout_id, names=list(request.names), image=request.image)
        return status

    async def _undo(self, request: UndoRollout) -> RolloutStatus:
        deployment = self.store.deployment_of(request.name)
        revisions = {r.revision: r for r in self.store.revisions(deployment)}
        current = self.store.current(deployment)
        if current not in revisions:
            raise NotFoundError(f"{request.name!r} has no upgrade history: nothing to undo")
        target = request.revision or max((r for r in revisions if r < current), default=0)
        if target not in revisions or target == current:
            raise NotFoundError(
                f"{deployment!r} has no revision {target or 'before ' + str(current)} to return "
                f"to (mkctl upgrade history {request.name})"
            )
        _existing(revisions[target].image, f"revision {target}'s image is no longer kept ({{!r}})")
        return await self._rollout(
            StartRollout(
                (revisions[current].instance,),
                revisions[target].image,
                deadlines=request.deadlines,
            )
        )

    async def _status(self, request: RolloutRef) -> RolloutStatus:
        if request.rollout in self._rollouts:
            return self._rollouts[request.rollout].status
        found = self.store.rollout(request.rollout)
        if found is None:
            raise NotFoundError(
                "no rollout yet" if not request.rollout else f"no rollout {request.rollout}"
            )
        return found[1]

    async def _list(self, request: ListRollouts) -> RolloutList:
        return RolloutList(tuple(self.store.rollouts(request.limit)))

    async def _pause(self, request: RolloutRef) -> RolloutStatus:
        rollout = self._running(request)
        if rollout.status.outcome == "running":
            rollout.resumed = anyio.Event()
            await self._save_status(rollout, outcome="paused")
        return rollout.status

    async def _resume(self, request: RolloutRef) -> RolloutStatus:
        rollout = self._running(request)
        if rollout.status.outcome == "paused":
            await self._save_status(rollout, outcome="running")
            rollout.resumed.set()
        return rollout.status

    async def _history(self, request: RevisionsQuery) -> RevisionHistory:
        deployment = self.store.deployment_of(request.name)
        return RevisionHistory(deployment, tuple(self.store.revisions(deployment)))

    def _running(self, request: RolloutRef) -> _Rollout:
        rollout_id = request.rollout or max(self._rollouts, default=0)
        rollout = self._rollouts.get(rollout_id)
        if rollout is None or rollout.status.outcome not in ("running", "paused"):
            raise RefusedError(f"rollout {rollout_id or ''} is not under way".replace("  ", " "))
        return rollout

    # -- running rollouts ----------------------------------------------------------------------

    async def _run_rollout(self, rollout: _Rollout) -> None:
        request = rollout.request
        surge = anyio.Semaphore(request.max_surge)
        failed: list[str] = []
        async with anyio.create_task_group() as tg:
            for index, item in enumerate(rollout.status.instances):
                if item.outcome != "waiting":
                    continue
                while True:  # a pause may come while it waits for a surge slot
                    while rollout.paused():
                        await rollout.resumed.wait()
                    await surge.acquire()
                    if not rollout.paused():
                        break
                    surge.release()
                if failed:
                    surge.release()
                    break
                tg.start_soon(self._upgrade, rollout, index, surge, failed)
        outcome = "failed" if failed else "done"
        await self._save_status(
            rollout, outcome=outcome, ended_ns=time.time_ns(), error="; ".join(failed)
        )
        for item in rollout.status.instances:
            self._busy.pop(item.name, None)
        await self.bus.publish(rollout_subject(rollout.status.rollout), rollout.status)
        log.info("rollout ended", rollout=rollout.status.rollout, outcome=outcome)

    async def _upgrade(
        self, rollout: _Rollout, index: int, surge: anyio.Semaphore, failed: list[str]
    ) -> None:
        try:
            upgrade = self._upgrade_of(rollout, index)
            await upgrade.run()
        except UpgradeFailed as error:
            failed.append(f"{rollout.status.instances[index].name}: {error}")
        except Exception as error:  # a bug of ours must not take the actor down
            log.exception("upgrade failed", name=rollout.status.instances[index].name)
            failed.append(f"{rollout.status.instances[index].name}: {error}")
        finally:
            surge.release()

    def _upgrade_of(self, rollout: _Rollout, index: int) -> Upgrade:
        async def save(record: InstanceUpgrade) -> None:
            items = list(rollout.status.instances)
            items[index] = record
            await self._save_status(rollout, instances=tuple(items))
            done = sum(i.outcome in ("done", "rolled-back", "failed") for i in items)
            event = UpgradeEvent(
                rollout.status.rollout, record.name, record.step or "start",
                "running" if record.outcome == "waiting" else record.outcome,
                successor=record.successor, revision=record.revision, detail=record.error,
                time_ns=time.time_ns(), done=done, total=len(items),
            )  # fmt: skip
            await self.bus.publish(upgrade_subject(record.name, event.step), event)

        return Upgrade(
            self.bus, self.store, self.state_dir, rollout.request.deadlines,
            rollout.status.instances[index], save, image=rollout.request.image,
            in_place=rollout.in_place,
        )  # fmt: skip

    async def _recover(self, rollout: _Rollout) -> None:
        """Finish or undo the upgrades a previous run left under way (see `Upgrade.recover`)."""
        for index, item in enumerate(rollout.status.instances):
            self._busy[item.name] = rollout.status.rollout
            if item.outcome == "running":
                log.warning("recovering an upgrade", name=item.name, step=item.step)
                upgrade = self._upgrade_of(rollout, index)
                await upgrade.recover()
                if upgrade.record.outcome == "rolled-back":  # undone by the restart: again
                    items = list(rollout.status.instances)
                    items[index] = InstanceUpgrade(item.name)
                    await self._save_status(rollout, instances=tuple(items))

    async def _save_status(self, rollout: _Rollout, **changes: object) -> None:
        rollout.status = msgspec.structs.replace(rollout.status, **changes)
        self.store.save(rollout.status)  # a small WAL transaction: written before the step runs


def _existing(path: str, missing: str) -> str:
    """`path`, absolute, if something is there; else NotFoundError(missing.format(path))."""
    if not path or not os.path.exists(path):
        raise NotFoundError(missing.format(path))
    return os.path.abspath(path)
