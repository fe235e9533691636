"""The multikernel platform: an instance is a Linux kernel of its own on reserved CPUs and memory.

Every step is one of the kernel's own (`_mk_steps.KernelSteps`; docs/platform.md,
"multikernel"), through the one seam `MultikernelKernel` (`_mk_kernel`: the real kernel, or
`_mk_fake` in tests):

- `prepare` (the lifecycle's create and load): an instance-create overlay (`ready`), then
  `kexec_file_load` (`loaded`): kerf's create and load; `release` (its delete):
  `kexec_file_load(KEXEC_FILE_UNLOAD)`, then `rmdir tx_<N>` of each transaction that made or
  resized it, newest first: kerf's unload and delete;
- `launch`: `reboot(MULTIKERNEL)` (`active`): kerf's start (creating and loading first if the
  kernel has no such instance; such a launch's end removes it again);
- `update`: a cpu/memory/device add/remove overlay under `/instances/<name>`: kerf's update;
- `kill`: `reboot(MULTIKERNEL_HALT_FORCE)` (`loaded`; `signal(SIGTERM)` halts): kerf's kill.

A launch opens vsock streams to the instance's init (`_mk_init`) and hands it the agent's command
line and the fds it would have inherited, each as a stream: its hub session carried by a bridge
at each end (`_mk_session`; direct channels through shared memory, `_mk_channels`), other
sockets and its output pipe relayed as bytes (`_mk_vsock`), and the init's control lines
answered (`_mk_control`). A refusal at any step undoes the steps before it. The instance's
`status` file is polled: when it leaves `active` (halted, or a panic that put it back to
`loaded`) the launch has ended, `wait` answers, and the lifecycle's watcher and the fault actor
see a crashed instance as on any platform; the instance stays `loaded` for its next start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from functools import partial
from pathlib import Path
from typing import Final, Self

import anyio
import anyio.abc
import anyio.to_thread

from multikernel.endpoints.log import get_logger
from multikernel.services import _mk_adopt, _mk_control
from multikernel.services._mk_control import Control, OpenSession
from multikernel.services._mk_kernel import (
    MAX_INSTANCE_ID,
    REBOOT_CMD_BOOT,
    REBOOT_CMD_HALT,
    REBOOT_CMD_HALT_FORCE,
    MultikernelKernel,
)
from multikernel.services._mk_session import OpenStream, host_bridge
from multikernel.services._mk_steps import BootImage, KernelSteps
from multikernel.services._mk_vsock import AGENT_PORT, Connector, crossing, relay, send_line
from multikernel.services._namespaces import namespace_ids
from multikernel.services._platform import (
    Capabilities,
    InstanceProcess,
    InvalidSpecError,
    IsolationReport,
    LaunchError,
    LaunchSpec,
    NamespaceIds,
    PlatformError,
    Resources,
    launched_by,
)

log = get_logger("multikernel.services.multikernel")

#: The status `wait` answers for an instance whose kernel went down by itself (a panic) before
#: its init could report the agent's exit.
KERNEL_DOWN: Final = 1


class MultikernelInstance(InstanceProcess):
    """A launch on the multikernel platform: the instance's transactions and streams."""

    def __init__(self, platform: MultikernelPlatform, spec: LaunchSpec) -> None:
        super().__init__(platform, spec, pid=0)  # no host pid: it runs on a kernel of its own
        self.transactions: list[int] = []
        self.control: socket.socket | None = None
        self.streams: list[tuple[int, socket.socket]] = []  # (host fd, vsock), both ours
        self.ended = anyio.Event()
        self.relays = anyio.CancelScope()
        self.sessions = anyio.CancelScope()  # its control connection's reader and sessions
        self.ctl: Control | None = None
        self.output_sink: int | None = None  # an adopted launch's: the write end of `output`
        self.relaying = False  # its relay task was started (and closes the streams when done)
        self.relayed = anyio.Event()
        self.forced = False
        #: The kernel instance outlives the launch (the lifecycle's `create`/`load` made it):
        #: reclaiming the launch halts it, back to `loaded`, and leaves it for the next boot.
        self.kept = False


class MultikernelPlatform:
    """Instances as kernels of their own (see the module docstring). `async with` it: its task
    group holds each instance's relays and watcher."""

    name = "multikernel"

    def __init__(
        self,
        kernel: MultikernelKernel,
        image: BootImage,
        *,
        connector: Connector,
        poll: float = 0.02,
        boot_timeout: float = 30.0,
        shared: Path | None = None,
    ) -> None:
        self.kernel = kernel
        self.steps = KernelSteps(kernel, image)
        self.connector = connector
        self.poll = poll
        self.boot_timeout = boot_timeout
        #: Memory both kernels map (a DAXFS mount; in tests the vsock stand-in's directory):
        #: direct channels to an instance cross there (`_mk_channels`); None: they are dropped.
        self.shared = shared
        self._tg: anyio.abc.TaskGroup | None = None
        self._running: dict[str, MultikernelInstance] = {}
        self._open_session: OpenSession | None = None
        self._hub_up = anyio.Event()

    def serve_sessions(self, open_session: OpenSession) -> None:
        """The hub is up: sessions for processes re-attaching in an instance open with
        `open_session` (the hub's `open_instance_socket`; `_mk_control`)."""
        self._open_session = open_session
        self._hub_up.set()

    async def __aenter__(self) -> Self:
        self._tg = await anyio.create_task_group().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            for inst in list(self._running.values()):
                with contextlib.suppress(PlatformError):
                    await self.reclaim(inst)
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    def capabilities(self) -> Capabilities:
        # A kernel of its own on CPUs and memory no other kernel uses: more than any namespace.
        return Capabilities(namespaces=True, cpuset=True, memory_limit=True, affinity=True)

    def check(self, spec: LaunchSpec) -> None:
        if not 1 <= spec.instance_id <= MAX_INSTANCE_ID:
            raise InvalidSpecError(
                f"instance id {spec.instance_id}: the kernel takes 1 to {MAX_INSTANCE_ID}"
            )
        if spec.slot:
            raise InvalidSpecError("a multikernel instance has one kernel: no standby slots")
        if spec.name in self._running:
            raise LaunchError(f"instance {spec.name!r} is running: kill and reclaim it first")

    async def launch(self, spec: LaunchSpec) -> MultikernelInstance:
        if self._tg is None:
            raise RuntimeError("use the multikernel platform inside `async with`")
        self.check(spec)
        inst = MultikernelInstance(self, spec)
        self._running[spec.name] = inst
        try:
            # Made by the lifecycle's create and load already (kept), or else by this launch.
            if self.steps.status(spec.name) == "absent":
                inst.transactions.append(
                    await self.steps.create(spec.name, spec.instance_id, spec.resources)
                )
                if spec.resources.devices and (
                    tx := await self.steps.grant(spec.name, spec.resources, spec.resources.devices)
                ):
                    inst.transactions.append(tx)
            else:
                inst.kept = True
            await self.steps.prepare(spec.name, spec.instance_id, spec.resources, load=True)
            self.steps.reboot(f"cannot boot {spec.name!r}", REBOOT_CMD_BOOT, spec.instance_id)
            await self._attach(inst)
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                await self._undo(inst)
            if isinstance(error, PlatformError) and not isinstance(error, LaunchError):
                raise LaunchError(str(error)) from error
            raise
        self._tg.start_soon(self._watch, inst)
        return inst

    async def _attach(self, inst: MultikernelInstance) -> None:
        """Open the instance's launch stream and one per fd its agent gets; start the relays."""
        spec = inst.spec
        bus = spec.env.get("MULTIKERNEL_BUS_FD", "")
        modes = {str(fd): "session" if str(fd) == bus else crossing(fd) for fd in spec.pass_fds}
        with anyio.move_on_after(self.boot_timeout) as scope:
            inst.control = await self._connect(inst)
        if scope.cancelled_caught or inst.control is None:
            raise LaunchError(
                f"instance {spec.name!r} booted but its init did not answer on vsock port "
                f"{AGENT_PORT} within {self.boot_timeout:g} s "
                f"(status {self.steps.status(spec.name)})"
            )
        launch = {"argv": list(spec.argv), "env": dict(spec.env), "cwd": spec.cwd, "fds": modes}
        await send_line(inst.control, launch)
        inst.ctl = Control(inst.control)
        for fd, mode in modes.items():
            if mode == "hold":
                continue
            stream = await self.connector.connect(spec.instance_id, AGENT_PORT)
            host = os.dup(int(fd))
            inst.streams.append((host, stream))  # closed by the relay, or by `_undo`
            os.set_blocking(host, False)
            await send_line(stream, {"fd": int(fd)})
        assert self._tg is not None
        inst.relaying = True
        self._tg.start_soon(self._relay, inst, [m for m in modes.values() if m != "hold"])
        self._tg.start_soon(self._control, inst)

    async def _control(self, inst: MultikernelInstance) -> None:
        """Answer the init's control lines (`_mk_control`): a session for each process that
        re-attaches, until the launch ends. An adopted launch first opens a new control."""
        opener = partial(self.connector.connect, inst.instance_id, AGENT_PORT)
        with inst.sessions:
            if inst.ctl is None:
                try:
                    inst.control = await _mk_control.reattach(self.connector, inst.instance_id)
                except OSError as error:
                    log.warning("adopted instance's init not reached", instance=inst.name,
                                error=str(error))  # fmt: skip
                    return
                inst.ctl = Control(inst.control)
            async with anyio.create_task_group() as tg:
                if inst.output_sink is not None:
                    sink, inst.output_sink = inst.output_sink, None
                    tg.start_soon(
                        _mk_control.collect_output, self.connector, inst.instance_id, sink
                    )

                async def open_one() -> None:
                    await self._hub_up.wait()
                    assert self._open_session is not None
                    await _mk_control.resume(
                        self.connector,
                        inst.instance_id,
                        self._open_session,
                        opener,
                        tg,
                        shared=self.shared,
                    )

                await inst.ctl.serve(open_one)
                await anyio.sleep_forever()  # its sessions run until the launch ends

    async def _connect(self, inst: MultikernelInstance) -> socket.socket | None:
        """Connect to the init once it listens (refused, or reset as AF_VSOCK answers when
        nothing listens yet: try again); None if the instance went down first."""
        while self.steps.status(inst.name) == "active":
            try:
                return await self.connector.connect(inst.instance_id, AGENT_PORT)
            except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
                await anyio.sleep(self.poll)
        return None

    async def _relay(self, inst: MultikernelInstance, modes: list[str]) -> None:
        """Relay each stream until it ends or the launch does; then close them all, so the
        hub sees the agent's bus socket end as it would see a local agent's."""
        try:
            with inst.relays:
                async with anyio.create_task_group() as tg:
                    for (host, stream), mode in zip(inst.streams, modes, strict=True):
                        stream.setblocking(False)
                        if mode == "session":
                            opener = partial(self.connector.connect, inst.instance_id, AGENT_PORT)
                            tg.start_soon(_session, host, stream, opener, self.shared)
                        else:
                            both = mode == "rw"
                            tg.start_soon(partial(relay, host, stream.fileno(), both_ways=both))
                await inst.ended.wait()
        finally:
            _close_streams(inst)
            inst.relayed.set()

    async def _watch(self, inst: MultikernelInstance) -> None:
        """Poll the kernel's status until the instance leaves `active`; then it has ended."""
        # The status file is all the kernel offers (it sends no kernfs notification): poll it.
        while self.steps.status(inst.name) == "active":  # noqa: ASYNC110
            await anyio.sleep(self.poll)
        if inst.ctl is not None:
            inst.ctl.drain()
        status = inst.ctl.exit_status if inst.ctl is not None else None
        if status is None:
            status = -signal.SIGKILL if inst.forced else KERNEL_DOWN
            if not inst.forced:
                log.warning(
                    "instance kernel went down",
                    instance=inst.name,
                    status=self.steps.status(inst.name),
                )
        if inst.returncode is None:
            inst.returncode = status
        inst.relays.cancel()
        inst.sessions.cancel()
        inst.ended.set()

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        """A cpu/memory overlay for the instance (`KernelSteps.grant`), undone at reclaim."""
        inst = self._own(proc)
        tx = await self.steps.grant(inst.name, resources, resources.devices)
        if tx is not None:
            inst.transactions.append(tx)
        inst.resources = resources

    async def wait(self, proc: InstanceProcess) -> int:
        inst = self._mine(proc)
        await inst.ended.wait()
        assert inst.returncode is not None
        return inst.returncode

    def signal(self, proc: InstanceProcess, signum: int) -> None:
        """SIGKILL force-halts the instance, SIGTERM halts it; a kernel takes no other signal."""
        inst = self._own(proc)
        if inst.ended.is_set():
            return
        if signum == signal.SIGKILL:
            inst.forced = True
        if signum in (signal.SIGKILL, signal.SIGTERM):
            cmd = REBOOT_CMD_HALT_FORCE if signum == signal.SIGKILL else REBOOT_CMD_HALT
            with contextlib.suppress(PlatformError):  # it went down meanwhile
                self.steps.reboot(f"cannot halt {inst.name!r}", cmd, inst.instance_id)

    async def kill(self, proc: InstanceProcess) -> None:
        inst = self._mine(proc)
        if inst.reclaimed:
            return
        self.signal(inst, signal.SIGKILL)
        await inst.ended.wait()

    async def reclaim(self, proc: InstanceProcess) -> None:
        """Halt what is left, unload its kernel, undo every transaction it made; idempotent."""
        inst = self._mine(proc)
        if inst.reclaimed:
            return
        await self.kill(inst)
        await self._undo(inst)

    async def _undo(self, inst: MultikernelInstance) -> None:
        if self.steps.status(inst.name) == "active":
            inst.forced = True
            self.steps.reboot(f"cannot halt {inst.name!r}", REBOOT_CMD_HALT_FORCE, inst.instance_id)
        if self.steps.status(inst.name) == "loaded" and not inst.kept:
            await self.steps.unload(inst.name, inst.instance_id)
        inst.relays.cancel()
        inst.sessions.cancel()
        for fd in (inst.output_sink, inst.output):  # an adopted launch's, if nobody took them
            if fd is not None:
                os.close(fd)
        inst.output_sink = inst.output = None
        if inst.relaying:
            await inst.relayed.wait()
        _close_streams(inst)
        # Newest first: grants (ours, or the resource actor's through its host side), then the
        # instance-create, which removes the instance.
        made = set() if inst.kept else set(inst.transactions)  # a kept one's grants stay its own
        if made:  # the instance is ours (a refused create leaves another's alone)
            made |= set(self.steps.grants_of(inst.name))
        for tx in sorted(made, reverse=True):
            await self.steps.rollback(tx)
        inst.transactions.clear()
        if inst.control is not None:
            anyio.notify_closing(inst.control)  # its reader may wait on it still
            inst.control.close()
        inst.reclaimed = True
        if inst.returncode is None:
            inst.returncode = -signal.SIGKILL
        inst.ended.set()
        if self._running.get(inst.name) is inst:
            del self._running[inst.name]

    # -- the lifecycle's create, load and delete ----------------------------------------------

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> None:
        """The lifecycle's `create` (the kernel's instance, `ready`: kerf create) and `load`
        (its kernel, `loaded`: kerf load). It stays so between launches: each start boots it."""
        if not 1 <= instance_id <= MAX_INSTANCE_ID:
            raise InvalidSpecError(
                f"instance id {instance_id}: the kernel takes 1 to {MAX_INSTANCE_ID}"
            )
        await self.steps.prepare(name, instance_id, resources, load=load)

    async def release(self, name: str, instance_id: int) -> None:
        """The lifecycle's `delete`: unload the instance's kernel and undo every transaction
        that made or resized it (kerf unload and delete); nothing if the kernel has no such
        instance under that id."""
        if name in self._running:
            raise PlatformError(f"instance {name!r} is running: kill it first")
        await _mk_adopt.reclaim(self.steps, name, instance_id, set(), within=self.boot_timeout)

    # -- after a host restart (`_mk_adopt`) --------------------------------------------------

    def record(self, proc: InstanceProcess) -> str:
        """What a restarted host needs to find this launch again (JSON, for the state store)."""
        inst = self._own(proc)
        return _mk_adopt.encode_record(
            inst.name, inst.instance_id, inst.transactions, kept=inst.kept
        )

    def adopt(self, spec: LaunchSpec, record: str) -> MultikernelInstance | None:
        """Watch the recorded launch again if the kernel still runs it (None if it does not)."""
        found = _mk_adopt.decode_record(record)
        if self._tg is None or spec.name in self._running:
            return None
        if not _mk_adopt.adoptable(self.steps, found):
            return None
        inst = MultikernelInstance(self, spec)
        inst.transactions.extend(found.transactions)
        inst.kept = found.kept
        inst.output, inst.output_sink = os.pipe()  # fed once its init is reached again
        self._running[spec.name] = inst
        self._tg.start_soon(self._watch, inst)
        self._tg.start_soon(self._control, inst)  # its agent's sessions, again
        log.info("instance adopted", instance=spec.name, id=found.id)
        return inst

    async def reclaim_record(self, record: str) -> None:
        """End what is left of a recorded launch that was not adopted; undo its transactions."""
        found = _mk_adopt.decode_record(record)
        if found.kept:  # the instance outlives its launches: halted, left `loaded`
            await _mk_adopt.halt(self.steps, found.name, found.id, within=self.boot_timeout)
            return
        made = set(found.transactions)
        await _mk_adopt.reclaim(self.steps, found.name, found.id, made, within=self.boot_timeout)

    async def reclaim_unit(self, unit: str) -> None:
        """Reclaim what a launch of `unit` cut short by a crash left in the kernel."""
        await _mk_adopt.reclaim_unit(self.steps, unit, within=self.boot_timeout)

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        inst = self._own(proc)
        cpus, regions = self.steps.held(inst.name)
        return IsolationReport(
            pid=0,
            namespace_pid=1,
            affinity=cpus,
            namespaces=NamespaceIds(0, 0, 0),  # another kernel: none of ours
            host_namespaces=NamespaceIds(*namespace_ids("self")),
            cpuset_cpus=cpus,
            memory_limit=sum(size for _, size in regions),
        )

    def _mine(self, proc: InstanceProcess) -> MultikernelInstance:
        return launched_by(self, proc, MultikernelInstance)

    def _own(self, proc: InstanceProcess) -> MultikernelInstance:
        """`proc`, if it is ours and has not been reclaimed."""
        return launched_by(self, proc, MultikernelInstance, live=True)


async def _session(
    host: int, stream: socket.socket, open_stream: OpenStream, shared: Path | None
) -> None:
    with socket.socket(fileno=os.dup(host)) as hub:
        await host_bridge(hub, stream, open_stream, shared=shared)


def _close_streams(inst: MultikernelInstance) -> None:
    for host, stream in inst.streams:
        os.close(host)
        stream.close()
    inst.streams.clear()
