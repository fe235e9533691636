"""The fault actor: detect failed instances, restart them by their policy, remember everything.

It runs in its own process (`python -m multikernel.services.fault`, started and restarted by the
host) and talks to the others only through the bus: it learns of instances from the lifecycle's
`show` and its state events, of hangs from the agents' heartbeats, of garbage from the hub's
cut-off events (`_fault_watch`, detection), decides what a failure calls for (`_fault_policy`,
the OTP rules), and asks the lifecycle to `restart` or `fail` the instance. It serves `fault`
(`status`, `policy_get`, `policy_set`, `history`, typed in `multikernel.protocol`) and publishes
`failed`, `restarting`, `recovered` and `gave-up` on `mk.instance.<id>.fault`.

Everything it must not forget is in `fault.db` (`_fault_store`), written before it acts: which
launch's end was handled, the restarts counted against each intensity, the restart it decided and
has not yet seen done. A fault actor killed at any point, even while it waits out a back-off or
while the lifecycle restarts an instance for it, is started again by the host, reads that back,
finishes what it had begun, and handles the failures it missed; the lifecycle's `restart` takes the
generation of the launch it replaces, so a restart asked twice is made once.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints import Bus, Subscription, retrying
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    FAULT_METHODS,
    EndpointCutOff,
    FailInstance,
    FaultEvent,
    FaultHistory,
    FaultStatus,
    FaultStatusList,
    FaultStatusRequest,
    HistoryRequest,
    InstanceInfo,
    InstanceList,
    InstanceStateChanged,
    MultikernelError,
    NotFoundError,
    PolicyGet,
    PolicyInfo,
    PolicySet,
    RestartInstance,
    ShowInstances,
    SystemHeartbeat,
    UpdateInstance,
    fault_subject,
)
from multikernel.services._fault_policy import Member, decide, restart_key
from multikernel.services._fault_store import FaultStore, Intent
from multikernel.services._fault_watch import (
    FAILURE_CAUSES,
    Detection,
    DetectionConfig,
    Failure,
)

log = get_logger("multikernel.fault")

#: How long the actor keeps asking the lifecycle when it does not answer (it restarts too).
LIFECYCLE_PATIENCE = 30.0


class FaultError(NotFoundError):
    """A `fault` request that names an instance the fault actor does not know (NOT_FOUND: mkctl
    exits with status 3)."""


class FaultActor:
    """Serves `fault`; watches every instance and restarts the failed ones by their policy."""

    def __init__(
        self,
        endpoint: Bus,
        store: FaultStore,
        *,
        detection: DetectionConfig | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.ep = endpoint
        self.store = store
        self.detection = Detection(endpoint, detection or DetectionConfig(), self._report)
        self.jitter = jitter
        self.lifecycle = retrying(endpoint, within=LIFECYCLE_PATIENCE)
        self._failures, self._failed = anyio.create_memory_object_stream[Failure](1024)
        self._locks: dict[str, anyio.Lock] = {}
        self._restarting: dict[str, int] = {}  # name -> the generation being replaced
        self._last_failure: dict[str, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled."""
        svc = self.ep.service("fault")
        for name in FAULT_METHODS:
            svc.method(getattr(self, name), name=name)
        async with (
            anyio.create_task_group() as tg,
            await self.ep.subscribe("mk.instance.*.state") as states,
            await self.ep.subscribe("mk.instance.*.system") as beats,
            await self.ep.subscribe("mk.bus.cutoff.>") as cutoffs,
            self._failures,
            self._failed,
        ):
            self._tg = tg
            await self._resume(tg)
            tg.start_soon(self._read_states, states)
            tg.start_soon(self._read_heartbeats, beats)
            tg.start_soon(self._read_cutoffs, cutoffs)
            tg.start_soon(self._handle_failures, tg)
            tg.start_soon(self.detection.watch_hangs, tg)
            await svc.start()
            log.info("fault actor up", pid=os.getpid(), instances=len(self.detection.by_name))
            task_status.started()
            await anyio.sleep_forever()

    def _report(self, failure: Failure) -> None:
        try:
            self._failures.send_nowait(failure)
        except anyio.WouldBlock:  # 1024 failures waiting: something else is badly wrong
            log.warning("failure dropped: too many at once", instance=failure.name)

    async def _handle_failures(self, tg: anyio.abc.TaskGroup) -> None:
        async for failure in self._failed:
            tg.start_soon(self._handle, failure)

    async def _read_states(self, states: Subscription) -> None:
        async for message in states:
            try:
                change = message.decode(InstanceStateChanged)
            except msgspec.ValidationError:
                continue
            self.detection.on_state(change)
            if change.new == "active":
                await self._came_back(change.name, change.generation)
            elif change.new == "deleted":
                self._restarting.pop(change.name, None)
                self.store.forget(change.name)

    async def _read_heartbeats(self, beats: Subscription) -> None:
        async for message in beats:
            try:
                beat = message.decode(SystemHeartbeat)
                instance = int(message.subject.split(".")[2])
            except (msgspec.ValidationError, ValueError, IndexError):
                continue  # a Halted, or a malformed beat: the lifecycle sees the exit
            if beat.instance == instance:  # the subject is what the hub vouches for
                self.detection.on_heartbeat(instance)

    async def _read_cutoffs(self, cutoffs: Subscription) -> None:
        async for message in cutoffs:
            try:
                self.detection.on_cutoff(message.decode(EndpointCutOff))
            except msgspec.ValidationError:
                continue

    async def _came_back(self, name: str, generation: int) -> None:
        replaced = self._restarting.get(name)
        if replaced is not None and generation > replaced:
            del self._restarting[name]
            w = self.detection.by_name.get(name)
            if w is not None:
                await self._event(w.name, w.id, "recovered", generation=generation)
        if self.store.mark(name).gave_up:
            self.store.give_up(name, False)  # someone started it again: watched as before

    # -- failures -----------------------------------------------------------------------------

    def _lock(self, key: str) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    async def _instances(self) -> list[InstanceInfo]:
        listing = await self.lifecycle.request(
            "lifecycle", "show", ShowInstances(), response=InstanceList
        )
        for info in listing.instances:
            self.detection.learn(info)
        return list(listing.instances)

    async def _handle(self, failure: Failure) -> None:
        """One failure: record it, decide, and restart or give up (one at a time per key)."""
        infos = await self._instances()
        info = next((i for i in infos if i.name == failure.name), None)
        if info is None:
            return  # deleted meanwhile
        key = restart_key(info.name, info.restart)
        async with self._lock(key):
            if not self.store.handled(failure.name, failure.generation):
                return  # seen already (a hang we killed also ends as a death)
            members = [Member(i.name, i.id, i.restart) for i in infos]
            me = Member(info.name, info.id, info.restart)
            recent = self.store.recent(key, info.restart.period)
            decision = decide(me, failure.cause, recent, members, self.jitter())
            self._last_failure[failure.name] = f"{failure.cause}: {failure.detail}"
            log.warning(
                "instance failed", instance=failure.name, cause=failure.cause,
                generation=failure.generation, detail=failure.detail, decision=decision.reason,
            )  # fmt: skip
            await self._event(
                failure.name, failure.id, "failed", cause=failure.cause,
                detail=f"{failure.detail}; {decision.reason}", generation=failure.generation,
            )  # fmt: skip
            if decision.action == "ignore":
                return
            if decision.action == "give-up":
                await self._give_up(info, decision.members, decision.reason, failure.cause)
                return
            intent = Intent(
                failure.name, failure.generation, failure.cause, time.time() + decision.delay,
                decision.attempt, key, decision.members,
            )  # fmt: skip
            self.store.intend(intent)
            await self._announce_restart(intent, decision.delay)
            await self._carry_out(intent)

    async def _give_up(
        self, info: InstanceInfo, members: tuple[str, ...], reason: str, cause: str
    ) -> None:
        log.error("gave up", instance=info.name, members=list(members), reason=reason)
        for name in (info.name, *members):
            w = self.detection.by_name.get(name)
            if w is None:
                continue
            try:
                await self.lifecycle.request(
                    "lifecycle", "fail", FailInstance(name, f"fault actor: {reason}"),
                    response=InstanceInfo,
                )  # fmt: skip
            except MultikernelError as exc:
                log.warning("could not mark failed", instance=name, error=str(exc))
            self.store.give_up(name)
            self._restarting.pop(name, None)
            await self._event(name, w.id, "gave-up", cause=cause, detail=reason)

    async def _announce_restart(self, intent: Intent, delay: float) -> None:
        for name in (intent.name, *intent.members):
            w = self.detection.by_name.get(name)
            if w is None:
                continue
            replaced = intent.generation if name == intent.name else w.generation
            self._restarting[name] = replaced
            await self._event(
                name, w.id, "restarting", cause=intent.cause if name == intent.name else "group",
                detail=f"{intent.key}: restart {intent.attempt}", generation=replaced,
                attempt=intent.attempt, delay=delay,
            )  # fmt: skip

    async def _carry_out(self, intent: Intent) -> None:
        """Wait until the intent is due, then have the lifecycle restart each instance, in
        start order; the restart counts once against the key's intensity."""
        await anyio.sleep(max(0.0, intent.due - time.time()))
        names = sorted(
            (n for n in (intent.name, *intent.members) if n in self.detection.by_name),
            key=lambda n: self.detection.by_name[n].id,
        )
        failed: list[tuple[str, str]] = []
        for name in names:
            w = self.detection.by_name[name]
            generation = intent.generation if name == intent.name else w.generation
            if name != intent.name:
                self.store.handled(name, generation)  # its end now is our doing
            request = RestartInstance(
                name, generation, intent.cause if name == intent.name else "requested",
                f"fault actor: {intent.cause} of {intent.name}",
            )  # fmt: skip
            try:
                await self.lifecycle.request("lifecycle", "restart", request, response=InstanceInfo)
            except MultikernelError as exc:
                log.warning("restart failed", instance=name, error=str(exc))
                failed.append((name, str(exc)))
        self.store.finish(intent, tuple(names))
        if failed:
            await self._restart_failed(failed)

    async def _restart_failed(self, failed: list[tuple[str, str]]) -> None:
        """A restart that did not bring the instance up is a failure of the new launch."""
        for info in await self._instances():
            for name, error in failed:
                if info.name == name and info.state != "active":
                    self._restarting.pop(name, None)
                    self._report(
                        Failure(name, info.id, info.generation, "crashed", f"restart: {error}")
                    )

    async def _resume(self, tg: anyio.abc.TaskGroup) -> None:
        """After a (re)start: learn the instances, finish the intents, handle missed failures."""
        infos = await self._instances()
        pending = set()
        for intent in self.store.intents():
            w = self.detection.by_name.get(intent.name)
            if w is None:
                self.store.done(intent.name)
                continue
            pending.add(intent.name)
            if w.generation != intent.generation:  # done before we died: count it now
                self.store.finish(intent, (intent.name, *intent.members))
                if w.state == "active":  # and owe its `recovered`
                    await self._event(w.name, w.id, "recovered", generation=w.generation)
                else:
                    self._restarting[intent.name] = intent.generation
                continue
            log.info("resuming restart", instance=intent.name, due_in=intent.due - time.time())
            for name in (intent.name, *intent.members):
                if name in self.detection.by_name:
                    self._restarting[name] = (
                        intent.generation
                        if name == intent.name
                        else self.detection.by_name[name].generation
                    )
            tg.start_soon(self._resume_intent, intent)
        for info in infos:
            if (
                info.name not in pending
                and info.state == "loaded"
                and info.cause in FAILURE_CAUSES
                and info.generation > self.store.mark(info.name).handled
            ):
                self._report(
                    Failure(info.name, info.id, info.generation, info.cause, "seen at start")
                )

    async def _resume_intent(self, intent: Intent) -> None:
        async with self._lock(intent.key):
            await self._carry_out(intent)

    async def _event(self, name: str, instance: int, kind: Any, **facts: Any) -> None:
        event = FaultEvent(name, instance, kind, time_ns=time.time_ns(), **facts)
        self.store.record(event)
        await self.ep.publish(fault_subject(instance), event)

    # -- the service --------------------------------------------------------------------------

    def _watched(self, name: str) -> Any:
        w = self.detection.by_name.get(name)
        if w is None:
            known = ", ".join(sorted(self.detection.by_name)) or "none"
            raise FaultError(f"no instance named {name!r} (known: {known})")
        return w

    async def status(self, request: FaultStatusRequest) -> FaultStatusList:
        await self._instances()  # policies as the lifecycle stores them now
        names = [request.name] if request.name else sorted(self.detection.by_name)
        now = self.detection.clock()
        out = []
        for name in names:
            w = self._watched(name)
            mark = self.store.mark(name)
            if name in self._restarting:
                state = "restarting"
            elif mark.gave_up:
                state = "gave-up"
            else:
                state = "watching" if w.state == "active" else "idle"
            out.append(
                FaultStatus(
                    name=w.name,
                    id=w.id,
                    state=state,
                    policy=w.policy,
                    generation=w.generation,
                    restarts=mark.restarts,
                    recent=self.store.recent(restart_key(name, w.policy), w.policy.period),
                    phi=round(self.detection.phi(w), 3),
                    threshold=self.detection.config.threshold,
                    last_heartbeat_age=now - w.detector.last if w.detector else -1.0,
                    last_failure=self._last_failure.get(name, ""),
                )
            )
        return FaultStatusList(tuple(out), pid=os.getpid())

    async def policy_get(self, request: PolicyGet) -> PolicyInfo:
        listing = await self.lifecycle.request(
            "lifecycle", "show", ShowInstances(request.name), response=InstanceList
        )
        (info,) = listing.instances
        return PolicyInfo(info.name, info.restart)

    async def policy_set(self, request: PolicySet) -> PolicyInfo:
        info = await self.lifecycle.request(
            "lifecycle", "update", UpdateInstance(request.name, restart=request.policy),
            response=InstanceInfo,
        )  # fmt: skip
        self.detection.learn(info)
        return PolicyInfo(info.name, info.restart)

    async def history(self, request: HistoryRequest) -> FaultHistory:
        return FaultHistory(tuple(self.store.history(request.name, request.limit)))
