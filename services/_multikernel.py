"""The multikernel platform: an instance is a Linux kernel of its own on reserved CPUs and memory.

Every step is one of the kernel's own (docs/platform.md, "multikernel"), through the one seam
`MultikernelKernel` (`_mk_kernel`: the real kernel, or `_mk_fake` in tests):

| step | the kernel's interface | kerf's verb |
|---|---|---|
| `create` | an `instance-create` overlay (kerf's) to `overlays/new` -> `ready` | `kerf create` |
| `grant` | cpu/memory add/remove overlays under `/instances/<name>` | `kerf update` |
| `load` | `kexec_file_load` with `KEXEC_MULTIKERNEL` and the id -> `loaded` | `kerf load` |
| `boot` | `reboot(MULTIKERNEL, &id)` -> `active` | `kerf start` |
| `halt` | `reboot(MULTIKERNEL_HALT[_FORCE], &id)` -> `loaded` | `kerf kill [--force]` |
| `unload` | `kexec_file_load` with `KEXEC_FILE_UNLOAD` -> `ready` | `kerf unload` |
| `remove` | `rmdir overlays/tx_<N>` of our transactions, newest first | `kerf delete` |

`launch` is create + load + boot, then the host opens vsock streams to the instance's init
(`_mk_init`) and hands it the agent's command line and the fds it would have inherited, each as a
stream: its hub session carried by a bridge at each end (`_mk_session`), other sockets and its
output pipe relayed as bytes (`_mk_vsock`). A refusal at any step undoes the steps before it.
The instance's
`status` file is polled: when it leaves `active` (halted, or a panic that put it back to `loaded`)
the launch has ended, `wait` answers, and the lifecycle's watcher and the fault actor see a
crashed instance as on any platform. Every transaction an instance made is rolled back by
`reclaim`, so the pool is as it was.

Overlay writes take kerf's lock, so the transaction a write made is known even beside kerf.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Self

import anyio
import anyio.abc
import anyio.to_thread
from kerf.vmlinuz import VmlinuzError, open_kernel_fd

from multikernel.endpoints.log import get_logger
from multikernel.services import _mk_dt as dt
from multikernel.services._mk_kernel import (
    MAX_INSTANCE_ID,
    REBOOT_CMD_BOOT,
    REBOOT_CMD_HALT,
    REBOOT_CMD_HALT_FORCE,
    MultikernelKernel,
    kexec_flags,
)
from multikernel.services._mk_session import OpenStream, host_bridge, send_line
from multikernel.services._mk_vsock import AGENT_PORT, Connector, relay
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
)

log = get_logger("multikernel.services.multikernel")

#: The status `wait` answers for an instance whose kernel went down by itself (a panic) before
#: its init could report the agent's exit.
KERNEL_DOWN: Final = 1

#: What each errno of the kernel's overlay, kexec and reboot paths means, and what to do.
_MEANING: Final = {
    errno.EBUSY: "a CPU or memory range it names is lent to another instance, or the instance "
    "is loaded or active (stop it first)",
    errno.ENOENT: "the kernel has no such instance (mkctl show; kerf show)",
    errno.EEXIST: "the kernel already has an instance of that name (kerf delete it, or pick "
    "another name)",
    errno.ENOSPC: "that instance id is taken in the kernel",
    errno.ENOMEM: "the pool has not that much free memory (kerf show)",
    errno.EINVAL: "the kernel refused it as invalid (see dmesg)",
    errno.EPERM: "the kernel does not allow it (is this kernel the pool's owner? are you root?)",
    errno.ENOEXEC: "the kernel image is not an ELF vmlinux (kerf load extracts it from a bzImage)",
    errno.ENODEV: "the device is not in the pool",
}


def explain(what: str, error: OSError) -> str:
    """`what` failed, in the kernel's words and ours: one line that says what to do."""
    code = error.errno or 0
    meaning = _MEANING.get(code, os.strerror(code) if code else str(error))
    return f"{what}: {errno.errorcode.get(code, '?')}: {meaning}"


@dataclass(frozen=True)
class BootImage:
    """What an instance boots: an ELF vmlinux, an initrd (with `_mk_init` as its init), and the
    command line."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


class MultikernelInstance(InstanceProcess):
    """A launch on the multikernel platform: the instance's transactions and streams."""

    def __init__(self, platform: MultikernelPlatform, spec: LaunchSpec) -> None:
        super().__init__(platform, spec, pid=0)  # no host pid: it runs on a kernel of its own
        self.transactions: list[int] = []
        self.control: socket.socket | None = None
        self.streams: list[tuple[int, socket.socket]] = []  # (host fd, vsock), both ours
        self.ended = anyio.Event()
        self.relays = anyio.CancelScope()
        self.relaying = False  # its relay task was started (and closes the streams when done)
        self.relayed = anyio.Event()
        self.forced = False
        self.reclaimed = False


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
    ) -> None:
        self.kernel = kernel
        self.image = image
        self.connector = connector
        self.poll = poll
        self.boot_timeout = boot_timeout
        self._tg: anyio.abc.TaskGroup | None = None
        self._running: dict[str, MultikernelInstance] = {}

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

    # -- the kernel's steps (kerf's verbs) ---------------------------------------------------

    def status(self, name: str) -> str:
        """The instance's state as the kernel says it (`absent` if it has none)."""
        try:
            return self.kernel.read(f"instances/{name}/status").decode().strip()
        except FileNotFoundError:
            return "absent"

    async def apply(self, what: str, overlay: bytes) -> int:
        """Write `overlay` to `overlays/new`; its transaction id. A refused overlay's
        transaction (left `failed` by the kernel, which undid it) is cleared, and
        `PlatformError` says why."""
        return await anyio.to_thread.run_sync(self._apply, what, overlay)

    def _apply(self, what: str, overlay: bytes) -> int:
        self.kernel.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.kernel.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            before = self._transactions()
            try:
                self.kernel.write("overlays/new", overlay)
            except OSError as error:
                for tx in self._transactions() - before:
                    with contextlib.suppress(OSError):
                        self.kernel.rmdir(f"overlays/tx_{tx}")
                raise PlatformError(explain(what, error)) from error
            made = self._transactions() - before
        if len(made) != 1:
            raise PlatformError(f"{what}: the kernel made transactions {sorted(made)}, not one")
        return made.pop()

    def _transactions(self) -> set[int]:
        return {int(d[3:]) for d in self.kernel.listdir("overlays") if d.startswith("tx_")}

    async def rollback(self, tx: int) -> None:
        """`rmdir overlays/tx_<tx>`: undo a transaction (a missing one is already undone)."""
        try:
            await anyio.to_thread.run_sync(self.kernel.rmdir, f"overlays/tx_{tx}")
        except FileNotFoundError:
            pass
        except OSError as error:
            raise PlatformError(explain(f"rolling back transaction {tx}", error)) from error

    async def create(self, name: str, instance_id: int, resources: Resources) -> int:
        """`instance-create` with the instance's CPUs and memory; its transaction id."""
        overlay = dt.create_overlay(name, instance_id, resources.cpus, resources.memory)
        return await self.apply(f"cannot create instance {name!r}", overlay)

    async def load(self, name: str, instance_id: int) -> None:
        flags = kexec_flags(instance_id, initramfs=self.image.initrd is not None)
        await self._kexec(f"cannot load a kernel into {name!r}", flags)

    async def unload(self, name: str, instance_id: int) -> None:
        await self._kexec(f"cannot unload {name!r}", kexec_flags(instance_id, unload=True))

    async def _kexec(self, what: str, flags: int) -> None:
        fds = []
        try:
            # kerf's: an ELF vmlinux as it is, a bzImage's vmlinux extracted into a memfd.
            fds.append(await anyio.to_thread.run_sync(open_kernel_fd, self.image.kernel))
            if self.image.initrd is not None:
                fds.append(os.open(self.image.initrd, os.O_RDONLY | os.O_CLOEXEC))
            initrd = fds[1] if len(fds) > 1 else -1
            cmdline = self.image.cmdline.encode()
            await anyio.to_thread.run_sync(
                self.kernel.kexec_file_load, fds[0], initrd, cmdline, flags
            )
        except OSError as error:
            raise PlatformError(explain(what, error)) from error
        except VmlinuzError as error:
            raise PlatformError(f"{what}: {self.image.kernel}: {error}") from error
        finally:
            for fd in fds:
                os.close(fd)

    def reboot(self, what: str, cmd: int, instance_id: int) -> None:
        try:
            self.kernel.reboot(cmd, instance_id)
        except OSError as error:
            raise PlatformError(explain(what, error)) from error

    # -- the platform interface --------------------------------------------------------------

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
            inst.transactions.append(await self.create(spec.name, spec.instance_id, spec.resources))
            await self.load(spec.name, spec.instance_id)
            self.reboot(f"cannot boot {spec.name!r}", REBOOT_CMD_BOOT, spec.instance_id)
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
        modes = {str(fd): "session" if str(fd) == bus else _mode(fd) for fd in spec.pass_fds}
        with anyio.move_on_after(self.boot_timeout) as scope:
            inst.control = await self._connect(inst)
        if scope.cancelled_caught or inst.control is None:
            raise LaunchError(
                f"instance {spec.name!r} booted but its init did not answer on vsock port "
                f"{AGENT_PORT} within {self.boot_timeout:g} s (status {self.status(spec.name)})"
            )
        launch = {"argv": list(spec.argv), "env": dict(spec.env), "cwd": spec.cwd, "fds": modes}
        await send_line(inst.control, launch)
        for fd, mode in modes.items():
            if mode == "hold":
                continue
            stream = await self.connector.connect(spec.instance_id, AGENT_PORT)
            await send_line(stream, {"fd": int(fd)})
            host = os.dup(int(fd))
            os.set_blocking(host, False)
            inst.streams.append((host, stream))
        assert self._tg is not None
        inst.relaying = True
        self._tg.start_soon(self._relay, inst, [m for m in modes.values() if m != "hold"])

    async def _connect(self, inst: MultikernelInstance) -> socket.socket | None:
        """Connect to the init once it listens; None if the instance went down first."""
        while self.status(inst.name) == "active":
            try:
                return await self.connector.connect(inst.instance_id, AGENT_PORT)
            except (ConnectionRefusedError, FileNotFoundError):
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
                            tg.start_soon(_session, host, stream, opener)
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
        while self.status(inst.name) == "active":  # noqa: ASYNC110
            await anyio.sleep(self.poll)
        status = _reported_exit(inst.control)
        if status is None:
            status = -signal.SIGKILL if inst.forced else KERNEL_DOWN
            if not inst.forced:
                log.warning(
                    "instance kernel went down", instance=inst.name, status=self.status(inst.name)
                )
        if inst.returncode is None:
            inst.returncode = status
        inst.relays.cancel()
        inst.ended.set()

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        inst = self._own(proc)
        await self.grant(inst, resources)
        inst.resources = resources

    async def grant(self, inst: MultikernelInstance, resources: Resources) -> int | None:
        """Give the instance exactly `resources` in one transaction (cpu/memory add/remove);
        its id, or None if nothing changes. Refused or not as asked: undone, `PlatformError`."""
        cpus, regions = self.held(inst.name)
        memory = sum(size for _, size in regions)
        if (cpus, memory) == (resources.cpus, resources.memory):
            return None
        add_base = None
        if resources.memory > memory:
            add_base = self.free_range(resources.memory - memory)
        try:
            overlay = dt.update_overlay(
                inst.name, (cpus, memory), (resources.cpus, resources.memory),
                regions=regions, add_base=add_base,
            )  # fmt: skip
        except Exception as error:  # kerf's ResourceError: memory leaves in whole regions
            raise PlatformError(f"cannot resize {inst.name!r}: {error}") from error
        tx = await self.apply(f"cannot give {inst.name!r} its new resources", overlay)
        got_cpus, got = self.held(inst.name)
        if (got_cpus, sum(s for _, s in got)) != (resources.cpus, resources.memory):
            await self.rollback(tx)
            raise PlatformError(
                f"the kernel applied transaction {tx} for {inst.name!r} but it holds CPUs "
                f"{sorted(got_cpus)}, not {sorted(resources.cpus)}: rolled back"
            )
        inst.transactions.append(tx)
        return tx

    def held(self, name: str) -> tuple[frozenset[int], list[tuple[int, int]]]:
        """The CPUs and memory ranges the kernel says instance `name` has."""
        try:
            tree = dt.parse(self.kernel.read(f"instances/{name}/device_tree"))
        except FileNotFoundError as error:
            raise PlatformError(explain(f"no instance {name!r} in the kernel", error)) from error
        resources = tree.child("resources") or dt.Node("resources")
        regions = [c.reg() for c in resources.children if c.name.startswith("memory@")]
        return frozenset(resources.cells("cpus")), regions

    def free_range(self, size: int) -> int:
        """The base of `size` free bytes in the pool, from `/proc/iomem`'s pool chunks and the
        instances' ranges reserved in them."""
        chunks, used = [], []
        for line in self.kernel.iomem().splitlines():
            span, _, label = line.partition(" : ")
            first, _, last = span.strip().partition("-")
            rng = (int(first, 16), int(last, 16) + 1)
            if label.strip() == "Multikernel Memory Pool":
                chunks.append(rng)
            elif line.startswith(" ") and label.strip().startswith("mk-instance"):
                used.append(rng)
        for base, end in chunks:
            at = base
            for ub, ue in sorted(used):
                if ue <= at or ub >= end:
                    continue
                if ub - at >= size:
                    break
                at = ue
            if at + size <= end:
                return at
        raise PlatformError(f"the pool has no {size} free bytes in one range (kerf show)")

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
                self.reboot(f"cannot halt {inst.name!r}", cmd, inst.instance_id)

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
        if self.status(inst.name) == "active":
            inst.forced = True
            self.reboot(f"cannot halt {inst.name!r}", REBOOT_CMD_HALT_FORCE, inst.instance_id)
        if self.status(inst.name) == "loaded":
            await self.unload(inst.name, inst.instance_id)
        inst.relays.cancel()
        if inst.relaying:
            await inst.relayed.wait()
        _close_streams(inst)
        for tx in reversed(inst.transactions):
            await self.rollback(tx)
        inst.transactions.clear()
        if inst.control is not None:
            inst.control.close()
        inst.reclaimed = True
        if inst.returncode is None:
            inst.returncode = -signal.SIGKILL
        inst.ended.set()
        if self._running.get(inst.name) is inst:
            del self._running[inst.name]

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        inst = self._own(proc)
        cpus, regions = self.held(inst.name)
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
        if isinstance(proc, MultikernelInstance) and proc.platform is self:
            return proc
        raise TypeError(f"{proc!r} was not launched by this platform")

    def _own(self, proc: InstanceProcess) -> MultikernelInstance:
        inst = self._mine(proc)
        if inst.reclaimed:
            raise anyio.ClosedResourceError(f"instance {proc.name!r} has been reclaimed")
        return inst


async def _session(host: int, stream: socket.socket, open_stream: OpenStream) -> None:
    with socket.socket(fileno=os.dup(host)) as hub:
        await host_bridge(hub, stream, open_stream)


def _close_streams(inst: MultikernelInstance) -> None:
    for host, stream in inst.streams:
        os.close(host)
        stream.close()
    inst.streams.clear()


def _mode(fd: int) -> str:
    """How an fd the agent gets crosses to its kernel: `rw` (a socket: relayed both ways), `w`
    (a pipe it writes: relayed to here), `hold` (anything else: a pipe of its own there)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return "rw"
    if stat.S_ISFIFO(mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        return "w"
    return "hold"


def _reported_exit(control: socket.socket | None) -> int | None:
    """The agent's exit status, if the instance's init wrote `exit <status>` before it ended."""
    if control is None:
        return None
    try:
        control.setblocking(False)
        data = control.recv(64)
    except OSError:
        return None
    text = data.decode(errors="replace").strip()
    if text.startswith("exit "):
        with contextlib.suppress(ValueError):
            return int(text[5:])
    return None
