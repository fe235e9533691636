"""Images: manifest validation, deterministic packing, signing, verified loading, safe unpacking."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from multikernel.services import _image
from multikernel.services._image import SIGNATURE_NAME, load_image, pack, sign_image, verify_image
from multikernel.services._manifest import ImageError, Manifest, parse_manifest, parse_size
from multikernel.services._signature import (
    MAGIC,
    BadSignatureError,
    UnsignedImageError,
    UntrustedSignerError,
    make_signing_key,
    split,
)

MANIFEST = """\
name = "echo-service"
version = "1.0.0"
entry = ["/bin/echo-service", "--port", "7"]
min_cpus = 2
min_memory = "64M"

[env]
LOG_LEVEL = "debug"

[parameters]
greeting = "hello"
limits = { rps = 100 }
"""

Pair = tuple[bytes, bytes]


@pytest.fixture(scope="module")
def pair() -> Pair:
    return make_signing_key("image signer", algorithm="rsa2048")


@pytest.fixture(scope="module")
def stranger() -> Pair:
    return make_signing_key("someone else", algorithm="ec-p256")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "bin").mkdir(parents=True)
    (root / MANIFEST_NAME).write_text(MANIFEST)
    (root / "bin" / "echo-service").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "echo-service").chmod(0o755)
    (root / "share").mkdir()
    (root / "share" / "motd").write_text("welcome\n")
    (root / "bin" / "default").symlink_to("echo-service")
    return root


MANIFEST_NAME = "manifest.toml"


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], *, gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, content in members:
            info.size = len(content) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


def _entry(name: str, content: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, content


def _manifest_entry() -> tuple[tarfile.TarInfo, bytes]:
    return _entry(MANIFEST_NAME, MANIFEST.encode())


# --- manifest --------------------------------------------------------------------------------


def test_manifest_parses_every_field() -> None:
    assert parse_manifest(MANIFEST) == Manifest(
        name="echo-service",
        version="1.0.0",
        entry=("/bin/echo-service", "--port", "7"),
        env={"LOG_LEVEL": "debug"},
        parameters={"greeting": "hello", "limits": {"rps": 100}},
        min_cpus=2,
        min_memory=64 << 20,
    )


def test_manifest_defaults() -> None:
    manifest = parse_manifest('name = "a"\nversion = "1"\nentry = ["/a"]\n')
    assert (manifest.env, manifest.parameters, manifest.min_cpus, manifest.min_memory) == (
        {},
        {},
        1,
        0,
    )


BASE = 'name = "a"\nversion = "1"\nentry = ["/a"]\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name = ", "TOML"),
        ('version = "1"\nentry = ["/a"]\n', "'name'"),
        ('name = "../x"\nversion = "1"\nentry = ["/a"]\n', "'name'"),
        ('name = "a"\nentry = ["/a"]\n', "'version'"),
        ('name = "a"\nversion = "1"\n', "'entry'"),
        ('name = "a"\nversion = "1"\nentry = "/a"\n', "'entry'"),
        ('name = "a"\nversion = "1"\nentry = []\n', "'entry'"),
        ('name = "a"\nversion = "1"\nentry = ["", "x"]\n', "'entry'"),
        (BASE + "min_cpus = 0\n", "'min_cpus'"),
        (BASE + "min_cpus = true\n", "'min_cpus'"),
        (BASE + 'min_memory = "lots"\n', "'min_memory'"),
        (BASE + "min_memory = -1\n", "'min_memory'"),
        (BASE + "env = { 1X = 'y' }\n", "'env'"),
        (BASE + "env = { X = 1 }\n", "'env'"),
        (BASE + "parameters = 3\n", "'parameters'"),
        (BASE + "entrypoint = ['/a']\n", "unknown keys"),
    ],
)
def test_invalid_manifest_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ImageError, match=key):
        parse_manifest(text)


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (4096, 4096), ("512", 512), ("64M", 64 << 20), ("1G", 1 << 30), ("2 KiB", 2048)],
)
def test_sizes_take_binary_units(value: object, size: int) -> None:
    assert parse_size(value) == size


# --- packing ---------------------------------------------------------------------------------


def test_pack_is_deterministic_across_mtimes_and_creation_order(tmp_path: Path) -> None:
    def build(root: Path, names: list[str], mtime: int) -> Path:
        root.mkdir()
        (root / MANIFEST_NAME).write_text(MANIFEST)
        for name in names:
            (root / name).write_text(name)
            os.utime(root / name, (mtime, mtime))
        return root

    first = build(tmp_path / "a", ["x", "b", "m"], 1_000)
    second = build(tmp_path / "b", ["m", "x", "b"], 2_000_000_000)
    assert pack(first) == pack(first) == pack(second)


def test_pack_normalises_owners_times_and_modes(image_dir: Path) -> None:
    (image_dir / "share" / "motd").chmod(0o600)
    with tarfile.open(fileobj=io.BytesIO(pack(image_dir))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members)
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in members.values()} == {(0, 0, 0, "")}
    assert members["bin/echo-service"].mode == 0o755
    assert members["share/motd"].mode == 0o644
    assert members["bin/default"].linkname == "echo-service"


def test_pack_leaves_out_the_signature_file(image_dir: Path) -> None:
    before = pack(image_dir)
    (image_dir / SIGNATURE_NAME).write_bytes(b"anything")
    assert pack(image_dir) == before


def test_pack_refuses_a_fifo(image_dir: Path) -> None:
    os.mkfifo(image_dir / "pipe")
    with pytest.raises(ImageError, match="files, directories and symlinks only"):
        pack(image_dir)


def test_pack_refuses_a_symlink_out_of_the_image(image_dir: Path) -> None:
    (image_dir / "share" / "passwd").symlink_to("../../etc/passwd")
    with pytest.raises(ImageError, match="outside the image"):
        pack(image_dir)


def test_pack_needs_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no manifest\.toml"):
        pack(tmp_path)


# --- signing and loading ---------------------------------------------------------------------


def test_signed_directory_loads_verified_and_unpacked(
    image_dir: Path, pair: Pair, tmp_path: Path
) -> None:
    assert sign_image(image_dir, *pair) == image_dir / SIGNATURE_NAME
    loaded = load_image(image_dir, tmp_path / "run", trusted_certs=[pair[1]])
    assert loaded.manifest.name == "echo-service"
    assert loaded.signer is not None
    assert loaded.signer.subject == "CN=image signer"
    assert loaded.digest == "sha256:" + hashlib.sha256(pack(image_dir)).hexdigest()
    assert (loaded.path / "share" / "motd").read_text() == "welcome\n"
    assert os.access(loaded.path / "bin" / "echo-service", os.X_OK)
    assert os.readlink(loaded.path / "bin" / "default") == "echo-service"


def test_directory_signature_is_the_trailer_of_its_signed_archive(
    image_dir: Path, pair: Pair, tmp_path: Path
) -> None:
    """pack(d) + d/.signature is byte for byte the signed archive of d."""
    sign_image(image_dir, *pair)
    archive = sign_image(image_dir, *pair, out=tmp_path / "image.tar")
    assert archive.read_bytes() == pack(image_dir) + (image_dir / SIGNATURE_NAME).read_bytes()
    assert verify_image(archive, trusted_certs=[pair[1]]).manifest.name == "echo-service"


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_archive_is_signed_in_place_and_loads(tmp_path: Path, pair: Pair, gz: bool) -> None:
    archive = tmp_path / ("image.tar.gz" if gz else "image.tar")
    archive.write_bytes(_tar([_manifest_entry(), _entry("data/x", b"x" * 5000)], gz=gz))
    original = archive.read_bytes()
    sign_image(archive, *pair)
    assert split(archive.read_bytes())[0] == original
    loaded = load_image(archive, tmp_path / "run", trusted_certs=[pair[1]])
    assert (loaded.path / "data" / "x").read_bytes() == b"x" * 5000


def test_signing_again_replaces_the_old_signature(
    tmp_path: Path, pair: Pair, stranger: Pair
) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(_tar([_manifest_entry()]))
    sign_image(archive, *stranger)
    sign_image(archive, *pair)
    assert archive.read_bytes().count(MAGIC) == 1
    assert verify_image(archive, trusted_certs=[pair[1]]).signer is not None


def test_signing_to_out_leaves_the_archive_alone(tmp_path: Path, pair: Pair) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(_tar([_manifest_entry()]))
    original = archive.read_bytes()
    signed = sign_image(archive, *pair, out=tmp_path / "image.tar.signed")
    assert archive.read_bytes() == original
    assert split(signed.read_bytes())[0] == original


def test_an_invalid_image_is_not_signed(tmp_path: Path, pair: Pair) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(_tar([_entry(MANIFEST_NAME, b'name = "a"\n')]))
    with pytest.raises(ImageError, match="'version'"):
        sign_image(archive, *pair)
    assert MAGIC not in archive.read_bytes()


def test_file_changed_after_signing_is_refused(image_dir: Path, pair: Pair) -> None:
    sign_image(image_dir, *pair)
    (image_dir / "share" / "motd").write_text("welcome!\n")
    with pytest.raises(BadSignatureError):
        verify_image(image_dir, trusted_certs=[pair[1]])


def test_tampered_archive_byte_is_refused(tmp_path: Path, pair: Pair) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(_tar([_manifest_entry()]))
    sign_image(archive, *pair)
    blob = bytearray(archive.read_bytes())
    blob[600] ^= 0x20
    archive.write_bytes(bytes(blob))
    with pytest.raises(BadSignatureError):
        verify_image(archive, trusted_certs=[pair[1]], allow_unsigned=True)


def test_unsigned_image_is_refused_with_what_to_do(image_dir: Path, pair: Pair) -> None:
    with pytest.raises(UnsignedImageError, match="mkctl image sign"):
        verify_image(image_dir, trusted_certs=[pair[1]])


def test_unsigned_image_loads_when_the_host_allows_it(image_dir: Path, tmp_path: Path) -> None:
    loaded = load_image(image_dir, tmp_path / "run", trusted_certs=[], allow_unsigned=True)
    assert loaded.signer is None
    assert (loaded.path / MANIFEST_NAME).read_text() == MANIFEST


def test_untrusted_signer_is_refused_even_when_unsigned_is_allowed(
    image_dir: Path, pair: Pair, stranger: Pair
) -> None:
    sign_image(image_dir, *stranger)
    with pytest.raises(UntrustedSignerError, match="trusted keys"):
        verify_image(image_dir, trusted_certs=[pair[1]], allow_unsigned=True)


def test_missing_image_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        verify_image(tmp_path / "nope.tar", trusted_certs=[], allow_unsigned=True)


def test_garbage_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8bnot gzip at all" * 10)
    with pytest.raises(ImageError, match="gzip"):
        verify_image(tmp_path / "junk.tar", trusted_certs=[], allow_unsigned=True)


def test_archive_without_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(_tar([_entry("x", b"x")]))
    with pytest.raises(ImageError, match=r"no manifest\.toml"):
        verify_image(tmp_path / "image.tar", trusted_certs=[], allow_unsigned=True)


# --- safe unpacking --------------------------------------------------------------------------


def _load_members(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Callable[[], object]:
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar([_manifest_entry(), *members]))
    return lambda: load_image(archive, tmp_path / "run", trusted_certs=[], allow_unsigned=True)


@pytest.mark.parametrize(
    "member",
    [
        _entry("/etc/evil", b"x"),
        _entry("../evil", b"x"),
        _entry("a/../../evil", b"x"),
        _entry("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _entry("a/link", type=tarfile.SYMTYPE, linkname="../../etc"),
        _entry("hard", type=tarfile.LNKTYPE, linkname=MANIFEST_NAME),
        _entry("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        _entry("fifo", type=tarfile.FIFOTYPE),
        _entry(MANIFEST_NAME, b"again"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "inner-dotdot",
        "abs-link",
        "link-out",
        "hardlink",
        "device",
        "fifo",
        "duplicate",
    ],
)
def test_unsafe_member_is_refused(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]) -> None:
    with pytest.raises(ImageError, match="unsafe"):
        _load_members(tmp_path, member)()
    assert not (tmp_path / "run").exists()


def test_symlink_through_a_symlinked_parent_cannot_escape(tmp_path: Path) -> None:
    """'p' -> '.' makes 'p/s' -> '../x' look inside yet land in the parent of the image."""
    load = _load_members(
        tmp_path,
        _entry("p", type=tarfile.SYMTYPE, linkname="."),
        _entry("p/s", type=tarfile.SYMTYPE, linkname="../x"),
    )
    with pytest.raises(ImageError, match="outside the image"):
        load()
    assert not (tmp_path / "run").exists()


def test_unpack_refuses_a_non_empty_destination(image_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep").write_text("mine")
    with pytest.raises(ImageError, match="new or empty"):
        load_image(image_dir, tmp_path / "run", trusted_certs=[], allow_unsigned=True)
    assert (tmp_path / "run" / "keep").read_text() == "mine"


def test_absurd_total_size_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_image, "MAX_TOTAL_SIZE", 4096)
    with pytest.raises(ImageError, match="more than"):
        _load_members(tmp_path, _entry("big", b"\0" * 8192))()


def test_gzip_bomb_is_refused_before_inflating_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_image, "MAX_TOTAL_SIZE", 4096)
    monkeypatch.setattr(_image, "MAX_MEMBERS", 2)
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(_tar([_manifest_entry(), _entry("zeros", b"\0" * (1 << 20))], gz=True))
    with pytest.raises(ImageError, match="inflates to more than"):
        verify_image(archive, trusted_certs=[], allow_unsigned=True)
