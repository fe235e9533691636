"""Regions: shared-memory areas that rings live in.

A region is any mmap-able file: an anonymous memfd (the default: it has no name, so nothing can
be left behind), a file in /dev/shm (when a peer must find it by path), or any other file a peer
can map, such as a DAX-backed file or a PCI BAR exposed by a device. The process that creates a
named region owns it and unlinks it; every other process only attaches.

Orphans: a named region is called ``multikernel-<pid>-<token>`` after the process that created it,
or ``multikernel-<tag>-<pid>-<token>`` when ``$MULTIKERNEL_SHM_TAG`` is set, so that a test run, a
demo or a host looks at and removes only its own files (`name_prefix`). If the creator was
SIGKILLed before it could unlink, `find_orphans` lists the files whose creator is gone and
`remove_orphans` deletes them (``python -m multikernel.shm orphans --remove [--tag TAG]``).

Who can hurt us through a region: whoever can change its size. Touching a page past the end of a
file kills the process with SIGBUS, so a peer that could `ftruncate` a region we map could kill
us at will. A memfd we create is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) once sized,
and `from_fd`, the way in for an fd a peer handed us, maps only a memfd sealed like that: its
size can never change again, for anyone. A file in /dev/shm cannot be sealed: `open` maps files
by path only for peers we trust, and refuses a file other users could write.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Self

from multikernel.shm._errors import UnsafeHandleError

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "multikernel-"
#: The environment variable whose value tags every named region a process (tree) creates.
ENV_TAG = "MULTIKERNEL_SHM_TAG"
# A letter first, no '-': one tag's prefix never matches another tag's names, nor untagged ones.
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,31}")


def name_prefix(tag: str | None = None) -> str:
    """How the names of named regions created under `tag` (default: $MULTIKERNEL_SHM_TAG) start."""
    if tag is None:
        tag = os.environ.get(ENV_TAG, "")
    if not tag:
        return NAME_PREFIX
    if not _TAG.fullmatch(tag):
        raise ValueError(
            f"bad shared-memory tag {tag!r} (${ENV_TAG}): use a letter, then up to 31 letters, "
            "digits, '_' or '.'"
        )
    return f"{NAME_PREFIX}{tag}-"


Backing = Literal["memfd", "shm"]

#: The seals that fix a memfd's size for good: no shrinking, no growing, no more seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_F_SEAL_FUTURE_WRITE = 0x10  # Linux 5.1; Python's fcntl module does not name it
_WRITE_SEALS = fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE
_SEAL_NAMES = {
    fcntl.F_SEAL_SHRINK: "F_SEAL_SHRINK",
    fcntl.F_SEAL_GROW: "F_SEAL_GROW",
    fcntl.F_SEAL_SEAL: "F_SEAL_SEAL",
}


def check_sealed(fd: int) -> int:
    """The size of the region behind `fd` if a peer holding it cannot resize it; else refuse.

    Raises `UnsafeHandleError` for anything but a read-write memfd sealed with `SEALS` and not
    sealed against writing. The seals, once `F_SEAL_SEAL` is among them, never change again,
    so what is checked here stays true while we map it.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise UnsafeHandleError(
            f"the region fd {fd} is not a memfd ({exc.strerror}): a peer could resize it under "
            "us; channel regions come from Region.create() (a sealed memfd)"
        ) from None
    if missing := SEALS & ~seals:
        names = " | ".join(name for bit, name in _SEAL_NAMES.items() if missing & bit)
        raise UnsafeHandleError(
            f"the region fd {fd} lacks {names} (seals {seals:#x}): a peer holding it could "
            "truncate it and kill this process with SIGBUS; channel regions come from "
            "Region.create() (a sealed memfd)"
        )
    if seals & _WRITE_SEALS:
        raise UnsafeHandleError(f"the region fd {fd} is sealed against writing (seals {seals:#x})")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise UnsafeHandleError(f"the region fd {fd} is not open for reading and writing")
    size = os.fstat(fd).st_size
    if size <= 0:
        raise UnsafeHandleError(f"the region fd {fd} is empty")
    return size


def _check_file(fd: int, path: str | os.PathLike[str], size: int | None) -> int:
    """The size to map of a file opened by path; refuse one that others could truncate."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a device (a DAX device, a PCI BAR): its size is fixed
        return st.st_size if size is None else size
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        raise UnsafeHandleError(
            f"{path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):#o}) could be "
            "truncated by other users, which would kill this process with SIGBUS; make it "
            "ours and writable by us only, or share a sealed memfd instead"
        )
    return _within(size, st.st_size, str(path))


def _within(size: int | None, actual: int, what: str) -> int:
    """`size` (default: all of it) if it ends within the file: a page past its end is SIGBUS."""
    if size is None:
        return actual
    if size > actual:
        raise UnsafeHandleError(f"asked to map {size} bytes of {what}, which has {actual}")
    return size


class Region:
    """A shared mapping of a file, with the fd kept open so it can be handed to peers.

    The constructor maps what it is given; a region fd that comes from a peer goes through
    `from_fd`, which checks it first.
    """

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
        """Create a zero-filled region of `size` bytes; a named one is owned (unlinked) by us.

        A memfd is sealed once sized, so it is safe to hand to any peer. A named region cannot
        be sealed: share it only with peers you trust (see the module docstring).
        """
        if backing == "memfd":
            fd = os.memfd_create("multikernel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            path = None
        elif backing == "shm":
            path = SHM_DIR / f"{name_prefix()}{os.getpid()}-{secrets.token_hex(6)}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            raise ValueError(f"unknown region backing {backing!r}; use 'memfd' or 'shm'")
        try:
            os.ftruncate(fd, size)
            if path is None:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, size, path=path, owner=path is not None)
        except BaseException:
            os.close(fd)
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    @classmethod
    def from_fd(cls, fd: int, size: int | None = None) -> Self:
        """Attach to a region whose fd a peer handed us; the region takes ownership of `fd`.

        Only a memfd sealed against resizing is mapped (`check_sealed`); anything else raises
        `UnsafeHandleError`, with `fd` closed. `size` defaults to the whole region.
        """
        try:
            actual = check_sealed(fd)
            return cls(fd, _within(size, actual, "the region"))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None) -> Self:
        """Attach to an existing mmap-able file (a /dev/shm file, a DAX file, a PCI BAR...).

        For peers we trust: a file cannot be sealed, and whoever can write it can truncate it
        and kill us with SIGBUS. A regular file that users other than us and root could write is
        refused (`UnsafeHandleError`), and so is a `size` past its end.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            region = cls(fd, _check_file(fd, path, size))
        except BaseException:
            os.close(fd)
            raise
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


def find_orphans(directory: Path = SHM_DIR, *, prefix: str = NAME_PREFIX) -> Iterator[Path]:
    """Named regions (whose names start with `prefix`) whose creating process no longer exists.

    Pass `name_prefix(tag)` to look only at one tag's regions.
    """
    for entry in directory.glob(f"{prefix}*"):
        parts = entry.name[len(NAME_PREFIX) :].rsplit("-", 2)  # [tag,] pid, token
        pid_text = parts[-2] if len(parts) >= 2 else ""
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            yield entry


def remove_orphans(directory: Path = SHM_DIR, *, prefix: str = NAME_PREFIX) -> list[Path]:
    """Delete every orphaned named region whose name starts with `prefix`; returns them."""
    removed = []
    for path in find_orphans(directory, prefix=prefix):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
