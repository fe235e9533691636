"""Instance images: a directory or a tar archive with a ``manifest.toml``, signed like a module.

The **signed payload** of an archive image (``.tar``, ``.tar.gz``) is the archive file's bytes,
and its signature is appended to the file itself, as ``sign-file`` signs a ``.ko``. A directory
image is signed through its packed form: ``pack(directory)`` is a deterministic tar (sorted
paths, zeroed owners and times, normalised modes), and the signature that would be appended to
it is kept in the directory as ``.signature``, so ``pack(d) + d/.signature`` is exactly a signed
archive of ``d``. Loading verifies first, then reads the manifest and unpacks from the very bytes
that were verified, refusing anything that could land outside the destination. What the
manifest may say, and how it is validated, is ``_manifest``'s.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final, Literal

from multikernel.services._manifest import (
    MANIFEST_NAME,
    ImageError,
    ImageNotFoundError,
    Manifest,
    parse_manifest,
)
from multikernel.services._signature import SignerInfo, UnsignedImageError, is_signed, sign
from multikernel.services._signature import split as split_signature
from multikernel.services._signature import verify as verify_signature

SIGNATURE_NAME: Final = ".signature"
MAX_MEMBERS: Final = 100_000
MAX_TOTAL_SIZE: Final = 1 << 30  # bytes of file content an image may unpack to
MAX_MANIFEST_SIZE: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class VerifiedImage:
    """An image whose signature (if any) checked out and whose manifest is valid."""

    manifest: Manifest
    digest: str  # "sha256:<hex>" of the signed payload
    signer: SignerInfo | None  # None only for an unsigned image on a host that allows them
    source: Path


@dataclass(frozen=True, slots=True)
class LoadedImage(VerifiedImage):
    """A verified image unpacked into ``path``."""

    path: Path


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of an image being packed, named by its path inside the image.

    A file's bytes are ``data``, or are read from ``source`` when it is written; ``source`` (or
    the name) is also what an error names. A symlink's ``target`` must stay inside the image.
    """

    name: str
    kind: Literal["dir", "file", "symlink"]
    source: Path | None = None
    data: bytes | None = None
    executable: bool = False
    target: str = ""


def pack(directory: str | os.PathLike[str]) -> bytes:
    """The deterministic tar of a directory image: the same tree always gives the same bytes.

    Paths are sorted, owners and times zeroed, modes normalised (0755 for directories and
    executables, 0644 otherwise); the top-level ``.signature`` is left out. Devices, fifos,
    sockets and symlinks that point outside the image are refused.
    """
    root = Path(directory)
    if not (root / MANIFEST_NAME).is_file():
        raise ImageError(f"{root}: no {MANIFEST_NAME} at the top; an image directory needs one")
    return pack_members(tree_members(root, "", skip_signature=True))


def tree_members(root: Path, prefix: str, *, skip_signature: bool = False) -> Iterator[Member]:
    """The members of a directory tree in ``pack``'s order, named ``prefix`` + their path."""
    for rel, path, st in _walk(root, prefix, skip_signature):
        yield path_member(rel, path, st)


def path_member(name: str, path: Path, st: os.stat_result) -> Member:
    """The member for one file, directory or symlink (as ``lstat`` gave ``st``) of a tree."""
    if stat.S_ISDIR(st.st_mode):
        return Member(name, "dir", path)
    if stat.S_ISREG(st.st_mode):
        return Member(name, "file", path, executable=bool(st.st_mode & 0o111))
    if stat.S_ISLNK(st.st_mode):
        return Member(name, "symlink", path, target=os.readlink(path))
    raise ImageError(f"{path}: images hold files, directories and symlinks only")


def pack_members(members: Iterable[Member]) -> bytes:
    """A deterministic tar of ``members``, in their order, within the image limits."""
    buffer = io.BytesIO()
    count = total = 0
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            where = member.source or member.name
            info = tarfile.TarInfo(member.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            count += 1
            if count > MAX_MEMBERS:
                raise ImageError(f"{where}: more than {MAX_MEMBERS} entries; too many for an image")
            if member.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif member.kind == "symlink":
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, member.target
                if _link_escapes(member.name, member.target):
                    raise ImageError(
                        f"{where}: symlink to {member.target!r} points outside the image"
                    )
                tar.addfile(info)
            else:
                info.mode = 0o755 if member.executable else 0o644
                with _content(member) as (size, stream):
                    total += size
                    if total > MAX_TOTAL_SIZE:
                        raise ImageError(
                            f"{where}: more than {MAX_TOTAL_SIZE} bytes of files; too large "
                            "for an image"
                        )
                    info.size = size
                    tar.addfile(info, stream)
    return buffer.getvalue()


@contextmanager
def _content(member: Member) -> Iterator[tuple[int, BinaryIO]]:
    if member.data is not None:
        yield len(member.data), io.BytesIO(member.data)
        return
    assert member.source is not None
    with member.source.open("rb") as stream:
        yield os.fstat(stream.fileno()).st_size, stream


def sign_image(
    path: str | os.PathLike[str],
    key_pem: bytes,
    cert_pem: bytes,
    out: str | os.PathLike[str] | None = None,
    *,
    hash: str = "sha256",
) -> Path:
    """Sign an image and return the file written.

    An archive is signed in place, replacing any old signature, or written signed to ``out``. A
    directory gets its signature as ``.signature`` inside it, or ``out`` receives the signed
    packed archive. The image is validated (manifest, safe contents) before it is signed.
    """
    source = Path(path)
    if source.is_dir():
        payload = pack(source)
    else:
        blob = _read_file(source)
        payload = split_signature(blob)[0] if is_signed(blob) else blob
    _inspect(payload, source)
    signed = sign(payload, key_pem, cert_pem, hash=hash)
    if out is not None:
        target, content = Path(out), signed
    elif source.is_dir():
        target, content = source / SIGNATURE_NAME, signed[len(payload) :]
    else:
        target, content = source, signed
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    temporary.replace(target)
    return target


def verify_image(
    path: str | os.PathLike[str], *, trusted_certs: Iterable[bytes], allow_unsigned: bool = False
) -> VerifiedImage:
    """Verify an image's signature against the trusted certificates and validate its manifest.

    Unsigned images raise ``UnsignedImageError`` unless ``allow_unsigned``; a signature that is
    present must always verify (``BadSignatureError``, ``UntrustedSignerError`` otherwise).
    """
    source = Path(path)
    payload, signer = _verified_payload(source, trusted_certs, allow_unsigned)
    manifest, _ = _inspect(payload, source)
    return VerifiedImage(manifest, _digest(payload), signer, source)


def load_image(
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    trusted_certs: Iterable[bytes],
    allow_unsigned: bool = False,
) -> LoadedImage:
    """Verify an image as ``verify_image`` does, then unpack it into ``dest`` (new or empty)."""
    source, target = Path(path), Path(dest)
    payload, signer = _verified_payload(source, trusted_certs, allow_unsigned)
    manifest, tar = _inspect(payload, source)
    _unpack(tar, target, source)
    return LoadedImage(manifest, _digest(payload), signer, source, target)


def _verified_payload(
    source: Path, trusted_certs: Iterable[bytes], allow_unsigned: bool
) -> tuple[bytes, SignerInfo | None]:
    if source.is_dir():
        trailer = source / SIGNATURE_NAME
        blob = pack(source) + (trailer.read_bytes() if trailer.exists() else b"")
        claims_signature = trailer.exists()
    else:
        blob = _read_file(source)
        claims_signature = is_signed(blob)
    if claims_signature:
        signer = verify_signature(blob, trusted_certs)
        return split_signature(blob)[0], signer
    if not allow_unsigned:
        raise UnsignedImageError(
            f"{source}: the image is not signed; sign it with `mkctl image sign`, or allow "
            "unsigned images in this host's configuration"
        )
    return blob, None


def _read_file(source: Path) -> bytes:
    try:
        return source.read_bytes()
    except OSError as exc:
        cls = ImageNotFoundError if isinstance(exc, FileNotFoundError) else ImageError
        raise cls(
            f"{source}: cannot read the image ({exc.strerror}); pass a directory "
            "or a .tar/.tar.gz file"
        ) from None


def _digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _walk(
    root: Path, prefix: str, skip_signature: bool = False
) -> Iterator[tuple[str, Path, os.stat_result]]:
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if skip_signature and entry.name == SIGNATURE_NAME:
            continue
        rel, st = prefix + entry.name, entry.stat(follow_symlinks=False)
        yield rel, Path(entry.path), st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(Path(entry.path), rel + "/")


def _link_escapes(name: str, target: str) -> bool:
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return posixpath.isabs(target) or resolved == ".." or resolved.startswith("../")


def _inspect(payload: bytes, source: Path) -> tuple[Manifest, _Archive]:
    """Open the payload as a tar, check every member is safe, and parse the manifest."""
    tar = _Archive(payload, source)
    manifest = tar.members.get(MANIFEST_NAME)
    if manifest is None or not manifest.isreg():
        raise ImageError(f"{source}: no {MANIFEST_NAME} at the top of the image")
    if manifest.size > MAX_MANIFEST_SIZE:
        raise ImageError(f"{source}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_SIZE} bytes")
    try:
        text = tar.read(manifest).decode()
    except UnicodeDecodeError:
        raise ImageError(f"{source}: {MANIFEST_NAME} is not UTF-8 text") from None
    return parse_manifest(text), tar


class _Archive:
    """A tar read from memory whose members were all checked: names, types, links and sizes."""

    def __init__(self, payload: bytes, source: Path) -> None:
        self.source = source
        self.members: dict[str, tarfile.TarInfo] = {}
        if payload[:2] == b"\x1f\x8b":
            payload = _gunzip(payload, self)
        try:
            self._tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:")  # noqa: SIM115 - held for reads; wraps memory only
            total = 0
            for member in self._tar:
                name = self._check(member)
                total += member.size
                if len(self.members) >= MAX_MEMBERS or total > MAX_TOTAL_SIZE:
                    raise self.error(f"more than {MAX_MEMBERS} entries or {MAX_TOTAL_SIZE} bytes")
                self.members[name] = member
        except (tarfile.TarError, OSError) as exc:
            raise self.error(f"not a readable tar or tar.gz archive ({exc})") from None

    def _check(self, member: tarfile.TarInfo) -> str:
        path = PurePosixPath(member.name)
        name = str(path)
        if path.is_absolute() or ".." in path.parts or name in ("", "."):
            raise self.error(f"{member.name!r} is absolute or climbs out with '..'")
        if name in self.members:
            raise self.error(f"{name!r} appears twice")
        if member.issym() and _link_escapes(name, member.linkname):
            raise self.error(f"symlink {name!r} to {member.linkname!r} points outside the image")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise self.error(f"{name!r} is a hard link, device or fifo; images cannot hold those")
        return name

    def read(self, member: tarfile.TarInfo) -> bytes:
        stream = self._tar.extractfile(member)
        assert stream is not None
        return stream.read()

    def error(self, what: str) -> ImageError:
        return ImageError(f"{self.source}: unsafe or broken image: {what}")


def _unpack(tar: _Archive, dest: Path, source: Path) -> None:
    """Unpack into ``dest`` (new or empty); on any failure leave it as it was found."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ImageError(f"{dest}: unpack into a new or empty directory")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _extract(tar, dest)
    except BaseException as exc:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in dest.iterdir():
                _remove(child)
        if isinstance(exc, OSError | tarfile.TarError):
            raise ImageError(f"{source}: cannot unpack into {dest}: {exc}") from None
        raise


def _extract(tar: _Archive, dest: Path) -> None:
    """Directories, then files in archive order, then symlinks, each checked to stay inside."""
    root = os.path.realpath(dest)
    for name, member in sorted(tar.members.items(), key=lambda i: (not i[1].isdir(), i[1].issym())):
        target = dest / name
        if not _inside(root, target.parent):
            raise tar.error(f"{name!r} would be written through a symlink out of the image")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if member.isdir():
            target.mkdir(mode=0o755, exist_ok=True)
        elif member.issym():
            if not _inside(root, target.parent / member.linkname):
                raise tar.error(f"symlink {name!r} resolves outside the image")
            target.symlink_to(member.linkname)
        else:
            mode = 0o755 if member.mode & 0o111 else 0o644
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(target, flags, mode), "wb") as out:
                out.write(tar.read(member))


def _inside(root: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _gunzip(payload: bytes, archive: _Archive) -> bytes:
    limit = MAX_TOTAL_SIZE + MAX_MEMBERS * 2048  # contents plus tar headers
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(payload, limit)
    except zlib.error as exc:
        raise archive.error(f"not a readable gzip stream ({exc})") from None
    if inflater.unconsumed_tail:
        raise archive.error(f"it inflates to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise archive.error("the gzip stream is truncated or has trailing data")
    return data


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
