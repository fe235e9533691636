"""Images from Nix: a store path and its closure, packed as an image under ``nix/store/``.

``pack_nix`` takes a store path (``/nix/store/<hash>-<name>``, or a ``result`` link to one), or a
derivation it realises first with ``nix-store --realise``, and computes its closure with
``nix-store --query --requisites``, or reads it from a file (closureInfo's ``store-paths``, one
path a line) when Nix is not on this machine. Each store path of the closure lands in the image
at ``nix/store/<hash>-<name>``, so a link into another store path of the closure stays a link:
absolute links into the store are rewritten relative (an image may not hold a link out of
itself), and a link to anything outside the closure is refused, since it would dangle once
unpacked. The manifest is made here (name and version from the store path's name, as Nix's
``parseDrvName`` splits it; the entry from ``bin/<name>``, or the caller's), and the tar is
``_image.pack_members``': deterministic, so the same closure always packs to the same bytes.

Programs that Nix built for the store find their interpreter and libraries at absolute
``/nix/store`` paths; they run in an instance whose host has that closure in its own store, or
if the workload is a script. ``{image}`` in the entry is the unpacked image, as in any image.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Final

from multikernel.services._image import Member, pack_members, path_member, tree_members
from multikernel.services._manifest import MANIFEST_NAME, ImageError, Manifest, parse_manifest

#: Nix's base32 alphabet: digits and lower-case letters without e, o, u and t.
NIX_BASE32: Final = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_LENGTH: Final = 32
_NAME: Final = re.compile(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}")


class NixError(ImageError):
    """Nix could not give what an image from Nix needs (not installed, a build that failed)."""


class NixInputError(NixError):
    """What was asked is wrong: not a store path, a missing one, an entry out of the image."""


@dataclass(frozen=True, slots=True)
class StorePath:
    """``<store>/<hash>-<name>``: a path directly in the Nix store."""

    path: Path
    hash: str
    name: str  # "hello-2.12.1"

    @property
    def base(self) -> str:
        return self.path.name

    @property
    def in_image(self) -> str:
        return f"nix/store/{self.base}"


@dataclass(frozen=True, slots=True)
class NixImage:
    """An image packed from a store path: its tar, its manifest and what went into it."""

    payload: bytes
    manifest: Manifest
    root: StorePath
    closure: tuple[StorePath, ...]
    warnings: tuple[str, ...] = field(default=())


def store_dir() -> Path:
    """The Nix store: ``$NIX_STORE_DIR`` (as Nix reads it), else ``/nix/store``."""
    return Path(os.environ.get("NIX_STORE_DIR") or "/nix/store")


def parse_store_path(path: str | os.PathLike[str], store: Path | None = None) -> StorePath:
    """Check that ``path`` is ``<store>/<hash>-<name>``, with a hash as Nix writes one."""
    store = store or store_dir()
    given = Path(os.path.normpath(os.path.abspath(path)))
    if given.parent != store:
        raise NixInputError(
            f"{path}: not a Nix store path; it should be {store}/<hash>-<name> (a build's "
            "`result` link, or what `nix build --print-out-paths` printed)"
        )
    hash, dash, name = given.name.partition("-")
    if len(hash) != HASH_LENGTH:
        raise NixInputError(
            f"{path}: the hash {hash!r} has {len(hash)} characters; a Nix store hash has "
            f"{HASH_LENGTH}"
        )
    if bad := sorted(set(hash) - set(NIX_BASE32)):
        raise NixInputError(
            f"{path}: the hash {hash!r} has {''.join(bad)!r}, which are not in Nix's base32 "
            f"alphabet ({NIX_BASE32})"
        )
    if not dash or not _NAME.fullmatch(name):
        raise NixInputError(
            f"{path}: {name!r} is not a store path name (letters, digits and + - . _ ? =, "
            "not starting with '.')"
        )
    return StorePath(given, hash, name)


def split_name(name: str) -> tuple[str, str]:
    """Nix's ``parseDrvName``: the version starts after the first '-' not followed by a letter."""
    for i, char in enumerate(name[:-1]):
        if char == "-" and not name[i + 1].isalpha():
            return name[:i], name[i + 1 :]
    return name, ""


def pack_nix(
    path: str | os.PathLike[str],
    *,
    derivation: bool = False,
    closure_file: str | os.PathLike[str] | None = None,
    name: str | None = None,
    version: str | None = None,
    entry: str | Sequence[str] | None = None,
) -> NixImage:
    """The image of a store path (realised first if it is a derivation) and its closure."""
    store, warnings = store_dir(), []
    root = _store_path_of(Path(path), store)
    if derivation or root.name.endswith(".drv"):
        root = realise(root, store)
    elif not os.path.lexists(root.path):
        raise NixInputError(
            f"{root.path}: no such store path; build it first (`nix build`), or pass its "
            "derivation with --derivation"
        )
    if closure_file is not None:
        closure = _read_closure(Path(closure_file), store)
    elif nix_store := shutil.which("nix-store"):
        closure = _run_nix([nix_store, "--query", "--requisites", str(root.path)], store)
    else:
        closure = [root]
        warnings.append(
            f"nix-store is not on PATH and no --closure was given: the image holds "
            f"{root.path} alone, without its dependencies"
        )
    closure = sorted(set(closure), key=lambda p: p.base)
    if root not in closure:
        where = closure_file or "nix-store --query --requisites"
        raise NixInputError(f"{root.path} is not in its own closure ({where}): a wrong closure?")
    for member in closure:
        if not os.path.lexists(member.path):
            raise NixInputError(f"{member.path}: in the closure but not in the store")
    manifest = _manifest(root, closure, store, name, version, entry)
    members = [Member(MANIFEST_NAME, "file", data=_toml(manifest).encode())]
    members += [Member("nix", "dir"), Member("nix/store", "dir")]
    payload = pack_members(chain(members, _closure_members(closure, store)))
    return NixImage(payload, manifest, root, tuple(closure), tuple(warnings))


def realise(drv: StorePath, store: Path) -> StorePath:
    """Build (or fetch) a derivation's outputs with Nix and return its ``out`` output."""
    if nix_store := shutil.which("nix-store"):
        command = [nix_store, "--realise", str(drv.path)]
    elif nix := shutil.which("nix"):
        target = f"{drv.path}^*" if drv.name.endswith(".drv") else str(drv.path)
        command = [nix, "build", "--no-link", "--print-out-paths", target]
    else:
        raise NixError(
            f"{drv.path}: realising a derivation needs Nix, and neither nix-store nor nix is on "
            "PATH; install Nix (https://nixos.org/download), or build it where Nix is and pass "
            "the output path with its closure (--closure)"
        )
    outputs = _run_nix(command, store)
    wanted = drv.name.removesuffix(".drv")  # the `out` output's name; others add "-<output>"
    for output in outputs:
        if output.name == wanted:
            return output
    if len(outputs) == 1:
        return outputs[0]
    raise NixError(
        f"{drv.path}: realised to {[str(o.path) for o in outputs]}, none of them the `out` "
        "output; pass the output store path you want"
    )


def _store_path_of(path: Path, store: Path) -> StorePath:
    """``path`` itself, or where a link to the store (a build's ``result``) points."""
    for _ in range(40):
        given = Path(os.path.normpath(os.path.abspath(path)))
        if given.parent == store or not given.is_symlink():
            break
        path = given.parent / os.readlink(given)
    return parse_store_path(path, store)


def _run_nix(command: list[str], store: Path) -> list[StorePath]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise NixError(f"cannot run {command[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NixError(f"`{shlex.join(command)}` failed (status {done.returncode}): {why}")
    return [parse_store_path(line, store) for line in done.stdout.split()]


def _read_closure(path: Path, store: Path) -> list[StorePath]:
    """A closure file: store paths, one a line (closureInfo's ``store-paths``), or a registration
    (closureInfo's ``registration``, ``nix-store --dump-db``: each path with its hash, size,
    deriver and references, whose paths are what is kept); or a closureInfo directory."""
    file = path / "store-paths" if path.is_dir() else path
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NixInputError(f"{file}: cannot read the closure ({exc})") from None
    if all(line.startswith("/") for line in lines if line.strip()):
        return [parse_store_path(line.strip(), store) for line in lines if line.strip()]
    paths = [line for line in lines if line.startswith("/") and not line.endswith(".drv")]
    return [parse_store_path(line, store) for line in paths]


def _manifest(
    root: StorePath,
    closure: list[StorePath],
    store: Path,
    name: str | None,
    version: str | None,
    entry: str | Sequence[str] | None,
) -> Manifest:
    pname, pversion = split_name(root.name)
    if not (version or pversion):
        raise NixInputError(f"{root.path}: {root.name!r} has no version; pass --version")
    if entry is None:
        program = root.path / "bin" / pname
        if not (root.path.is_dir() and os.path.lexists(program)):
            raise NixInputError(
                f"{root.path} has no bin/{pname}; say what to run with --entry 'bin/PROGRAM ARGS'"
            )
        argv = [f"bin/{pname}"]
    else:
        argv = shlex.split(entry) if isinstance(entry, str) else list(entry)
        if not argv:
            raise NixInputError("--entry is empty; say what to run: --entry 'bin/PROGRAM ARGS'")
    bases = {p.base for p in closure}
    argv = [_program(root, argv[0], store, bases), *(_argument(a, store, bases) for a in argv[1:])]
    text = _toml(Manifest(name or pname, version or pversion, tuple(argv)))
    try:
        return parse_manifest(text)
    except ImageError as exc:
        raise NixInputError(f"{root.path}: {exc}; pass --name or --version") from None


def _program(root: StorePath, program: str, store: Path, bases: set[str]) -> str:
    """The entry's program as a path in the unpacked image, checked to be in the closure."""
    if program.startswith("{image}/nix/store/"):
        inside = _in_store(f"{store}/{program.removeprefix('{image}/nix/store/')}", store, bases)
    elif program.startswith("{"):
        inside = None
    else:  # a store path, or a path relative to the root's (which must not climb out of it)
        inside = _in_store(posixpath.join(str(root.path), program), store, bases)
    if inside is None:
        raise NixInputError(
            f"the entry {program!r} is not inside {root.base} or its closure; give a path "
            "relative to the store path (bin/PROGRAM) or a store path of the closure"
        )
    if not os.path.lexists(store / inside.removeprefix("nix/store/")):
        raise NixInputError(f"the entry {program!r}: there is no {inside} in the closure")
    return "{image}/" + inside


def _argument(argument: str, store: Path, bases: set[str]) -> str:
    """An argument naming a path of the closure names it in the unpacked image."""
    inside = _in_store(argument, store, bases)
    return argument if inside is None else "{image}/" + inside


def _in_store(path: str, store: Path, bases: set[str]) -> str | None:
    """``nix/store/<base>/...`` for a normalised path into a store path of the closure."""
    path = posixpath.normpath(path)
    if not path.startswith(f"{store}/"):
        return None
    rest = path[len(str(store)) + 1 :]
    return f"nix/store/{rest}" if rest.split("/")[0] in bases else None


def _closure_members(closure: list[StorePath], store: Path) -> Iterator[Member]:
    bases = {p.base for p in closure}
    for path in closure:
        top = path_member(path.in_image, path.path, path.path.lstat())
        members = (
            [top] if top.kind != "dir" else [top, *tree_members(path.path, f"{path.in_image}/")]
        )
        for member in members:
            yield _relinked(member, store, bases) if member.kind == "symlink" else member


def _relinked(member: Member, store: Path, bases: set[str]) -> Member:
    """A symlink into the closure, made relative; one out of the closure is refused."""
    target = member.target
    if posixpath.isabs(target):
        inside = _in_store(target, store, bases)
    else:
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), target))
        parts = resolved.split("/")
        in_closure = len(parts) > 2 and parts[:2] == ["nix", "store"] and parts[2] in bases
        inside = resolved if in_closure else None
    if inside is None:
        raise NixInputError(
            f"{member.source}: symlink to {target!r} points outside the closure; pass the whole "
            "closure with --closure (where Nix is installed it is computed), or fix the package"
        )
    if not posixpath.isabs(target):
        return member
    relative = posixpath.relpath(inside, posixpath.dirname(member.name))
    return Member(member.name, "symlink", member.source, target=relative)


def _toml(manifest: Manifest) -> str:
    entry = ", ".join(_quote(arg) for arg in manifest.entry)
    return (
        f"name = {_quote(manifest.name)}\nversion = {_quote(manifest.version)}\nentry = [{entry}]\n"
    )


def _quote(text: str) -> str:
    """A TOML basic string."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
