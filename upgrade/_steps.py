"""One instance's upgrade, step by step, and how each step is undone (docs/upgrade.md).

`Upgrade.run` takes an instance (the *predecessor*) through ``UPGRADE_STEPS``: a successor
instance is created beside it with the same resources (a surge grant from the resource actor),
loaded with the new image (the lifecycle verifies it) and started; the predecessor's names are
held at the hub, the predecessor is frozen and its state streamed to the actor, which keeps it in
its state dir before anything else happens; the successor restores it and answers its health
check; the names switch at once; the predecessor is stopped and deleted.

Every step runs under its deadline. A failure up to the switch rolls back: the holds end (the
predecessor keeps its names and what waited goes to it), the predecessor thaws, the successor is
stopped and deleted. From the switch on the upgrade is done: what is left (stopping the
predecessor) is finished, never undone, since the successor may have served calls already.

The actor writes the upgrade's progress (`InstanceUpgrade`) before each step through `save`, so
an actor restarted mid-way calls `recover`, which rolls back or finishes by the step recorded.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from multikernel.endpoints import Bus
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    ControlInfo,
    CreateInstance,
    Deadlines,
    DeleteInstance,
    InstanceInfo,
    InstanceList,
    InstanceUpgrade,
    KillInstance,
    LoadImage,
    MultikernelError,
    NoRespondersError,
    NotFoundError,
    RefusedError,
    RestartPolicy,
    Revision,
    ShowInstances,
    StartInstance,
    UpdateInstance,
    control_name,
)
from multikernel.upgrade._handover import (
    UpgradeFailed,
    check_endpoint,
    describe,
    give_state,
    predecessor_control,
    take_state,
    wait_healthy,
    write_durably,
)
from multikernel.upgrade._store import UpgradeStore

log = get_logger("multikernel.upgrade")

#: Steps after which the names have moved: an upgrade stopped there is finished, not undone.
SWITCHED = ("switch", "drain")


@dataclass
class Upgrade:
    """One instance's upgrade (see the module docstring)."""

    bus: Bus
    store: UpgradeStore
    state_dir: Path
    deadlines: Deadlines
    record: InstanceUpgrade
    save: Callable[[InstanceUpgrade], Awaitable[None]]
    image: str = ""
    deployment: str = ""
    in_place: anyio.Semaphore | None = None  # the rollout's max_unavailable budget, if any
    held: tuple[str, ...] = ()
    frozen: bool = False
    held_at: float = 0.0
    state: bytes = b""  # the predecessor's state image, once taken
    switched: bool = False  # the names moved (this run saw switch_names succeed)

    async def _set(self, **changes: Any) -> None:
        self.record = msgspec.structs.replace(self.record, **changes)
        await self.save(self.record)

    async def run(self) -> None:
        """Upgrade; UpgradeFailed (after the rollback) if it did not happen."""
        try:
            await self._forward()
        except Exception as error:
            if self.switched:
                # the names moved: finish the stop of the predecessor, do not undo
                log.warning("upgrade done with a problem", name=self.record.name, error=str(error))
                await self._set(
                    outcome="done", error=f"{self.record.step}: {error}", ended_ns=_now()
                )
                return
            message = f"{self.record.step}: {error}"
            with anyio.CancelScope(shield=True):
                await self.rollback(message)
            raise UpgradeFailed(message) from error

    async def _names_moved(self) -> bool:
        """After a restart: whether the successor may have served (the upgrade is then
        finished). At `switch` the journal says the move was asked, not that it happened: the
        hub says whether the successor owns a name now."""
        step, mode = self.record.step, self.record.mode
        if mode == "in-place" or step != "switch":
            return step == "switch" if mode == "in-place" else step in SWITCHED
        successor = await self._maybe_show(self.record.successor)
        if successor is None:
            return False
        snapshot = await self.bus.introspect()
        mine = {e.endpoint_id for e in snapshot.endpoints if e.instance == successor.id}
        return any(
            owners and owners[0] in mine and not name.startswith("instance.")
            for name, owners in snapshot.names.items()
        )

    def _state_path(self, kind: str) -> Path:
        """Where the predecessor's state (`mkps`) or definition (`instance`) is kept."""
        path = self.state_dir / "states" / f"{self.deployment}-r{self.record.revision}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    async def _forward(self) -> None:
        old = await self._show(self.record.name)
        if old.state != "active":
            raise RefusedError(
                f"{old.name!r} is {old.state}: only an active instance is upgraded "
                f"(mkctl start {old.name})"
            )
        self.deployment = self.store.deployment_of(old.name)
        revision = self._first_revision(old)
        await self._set(step="verify", revision=revision, started_ns=_now(), outcome="running")
        await self._set(successor=self._successor_name(revision), mode="surge")
        self.image = self._keep_image(revision)
        try:
            with anyio.fail_after(self.deadlines.start):
                await self._create(self.record.successor, old)
        except RefusedError as error:
            if error.remote_type != "ResourceUnavailableError":
                raise
            await self._in_place(old, error)
            return
        new, ours = await self._start_successor()
        theirs = await predecessor_control(self.bus, old)
        missing = set(theirs.names) - set(ours.names)
        if missing:
            raise RefusedError(f"the new image does not serve {sorted(missing)}")
        await check_endpoint(self.bus, ours.endpoint, new)
        await self._switch_over(old, new, theirs, ours)
        await self._set(step="drain")
        await self._drain(old, new)
        await self._set(outcome="done", ended_ns=_now())

    async def _create(self, name: str, like: InstanceInfo, **changes: Any) -> InstanceInfo:
        """Create `name` with `like`'s resources (a grant of its own from the resource actor)."""
        return await self._lifecycle(
            "create",
            CreateInstance(
                name, cpu_count=max(len(like.cpus), 1), memory=like.memory,
                restart=changes.get("restart", RestartPolicy(mode="temporary")),
                queues=like.queues or None,
            ),
        )  # fmt: skip

    async def _start_successor(self) -> tuple[InstanceInfo, ControlInfo]:
        """Load the new image into the created successor, start it, and find its control."""
        successor = self.record.successor
        with anyio.fail_after(self.deadlines.start):
            new = await self._lifecycle("load", LoadImage(successor, self.image))
            self.store.add_revision(
                self.deployment,
                Revision(
                    self.record.revision, successor, self.image, new.image_digest,
                    new.image_version,
                ),
                current=False,
            )  # fmt: skip
            await self._set(step="start")
            new = await self._lifecycle("start", StartInstance(successor))
            ours = await describe(self.bus, new.id, self.deadlines.start)
        return new, ours

    # -- in place ------------------------------------------------------------------------------

    async def _in_place(self, old: InstanceInfo, refused: RefusedError) -> None:
        """No room for a successor beside `old`: stop it first (downtime), then replace it.

        Allowed only within the rollout's `max_unavailable`. The predecessor's state is taken
        and kept before it stops; a successor that fails is removed and the predecessor made
        again from its kept image and state (`_restore_predecessor`).
        """
        if self.in_place is None:
            raise RefusedError(
                f"no room for a successor beside {old.name!r} ({refused}); to upgrade it in "
                "place, with downtime, allow it: --max-unavailable 1"
            )
        async with self.in_place:
            await self._set(mode="in-place", step="freeze")
            theirs = await predecessor_control(self.bus, old)
            with anyio.fail_after(self.deadlines.freeze):
                if theirs.endpoint:
                    self.frozen = True
                    self.state = await take_state(self.bus, old.id, self._thaw_after())
            await self._keep_state(self.state)  # before the predecessor is stopped
            await anyio.to_thread.run_sync(
                write_durably, self._state_path("instance"), msgspec.msgpack.encode(old)
            )
            await self._set(step="drain")
            down = time.monotonic()
            with anyio.fail_after(self.deadlines.drain + 5):
                await self._lifecycle("kill", KillInstance(old.name, grace=self.deadlines.drain))
                await self._lifecycle("delete", DeleteInstance(old.name))
            self.frozen = False
            await self._create(self.record.successor, old)
            new, ours = await self._start_successor()
            await self._set(step="restore")
            with anyio.fail_after(self.deadlines.restore):
                if ours.stateful and theirs.stateful:
                    await give_state(self.bus, new.id, self.state)
            await self._set(step="health")
            await wait_healthy(self.bus, new.id, self.deadlines.health)
            await self._set(step="switch")
            self.switched = True  # it serves its names already
            self.store.set_current(self.deployment, self.record.revision)
            await self._lifecycle("update", UpdateInstance(new.name, restart=old.restart))
            await self._set(
                outcome="done", down_ms=(time.monotonic() - down) * 1000, ended_ns=_now()
            )

    async def _switch_over(
        self, old: InstanceInfo, new: InstanceInfo, theirs: ControlInfo, ours: ControlInfo
    ) -> None:
        await self._set(step="freeze")
        self.held_at = time.monotonic()
        if theirs.names:
            await self.bus.hold_names(theirs.names, hold_for=self.deadlines.hold)
            self.held = theirs.names
        image = b""
        with anyio.fail_after(self.deadlines.freeze):
            if theirs.endpoint:  # an upgradable predecessor: its state, whole
                self.frozen = True
                image = await take_state(self.bus, old.id, self._thaw_after())
        await self._set(step="restore")
        with anyio.fail_after(self.deadlines.restore):
            try:
                async with anyio.create_task_group() as tg:  # kept on disk while it is restored
                    tg.start_soon(self._keep_state, image)
                    if ours.stateful and theirs.stateful:
                        await give_state(self.bus, new.id, image)
            except BaseExceptionGroup as group:  # the error itself, not its group
                raise group.exceptions[0] from None
        await self._set(step="health")
        await wait_healthy(self.bus, new.id, self.deadlines.health)
        await self._set(step="switch")
        if self.held:
            await self.bus.switch_names({name: ours.endpoint for name in self.held})
        self.switched = True
        held_ms = (time.monotonic() - self.held_at) * 1000
        self.held = ()
        self.store.set_current(self.deployment, self.record.revision)
        await self._set(held_ms=held_ms)
        log.info("names switched", name=old.name, successor=new.name, held_ms=round(held_ms, 1))

    async def _drain(self, old: InstanceInfo, new: InstanceInfo) -> None:
        if self.frozen:
            await self._control(old.id, "finish")
        with anyio.fail_after(self.deadlines.drain + 5):
            await self._lifecycle("kill", KillInstance(old.name, grace=self.deadlines.drain))
            await self._lifecycle("delete", DeleteInstance(old.name))
        await self._lifecycle("update", UpdateInstance(new.name, restart=old.restart))

    # -- the steps' parts ----------------------------------------------------------------------

    def _first_revision(self, old: InstanceInfo) -> int:
        """The revision the upgrade makes; the predecessor's own is recorded first if new."""
        if not self.store.revisions(self.deployment):
            kept = self._copy_image(old.image_source, 1)
            self.store.add_revision(
                self.deployment,
                Revision(1, old.name, kept, old.image_digest, old.image_version),
                current=True,
            )
        return self.store.next_revision(self.deployment)

    def _successor_name(self, revision: int) -> str:
        return f"{self.deployment[: 31 - len(str(revision)) - 2]}-r{revision}"

    def _keep_image(self, revision: int) -> str:
        return self._copy_image(self.image, revision)

    def _copy_image(self, source: str, revision: int) -> str:
        """A copy of the image in the actor's state dir (an undo loads it again); its path."""
        if not source or not os.path.exists(source):
            return source  # nothing to copy: a revision that cannot be undone to
        dest = self.state_dir / "images" / self.deployment / f"r{revision}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(source):
            shutil.copytree(source, dest, symlinks=True)
        else:
            dest.mkdir()
            dest = dest / os.path.basename(source)
            shutil.copy2(source, dest)
        return str(dest)

    def _thaw_after(self) -> float:
        """How long a frozen predecessor waits for us before it thaws by itself."""
        return self.deadlines.hold + self.deadlines.drain

    async def _keep_state(self, image: bytes) -> None:
        """Write the predecessor's state to the state dir, durably (an fsync: in a thread)."""
        await anyio.to_thread.run_sync(write_durably, self._state_path("mkps"), image)

    # -- undoing -------------------------------------------------------------------------------

    async def rollback(self, why: str) -> None:
        """Undo what was done so far: the predecessor keeps everything, or (in place, once it
        was stopped) is made again from its kept image and state."""
        log.warning("rolling back", name=self.record.name, why=why)
        errors: list[str] = []
        if self.held:
            try:
                await self.bus.release_names(self.held)
            except MultikernelError as error:  # its deadline ends it anyway
                errors.append(f"release: {error}")
            self.held = ()
        if self.record.successor:
            await self._remove(self.record.successor, errors)
            if self.deployment and self.record.revision:
                self.store.drop_revision(self.deployment, self.record.revision)
        old = await self._maybe_show(self.record.name)
        outcome = "rolled-back"
        if old is not None and old.state == "active":
            try:
                await self._control(old.id, "thaw")
            except NoRespondersError:
                pass  # not upgradable, or never frozen
            except MultikernelError as error:
                errors.append(f"thaw: {error}")
        elif old is None and self.record.mode == "in-place":
            try:
                await self._restore_predecessor()
            except Exception as error:
                outcome = "failed"
                errors.append(
                    f"{self.record.name!r} could not be made again ({error}); its state is kept "
                    f"in {self._state_path('mkps')}"
                )
        await self._set(
            outcome=outcome,
            error=why + (f" (and {'; '.join(errors)})" if errors else ""),
            ended_ns=_now(),
        )

    async def _restore_predecessor(self) -> None:
        """Make the predecessor stopped by an in-place upgrade again: its definition, the image
        of the deployment's current revision, its kept state."""
        old = msgspec.msgpack.decode(self._state_path("instance").read_bytes(), type=InstanceInfo)
        state_file = self._state_path("mkps")
        state = state_file.read_bytes() if state_file.exists() else b""
        revisions = {r.revision: r for r in self.store.revisions(self.deployment)}
        current = revisions.get(self.store.current(self.deployment))
        with anyio.fail_after(self.deadlines.start + self.deadlines.restore):
            await self._create(old.name, old, restart=old.restart)
            image = current.image if current is not None else old.image_source
            await self._lifecycle("load", LoadImage(old.name, image))
            info = await self._lifecycle("start", StartInstance(old.name))
            if state:
                ours = await describe(self.bus, info.id, self.deadlines.start)
                if ours.stateful:
                    await give_state(self.bus, info.id, state)
        log.info("predecessor made again", name=old.name)

    async def recover(self) -> None:
        """Finish or undo an upgrade a previous run of the actor left at `record.step`."""
        self.deployment = self.store.deployment_of(self.record.name)
        if await self._names_moved():
            old = await self._maybe_show(self.record.name)
            new = await self._maybe_show(self.record.successor)
            if old is not None and new is not None and self.record.mode == "surge":
                self.frozen = old.state == "active"
                with anyio.CancelScope(shield=True):
                    try:
                        await self._drain(old, new)
                    except MultikernelError as error:
                        log.warning("drain after restart failed", error=str(error))
            self.store.set_current(self.deployment, self.record.revision)
            await self._set(outcome="done", ended_ns=_now())
        else:
            await self.rollback(f"the upgrade actor restarted at {self.record.step or 'start'}")

    async def _remove(self, name: str, errors: list[str]) -> None:
        try:
            if (info := await self._maybe_show(name)) is None:
                return
            if info.state == "active":
                await self._lifecycle("kill", KillInstance(name, force=True))
            await self._lifecycle("delete", DeleteInstance(name))
        except MultikernelError as error:
            errors.append(f"removing {name}: {error}")

    # -- calls ---------------------------------------------------------------------------------

    async def _lifecycle(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.bus.request(
            "lifecycle", method, body, response=InstanceInfo
        )
        return info

    async def _show(self, name: str) -> InstanceInfo:
        listing = await self.bus.request(
            "lifecycle", "show", ShowInstances(name), response=InstanceList
        )
        return listing.instances[0]

    async def _maybe_show(self, name: str) -> InstanceInfo | None:
        try:
            return await self._show(name)
        except NotFoundError:
            return None

    async def _control(
        self, instance: int, method: str, body: object = None, *, response: Any = Any
    ) -> Any:
        return await self.bus.request(control_name(instance), method, body, response=response)


def _now() -> int:
    return time.time_ns()
