"""The lifecycle actor: kernel instances from `create` to `delete`, as a bus service.

Requests (`lifecycle.create|update|load|start|kill|delete|show`) come from `mkctl` or any
endpoint the policy lets call `lifecycle`. The actor keeps one `Instance` per name, runs it
through the kernel's states (empty → ready → loaded → active, and failed), verifies images
against the host's trusted certificates before unpacking them, launches each instance's agent
through a `Platform` with the socket the hub binds to that instance, and publishes every state
change on `mk.instance.<id>.state`.

Stopping is negotiated like the kernel's SHUTDOWN → SHUTDOWN_ACK → HALTED, bounded by a grace
period, then forced; resources and the unpacked image are given back on every path, including
when the agent is SIGKILLed (the platform's pidfd says so at once, and the instance returns to
`loaded`).

Every instance is stored in `lifecycle.db` in the state dir at every change, so a restarted host
knows them all, adopts the ones still running and reclaims the rest (`_recovery`). `restart`
(idempotent by launch generation) and `fail` are what the fault actor asks for; warm standbys of
instances whose restart policy wants one are kept by `_standby`.

CPUs, memory and I/O queues are never picked here: `create` and `update` ask the resource actor
(`resource.allocate` / `resource.update`) over the bus, which places them, applies a change to a
running instance with its agent, and answers the grant; `delete` releases it, `start` launches
with the grant the resource actor holds. A restart, a standby taking over and an adopted instance
keep the grant they have (nothing is asked again, nothing released in between). At start the
actor reconciles: the resource actor releases the grants of instances `lifecycle.db` does not
know, and each stored instance's resources are read back from the resource actor.

Writes are ordered so that `lifecycle.db` and `resource.db` cannot disagree after a crash: a
create is granted before it is stored (a crash between leaves a grant of an unknown instance,
released by the next reconcile), a delete is forgotten before its grant is released (the same),
and an update's new grant, committed by the resource actor first, is read back at reconcile.

This module is the service: its requests and the checks each one makes.
Running the agents (launch, hello, watch, negotiated stop) is the `Supervisor`'s (`_supervisor`);
the state machine, and the announcing of every move, are `_instances`'.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints import Bus, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    AgentHello,
    CreateInstance,
    DeleteInstance,
    FailInstance,
    InstanceInfo,
    InstanceList,
    KillInstance,
    LoadImage,
    LogLines,
    ReadLogs,
    RestartInstance,
    ShowInstances,
    StartInstance,
    SystemHeartbeat,
    UpdateInstance,
    format_size,
)
from multikernel.services._image import load_image
from multikernel.services._instance_store import InstanceStore
from multikernel.services._instances import (
    ACTIVE,
    EMPTY,
    FAILED,
    LOADED,
    READY,
    Instance,
    InstanceError,
    InstanceRefusedError,
    StateChanges,
    UnknownInstanceError,
)
from multikernel.services._lifecycle_grants import ResourceClient, describe
from multikernel.services._output import InstanceLog
from multikernel.services._platform import Platform, PlatformError, check_name
from multikernel.services._recovery import Recovered, recover
from multikernel.services._supervisor import Supervisor

log = get_logger("multikernel.lifecycle")

DEFAULT_HELLO_TIMEOUT = 15.0
#: Seconds between an instance becoming active and the start of its (next) warm standby.
STANDBY_DELAY = 0.5
_LOG_BATCH = 500  # lines per LogLines reply


class LifecycleActor:
    """Serves `lifecycle` on the bus; owns the instances and their processes."""

    def __init__(
        self,
        endpoint: Bus,
        platform: Platform,
        *,
        open_instance_socket: Callable[[int], socket.socket],
        state_dir: Path,
        trusted_certs: list[bytes],
        allow_unsigned: bool = False,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        bus_path: Path | None = None,
        heartbeat: float | None = None,
        recovered: Recovered | None = None,
    ) -> None:
        self.ep = endpoint
        self.platform = platform
        self.state_dir = state_dir
        self.trusted = trusted_certs
        self.allow_unsigned = allow_unsigned
        self.hello_timeout = hello_timeout
        self.instances: dict[str, Instance] = {}
        self._creating = anyio.Lock()
        self._recovered = recovered
        self._warming: set[str] = set()  # instances whose standby is being started
        self.standby_delay = STANDBY_DELAY
        self._tg: anyio.abc.TaskGroup | None = None
        self.timings: dict[str, list[float]] = {"hello": [], "reclaim": [], "takeover": []}
        self._states = StateChanges(endpoint)
        self._grants = ResourceClient(endpoint)
        self._supervisor = Supervisor(
            endpoint,
            platform,
            self._states,
            open_instance_socket=open_instance_socket,
            timings=self.timings,
            bus_path=bus_path,
            heartbeat=heartbeat,
        )
        self._supervisor.standby_lost = self._keep_standby

    def _store(self) -> InstanceStore:
        assert self._states.store is not None, "the store is open once the actor runs"
        return self._states.store

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; then stop every instance and give back what they hold.

        First the stored instances are brought back (unless the host did it already: `recovered`),
        the adopted ones watched again and what changed meanwhile announced.
        """
        if self._recovered is None:
            self._recovered = await recover(self.platform, self.state_dir)
        recovered = self._recovered
        self._states.store = recovered.store
        self.instances = recovered.instances
        for inst in self.instances.values():  # their output, as stored before the restart
            if inst.output is None:
                inst.output = InstanceLog(self._instance_dir(inst.name))
        svc = self.ep.service("lifecycle", concurrency=16)
        for method in (
            self.create,
            self.update,
            self.load,
            self.start,
            self.kill,
            self.delete,
            self.show,
            self.restart,
            self.fail,
        ):
            svc.method(method, name=method.__name__)
        svc.method(self.logs, name="logs")
        try:
            async with (
                anyio.create_task_group() as tg,
                await self.ep.subscribe("mk.instance.*.hello") as hellos,
                await self.ep.subscribe("mk.resource.*.tx") as grants,
                await self.ep.subscribe("mk.instance.*.system") as system,
            ):
                self._tg = tg
                for inst in recovered.adopted():
                    assert inst.proc is not None
                    self._supervisor.reattach_output(inst, tg)
                    tg.start_soon(self._supervisor.watch, inst, inst.proc, inst.exited)
                await self._grants.reconcile(self.instances.values())
                await self._grants.refresh(self.instances.values(), self._states.save)
                await svc.start()
                tg.start_soon(self._hellos, hellos)
                tg.start_soon(self._grants.follow, grants, self.instances, self._states.save)
                tg.start_soon(self._heartbeats, system)
                for change in recovered.changes:
                    inst = change.inst
                    await self._states.announce(
                        inst, change.old, change.new, change.reason, change.cause
                    )
                recovered.changes.clear()
                for inst in recovered.adopted():
                    self._keep_standby(inst)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()
                recovered.store.close()

    async def _hellos(self, hellos: Subscription) -> None:
        """Agents announce themselves on mk.instance.<id>.hello.

        The instance is read from the subject, not the body: the policy lets a guest publish only
        under its own `mk.instance.<id>`, so the subject is what the hub vouches for.
        """
        async for message in hellos:
            try:
                message.decode(AgentHello)
                instance = int(message.subject.split(".")[2])
            except (msgspec.ValidationError, ValueError, IndexError):
                continue  # a malformed hello is that instance's problem
            for inst in self.instances.values():
                if inst.id == instance:
                    inst.agent = message.source
                    inst.hello.set()

    async def _heartbeats(self, system: Subscription) -> None:
        """The first heartbeat of each start says its workload is up (see `Supervisor.start`)."""
        async for message in system:
            try:
                message.decode(SystemHeartbeat)
                instance = int(message.subject.split(".")[2])
            except (msgspec.ValidationError, ValueError, IndexError):
                continue  # Halted, ShutdownAck, or garbage: not a heartbeat
            for inst in self.instances.values():
                if inst.id == instance and not inst.beat.is_set():
                    inst.beat.set()

    async def _stop_all(self) -> None:
        """On the way out (the watchers are gone): kill, wait and reclaim each instance here."""
        for inst in list(self.instances.values()):
            try:
                await self._supervisor.stop_now(inst)
            except Exception as exc:  # one instance's trouble must not strand the others
                log.exception("could not stop instance", instance=inst.name, error=str(exc))
            finally:
                self._drop_image(inst)

    # -- requests -----------------------------------------------------------------------------

    async def create(self, request: CreateInstance) -> InstanceInfo:
        name = check_name(request.name)
        async with self._creating:  # one at a time: the name check and the id hold until granted
            if name in self.instances:
                raise InstanceRefusedError(
                    f"an instance named {name!r} exists: pick another name or delete it"
                )
            inst = Instance(
                name,
                self._store().next_id(),
                restart=request.restart,
                output=InstanceLog(self._instance_dir(name)),
            )
            asked = self._grants.asked(inst, request)
            grant = await self._grants.change("allocate", asked) if asked is not None else None
            # Only once the resources are granted: a refusal leaves nothing behind (no record, no
            # state event, no instance id used up). A crash before the record is stored leaves a
            # grant nobody knows, which the next host's reconcile releases.
            self._store().allocate_id(inst.id)
            self.instances[name] = inst
            if grant is not None:
                inst.grant(grant)
                self._states.save(inst)  # stored first: a crash after leaves nothing unknown
                await self._prepare(inst, load=False, undo=True)
        await self._states.move(inst, EMPTY, "created")
        if grant is not None:
            await self._states.move(inst, READY, f"resources granted: {describe(grant)}")
        return self._info(inst)

    async def update(self, request: UpdateInstance) -> InstanceInfo:
        inst = self._get(request.name)
        async with inst.lock:
            asked = self._grants.asked(inst, request)
            if asked is None and request.restart is None:
                raise InstanceRefusedError(
                    "update needs --cpus, --memory or --queues (or --restart)"
                )
            if request.restart is not None:
                inst.restart = request.restart
                self._states.save(inst)
                if not inst.restart.standby:
                    await self._supervisor.discard_standby(inst)
                self._keep_standby(inst)
            if asked is None:
                return self._info(inst)
            # The resource actor applies it live when the instance runs (cpuset, memory limit,
            # its agent's acknowledgement), or for its next launch.
            grant = await self._grants.change("update" if inst.resources else "allocate", asked)
            changed = (frozenset(grant.cpus), grant.memory, tuple(grant.queues)) != (
                inst.resources.cpus if inst.resources else frozenset(),
                inst.resources.memory if inst.resources else 0,
                inst.queues,
            )
            was = inst.resources
            inst.grant(grant)
            self._states.save(inst)
            if was is None:  # its first grant: the platform makes what `create` would have
                await self._prepare(inst, load=False)
            if changed and inst.standby is not None:
                await self._supervisor.discard_standby(inst)  # made for the old grant
                self._keep_standby(inst)
            if inst.state == EMPTY:
                await self._states.move(inst, READY, f"resources granted: {describe(grant)}")
            return self._info(inst)

    async def load(self, request: LoadImage) -> InstanceInfo:
        inst = self._get(request.name)
        async with inst.lock:
            inst.require(READY, LOADED, verb="load")
            allow = self.allow_unsigned  # the host decides (mkctl host up --allow-unsigned)
            dest = self.state_dir / "instances" / inst.name / "image"
            self._drop_image(inst)
            dest.parent.mkdir(parents=True, exist_ok=True)
            image = await anyio.to_thread.run_sync(
                lambda: load_image(
                    request.image, dest, trusted_certs=self.trusted, allow_unsigned=allow
                )
            )
            inst.image, inst.image_dir = image, dest
            self._states.save(inst)
            assert inst.resources is not None
            manifest = image.manifest
            if (
                len(inst.resources.cpus) < manifest.min_cpus
                or inst.resources.memory < manifest.min_memory
            ):
                self._drop_image(inst)
                raise InstanceRefusedError(
                    f"image {manifest.name} needs {manifest.min_cpus} CPU(s) and "
                    f"{format_size(manifest.min_memory)}; {inst.name!r} has "
                    f"{len(inst.resources.cpus)} and {format_size(inst.resources.memory)}: "
                    f"mkctl update {inst.name} --cpus N --memory SIZE"
                )
            try:
                await self._prepare(inst, load=True)
            except InstanceError:
                self._drop_image(inst)
                raise
            await self._states.move(
                inst, LOADED, f"image {manifest.name} {manifest.version} verified"
            )
            return self._info(inst)

    async def start(self, request: StartInstance) -> InstanceInfo:
        inst = self._get(request.name)
        async with inst.lock:
            inst.require(LOADED, verb="start")
            granted = await self._grants.current(inst)  # what the resource actor holds for it
            if granted is not None:
                inst.grant(granted)
            assert self._tg is not None
            await self._supervisor.start(
                inst, request.command, watchers=self._tg, hello_timeout=self.hello_timeout
            )
            self._keep_standby(inst)
            return self._info(inst)

    async def kill(self, request: KillInstance) -> InstanceInfo:
        inst = self._get(request.name)
        async with inst.lock:
            if inst.state == FAILED and inst.proc is None:
                await self._states.move(
                    inst, LOADED if inst.image else READY, "reset after failure"
                )
                return self._info(inst)
            inst.require(ACTIVE, FAILED, verb="kill")
            await self._supervisor.discard_standby(inst)
            await self._supervisor.stop(inst, None if request.force else request.grace)
            return self._info(inst)

    async def delete(self, request: DeleteInstance) -> InstanceInfo:
        inst = self._get(request.name)
        async with inst.lock:
            if inst.state == ACTIVE:
                raise InstanceRefusedError(
                    f"{inst.name!r} is active: stop it first: mkctl kill {inst.name}"
                )
            info = self._info(inst)
            # Forgotten first, then its grant released: a crash between leaves a grant of an
            # instance lifecycle.db does not know, which the next reconcile releases.
            if self._states.store is not None:
                self._states.store.delete(inst.name)
            del self.instances[inst.name]
            # an image is thousands of files: removed in a thread, not on the hub's event loop
            await anyio.to_thread.run_sync(self._drop_image, inst)
            await anyio.to_thread.run_sync(
                lambda: shutil.rmtree(self.state_dir / "instances" / inst.name, ignore_errors=True)
            )
            try:
                await self.platform.release(inst.name, inst.id)
            except PlatformError as error:  # forgotten anyway: say what is left in the kernel
                log.warning("platform left the instance", instance=inst.name, error=str(error))
            if inst.resources is not None:
                try:
                    await self._grants.release(inst)
                except InstanceError as error:  # no resource actor now: the next reconcile
                    log.warning("grant not released yet", instance=inst.name, error=str(error))
            await self._states.announce(inst, inst.state, "deleted", "deleted")
            return info

    async def restart(self, request: RestartInstance) -> InstanceInfo:
        """End the instance's launch if one runs (forced), then start it again, with the same
        command; a warm standby takes over when there is one. With `generation`, only if that
        is still the current launch: a restart asked twice happens once."""
        inst = self._get(request.name)
        async with inst.lock:
            if request.generation and request.generation != inst.generation:
                return self._info(inst)  # someone restarted it already
            if inst.proc is not None:
                await self._supervisor.stop(inst, None, cause=request.cause or "requested")
            if inst.state == FAILED and inst.image is not None:
                await self._states.move(inst, LOADED, "reset to restart")
            inst.require(LOADED, verb="restart")
            assert self._tg is not None
            await self._supervisor.start(
                inst, inst.command, watchers=self._tg, hello_timeout=self.hello_timeout
            )
            self._keep_standby(inst)
            return self._info(inst)

    async def fail(self, request: FailInstance) -> InstanceInfo:
        """Mark the instance `failed`, ending its launch (and standby) if one runs: what the
        fault actor does when an instance keeps failing. `mkctl kill NAME` resets it. Only an
        instance that has an image can fail (one never loaded has nothing to fail)."""
        inst = self._get(request.name)
        async with inst.lock:
            inst.require(LOADED, ACTIVE, FAILED, verb="fail")
            await self._supervisor.discard_standby(inst)
            if inst.proc is not None:
                await self._supervisor.stop(inst, None, cause="requested")
            if inst.state != FAILED:
                await self._states.move(inst, FAILED, request.reason or "marked failed")
            return self._info(inst)

    async def _prepare(self, inst: Instance, *, load: bool, undo: bool = False) -> None:
        """`Platform.prepare` for the instance's `create` or `load`; the platform's refusal is
        the request's. With `undo` (a create), the instance is forgotten and its grant released
        first, so a refused create leaves nothing."""
        assert inst.resources is not None
        try:
            await self.platform.prepare(inst.name, inst.id, inst.resources, load=load)
        except PlatformError as error:
            if undo:
                self._store().delete(inst.name)
                del self.instances[inst.name]
                try:
                    await self._grants.release(inst)
                except InstanceError as gone:  # the next reconcile releases it
                    log.warning("grant not released yet", instance=inst.name, error=str(gone))
            raise InstanceRefusedError(str(error)) from error

    def _keep_standby(self, inst: Instance) -> None:
        """Start a warm standby for `inst` in the background, if its policy wants one."""
        if (
            inst.restart.standby
            and inst.state == ACTIVE
            and inst.standby is None
            and inst.name not in self._warming
            and self._tg is not None
        ):
            self._warming.add(inst.name)
            self._tg.start_soon(self._launch_standby, inst, self._tg)

    async def _launch_standby(self, inst: Instance, tg: anyio.abc.TaskGroup) -> None:
        try:
            # Not at once: the launch that just started (often a standby taking over) gets the
            # instance's CPUs to itself first; two Python start-ups would slow it down.
            await anyio.sleep(self.standby_delay)
            async with inst.lock:  # not while the instance is started, stopped or restarted
                await self._supervisor.launch_standby(
                    inst, watchers=tg, ready_timeout=self.hello_timeout
                )
        finally:
            self._warming.discard(inst.name)

    async def show(self, request: ShowInstances) -> InstanceList:
        if request.name:
            return InstanceList((self._info(self._get(request.name)),))
        return InstanceList(tuple(self._info(i) for i in self.instances.values()))

    async def logs(self, request: ReadLogs) -> AsyncIterator[LogLines]:
        """The instance's own output (its workload's stdout and stderr), then, with `follow`,
        what it writes until its output ends."""
        inst = self._get(request.name)
        assert inst.output is not None
        if not request.follow:
            lines = await anyio.to_thread.run_sync(inst.output.read, request.since_ns, request.tail)
            for start in range(0, len(lines), _LOG_BATCH):
                yield LogLines(tuple(lines[start : start + _LOG_BATCH]))
            return
        async for batch in inst.output.follow(request.since_ns, request.tail):
            for start in range(0, len(batch), _LOG_BATCH):
                yield LogLines(tuple(batch[start : start + _LOG_BATCH]))

    def _instance_dir(self, name: str) -> Path:
        return self.state_dir / "instances" / name

    # -- state and resources ------------------------------------------------------------------

    def _get(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise UnknownInstanceError(
                f"no instance named {name!r} (known: {known}); mkctl create {name}"
            )
        return inst

    def infos(self) -> list[InstanceInfo]:
        """Every instance, as `show` describes it (the host's metrics read these)."""
        return [self._info(inst) for inst in self.instances.values()]

    def _info(self, inst: Instance) -> InstanceInfo:
        caps = self.platform.capabilities()
        mechanisms = {
            "namespaces": caps.namespaces,
            "cpuset": caps.cpuset,
            "memory-limit": caps.memory_limit,
            "affinity": caps.affinity,
            "cache": caps.cache,
        }
        applied = tuple(kind for kind, on in mechanisms.items() if on)
        return inst.info(applied, caps.warnings)

    def _drop_image(self, inst: Instance) -> None:
        if inst.image_dir is not None:
            shutil.rmtree(inst.image_dir, ignore_errors=True)
        inst.image = inst.image_dir = None
