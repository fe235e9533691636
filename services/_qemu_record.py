"""What a restarted host knows of a guest it launched: QEMU's pid, its start time, its directory.

A guest is not adopted by a restarted host (its agent's session was served by the old host's
hub, and cannot be served again yet: docs/platform.md, "qemu"), so the record is only what ending
it takes: QEMU's pid and start time (a recycled pid is never killed: the pidfd is opened, then the
start time checked), and the instance's directory, removed. A record reads
`qemu {"unit": ..., "pid": ..., "start": ..., "workdir": ...}`; `Platforms` routes it here by
its first word.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Final

import anyio
import msgspec

from multikernel.services._local_adopt import start_time

PREFIX: Final = "qemu "


class QemuRecord(msgspec.Struct, frozen=True):
    unit: str
    pid: int
    start: int
    workdir: str


class QemuRecords:
    """Makes and reclaims guests' launch records."""

    def record(self, unit: str, pid: int, workdir: Path) -> str:
        found = QemuRecord(unit, pid, start_time(pid) or 0, str(workdir))
        return PREFIX + msgspec.json.encode(found).decode()

    async def reclaim(self, record: str) -> None:
        """SIGKILL the recorded QEMU if it still runs (the same process), wait for it to go,
        and remove the guest's directory."""
        try:
            found = msgspec.json.decode(record.removeprefix(PREFIX), type=QemuRecord)
        except msgspec.DecodeError:
            return  # not ours to read: nothing to end
        fd = _open_if_same(found.pid, found.start)
        if fd is not None:
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                with anyio.fail_after(10):
                    await anyio.wait_readable(fd)  # a pidfd turns readable when it exits
            finally:
                os.close(fd)
        workdir = Path(found.workdir)
        if workdir.name.startswith("mk-qemu-"):  # never a directory the record did not make
            shutil.rmtree(workdir, ignore_errors=True)


def _open_if_same(pid: int, started: int) -> int | None:
    if not pid or not started:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if start_time(pid) != started:
        os.close(fd)
        return None
    return fd
