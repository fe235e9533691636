"""The one seam between the multikernel platform and the multikernel kernel.

Everything the platform asks of the kernel goes through a `MultikernelKernel`: files of the
multikernel file system (`mount -t multikernel none /sys/fs/multikernel`: the global
`device_tree`, `instances/<name>/{id,status,device_tree}`, `overlays/new` and `overlays/tx_<N>/`),
`/proc/iomem`, and two system calls:

- `kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags)` (x86_64: 320) with
  `KEXEC_MULTIKERNEL | ((id << 5) & 0xFFE0)`, plus `KEXEC_FILE_UNLOAD` to unload;
- `reboot(0xfee1dead, 672274793, cmd, &(int){id})` with `cmd` MULTIKERNEL (boot), _HALT or
  _HALT_FORCE.

`SysfsKernel` is the real one (the files under `/sys/fs/multikernel`, the calls through kerf's
own wrappers of libc's `syscall`); `multikernel.services.testing.FakeMultikernel` a fake that
acts like the kernel (docs/platform.md, "multikernel"). The platform is the same code on both.
Errors stay `OSError`s with the kernel's errno here; the platform turns them into its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Protocol

#: Where the kernel's file system is mounted.
KERNFS_ROOT: Final = Path("/sys/fs/multikernel")

KEXEC_FILE_UNLOAD: Final = 0x1
KEXEC_FILE_NO_INITRAMFS: Final = 0x4
KEXEC_MULTIKERNEL: Final = 0x10
KEXEC_MK_ID_SHIFT: Final = 5
KEXEC_MK_ID_MASK: Final = 0xFFE0
#: The highest instance id kerf hands out (1-511; id 0 is the host kernel); the flags' field
#: itself is 11 bits wide.
MAX_INSTANCE_ID: Final = 511

REBOOT_MAGIC1: Final = 0xFEE1DEAD
REBOOT_MAGIC2: Final = 672274793  # 0x28121969
REBOOT_CMD_BOOT: Final = 0x4D4B4C49  # LINUX_REBOOT_CMD_MULTIKERNEL
REBOOT_CMD_HALT: Final = 0x4D4B4C48  # LINUX_REBOOT_CMD_MULTIKERNEL_HALT
REBOOT_CMD_HALT_FORCE: Final = 0x4D4B4C46  # LINUX_REBOOT_CMD_MULTIKERNEL_HALT_FORCE


def kexec_flags(instance_id: int, *, unload: bool = False, initramfs: bool = True) -> int:
    """The `kexec_file_load` flags that load (or unload) instance `instance_id`'s kernel."""
    if not 1 <= instance_id <= MAX_INSTANCE_ID:
        raise ValueError(f"instance ids are 1 to {MAX_INSTANCE_ID}, not {instance_id}")
    flags = KEXEC_MULTIKERNEL | ((instance_id << KEXEC_MK_ID_SHIFT) & KEXEC_MK_ID_MASK)
    if unload:
        flags |= KEXEC_FILE_UNLOAD
    if not initramfs:
        flags |= KEXEC_FILE_NO_INITRAMFS
    return flags


class MultikernelKernel(Protocol):
    """What the multikernel platform asks of the kernel (see the module docstring).

    Paths are relative to the multikernel file system's root (`overlays/new`). Every call may
    raise `OSError` with the kernel's errno; none blocks for long.
    """

    #: Where kerf's lock is: overlay writers (kerf, us) take it so transaction ids are theirs.
    lock_path: Path

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, data: bytes) -> None:
        """One write(2) of `data` (the kernel takes a DTBO whole, or not at all)."""
        ...

    def listdir(self, path: str) -> list[str]: ...

    def mkdir(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def iomem(self) -> str:
        """`/proc/iomem`: where the instances' memory is reserved."""
        ...

    def kexec_file_load(
        self, kernel_fd: int, initrd_fd: int, cmdline: bytes, flags: int
    ) -> None: ...

    def reboot(self, cmd: int, instance_id: int) -> None: ...

    def signatures_enforced(self) -> bool:
        """Whether `kexec_file_load` refuses kernels without a signature this kernel trusts
        (lockdown `integrity`/`confidentiality`, or CONFIG_KEXEC_SIG_FORCE)."""
        ...


class SysfsKernel:
    """The real kernel: its file system under `root`; its system calls are kerf's own wrappers
    (`kerf.load.main.kexec_file_load`, `kerf.start.main.boot_multikernel`,
    `kerf.kill.main.halt_multikernel`: ctypes `syscall` with the architecture's numbers)."""

    def __init__(self, root: Path = KERNFS_ROOT, *, lock_path: Path | None = None) -> None:
        self.root = root
        run = Path("/var/run")
        default = (run if os.access(run, os.W_OK) else Path("/tmp")) / "kerf.lock"
        self.lock_path = lock_path if lock_path is not None else default

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def write(self, path: str, data: bytes) -> None:
        fd = os.open(self.root / path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self.root / path)

    def mkdir(self, path: str) -> None:
        os.mkdir(self.root / path)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.root / path)

    def iomem(self) -> str:
        return Path("/proc/iomem").read_text()

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: bytes, flags: int) -> None:
        from kerf.load.main import kexec_file_load  # ~0.1 s of imports: only where it runs

        kexec_file_load(kernel_fd, initrd_fd, cmdline.decode(), flags)

    def signatures_enforced(self) -> bool:
        from kerf.signature import kexec_signatures_enforced  # kerf's own check

        return bool(kexec_signatures_enforced())

    def reboot(self, cmd: int, instance_id: int) -> None:
        from kerf.kill.main import halt_multikernel
        from kerf.start.main import boot_multikernel

        if cmd == REBOOT_CMD_BOOT:
            boot_multikernel(instance_id)
        elif cmd in (REBOOT_CMD_HALT, REBOOT_CMD_HALT_FORCE):
            halt_multikernel(instance_id, force=cmd == REBOOT_CMD_HALT_FORCE)
        else:
            raise ValueError(f"not a multikernel reboot command: {cmd:#x}")
