"""Guest images for the `qemu` platform: a Debian cloud kernel and an initramfs with our Python.

A guest boots a stock Debian kernel (`linux-image-<ver>-cloud-amd64`, fetched with `apt-get
download` and unpacked with `dpkg -x`) straight into an initramfs that holds busybox-static, the
host's own Python interpreter (the same build, so our C extensions and msgspec's load unchanged),
the libraries `ldd` lists for it and for every extension module copied, the stdlib and
site-packages top-level packages that the guest's modules import, and our package. `/init` mounts
/proc, /sys and /dev, runs `python -m multikernel.services.qemu_guest` (what it does is read
from the kernel command line) and powers the machine off when it returns.

Which modules go in is found, not listed: a probe interpreter imports the guest's entry modules
and reports `sys.modules`; each top-level package it names is copied whole (so lazy imports inside
a package still work), with bytecode compiled at build time as unchecked-hash .pyc files (valid
whatever the archive's timestamps, so the guest never compiles under TCG).

Both artefacts are cached under `cache_dir()` (`$XDG_CACHE_HOME/multikernel/qemu`): the kernel
by its Debian package's name and version, the initramfs by the SHA-256 of every input (paths and
contents), so a test run, a benchmark and a host share one build, and a change to any copied
file makes a new one. The archive is written by Python (newc cpio, gzip, no times): the same
inputs give the same entries with the same contents, except the .pyc files, whose bytes can
differ from one build to another although their code is the same (marshal marks an object for
sharing by its reference count at the time, so its output depends on the process's state).
The cache key is the inputs' digest, never the archive's bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from multikernel.services._platform import PlatformError

#: The Debian metapackage whose dependency names the current cloud kernel.
KERNEL_PACKAGE: Final = "linux-image-cloud-amd64"
BUSYBOX: Final = Path("/bin/busybox")
#: What the guest imports: its entry, and what it needs at run time that a plain import misses.
GUEST_MODULES: Final = (
    "multikernel.services.qemu_guest",
    "multikernel.shm",
    "multikernel.endpoints",
    "anyio",
    "anyio._backends._asyncio",
    "msgspec",
    "structlog",
)
#: Parts of the stdlib a guest never needs (tests, GUIs, build files, installers).
_STDLIB_SKIP: Final = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
     "distutils", "site-packages", "dist-packages", "__pycache__"}
)  # fmt: skip
#: Top-level packages a guest does without: they come in only as optional extras of others
#: (structlog's pretty console imports rich and pygments if it can; setuptools' .pth hook).
_SITE_SKIP: Final = frozenset({"rich", "pygments", "markdown_it", "mdurl", "_distutils_hack"})
_INSTALL_HINT: Final = (
    "install them with: apt-get install -y --no-install-recommends qemu-system-x86 "
    "busybox-static cpio"
)


class ImageBuildError(PlatformError):
    """A guest kernel or initramfs could not be made (a tool missing, a download failed)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: `kernel` and `initramfs` paths in the cache, and what they hold."""

    kernel: Path
    initramfs: Path
    kernel_version: str  # the kernel's release, e.g. 6.1.0-57-cloud-amd64
    digest: str  # the initramfs's input digest (its cache key)


def cache_dir() -> Path:
    """Where kernels and initramfs archives are kept: per user, shared by every run."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "multikernel" / "qemu"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ImageBuildError(f"{argv[0]} is not installed; {_INSTALL_HINT}")
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def kernel_release(package: str = KERNEL_PACKAGE) -> str:
    """The release the metapackage points at now (`apt-cache depends`): 6.1.0-57-cloud-amd64."""
    found = re.search(r"Depends: linux-image-(\S+)", _run(["apt-cache", "depends", package]))
    if found is None:
        raise ImageBuildError(f"apt-cache depends {package} names no linux-image package")
    return found.group(1)


def fetch_kernel(
    cache: Path | None = None, release: str | None = None, *, refresh: bool = False
) -> tuple[Path, str]:
    """The path of a cached `vmlinuz` for `release`, and the release.

    Without `release`: the most recently fetched kernel in the cache, or, if there is none or
    `refresh` is set, the current cloud kernel (asking apt takes ~1.3 s here). Downloaded once
    per release with `apt-get download` and unpacked with `dpkg -x`; the package's modules are
    kept beside it (`modules/`) for the guest drivers that need them.
    """
    cache = cache or cache_dir()
    if release is None and not refresh:
        fetched = sorted(cache.glob("kernel/*/vmlinuz"), key=lambda p: p.stat().st_mtime)
        if fetched:
            return fetched[-1], fetched[-1].parent.name
    release = release or kernel_release()
    if not re.fullmatch(r"[0-9A-Za-z.+~-]+", release):
        raise ImageBuildError(f"bad kernel release {release!r}")
    home = cache / "kernel" / release
    vmlinuz = home / "vmlinuz"
    if vmlinuz.exists():
        return vmlinuz, release
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt-get download runs as _apt where it can
        _run(["apt-get", "download", f"linux-image-{release}"], cwd=work)
        (deb,) = work.glob("*.deb")
        _run(["dpkg", "-x", str(deb), str(work / "root")])
        staged = work / "kernel"
        staged.mkdir()
        shutil.copy2(work / "root" / "boot" / f"vmlinuz-{release}", staged / "vmlinuz")
        modules = work / "root" / "lib" / "modules" / release
        if modules.is_dir():
            shutil.move(modules, staged / "modules")
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            staged.rename(home)  # atomic: a concurrent fetch of the same release loses cleanly
        except OSError:
            if not vmlinuz.exists():
                raise
    return vmlinuz, release


# -- what goes in the initramfs --------------------------------------------------------------


def _probe(modules: Iterable[str]) -> dict[str, str]:
    """Import `modules` in a fresh interpreter like ours; every loaded module's file, by name."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())"
        " if getattr(m, '__file__', None)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ImageBuildError(f"the guest's modules do not import here: {done.stderr[-800:]}")
    found: dict[str, str] = json.loads(done.stdout)
    return found


def _walk(top: Path) -> Iterator[Path]:
    """Every file under `top` (or `top` itself), skipping bytecode and the stdlib's extras."""
    if top.is_file():
        yield top
        return
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        for name in sorted(files):
            if not name.endswith((".pyc", ".pyo")):
                yield Path(root) / name


def _libraries(binaries: Iterable[Path]) -> set[str]:
    """The shared libraries (as the loader names them) that `binaries` need, transitively."""
    found: set[str] = set()
    for binary in binaries:
        for line in _run(["ldd", str(binary)]).splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                found.add(parts[2])
            elif parts and parts[0].startswith("/"):
                found.add(parts[0])  # the loader itself
    return found


@dataclass
class _Tree:
    """The initramfs's contents: guest path -> host file, or -> bytes, plus symlinks."""

    files: dict[str, Path]
    data: dict[str, tuple[bytes, int]]  # guest path -> (contents, mode)
    links: dict[str, str]


def _init_script(python: str) -> bytes:
    return (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox mount -t sysfs sysfs /sys\n"
        "/bin/busybox mount -t devtmpfs devtmpfs /dev\n"
        'echo "multikernel-guest: init at $(/bin/busybox cut -d" " -f1 /proc/uptime) s"\n'
        f"{python} -I -X frozen_modules=on -m multikernel.services.qemu_guest\n"
        'echo "multikernel-guest: exit $?"\n'
        "/bin/busybox poweroff -f\n"
    ).encode()


def guest_tree(modules: Iterable[str] = GUEST_MODULES) -> _Tree:
    """What the initramfs holds: busybox, the interpreter and its libraries, the modules."""
    if not BUSYBOX.exists():
        raise ImageBuildError(f"{BUSYBOX} is missing; {_INSTALL_HINT}")
    python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])
    guest_site = stdlib / "site-packages"  # the guest has no venv: deps go in the base's
    tree = _Tree(files={}, data={}, links={})
    tree.files["/bin/busybox"] = BUSYBOX
    for applet in ("sh", "mount", "poweroff", "cat", "ls", "echo"):
        tree.links[f"/bin/{applet}"] = "busybox"
    tree.files[str(python)] = python
    tree.data["/init"] = (_init_script(str(python)), 0o755)
    for name in ("os.py", "encodings"):  # the interpreter's landmarks and its first import
        for path in _walk(stdlib / name):
            tree.files[str(path)] = path
    ours = {p for sub in ("shm", "protocol", "services", "endpoints") for p in _package_dirs(sub)}
    site_dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    for name, file in sorted(_probe(modules).items()):
        path = Path(file)
        top = name.split(".")[0]
        if top == "multikernel" or top in _SITE_SKIP:
            continue
        if path.is_relative_to(stdlib / "lib-dynload"):
            tree.files[str(path)] = path
        elif any(path.is_relative_to(site) for site in site_dirs):
            site = next(s for s in site_dirs if path.is_relative_to(s))
            source = site / top if (site / top).is_dir() else path
            for found in _walk(source):
                tree.files[str(guest_site / found.relative_to(site))] = found
        elif path.is_relative_to(stdlib):
            source = stdlib / top if (stdlib / top).is_dir() else path
            for found in _walk(source):
                tree.files[str(found)] = found
    for directory, sub in ours:
        for found in _walk(directory):
            if "__pycache__" not in found.parts:
                tree.files[str(guest_site / "multikernel" / sub / found.relative_to(directory))] = (
                    Path(os.path.realpath(found))
                )
    binaries = [python, *(p for p in tree.files.values() if p.suffix == ".so")]
    for library in sorted(_libraries(binaries)):
        tree.files[library] = Path(os.path.realpath(library))
    return tree


def _package_dirs(sub: str) -> Iterator[tuple[Path, str]]:
    spec = importlib.util.find_spec(f"multikernel.{sub}")
    if spec is None or not spec.submodule_search_locations:
        raise ImageBuildError(f"multikernel.{sub} is not importable here")
    for location in spec.submodule_search_locations:
        yield Path(location), sub


# -- the archive -----------------------------------------------------------------------------


def _digest(tree: _Tree) -> str:
    h = hashlib.sha256(b"multikernel initramfs 1\n")
    for guest, host in sorted(tree.files.items()):
        h.update(f"f {guest} {oct(host.stat().st_mode & 0o777)}\n".encode())
        h.update(hashlib.sha256(host.read_bytes()).digest())
    for guest, (data, mode) in sorted(tree.data.items()):
        h.update(f"d {guest} {oct(mode)}\n".encode())
        h.update(hashlib.sha256(data).digest())
    for guest, target in sorted(tree.links.items()):
        h.update(f"l {guest} {target}\n".encode())
    return h.hexdigest()


class _Cpio:
    """A newc ("070701") archive writer: just what an initramfs needs."""

    def __init__(self, out: gzip.GzipFile) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in self._dirs:
                self._dirs.add(directory)
                self._entry(directory, 0o040755, b"")

    def file(self, path: str, data: bytes, mode: int) -> None:
        self.parents(path)
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self.parents(path)
        self._entry(path, 0o120777, target.encode())

    def directory(self, path: str) -> None:
        self.parents(path + "/x")

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, b"")


def _bytecode(source: Path, guest: str) -> bytes | None:
    """Unchecked-hash bytecode for a module (valid whatever the file times), None if not .py."""
    if not guest.endswith(".py"):
        return None
    import importlib._bootstrap_external as external

    text = source.read_bytes()
    try:
        code = compile(text, guest, "exec", dont_inherit=True)
    except SyntaxError:
        return None  # some packages ship templates named .py: leave them to fail where used
    return bytes(external._code_to_hash_pyc(code, importlib.util.source_hash(text), False))  # type: ignore[attr-defined]


def _contents(path: Path, scratch: Path) -> bytes:
    """A file's bytes for the archive: ELF files stripped of their symbols (pyenv's libpython
    is 23 MB with them, 6 MB without), everything else as it is."""
    data = path.read_bytes()
    if not data.startswith(b"\x7fELF") or shutil.which("strip") is None:
        return data
    stripped = scratch / "stripped"
    done = subprocess.run(
        ["strip", "--strip-unneeded", "-o", str(stripped), str(path)],
        capture_output=True,
        check=False,
    )
    return stripped.read_bytes() if done.returncode == 0 else data


def write_initramfs(tree: _Tree, out: Path) -> None:
    """Write `tree` to `out` as a gzip-compressed newc cpio archive (no times, sorted)."""
    tag = sys.implementation.cache_tag
    with (
        tempfile.TemporaryDirectory() as scratch,
        open(out, "wb") as raw,
        gzip.GzipFile("", "wb", 6, raw, mtime=0) as gz,
    ):
        cpio = _Cpio(gz)
        for directory in ("proc", "sys", "dev", "tmp", "run"):
            cpio.directory(directory)
        for guest, host in sorted(tree.files.items()):
            cpio.file(guest, _contents(host, Path(scratch)), host.stat().st_mode & 0o755 | 0o444)
            pyc = _bytecode(host, guest)
            if pyc is not None:
                folder, _, name = guest.rpartition("/")
                cpio.file(f"{folder}/__pycache__/{name[:-3]}.{tag}.pyc", pyc, 0o644)
        for guest, (data, mode) in sorted(tree.data.items()):
            cpio.file(guest, data, mode)
        for guest, target in sorted(tree.links.items()):
            cpio.symlink(guest, target)
        cpio.close()


def build_initramfs(
    cache: Path | None = None, modules: Iterable[str] = GUEST_MODULES
) -> tuple[Path, str]:
    """The cached initramfs for these modules and this interpreter (built if missing)."""
    cache = cache or cache_dir()
    tree = guest_tree(modules)
    digest = _digest(tree)
    out = cache / "initramfs" / f"{digest[:32]}.cpio.gz"
    if out.exists():
        return out, digest
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        write_initramfs(tree, partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out, digest


def build_image(
    cache: Path | None = None, release: str | None = None, *, refresh: bool = False
) -> GuestImage:
    """A bootable guest: the cached kernel and initramfs, each fetched or built if missing
    (`fetch_kernel` says which kernel)."""
    kernel, release = fetch_kernel(cache, release, refresh=refresh)
    initramfs, digest = build_initramfs(cache)
    return GuestImage(kernel, initramfs, release, digest)


def write_image_dir(image: GuestImage, out: Path) -> Path:
    """An image directory for `mkctl load`/`sign`: the kernel, the initramfs, a manifest.

    The manifest names the platform and the two files in `parameters`; its version is the
    kernel release and the initramfs digest, so two builds of different contents never share
    one.
    """
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image.kernel, out / "vmlinuz")
    shutil.copyfile(image.initramfs, out / "initramfs.cpio.gz")
    (out / "manifest.toml").write_text(
        'name = "qemu-guest"\n'
        f'version = "{image.kernel_version}+{image.digest[:12]}"\n'
        'entry = ["/init"]\n'
        'min_memory = "128M"\n'
        "[parameters]\n"
        'platform = "qemu"\n'
        'kernel = "vmlinuz"\n'
        'initramfs = "initramfs.cpio.gz"\n'
        f'kernel_release = "{image.kernel_version}"\n'
    )
    return out
