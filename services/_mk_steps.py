"""The multikernel kernel's steps, as kerf takes them: overlays, kexec, reboot, read-backs.

`KernelSteps` is what `MultikernelPlatform` asks of the kernel, one kernel interface per call,
through the `MultikernelKernel` seam (docs/platform.md, "multikernel"):

- `apply(what, overlay)` writes a DTBO to `overlays/new` under kerf's lock and answers the
  transaction it made; a refused one (left `failed` by the kernel, which undid it) is cleared and
  `PlatformError` says why; `rollback(tx)` is `rmdir overlays/tx_<N>`;
- `create` (instance-create) and `grant` (cpu/memory add/remove, checked against the instance's
  `device_tree` afterwards and rolled back if the kernel did not do as asked);
- `load` / `unload` (`kexec_file_load` with `KEXEC_MULTIKERNEL` and the id, a bzImage's vmlinux
  extracted by kerf), `reboot` (boot, halt, force-halt);
- `status`, `held` (an instance's CPUs and memory ranges) and `free_range` (from `/proc/iomem`).

Every refusal of the kernel becomes one line with its errno and what to do (`explain`).
`MultikernelHostSide` is the resource actor's end of a grant on such a host: the same overlays.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
from kerf.signature import MODULE_SIG_STRING as SIGNATURE_MARKER
from kerf.vmlinuz import BZIMAGE_HEADER_SIZE, VmlinuzError, is_bzimage, open_kernel_fd

from multikernel.services import _mk_dt as dt
from multikernel.services._enforce import HostSideError
from multikernel.services._mk_kernel import KEXEC_FILE_UNLOAD, MultikernelKernel, kexec_flags
from multikernel.services._platform import PlatformError, Resources

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
    errno.ENODATA: "the kernel image is not signed and this host enforces kernel signatures "
    "(sign it: kerf sign)",
    errno.ENOKEY: "the kernel image's signer is not trusted by this host (enroll its "
    "certificate, e.g. as a MOK)",
    errno.EKEYREJECTED: "the kernel image's signature was rejected by this host's keys",
    errno.EBADMSG: "the kernel image's signature does not match it (re-sign it: kerf sign)",
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


class KernelSteps:
    """The kernel's steps for the instances of one platform (see the module docstring)."""

    def __init__(self, kernel: MultikernelKernel, image: BootImage | None = None) -> None:
        self.kernel = kernel
        self.image = image  # None: grants only (the resource actor's), no kernel to load

    def check_mounted(self) -> None:
        """`PlatformError` unless the kernel's multikernel file system is there."""
        try:
            self.kernel.listdir("overlays")
            self.kernel.listdir("instances")
        except OSError as error:
            raise PlatformError(
                f"no multikernel file system ({error.strerror}): is this a multikernel kernel? "
                "mount -t multikernel none /sys/fs/multikernel, or give its path (--kernfs)"
            ) from error

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

    def grants_of(self, name: str) -> list[int]:
        """The applied transactions under `/instances/<name>` (grants, whoever made them)."""
        found = []
        for tx in sorted(self._transactions()):
            try:
                target = self.kernel.read(f"overlays/tx_{tx}/instance").decode().strip()
                status = self.kernel.read(f"overlays/tx_{tx}/status").decode().strip()
            except FileNotFoundError:
                continue  # rolled back meanwhile
            if target == f"/instances/{name}" and status == "applied":
                found.append(tx)
        return found

    def created(self, name: str) -> int | None:
        """The applied transaction whose `instance-create` made instance `name`, if any."""
        for tx in sorted(self._transactions()):
            try:
                if self.kernel.read(f"overlays/tx_{tx}/status").decode().strip() != "applied":
                    continue
                tree = dt.parse(self.kernel.read(f"overlays/tx_{tx}/dtbo"))
            except (FileNotFoundError, dt.DeviceTreeError):
                continue
            for fragment in tree.children:
                overlay = fragment.child("__overlay__")
                made = overlay.child("instance-create") if overlay is not None else None
                if made is not None and made.string("instance-name") == name:
                    return tx
        return None

    def instance_id(self, name: str) -> int | None:
        """The id the kernel gave instance `name` (None: it has no such instance)."""
        try:
            return int(self.kernel.read(f"instances/{name}/id").decode().strip())
        except (FileNotFoundError, ValueError):
            return None

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

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> int | None:
        """Bring instance `name` to `ready` (made by an instance-create if the kernel has no such
        instance: its transaction is answered) and, with `load`, to `loaded`; idempotent. An
        instance of that name under another id is not ours: `PlatformError`."""
        made = None
        status = self.status(name)
        if status == "absent":
            made = await self.create(name, instance_id, resources)
            status = "ready"
        elif (other := self.instance_id(name)) != instance_id:
            raise PlatformError(
                f"the kernel has an instance named {name!r} under id {other}, not {instance_id}: "
                f"not this host's (kerf delete {name}, or pick another name)"
            )
        elif status == "failed":
            raise PlatformError(
                f"the kernel says instance {name!r} failed: mkctl delete {name} removes it"
            )
        if made is not None and resources.devices:  # an instance-create names no devices
            try:
                await self.grant(name, resources, resources.devices)
            except PlatformError:
                await self.rollback(made)
                raise
        if load and status == "ready":
            await self.load(name, instance_id)
        return made

    async def load(self, name: str, instance_id: int) -> None:
        if self.image is None:
            raise PlatformError(f"cannot load a kernel into {name!r}: no kernel image given")
        flags = kexec_flags(instance_id, initramfs=self.image.initrd is not None)
        await self._kexec(f"cannot load a kernel into {name!r}", flags)

    async def unload(self, name: str, instance_id: int) -> None:
        await self._kexec(f"cannot unload {name!r}", kexec_flags(instance_id, unload=True))

    async def _kexec(self, what: str, flags: int) -> None:
        if self.image is None:
            raise PlatformError(f"{what}: no kernel image given")
        if not flags & KEXEC_FILE_UNLOAD:
            await anyio.to_thread.run_sync(self._check_signed, what)
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

    def _check_signed(self, what: str) -> None:
        """On a host that enforces kernel signatures (kerf's check, through the seam), refuse an
        image the kernel would refuse for want of one, before loading, saying what to do: a
        bzImage (its extracted vmlinux carries no signature) or an unsigned vmlinux."""
        assert self.image is not None
        if not self.kernel.signatures_enforced():
            return
        try:
            with open(self.image.kernel, "rb") as image:
                head = image.read(BZIMAGE_HEADER_SIZE)
                image.seek(-len(SIGNATURE_MARKER), os.SEEK_END)
                tail = image.read()
        except OSError as error:
            raise PlatformError(f"{what}: {self.image.kernel}: {error.strerror}") from error
        if is_bzimage(head):
            raise PlatformError(
                f"{what}: this host enforces kernel signatures and {self.image.kernel} is a "
                "bzImage, whose extracted vmlinux is unsigned: give a signed ELF vmlinux "
                "(kerf sign)"
            )
        if tail != SIGNATURE_MARKER:
            raise PlatformError(
                f"{what}: this host enforces kernel signatures and {self.image.kernel} is not "
                "signed: sign it (kerf sign)"
            )

    def reboot(self, what: str, cmd: int, instance_id: int) -> None:
        try:
            self.kernel.reboot(cmd, instance_id)
        except OSError as error:
            raise PlatformError(explain(what, error)) from error

    async def grant(
        self, name: str, resources: Resources, devices: frozenset[str] | None = None
    ) -> int | None:
        """Give instance `name` exactly `resources` (and `devices`, PCI addresses; None: those
        it has) in one transaction (cpu/memory/device add/remove); its id, or None if nothing
        changes. Refused or not as asked: undone, `PlatformError`."""
        cpus, regions = self.held(name)
        had = self.devices(name)
        devices = had if devices is None else devices
        memory = sum(size for _, size in regions)
        if (cpus, memory, had) == (resources.cpus, resources.memory, devices):
            return None
        add_base = None
        if resources.memory > memory:
            add_base = self.free_range(resources.memory - memory)
        try:
            overlay = dt.update_overlay(
                name, (cpus, memory), (resources.cpus, resources.memory),
                regions=regions, add_base=add_base, devices=(had, devices),
            )  # fmt: skip
        except Exception as error:  # kerf's ResourceError: memory leaves in whole regions
            raise PlatformError(f"cannot resize {name!r}: {error}") from error
        tx = await self.apply(f"cannot give {name!r} its new resources", overlay)
        got_cpus, got = self.held(name)
        got_devices = self.devices(name)
        if (got_cpus, sum(s for _, s in got), got_devices) != (
            resources.cpus, resources.memory, devices,
        ):  # fmt: skip
            await self.rollback(tx)
            raise PlatformError(
                f"the kernel applied transaction {tx} for {name!r} but it holds CPUs "
                f"{sorted(got_cpus)} and devices {sorted(got_devices)}, not "
                f"{sorted(resources.cpus)} and {sorted(devices)}: rolled back"
            )
        return tx

    def devices(self, name: str) -> frozenset[str]:
        """The PCI addresses of the devices the kernel says instance `name` has."""
        try:
            tree = dt.parse(self.kernel.read(f"instances/{name}/device_tree"))
        except FileNotFoundError as error:
            raise PlatformError(explain(f"no instance {name!r} in the kernel", error)) from error
        resources = tree.child("resources") or dt.Node("resources")
        return frozenset(resources.strings("devices"))

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


class MultikernelHostSide:
    """The host's end of the resource actor's grants on a multikernel kernel (`_enforce`'s
    `HostSide`): a running instance's CPUs and memory change by an overlay. An instance the
    kernel does not have yet gets its grant when it is created (at its next launch)."""

    def __init__(self, steps: KernelSteps) -> None:
        self.steps = steps

    async def apply(
        self,
        instance: str,
        cpus: frozenset[int],
        memory: int | None,
        *,
        running: bool = False,
        devices: frozenset[str] | None = None,
    ) -> None:
        if self.steps.status(instance) == "absent":
            if running:
                raise HostSideError(
                    f"{instance!r} runs, but the multikernel kernel has no instance of that "
                    "name: is the resource actor looking at this host's kernel?"
                )
            return
        held_cpus, regions = self.steps.held(instance)
        size = memory if memory is not None else sum(s for _, s in regions)
        try:
            await self.steps.grant(instance, Resources(cpus or held_cpus, size), devices)
        except PlatformError as error:
            raise HostSideError(str(error)) from error
