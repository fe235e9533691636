"""A fake multikernel kernel: its file system in a directory, its system calls recorded.

`FakeMultikernel(directory, cpus=..., memory=...)` is a `MultikernelKernel` (`_mk_kernel`) that
acts like the kernel's `kernel/multikernel/` as its documentation and `kernfs.c` describe it:

- `kernfs/device_tree`: the pool (`/resources`: `cpus`, `cpus-available`, one `memory@<base>`
  per chunk, `devices/<name>` with the `pci-id` of each PCI device), regenerated at every
  change; `kernfs/instances/<name>/{id,status,device_tree}` (its `device_tree` lists its devices'
  PCI addresses in `/resources/devices`: the fake's layout);
  `mkdir` anywhere is EPERM, writes to anything but `overlays/new` EINVAL;
- `overlays/new` takes a DTBO as one write; each write makes `overlays/tx_<N>/{id,status,
  instance,resources,dtbo}`; its fragments run in unit-address order, each fragment's operations
  in the kernel's order; a refused operation (EINVAL bad overlay or resource, ENOENT unknown
  instance, EBUSY a CPU, range or device not free, EEXIST a taken name or id, EPERM a pool
  target, ENODEV a device not in the pool) undoes
  what the transaction did, leaves `status` `failed` and fails the write with that errno;
  `rmdir tx_<N>` undoes an applied transaction in reverse (EBUSY if that would destroy a loaded or
  active instance) and removes the directory, as it clears a failed one;
- instance states `ready` (made by instance-create) → `loaded` (kexec_file_load) → `active`
  (reboot MULTIKERNEL); halt and force-halt return it to `loaded`, and so does a panic (`panic`,
  or the instance's process ending by itself); `fail` makes it `failed`;
- `iomem()`: `/proc/iomem` with the pool chunks and the instances' ranges in them;
- `calls`: every `kexec_file_load` and `reboot`, with their exact arguments.

Booting runs `boot(instance)` (a `BootHook`) and keeps the process it returns as the instance's
userspace: tests run our agent there, under `_mk_init`, reached through `UnixVsock`. Status reads
notice a process that ended. `close()` kills every such process; it is a context manager.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from multikernel.services import _mk_dt as dt
from multikernel.services._mk_fake_ops import FakeInstance, FakePool, Refused, Transaction, apply
from multikernel.services._mk_kernel import (
    KEXEC_FILE_UNLOAD,
    KEXEC_MK_ID_MASK,
    KEXEC_MK_ID_SHIFT,
    KEXEC_MULTIKERNEL,
    REBOOT_CMD_BOOT,
    REBOOT_CMD_HALT,
    REBOOT_CMD_HALT_FORCE,
)
from multikernel.services._mk_vsock import AGENT_PORT, UnixVsock
from multikernel.services._signature import (
    SignatureError,
    UnsignedImageError,
    UntrustedSignerError,
    verify,
)


@dataclass
class KexecCall:
    kernel: str  # what kernel_fd was open on
    initrd: str | None  # what initrd_fd was open on (None: -1)
    cmdline: bytes
    flags: int


@dataclass
class RebootCall:
    cmd: int
    instance_id: int


P = ParamSpec("P")
R = TypeVar("R")
BootHook = Callable[[FakeInstance], "subprocess.Popen[bytes]"]


def boot_init(vsock: UnixVsock, *, python: str = sys.executable) -> BootHook:
    """A `BootHook` that runs the instance's userspace as a local process: our init
    (`_mk_init`), listening on the vsock stand-in `vsock` for (the instance's id, AGENT_PORT).
    It runs in a session of its own, so a halt ends every process it started."""

    def boot(inst: FakeInstance) -> subprocess.Popen[bytes]:
        where = str(vsock.path(inst.id, AGENT_PORT))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        argv = [python, "-P", "-m", "multikernel.services._mk_init", where]
        return subprocess.Popen(argv, start_new_session=True)

    return boot


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    """One call at a time, as the kernel's mutexes make it: the platform calls from threads."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return call


class FakeMultikernel:
    """See the module docstring. `cpus` are the pool's CPU ids, `memory` its chunks."""

    def __init__(
        self,
        directory: Path,
        *,
        cpus: set[int] | range = range(1, 4),
        memory: list[tuple[int, int]] | None = None,
        devices: dict[str, str] | None = None,
        boot: BootHook | None = None,
        trusted: list[bytes] | None = None,
    ) -> None:
        self.directory = directory
        self.kernfs = directory / "kernfs"
        self.lock_path = directory / "kerf.lock"
        self.pool = FakePool(
            set(cpus), list(memory or [(0x1_0000_0000, 1 << 30)]), devices=dict(devices or {})
        )
        self.boot = boot
        #: With certificates, it enforces kernel signatures as a locked-down kernel does: an
        #: image without an appended signature is ENODATA, one no certificate here signed ENOKEY,
        #: a signature that does not match EBADMSG.
        self.trusted = trusted
        self.calls: list[KexecCall | RebootCall] = []
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self._lock = threading.RLock()
        (self.kernfs / "instances").mkdir(parents=True, exist_ok=True)
        (self.kernfs / "overlays").mkdir(exist_ok=True)
        _put(self.kernfs / "overlays" / "new", b"")
        self._sync()

    # -- the seam ---------------------------------------------------------------------------

    @_locked
    def read(self, path: str) -> bytes:
        self.notice_exits()
        return (self.kernfs / path).read_bytes()

    @_locked
    def listdir(self, path: str) -> list[str]:
        self.notice_exits()
        return os.listdir(self.kernfs / path)

    @_locked
    def write(self, path: str, data: bytes) -> None:
        if path.strip("/") != "overlays/new":
            if not (self.kernfs / path).exists():
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            raise OSError(errno.EINVAL, f"{path} takes no writes")
        try:
            tree = dt.parse(data)
        except dt.DeviceTreeError as error:
            raise OSError(errno.EINVAL, f"not a device tree overlay: {error}") from error
        tx = Transaction(self._next_tx, bytes(data), tree)
        self._next_tx += 1
        self.transactions[tx.id] = tx
        self.notice_exits()
        try:
            apply(self.pool, tx)
        except Refused as refused:
            tx.status = "failed"
            self._sync()
            raise OSError(refused.errno, str(refused)) from None
        tx.status = "applied"
        self._sync()

    def mkdir(self, path: str) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)

    @_locked
    def rmdir(self, path: str) -> None:
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "overlays" or not parts[1].startswith("tx_"):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)
        tx = self.transactions.get(int(parts[1][3:]))
        if tx is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if tx.status == "applied":
            self.notice_exits()
            try:
                tx.rollback(self.pool)
            except Refused as refused:
                raise OSError(refused.errno, str(refused)) from None
        del self.transactions[tx.id]
        self._sync()

    @_locked
    def iomem(self) -> str:
        lines = []
        for base, size in sorted(self.pool.chunks):
            lines.append(f"{base:08x}-{base + size - 1:08x} : Multikernel Memory Pool")
            for inst in sorted(self.pool.instances.values(), key=lambda i: i.id):
                for rb, rs in inst.regions:
                    if base <= rb < base + size:
                        lines.append(f"  {rb:08x}-{rb + rs - 1:08x} : mk-instance-{inst.id}")
        return "\n".join(lines) + "\n"

    @_locked
    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: bytes, flags: int) -> None:
        kernel = os.readlink(f"/proc/self/fd/{kernel_fd}")
        initrd = os.readlink(f"/proc/self/fd/{initrd_fd}") if initrd_fd >= 0 else None
        self.calls.append(KexecCall(kernel, initrd, cmdline, flags))
        if not flags & KEXEC_MULTIKERNEL:
            raise OSError(errno.EPERM, "a kexec without KEXEC_MULTIKERNEL would replace the host")
        inst = self._by_id((flags & KEXEC_MK_ID_MASK) >> KEXEC_MK_ID_SHIFT)
        if flags & KEXEC_FILE_UNLOAD:
            if inst.state != "loaded":
                raise OSError(errno.EBUSY if inst.state == "active" else errno.EINVAL, inst.state)
            inst.state, inst.kernel = "ready", None
        else:
            if inst.state not in ("ready", "loaded"):
                raise OSError(errno.EBUSY, f"instance {inst.name} is {inst.state}")
            if os.pread(kernel_fd, 4, 0) != b"\x7fELF":
                raise OSError(errno.ENOEXEC, "the kernel image is not an ELF vmlinux")
            self._check_signature(kernel_fd)
            inst.state, inst.kernel = "loaded", kernel
        self._sync()

    @_locked
    def reboot(self, cmd: int, instance_id: int) -> None:
        self.calls.append(RebootCall(cmd, instance_id))
        self.notice_exits()
        inst = self._by_id(instance_id)
        if cmd == REBOOT_CMD_BOOT:
            if inst.state != "loaded":
                raise OSError(errno.EINVAL, f"instance {inst.name} is {inst.state}, not loaded")
            inst.state, inst.halted_by = "active", ""
            if self.boot is not None:
                inst.process = self.boot(inst)
        elif cmd in (REBOOT_CMD_HALT, REBOOT_CMD_HALT_FORCE):
            if inst.state != "active":
                raise OSError(errno.EINVAL, f"instance {inst.name} is {inst.state}, not active")
            force = cmd == REBOOT_CMD_HALT_FORCE
            inst.halted_by = "force" if force else "halt"
            self._end(inst, signal.SIGKILL if force else signal.SIGTERM)
            if force or inst.process is None:
                inst.state = "loaded"
        else:
            raise OSError(errno.EINVAL, f"unknown reboot command {cmd:#x}")
        self._sync()

    def signatures_enforced(self) -> bool:
        return self.trusted is not None

    def _check_signature(self, kernel_fd: int) -> None:
        if self.trusted is None:
            return
        image = os.pread(kernel_fd, os.fstat(kernel_fd).st_size, 0)
        try:
            verify(image, self.trusted)
        except UnsignedImageError:
            raise OSError(errno.ENODATA, "the kernel image is not signed") from None
        except UntrustedSignerError:
            raise OSError(errno.ENOKEY, "no trusted key signed the kernel image") from None
        except SignatureError:
            raise OSError(errno.EBADMSG, "the kernel image's signature does not match") from None

    # -- what a test does to the instances ---------------------------------------------------

    @_locked
    def panic(self, name: str) -> None:
        """The instance's kernel panics: its userspace is gone, it is `loaded` again."""
        inst = self.pool.instances[name]
        self._end(inst, signal.SIGKILL)
        inst.state, inst.halted_by = "loaded", "panic"
        self._sync()

    @_locked
    def fail(self, name: str) -> None:
        inst = self.pool.instances[name]
        self._end(inst, signal.SIGKILL)
        inst.state = "failed"
        self._sync()

    @_locked
    def notice_exits(self) -> None:
        """An active instance whose process ended went down by itself: `loaded`."""
        changed = False
        for inst in self.pool.instances.values():
            ended = inst.process is not None and inst.process.poll() is not None
            if inst.state == "active" and ended:
                inst.state, inst.halted_by, changed = "loaded", inst.halted_by or "panic", True
        if changed:
            self._sync()

    def close(self) -> None:
        for inst in self.pool.instances.values():
            self._end(inst, signal.SIGKILL)

    def __enter__(self) -> FakeMultikernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ------------------------------------------------------------------------------

    def _by_id(self, instance_id: int) -> FakeInstance:
        for inst in self.pool.instances.values():
            if inst.id == instance_id:
                return inst
        raise OSError(errno.ENOENT, f"no instance with id {instance_id}")

    @staticmethod
    def _end(inst: FakeInstance, signum: int) -> None:
        proc = inst.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        if signum == signal.SIGKILL:
            proc.wait()

    def _sync(self) -> None:
        """Write the files the kernel would show."""
        root = dt.Node("", {"compatible": b"multikernel-v1\0", "id": dt.u32(0)})
        resources = dt.Node("resources", {
            "cpus": dt.cpu_cells(self.pool.cpus),
            "cpus-available": dt.cpu_cells(self.pool.free_cpus()),
        })  # fmt: skip
        for base, size in self.pool.chunks:
            resources.children.append(_memory_node(base, size))
        if self.pool.devices:
            pool_devices = dt.Node("devices")
            for name, pci_id in sorted(self.pool.devices.items()):
                device = {"device-type": b"pci\0", "pci-id": pci_id.encode() + b"\0"}
                pool_devices.children.append(dt.Node(name, device))
            resources.children.append(pool_devices)
        root.children.append(resources)
        _put(self.kernfs / "device_tree", dt.build(root))
        instances = self.kernfs / "instances"
        for gone in set(os.listdir(instances)) - set(self.pool.instances):
            shutil.rmtree(instances / gone)
        for inst in self.pool.instances.values():
            where = instances / inst.name
            where.mkdir(exist_ok=True)
            _put(where / "id", f"{inst.id}\n")
            _put(where / "status", f"{inst.state}\n")
            _put(where / "device_tree", _instance_tree(inst))
        overlays = self.kernfs / "overlays"
        for gone in {d for d in os.listdir(overlays) if d.startswith("tx_")} - {
            f"tx_{n}" for n in self.transactions
        }:
            shutil.rmtree(overlays / gone)
        for tx in self.transactions.values():
            where = overlays / f"tx_{tx.id}"
            where.mkdir(exist_ok=True)
            _put(where / "id", f"{tx.id}\n")
            _put(where / "status", f"{tx.status}\n")
            _put(where / "instance", f"{tx.target}\n")
            _put(where / "resources", f"{tx.resources}\n")
            _put(where / "dtbo", tx.dtbo)


def _put(path: Path, data: str | bytes) -> None:
    """Replace a file whole: a reader sees the old content or the new, as from the kernel."""
    part = path.with_name(f".{path.name}.new")
    part.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(part, path)


def _memory_node(base: int, size: int) -> dt.Node:
    return dt.Node(f"memory@{base:x}", {
        "device_type": b"memory\0", "reg": dt.u64(base) + dt.u64(size),
    })  # fmt: skip


def _instance_tree(inst: FakeInstance) -> bytes:
    root = dt.Node("", {"compatible": b"multikernel-v1\0", "id": dt.u32(inst.id)})
    resources = dt.Node("resources", {"cpus": dt.cpu_cells(inst.cpus)})
    if inst.devices:  # the PCI addresses lent to it (the fake's layout)
        resources.props["devices"] = b"".join(d.encode() + b"\0" for d in sorted(inst.devices))
    resources.children.extend(_memory_node(b, s) for b, s in inst.regions)
    root.children.append(resources)
    return dt.build(root)
