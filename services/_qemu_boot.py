"""The boot block: what a `qemu` guest's init is told, and what it answers, in its ivshmem memory.

A real multikernel instance finds its IPI buffers and its parameters in the device tree it boots
with; a guest finds them in the ivshmem device's memory, which the host fills before QEMU starts.
The session channel is at offset 0 (`shm`'s layout); the boot block is the last `BOOT_SIZE`
bytes:

| offset | size | what |
|---|---|---|
| 0 | 8 | magic `MKBOOT\\0\\0`, written last by the host |
| 8 | 8 | length of the JSON document at 64 |
| 16 | 8 | the agent's exit: `1 << 32 | (status & 0xffffffff)` once it ended, 0 before (guest) |
| 64 | length | JSON: `{"argv": [...], "env": {...}, "hostname": "...", "doorbell": bool}` (host) |

The kernel command line would hold the agent's command line but not its environment (2 KiB on
x86, and the workload's JSON goes in it), hence a block of its own. The guest may write anything
here, as it may anywhere in its memory: the host reads only the exit word, and takes a value
without the flag, or out of range, as "no exit status" (`read_status` gives None). Standard
library only: the guest's init imports it before anything else.
"""

from __future__ import annotations

import json
from typing import Any, Final

BOOT_SIZE: Final = 64 << 10
BOOT_MAGIC: Final = int.from_bytes(b"MKBOOT\x00\x00", "little")
_LENGTH: Final = 8
_STATUS: Final = 16
_DOCUMENT: Final = 64
_EXITED: Final = 1 << 32


def boot_offset(size: int) -> int:
    """Where the boot block starts in shared memory of `size` bytes."""
    return size - BOOT_SIZE


def write_boot(
    memory: memoryview,
    argv: list[str],
    env: dict[str, str],
    hostname: str,
    *,
    doorbell: bool = False,
) -> None:
    """Fill the boot block at the end of `memory` (the host, before the guest starts);
    `doorbell`: the guest rings the host through its doorbell register (interrupt mode)."""
    document = json.dumps(
        {"argv": argv, "env": env, "hostname": hostname, "doorbell": doorbell}
    ).encode()
    if len(document) > BOOT_SIZE - _DOCUMENT:
        raise ValueError(
            f"the guest's command line and environment take {len(document)} bytes, more than "
            f"its boot block holds ({BOOT_SIZE - _DOCUMENT}): pass less in the environment"
        )
    with memory[boot_offset(len(memory)) :] as block, block.cast("Q") as words:
        words[0] = words[_STATUS // 8] = 0
        block[_DOCUMENT : _DOCUMENT + len(document)] = document
        words[_LENGTH // 8] = len(document)
        words[0] = BOOT_MAGIC  # last: the guest reads nothing before it


def read_boot(memory: memoryview) -> dict[str, Any]:
    """The boot block's document (the guest's init); ValueError if the host wrote none."""
    with memory[boot_offset(len(memory)) :] as block:
        with block.cast("Q") as words:
            magic, length = words[0], words[_LENGTH // 8]
        if magic != BOOT_MAGIC or not 0 < length <= BOOT_SIZE - _DOCUMENT:
            raise ValueError("the host wrote no boot block in the ivshmem memory")
        document: dict[str, Any] = json.loads(bytes(block[_DOCUMENT : _DOCUMENT + length]))
    return document


def write_status(memory: memoryview, status: int) -> None:
    """Record the agent's exit status (the guest's init, before it powers off)."""
    with memory[boot_offset(len(memory)) :] as block, block.cast("Q") as words:
        words[_STATUS // 8] = _EXITED | (status & 0xFFFFFFFF)


def read_status(memory: memoryview) -> int | None:
    """The agent's exit status as the guest recorded it; None if it recorded none (or garbage)."""
    with memory[boot_offset(len(memory)) :] as block, block.cast("Q") as words:
        word = words[_STATUS // 8]
    if word >> 32 != 1:
        return None
    status = word & 0xFFFFFFFF
    status = status - (1 << 32) if status >= 1 << 31 else status
    return status if -64 <= status <= 255 else None  # an exit code, or minus a signal number
