"""A doorbell that is a device register: a store to a mapped register rings the peer.

A guest under QEMU rings its host through its ivshmem device: a 32-bit store of `(peer << 16) |
vector` to the doorbell register (BAR 0, offset 12) makes QEMU write the host's eventfd for that
vector. Nothing here is an fd the ring core can write, so a channel whose writer rings this way
calls `ring()` after each send that finds the reader asleep (`RingWriter.ring_after_publish`).
The register file is a PCI resource in sysfs (`/sys/bus/pci/devices/<dev>/resource0`): it can be
mapped, not read or written with read(2)/write(2).
"""

from __future__ import annotations

import os
from typing import Self

from multikernel.shm._region import Region


class RegisterDoorbell:
    """`ring()` stores `value` (32 bits) at `offset` of the mapped register file `path`."""

    def __init__(self, path: str | os.PathLike[str], offset: int, value: int) -> None:
        if offset < 0 or offset % 4:
            raise ValueError(f"a 32-bit register sits at a multiple of 4, not {offset}")
        if not 0 <= value < 1 << 32:
            raise ValueError(f"a 32-bit register holds 0 to 2**32-1, not {value}")
        self._region = Region.open(path, offset + 4)
        self._view = memoryview(self._region.mmap)
        self._word = self._view[offset : offset + 4].cast("I")
        self.value = value
        self.rings = 0

    @classmethod
    def parse(cls, spec: str) -> Self:
        """`PATH@OFFSET=VALUE` (what $MULTIKERNEL_BUS_DOORBELL says), e.g.
        `/sys/bus/pci/devices/0000:00:02.0/resource0@12=0`."""
        path, _, rest = spec.rpartition("@")
        offset, _, value = rest.partition("=")
        if not path or not offset.isdigit() or not value.isdigit():
            raise ValueError(f"a register doorbell is PATH@OFFSET=VALUE, not {spec!r}")
        return cls(path, int(offset), int(value))

    def ring(self) -> None:
        self._word[0] = self.value  # one aligned 4-byte store: what the device traps
        self.rings += 1

    def close(self) -> None:
        if not self._region.closed:
            self._word.release()
            self._view.release()
            self._region.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
