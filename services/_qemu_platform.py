"""The `qemu` platform: an instance is a real Linux kernel under QEMU, joined over ivshmem.

`launch` gives a guest the instance's grant: as much memory (`-m`, at least 128 MiB) and as many
virtual CPUs (`-smp`) as the grant has CPUs, and QEMU's threads are pinned to the granted host
CPUs. The guest gets an `ivshmem-doorbell` device whose memory is a sealed memfd of ours
(`SHARED_MEMORY` bytes) with a channel laid out at its start; QEMU joins as peer 1 of a
one-client ivshmem handshake on a socket in the instance's own directory (the host is peer 0),
so the host holds both sides' doorbell eventfds. `launch` returns once the guest's program has
sent its first frame on that channel; `QemuInstance.channel` is the host's end (polling: no
doorbell yet).

What the guest runs today is the echo program (`multikernel.services.qemu_guest`); the agent
attaching to the bus through this channel is the next step (docs/platform.md, "qemu (in
progress)"), so `spec.argv` is kept but not yet run, and `spec.pass_fds` must be empty: no fd
crosses into another kernel. The serial console and QEMU's own messages go to
`console.log` in the instance's directory (`logs` will read it); a launch that fails says its
last lines.

`wait` is QEMU's exit (0: the guest powered off; negative: QEMU was killed by that signal),
`signal` goes to QEMU, `kill` SIGKILLs QEMU, `reclaim` closes the channel, the memory, the
eventfds and the socket and removes the instance's directory; idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal as signals
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

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
from multikernel.services._qemu_image import GuestImage, build_image
from multikernel.services._qemu_link import SHARED_MEMORY
from multikernel.services._qemu_vm import QEMU, Vm, VmConfig
from multikernel.shm import Channel, Region, WaitPolicy, format_channel

T = TypeVar("T")
MIN_MEMORY: Final = 128 << 20
CAPACITY: Final = 64 << 10
#: How long a guest may take from QEMU's start to its first frame (TCG on a busy 2-CPU host
#: boots in 6-15 s).
BOOT_TIMEOUT: Final = 120.0


class QemuInstance(InstanceProcess):
    """A guest: QEMU's process, the host's end of its channel, what reclaim gives back."""

    def __init__(self, platform: QemuPlatform, spec: LaunchSpec, vm: Vm, workdir: Path) -> None:
        super().__init__(platform, spec, vm.pid)
        self.vm = vm
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.channel: Channel | None = None
        self.region: Region | None = None
        self.link: socket.socket | None = None  # QEMU's ivshmem connection (its hang-up: exit)
        self.host_peer: Peer | None = None
        self.guest_peer: Peer | None = None
        self.hello = ""  # the guest's first frame


class QemuPlatform:
    """Instances as guests under QEMU (see the module docstring).

    `image` is the guest's kernel and initramfs (default: `build_image()` at the first launch,
    cached per user); `policy` how the host's end of each channel waits.
    """

    name = "qemu"

    def __init__(self, image: GuestImage | None = None, *, policy: WaitPolicy | None = None):
        self.image = image
        self.policy = policy
        self._running: set[str] = set()

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
        if spec.unit in self._running:
            raise LaunchError(f"instance {spec.unit!r} is already running: kill and reclaim it")
        if shutil.which(QEMU) is None:
            raise LaunchError(f"{QEMU} is not installed; apt-get install qemu-system-x86")
        if self.image is None:
            self.image = await anyio.to_thread.run_sync(build_image)
        self._running.add(spec.unit)
        instance = None
        workdir = Path(tempfile.mkdtemp(prefix=f"mk-qemu-{spec.unit}-"))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            listener.bind(str(workdir / "ivshmem.sock"))
            listener.listen(1)
            region = Region.create(SHARED_MEMORY)
            format_channel(region, CAPACITY)
            config = VmConfig(
                self.image,
                memory_mib=spec.resources.memory >> 20,
                cpus=len(spec.resources.cpus),
                args=(("mode", "echo"),),
                ivshmem_socket=workdir / "ivshmem.sock",
                console=workdir / "console.log",
            )
            output = os.open(workdir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                vm = await Vm.start(config, output=output)
            finally:
                os.close(output)
            instance = QemuInstance(self, spec, vm, workdir)
            instance.region = region
            _pin(vm.pid, spec.resources.cpus)
            with anyio.fail_after(BOOT_TIMEOUT):
                await _unless_exited(instance.vm, functools.partial(self._join, instance, listener))
                instance.channel = channel = Channel.open_region(region, 0, self.policy)
                hello = await _unless_exited(instance.vm, channel.receive)
                instance.hello = hello.decode(errors="replace")
        except BaseException as exc:
            listener.close()
            tail = ""
            with anyio.CancelScope(shield=True):
                if instance is not None:
                    await self.kill(instance)
                    tail = _tail(workdir / "qemu.log") + _tail(instance.console)
                    await self.reclaim(instance)
                else:
                    self._running.discard(spec.unit)
                    shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, (OSError, TimeoutError, anyio.EndOfStream, _Exited)):
                detail = f" Its last output:\n{tail}" if tail else ""
                raise LaunchError(f"guest {spec.unit!r} did not come up: {exc}.{detail}") from exc
            raise
        listener.close()
        return instance

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
        assert instance.region is not None
        instance.host_peer = make_peer(0, 1)
        instance.guest_peer = make_peer(1, 1)
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
        _pin(instance.pid, resources.cpus)
        instance.resources = resources
        await anyio.lowlevel.checkpoint()

    async def wait(self, proc: InstanceProcess) -> int:
        instance = self._mine(proc)
        status = await instance.vm.wait()
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
        with anyio.CancelScope(shield=True):
            await instance.vm.aclose()
        for closable in (instance.channel, instance.region, instance.link):
            if closable is not None:
                closable.close()
        for peer in (instance.host_peer, instance.guest_peer):
            if peer is not None:
                close_peer(peer)
        shutil.rmtree(instance.workdir, ignore_errors=True)
        self._running.discard(instance.spec.unit)

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        """What the host sees of the guest: QEMU's pid, its affinity and namespaces (the
        host's: the isolation is the guest's own kernel), the guest's memory."""
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
        )


class _Exited(Exception):
    """QEMU ended while `launch` waited for its guest."""


async def _unless_exited(vm: Vm, step: Callable[[], Awaitable[T]]) -> T:
    """`await step()`, unless QEMU ends first (then `_Exited`, at once rather than at the boot
    timeout). The step's own exception comes out as it is, not in a group."""
    done: list[T] = []
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await vm.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            done.append(await step())
        except Exception as exc:  # raised below, outside the task group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not done:
        raise _Exited(f"QEMU exited with status {vm.process.returncode}")
    return done[0]


def _check_resources(resources: Resources) -> None:
    if resources.memory < MIN_MEMORY:
        raise InvalidSpecError(
            f"a qemu guest needs at least {MIN_MEMORY >> 20} MiB, not {resources.memory >> 20} MiB"
        )
    if missing := resources.cpus - online_cpus():
        raise InvalidSpecError(f"CPUs {sorted(missing)} are not online on this host")


def _pin(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of QEMU (`pid`) to `cpus`; threads it starts later inherit it."""
    os.sched_setaffinity(pid, cpus)
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) + "\n"
