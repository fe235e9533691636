"""The `qemu` platform: an instance is a real Linux kernel under QEMU, joined over ivshmem.

`launch` gives a guest the instance's grant: as much memory (`-m`, at least 128 MiB) and as many
virtual CPUs (`-smp`) as the grant has CPUs, and QEMU's threads are pinned to the granted host
CPUs. It boots `spec.boot` (the kernel and initramfs of a verified image) or the platform's
default image. The guest gets an `ivshmem-doorbell` device whose memory is a sealed memfd of
ours (`GUEST_MEMORY` bytes): session channels in slots from its start (the agent's in slot 0,
one per attachment the agent asks for, for its workload, in the others), the boot block at its
end
(`_qemu_boot`: the spec's argv, environment and hostname, the analogue of the device tree a
kernel boots with). QEMU joins as peer 1 of a one-client ivshmem handshake on a socket in the
instance's own directory (the host is peer 0), so the host holds both sides' doorbell eventfds.

The guest's init runs `spec.argv` (the instance agent) with `spec.env`; the agent attaches over
the session channel, which the platform serves on the host's hub (`serve_region`, in the
platform's task group, bound to `spec.instance_id` and QEMU's pid). `launch` returns once the
agent is attached (its Hello answered), and the session is cancelled when QEMU exits: a region
has no liveness of its own, so a guest that dies is seen by QEMU's exit alone. No fd crosses
into another kernel, so `spec.pass_fds` must be empty. The serial console goes to `spec.stdout`
(the lifecycle collects it: `mkctl logs`) and to `console.log` in the instance's directory,
whose last lines a failed launch says.

`wait` is the agent's exit status as the guest's init recorded it in the boot block before
powering off (negative: QEMU was killed by that signal; `GUEST_DOWN` when the guest ended
without recording one: a panic, a crash), `signal` goes to QEMU, `kill` SIGKILLs QEMU, `reclaim`
ends the session and closes the memory, the eventfds and the socket and removes the instance's
directory; idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal as signals
import socket
import tempfile
from pathlib import Path
from typing import Final, Self

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from multikernel.bus import Limits
from multikernel.services._ivshmem import Peer, close_peer, make_peer, send_handshake
from multikernel.services._local_probe import online_cpus
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
from multikernel.services._qemu_boot import read_status, write_boot
from multikernel.services._qemu_image import GuestImage, build_image
from multikernel.services._qemu_record import QemuRecords
from multikernel.services._qemu_sessions import (
    GUEST_MEMORY,
    VECTORS,
    GuestSessions,
    ServeRegion,
)
from multikernel.services._qemu_vm import QEMU, Exited, Vm, VmConfig, pin, tail, unless_exited
from multikernel.shm import Region, WaitPolicy, format_channel

MIN_MEMORY: Final = 128 << 20
#: How long a guest may take from QEMU's start to its agent attached: TCG on a 2-CPU host boots
#: in 6-15 s and the agent's imports take 4-6 s more, but 50-80 s were seen with the machine's
#: load at 20. A guest that fails sooner (QEMU exits) fails the launch at once.
BOOT_TIMEOUT: Final = 300.0
#: What `wait` answers for a guest that ended without its init recording the agent's exit.
GUEST_DOWN: Final = 1


class QemuInstance(InstanceProcess):
    """A guest: QEMU's process, its memory, its session on the hub, what reclaim gives back."""

    def __init__(
        self,
        platform: QemuPlatform,
        spec: LaunchSpec,
        vm: Vm,
        workdir: Path,
        image: GuestImage,
        region: Region,
    ) -> None:
        super().__init__(platform, spec, vm.pid)
        self.vm = vm
        self.workdir = workdir
        self.image = image
        self.console = workdir / "console.log"
        self.region = region
        self.link: socket.socket | None = None  # QEMU's ivshmem connection (its hang-up: exit)
        self.host_peer: Peer | None = None
        self.guest_peer: Peer | None = None
        self.session = anyio.CancelScope()  # the hub's sessions with the guest's processes
        self.served = anyio.Event()  # set once they have all ended
        self.sessions: anyio.abc.TaskGroup | None = None  # where they are served
        self.taken = {0}  # the slots whose session channel is in use (0: the agent's)


class QemuPlatform:
    """Instances as guests under QEMU (see the module docstring). `async with` it while the
    hub serves: its task group holds each guest's session and watcher.

    `serve_region` is the hub's (`Hub.serve_region`); `image` the guest's kernel and initramfs
    for a spec without `boot` (default: `build_image()` at the first such launch, cached per
    user); `policy` how the hub's end of each session channel waits (polling: no doorbell yet).
    """

    name = "qemu"

    def __init__(
        self,
        image: GuestImage | None = None,
        *,
        serve_region: ServeRegion | None = None,
        policy: WaitPolicy | None = None,
        session_capacity: int = Limits().session_capacity,
    ):
        self.image = image
        self.sessions = GuestSessions(serve_region, policy, session_capacity)
        self.records = QemuRecords()
        self._running: dict[str, QemuInstance | None] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def serve_region(self) -> ServeRegion | None:
        """`Hub.serve_region` of the hub the guests' sessions are served on."""
        return self.sessions.serve_region

    @serve_region.setter
    def serve_region(self, serve: ServeRegion | None) -> None:
        self.sessions.serve_region = serve

    async def __aenter__(self) -> Self:
        self._tg = await anyio.create_task_group().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            for inst in list(self._running.values()):
                if inst is not None:
                    await self.reclaim(inst)
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    def capabilities(self) -> Capabilities:
        warnings = [
            "QEMU runs under TCG here (KVM cannot boot stock kernels on these machines): a "
            "guest's CPUs are emulated, tens of times slower than the host's",
            "QEMU's threads are pinned to the instance's CPUs but not held there by a cpuset "
            "cgroup: a process of the host's user could change their affinity",
        ]
        if shutil.which(QEMU) is None:
            warnings.insert(0, f"{QEMU} is not installed: apt-get install qemu-system-x86")
        return Capabilities(
            namespaces=True,  # a kernel of its own: its own PIDs, hostname, mounts, everything
            cpuset=False,
            memory_limit=True,  # the guest has exactly its RAM
            affinity=True,
            warnings=tuple(warnings),
        )

    def check(self, spec: LaunchSpec) -> None:
        """`InvalidSpecError` unless a guest can be started for `spec`."""
        if spec.pass_fds:
            raise InvalidSpecError(
                f"a qemu instance inherits no fds (got {spec.pass_fds}): its channel is a "
                "region of its ivshmem memory"
            )
        _check_resources(spec.resources)

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> None:
        """Nothing: every launch makes its instance anew (`Platform.prepare`)."""

    async def release(self, name: str, instance_id: int) -> None:
        """Nothing: `prepare` made nothing."""

    async def launch(self, spec: LaunchSpec) -> QemuInstance:
        self.check(spec)
        if self._tg is None or self.serve_region is None:
            raise LaunchError(
                "the qemu platform serves each guest's session on the host's hub: make it with "
                "serve_region=hub.serve_region and enter it (async with) while the hub serves"
            )
        if spec.unit in self._running:
            raise LaunchError(f"instance {spec.unit!r} is already running: kill and reclaim it")
        if shutil.which(QEMU) is None:
            raise LaunchError(f"{QEMU} is not installed; apt-get install qemu-system-x86")
        self._running[spec.unit] = None
        instance = region = channel = None
        workdir = Path(tempfile.mkdtemp(prefix=f"mk-qemu-{spec.unit}-"))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            image = await self._image_for(spec)
            listener.bind(str(workdir / "ivshmem.sock"))
            listener.listen(1)
            region = Region.create(GUEST_MEMORY)
            with memoryview(region.mmap) as memory:
                write_boot(
                    memory,
                    list(spec.argv),
                    dict(spec.env),
                    spec.uts_name,
                    doorbell=spec.interrupts,
                )
            format_channel(region, self.sessions.session_capacity)
            config = VmConfig(
                image,
                memory_mib=spec.resources.memory >> 20,
                cpus=len(spec.resources.cpus),
                args=(("mode", "agent"),),
                ivshmem_socket=workdir / "ivshmem.sock",
                console_log=workdir / "console.log",
                vectors=VECTORS,
            )
            vm = await self._start(config, spec, workdir)
            instance = QemuInstance(self, spec, vm, workdir, image, region)
            self._running[spec.unit] = instance
            pin(vm.pid, spec.resources.cpus)
            with anyio.fail_after(BOOT_TIMEOUT):
                await unless_exited(vm, functools.partial(self._join, instance, listener))
                channel = self.sessions.agent_channel(instance)
                serve = functools.partial(self.sessions.serve, instance, channel)
                await unless_exited(vm, functools.partial(self._tg.start, serve))
            self._tg.start_soon(self.sessions.watch, instance)
        except BaseException as exc:
            listener.close()
            if channel is not None:
                channel.close()  # idempotent: the hub's session closes it too, if it started
            last = ""
            with anyio.CancelScope(shield=True):
                if instance is not None:
                    await self.kill(instance)
                    last = tail(workdir / "qemu.log") + tail(instance.console)
                    await self.reclaim(instance)
                else:
                    if region is not None:
                        region.close()
                    self._running.pop(spec.unit, None)
                    shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, (OSError, TimeoutError, RuntimeError, Exited)):
                detail = f" Its last output:\n{last}" if last else ""
                raise LaunchError(f"guest {spec.unit!r} did not come up: {exc}.{detail}") from exc
            raise
        listener.close()
        return instance

    async def _image_for(self, spec: LaunchSpec) -> GuestImage:
        if spec.boot is not None:
            if spec.boot.initramfs is None:
                raise InvalidSpecError(
                    f"a qemu guest boots a kernel and an initramfs; {spec.unit!r} has no "
                    "initramfs: build its image with mkctl image build"
                )
            return GuestImage(spec.boot.kernel, spec.boot.initramfs, spec.boot.release, "")
        if self.image is None:
            self.image = await anyio.to_thread.run_sync(build_image)
        return self.image

    @staticmethod
    async def _start(config: VmConfig, spec: LaunchSpec, workdir: Path) -> Vm:
        """QEMU, its stdout (the console, and its own messages) on `spec.stdout` or, without
        one, in `qemu.log`."""
        if spec.stdout is not None:
            return await Vm.start(config, output=spec.stdout)
        output = os.open(workdir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            return await Vm.start(config, output=output)
        finally:
            os.close(output)

    async def _join(self, instance: QemuInstance, listener: socket.socket) -> None:
        """QEMU's ivshmem device connects: it becomes peer 1, the host peer 0."""
        while True:
            try:
                link, _ = listener.accept()
                break
            except BlockingIOError:
                await anyio.wait_readable(listener)
        instance.link = link
        link.setblocking(False)
        instance.host_peer = make_peer(0, VECTORS)
        instance.guest_peer = make_peer(1, VECTORS)
        await send_handshake(link, instance.guest_peer, instance.region.fd, [instance.host_peer])

    def _mine(self, proc: InstanceProcess) -> QemuInstance:
        return launched_by(self, proc, QemuInstance)

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        instance = self._mine(proc)
        _check_resources(resources)
        if resources.memory != instance.resources.memory or len(resources.cpus) != len(
            instance.resources.cpus
        ):
            raise PlatformError(
                f"instance {instance.name!r} runs on qemu, whose guests cannot change their "
                "memory or CPU count live yet: restart it with the new grant"
            )
        pin(instance.pid, resources.cpus)
        instance.resources = resources
        await anyio.lowlevel.checkpoint()

    async def wait(self, proc: InstanceProcess) -> int:
        """The agent's exit status, as the guest recorded it (see the module docstring)."""
        instance = self._mine(proc)
        status = await instance.vm.wait()
        if status >= 0:
            recorded = None
            if not instance.reclaimed:
                with memoryview(instance.region.mmap) as memory:
                    recorded = read_status(memory)
            status = GUEST_DOWN if recorded is None else recorded
        instance.returncode = status
        return status

    def signal(self, proc: InstanceProcess, signum: int) -> None:
        instance = self._mine(proc)
        if instance.vm.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                instance.vm.process.send_signal(signals.Signals(signum))

    async def kill(self, proc: InstanceProcess) -> None:
        instance = self._mine(proc)
        self.signal(instance, signals.SIGKILL)
        with anyio.CancelScope(shield=True):
            instance.returncode = await instance.vm.wait()

    async def reclaim(self, proc: InstanceProcess) -> None:
        instance = self._mine(proc)
        if instance.reclaimed:
            return
        await self.kill(instance)
        instance.reclaimed = True
        instance.session.cancel()
        with anyio.CancelScope(shield=True):
            await instance.vm.aclose()
            if self._tg is not None and instance.link is not None:
                await instance.served.wait()  # the hub's session with it is over
        for closable in (instance.region, instance.link):
            if closable is not None:
                closable.close()
        for peer in (instance.host_peer, instance.guest_peer):
            if peer is not None:
                close_peer(peer)
        shutil.rmtree(instance.workdir, ignore_errors=True)
        self._running.pop(instance.spec.unit, None)

    def record(self, proc: InstanceProcess) -> str:
        """What a restarted host needs to end this guest (QEMU's pid and start time)."""
        instance = self._mine(proc)
        return self.records.record(instance.spec.unit, instance.pid, instance.workdir)

    def adopt(self, spec: LaunchSpec, record: str) -> InstanceProcess | None:
        """None: a guest's session died with the old host's hub, and its agent cannot attach
        again yet, so a restarted host ends it (`reclaim_record`) rather than adopt it."""
        return None

    async def reclaim_record(self, record: str) -> None:
        await self.records.reclaim(record)

    async def reclaim_unit(self, unit: str) -> None:
        """Nothing to find by name: a launch cut short left QEMU with no record of its pid
        (it ends when the guest powers off, or is found by its directory, /tmp/mk-qemu-*)."""
        await anyio.lowlevel.checkpoint()

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        """What the host sees of the guest: QEMU's pid, its affinity and namespaces (the
        host's: the isolation is the guest's own kernel, `kernel` and `vcpus`), the guest's
        memory."""
        instance = self._mine(proc)
        threads = tuple(int(t) for t in os.listdir(f"/proc/{instance.pid}/task"))
        return IsolationReport(
            pid=instance.pid,
            namespace_pid=instance.pid,
            affinity=frozenset(os.sched_getaffinity(instance.pid)),
            namespaces=NamespaceIds(*namespace_ids(instance.pid)),
            host_namespaces=NamespaceIds(*namespace_ids(os.getpid())),
            memory_limit=instance.resources.memory,
            processes=threads,
            kernel=instance.image.kernel_version,
            vcpus=len(instance.resources.cpus),
        )


def _check_resources(resources: Resources) -> None:
    if resources.memory < MIN_MEMORY:
        raise InvalidSpecError(
            f"a qemu guest needs at least {MIN_MEMORY >> 20} MiB, not {resources.memory >> 20} MiB"
        )
    if missing := resources.cpus - online_cpus():
        raise InvalidSpecError(f"CPUs {sorted(missing)} are not online on this host")
