"""Regions: shared-memory areas that rings live in.

A region is any mmap-able file: an anonymous memfd (the default: it has no name, so nothing can
be left behind), a file in /dev/shm (when a peer must find it by path), or any other file a peer
can map, such as a DAX-backed file or a PCI BAR exposed by a device. The process that creates a
named region owns it and unlinks it; every other process only attaches.

Orphans: a named region is called ``multikernel-<pid>-<token>`` after the process that created it.
If that process was SIGKILLed before it could unlink, `find_orphans` lists the files whose creator
is gone and `remove_orphans` deletes them (``python -m multikernel.shm orphans --remove``).
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Self

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "multikernel-"

Backing = Literal["memfd", "shm"]


class Region:
    """A shared mapping of a file, with the fd kept open so it can be handed to peers."""

    __slots__ = ("_closed", "_fd", "_mmap", "_owner", "path", "size")

    def __init__(self, fd: int, size: int, *, path: Path | None = None, owner: bool = False):
        if size <= 0:
            raise ValueError(f"a region needs a positive size, got {size}")
        self._fd = fd
        self.size = size
        self.path = path
        self._owner = owner
        self._closed = False
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, size: int, *, backing: Backing = "memfd") -> Self:
        """Create a zero-filled region of `size` bytes; a named one is owned (unlinked) by us."""
        if backing == "memfd":
            fd = os.memfd_create("multikernel", os.MFD_CLOEXEC)
            path = None
        elif backing == "shm":
            path = SHM_DIR / f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            raise ValueError(f"unknown region backing {backing!r}; use 'memfd' or 'shm'")
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, path=path, owner=path is not None)
        except BaseException:
            os.close(fd)
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    @classmethod
    def from_fd(cls, fd: int, size: int | None = None) -> Self:
        """Attach to a region whose fd a peer handed us; the region takes ownership of `fd`."""
        try:
            if size is None:
                size = os.fstat(fd).st_size
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None) -> Self:
        """Attach to an existing mmap-able file (a /dev/shm file, a DAX file, a PCI BAR...)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        region = cls.from_fd(fd, size)
        region.path = Path(path)
        return region

    @property
    def fd(self) -> int:
        if self._closed:
            raise ValueError("region is closed")
        return self._fd

    @property
    def mmap(self) -> mmap.mmap:
        if self._closed:
            raise ValueError("region is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._closed

    def unlink(self) -> None:
        """Remove the region's name (owner only); mappings and fds stay valid."""
        if self._owner and self.path is not None:
            self.path.unlink(missing_ok=True)
            self._owner = False

    def close(self) -> None:
        """Unmap and close; the owner of a named region also unlinks it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.unlink()
            self._mmap.close()
        finally:
            os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memfd"
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<Region {where} {self.size} bytes {state}>"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_orphans(directory: Path = SHM_DIR) -> Iterator[Path]:
    """Named regions whose creating process no longer exists."""
    for entry in directory.glob(f"{NAME_PREFIX}*"):
        pid_text = entry.name[len(NAME_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            yield entry


def remove_orphans(directory: Path = SHM_DIR) -> list[Path]:
    """Delete every orphaned named region; returns what was removed."""
    removed = []
    for path in find_orphans(directory):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
