"""One QEMU guest: its command line, its process, its serial console.

`qemu_argv` turns a `VmConfig` into QEMU's command line: TCG (KVM here is nested and hangs
stock kernels), no default devices, the guest's serial console on QEMU's stdout, no reboot (a
guest that powers off or panics ends QEMU), and optionally an ivshmem device whose shared memory
and doorbells come from an ivshmem server's socket (`_ivshmem`).

`Vm` is the running process as an async context manager: `console_line` waits for a line the
guest's program printed (those start with `multikernel-guest: `), `wait` for QEMU's exit, `kill`
ends it; leaving the `async with` kills QEMU if it is still running and reaps it, so no test or
benchmark leaves a guest behind. Everything QEMU prints is kept (`console`) for the error
message of a guest that did not come up.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from multikernel.services._platform import LaunchError
from multikernel.services._qemu_image import GuestImage

QEMU: Final = "qemu-system-x86_64"
GUEST_PREFIX: Final = "multikernel-guest: "


@dataclass(frozen=True)
class VmConfig:
    """How to start a guest: its image, memory, CPUs, the `mk.*` kernel arguments, ivshmem."""

    image: GuestImage
    memory_mib: int = 512
    cpus: int = 1
    args: tuple[tuple[str, str], ...] = ()  # mk.<key>=<value> on the kernel command line
    ivshmem_socket: Path | None = None  # an ivshmem server's socket: adds ivshmem-doorbell
    vectors: int = 1
    console: Path | None = None  # the serial console to this file, not to QEMU's stdout

    def __post_init__(self) -> None:
        if self.memory_mib < 128:
            raise ValueError(f"a guest needs at least 128 MiB, not {self.memory_mib}")
        if self.cpus < 1:
            raise ValueError(f"a guest needs at least one CPU, not {self.cpus}")
        for key, value in self.args:
            if not (key.isidentifier() and value and " " not in value):
                raise ValueError(f"bad guest argument mk.{key}={value!r}")
        for path in (self.ivshmem_socket, self.console):
            if path is not None and "," in str(path):  # QEMU's option syntax
                raise ValueError(f"a path QEMU is given may not contain ',': {path}")


def qemu_argv(config: VmConfig, qemu: str = QEMU) -> list[str]:
    """QEMU's command line for `config`."""
    append = ["console=ttyS0", "rdinit=/init", "quiet", "panic=-1"]
    append += [f"mk.{key}={value}" for key, value in config.args]
    argv = [
        qemu, "-accel", "tcg", "-m", str(config.memory_mib), "-smp", str(config.cpus),
        "-display", "none", "-nodefaults", "-no-reboot",
        "-serial", "stdio" if config.console is None else f"file:{config.console}",
        "-kernel", str(config.image.kernel), "-initrd", str(config.image.initramfs),
        "-append", " ".join(append),
    ]  # fmt: skip
    if config.ivshmem_socket is not None:
        argv += [
            "-chardev", f"socket,path={config.ivshmem_socket},id=ivsh",
            "-device", f"ivshmem-doorbell,chardev=ivsh,vectors={config.vectors}",
        ]  # fmt: skip
    return argv


class Vm:
    """A running QEMU guest (see the module docstring); made by `Vm.start`."""

    def __init__(self, process: anyio.abc.Process, config: VmConfig) -> None:
        self.process = process
        self.config = config
        self.console: deque[str] = deque(maxlen=200)  # the last lines QEMU printed
        self._stdout = (
            BufferedByteReceiveStream(process.stdout) if process.stdout is not None else None
        )

    @classmethod
    async def start(cls, config: VmConfig, output: int | None = None) -> Self:
        """Start QEMU for `config`; `LaunchError` if QEMU is not installed.

        QEMU's own output (and the console, unless `config.console`) is read through
        `console_line`, or goes to the file descriptor `output`.
        """
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise LaunchError(
                f"{QEMU} is not installed; apt-get install -y --no-install-recommends "
                "qemu-system-x86"
            )
        process = await anyio.open_process(
            qemu_argv(config, qemu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if output is None else output,
            stderr=subprocess.STDOUT,
        )
        return cls(process, config)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _line(self) -> str:
        if self._stdout is None:
            raise RuntimeError("QEMU's output goes to a file; there is no console to read")
        raw = await self._stdout.receive_until(b"\n", 1 << 16)
        line = raw.decode(errors="replace").rstrip("\r")
        self.console.append(line)
        return line

    async def console_line(self, starts: str = "") -> str:
        """The next line the guest's program prints whose text (after the prefix) starts with
        `starts`; `LaunchError` with QEMU's last output if QEMU ends first."""
        try:
            while True:
                line = await self._line()
                if line.startswith(GUEST_PREFIX + starts):
                    return line[len(GUEST_PREFIX) :]
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise LaunchError(
                "QEMU ended before the guest said "
                f"{GUEST_PREFIX + starts!r}; its last output:\n" + "\n".join(self.console)
            ) from None

    async def drain(self) -> None:
        """Read QEMU's output to its end (keeping the last lines), so QEMU never blocks on it."""
        with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
            while self._stdout is not None:
                await self._line()

    async def wait(self) -> int:
        """QEMU's exit status (0 when the guest powered off)."""
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        self.kill()
        with anyio.CancelScope(shield=True):
            await self.process.wait()
            await self.process.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
