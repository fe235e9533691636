"""Images from Nix: a store path and its closure packed, signed, loaded and run, against a fake
store in tmp_path (`$NIX_STORE_DIR`) and a fake `nix-store` on PATH; and every refusal."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from multikernel.services import _image
from multikernel.services._image import load_image, verify_image
from multikernel.services._manifest import ImageError
from multikernel.services._nix import NIX_BASE32, pack_nix, parse_store_path, split_name
from multikernel.services._signature import make_signing_key


def nix_hash(seed: str) -> str:
    return "".join(NIX_BASE32[b % 32] for b in hashlib.sha256(seed.encode()).digest())


@dataclass
class Store:
    dir: Path  # the fake /nix/store
    hello: Path  # <hash>-hello-2.12.1: bin/hello, share/greeting -> the dependency (absolute)
    greeting: Path  # <hash>-greeting-1.0: lib/greeting.txt, lib/libgreet.so
    closure: Path  # both, one a line, as closureInfo's store-paths
    bin: Path  # a PATH with no nix on it (and what the fake nix-store is put in)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    root = tmp_path / "nix" / "store"
    greeting = root / f"{nix_hash('greeting')}-greeting-1.0"
    (greeting / "lib").mkdir(parents=True)
    (greeting / "lib" / "greeting.txt").write_text("hello from nix\n")
    (greeting / "lib" / "libgreet.so").write_bytes(b"\x7fELF not really")
    hello = root / f"{nix_hash('hello')}-hello-2.12.1"
    (hello / "bin").mkdir(parents=True)
    (hello / "share").mkdir()
    (hello / "bin" / "hello").write_text('#!/bin/sh\ncat "$(dirname "$0")/../share/greeting"\n')
    (hello / "bin" / "hello").chmod(0o555)
    (hello / "share" / "greeting").symlink_to(greeting / "lib" / "greeting.txt")
    (hello / "lib").symlink_to("../" + greeting.name + "/lib")  # relative, into the closure
    closure = tmp_path / "store-paths"
    closure.write_text(f"{hello}\n{greeting}\n")
    bin = tmp_path / "bin"
    bin.mkdir()
    monkeypatch.setenv("NIX_STORE_DIR", str(root))
    monkeypatch.setenv("PATH", str(bin))
    return Store(root, hello, greeting, closure, bin)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key, cert = make_signing_key("nix images", algorithm="ec-p256")
    where = tmp_path_factory.mktemp("keys")
    (where / "key.pem").write_bytes(key)
    (where / "cert.pem").write_bytes(cert)
    return where / "key.pem", where / "cert.pem"


def mkctl_pack(*args: str | Path) -> tuple[int, str, str]:
    """`mkctl image pack ARGS` as a user runs it (with this test's $NIX_STORE_DIR and $PATH)."""
    command = [sys.executable, "-m", "multikernel.endpoints.mkctl", "image", "pack"]
    done = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def fails(*args: str | Path) -> tuple[int, str]:
    code, out, err = mkctl_pack(*args)
    assert code != 0, out
    assert "Traceback" not in err, err
    return code, err.splitlines()[0]


def members(archive: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: m for m in tar.getmembers()}


# --- packing, loading, running ---------------------------------------------------------------


def test_a_store_path_packs_signed_loads_and_runs_without_the_store(
    store: Store, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    key, cert = keys
    image = tmp_path / "hello.tar"
    code, out, err = mkctl_pack(
        "--from-nix", store.hello, "--closure", store.closure, "--out", image,
        "--sign-key", key, "--cert", cert,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    entry = f"{{image}}/nix/store/{store.hello.name}/bin/hello"
    assert (
        out == f"packed {store.hello} (2 store paths) into {image}: hello 2.12.1, entry '{entry}'\n"
    )
    loaded = load_image(image, tmp_path / "unpacked", trusted_certs=[cert.read_bytes()])
    assert (loaded.manifest.name, loaded.manifest.version) == ("hello", "2.12.1")
    assert loaded.manifest.entry == (entry,)
    assert loaded.signer is not None
    shutil.rmtree(store.dir)  # what runs is the image's own copy of the closure
    argv = [arg.replace("{image}", str(loaded.path)) for arg in loaded.manifest.entry]
    run = subprocess.run(argv, capture_output=True, text=True, check=True, env={"PATH": "/bin"})
    assert run.stdout == "hello from nix\n"
    assert (loaded.path / f"nix/store/{store.hello.name}/lib/libgreet.so").exists()


def test_absolute_links_into_the_closure_become_relative(store: Store) -> None:
    image = pack_nix(store.hello, closure_file=store.closure)
    found = members(image.payload)
    link = found[f"nix/store/{store.hello.name}/share/greeting"]
    assert link.linkname == f"../../{store.greeting.name}/lib/greeting.txt"
    assert found[f"nix/store/{store.hello.name}/lib"].linkname == f"../{store.greeting.name}/lib"
    assert list(found)[:3] == ["manifest.toml", "nix", "nix/store"]
    assert found[f"nix/store/{store.hello.name}/bin/hello"].mode == 0o755


def test_the_same_closure_packs_to_the_same_bytes(store: Store, tmp_path: Path) -> None:
    first = pack_nix(store.hello, closure_file=store.closure).payload
    os.utime(store.greeting / "lib" / "greeting.txt", (1, 1))
    reordered = tmp_path / "reordered"
    reordered.write_text(f"{store.greeting}\n{store.hello}\n{store.greeting}\n")
    assert pack_nix(store.hello, closure_file=reordered).payload == first
    assert pack_nix(store.hello, closure_file=store.closure).payload == first


def test_a_result_link_and_a_closure_info_directory(store: Store, tmp_path: Path) -> None:
    (tmp_path / "result").symlink_to(store.hello)
    info = tmp_path / "closure-info"
    info.mkdir()
    shutil.copy(store.closure, info / "store-paths")
    image = pack_nix(tmp_path / "result", closure_file=info)
    assert image.root.path == store.hello
    assert [p.path for p in image.closure] == sorted([store.hello, store.greeting])


def test_a_registration_file_gives_the_closure(store: Store, tmp_path: Path) -> None:
    """closureInfo's `registration` (`nix-store --dump-db`): path, hash, size, deriver, the
    number of references, the references."""
    drv = store.dir / f"{nix_hash('drv')}-hello-2.12.1.drv"
    registration = tmp_path / "registration"
    registration.write_text(
        f"{store.greeting}\n{'0' * 64}\n1234\n\n0\n"
        f"{store.hello}\n{'1' * 64}\n5678\n{drv}\n1\n{store.greeting}\n"
    )
    image = pack_nix(store.hello, closure_file=registration)
    assert [p.path for p in image.closure] == sorted([store.hello, store.greeting])
    assert image.payload == pack_nix(store.hello, closure_file=store.closure).payload


def test_name_version_and_entry_can_be_given(store: Store, tmp_path: Path) -> None:
    image = pack_nix(
        store.hello,
        closure_file=store.closure,
        name="greeter",
        version="7",
        entry=f"bin/hello --text {store.greeting}/lib/greeting.txt --flag",
    )
    assert image.manifest.name == "greeter"
    assert image.manifest.version == "7"
    assert image.manifest.entry == (
        f"{{image}}/nix/store/{store.hello.name}/bin/hello",
        "--text",
        f"{{image}}/nix/store/{store.greeting.name}/lib/greeting.txt",
        "--flag",
    )


def test_without_nix_or_a_closure_the_path_alone_with_a_warning(
    store: Store, tmp_path: Path
) -> None:
    tool = store.dir / f"{nix_hash('tool')}-tool-1.0"
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    code, out, err = mkctl_pack("--from-nix", tool, "--out", tmp_path / "tool.tar")
    assert code == 0, err
    assert err == (
        f"warning: nix-store is not on PATH and no --closure was given: the image holds {tool} "
        "alone, without its dependencies\n"
    )
    assert out.startswith(f"packed {tool} (1 store path) into")


def test_a_closure_too_large_for_an_image_is_refused(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_image, "MAX_TOTAL_SIZE", 64)
    with pytest.raises(ImageError, match=r"more than 64 bytes of files; too large for an image"):
        pack_nix(store.hello, closure_file=store.closure)
    monkeypatch.setattr(_image, "MAX_TOTAL_SIZE", 1 << 30)
    monkeypatch.setattr(_image, "MAX_MEMBERS", 5)
    with pytest.raises(ImageError, match=r"more than 5 entries; too many for an image"):
        pack_nix(store.hello, closure_file=store.closure)


def test_a_directory_packs_signed_too(keys: tuple[Path, Path], tmp_path: Path) -> None:
    key, cert = keys
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "manifest.toml").write_text('name = "d"\nversion = "1"\nentry = ["x"]\n')
    out = tmp_path / "d.tar"
    code, _, err = mkctl_pack(tmp_path / "dir", "--out", out, "--sign-key", key, "--cert", cert)
    assert code == 0, err
    assert verify_image(out, trusted_certs=[cert.read_bytes()]).manifest.name == "d"
    code, _, err = mkctl_pack(tmp_path / "dir", "--out", out, "--entry", "x")
    assert (code, err.splitlines()[-1]) == (
        2,
        "mkctl image pack: error: --derivation, --closure, --name, --version and --entry go "
        "with --from-nix",
    )


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("hello-2.12.1", ("hello", "2.12.1")),
        ("python3-3.11.4", ("python3", "3.11.4")),
        ("gcc-wrapper-12.2.0", ("gcc-wrapper", "12.2.0")),
        ("source", ("source", "")),
        ("foo-bar", ("foo-bar", "")),
    ],
)
def test_names_split_as_nix_splits_them(name: str, split: tuple[str, str]) -> None:
    assert split_name(name) == split


# --- a fake nix-store: derivations and closures ------------------------------------------------


def fake_nix_store(store: Store, outputs: str, *, status: int = 0) -> Path:
    log = store.bin / "calls"
    script = store.bin / "nix-store"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'if [ {status} != 0 ]; then echo "error: builder for it failed" >&2; exit {status}; fi\n'
        f'case "$1" in\n'
        f"  --realise) printf '%s\\n' {outputs} ;;\n"
        f"  --query) /bin/cat {store.closure} ;;\n"
        f"esac\n"
    )
    script.chmod(0o755)
    return log


def test_a_derivation_is_realised_and_its_closure_queried(store: Store, tmp_path: Path) -> None:
    drv = store.dir / f"{nix_hash('drv')}-hello-2.12.1.drv"
    drv.write_text("Derive(...)")
    man = store.dir / f"{nix_hash('man')}-hello-2.12.1-man"
    log = fake_nix_store(store, f"{man} {store.hello}")
    code, out, err = mkctl_pack("--from-nix", drv, "--out", tmp_path / "hello.tar")
    assert code == 0, err
    assert out.startswith(f"packed {store.hello} (2 store paths)")
    assert log.read_text().splitlines() == [
        f"--realise {drv}",
        f"--query --requisites {store.hello}",
    ]


def test_derivation_flag_realises_an_output_path(store: Store) -> None:
    log = fake_nix_store(store, str(store.hello))
    image = pack_nix(store.hello, derivation=True)
    assert image.root.path == store.hello
    assert log.read_text().splitlines()[0] == f"--realise {store.hello}"


def test_a_failed_build_says_why(store: Store, tmp_path: Path) -> None:
    fake_nix_store(store, "", status=1)
    drv = store.dir / f"{nix_hash('drv')}-hello-2.12.1.drv"
    assert fails("--from-nix", drv, "--out", tmp_path / "x.tar") == (
        1,
        f"error: `{store.bin}/nix-store --realise {drv}` failed (status 1): "
        "error: builder for it failed",
    )


def test_a_derivation_without_nix_says_to_install_it(store: Store, tmp_path: Path) -> None:
    drv = store.dir / f"{nix_hash('drv')}-hello-2.12.1.drv"
    code, line = fails("--from-nix", drv, "--out", tmp_path / "x.tar")
    assert code == 1
    assert line.startswith(f"error: {drv}: realising a derivation needs Nix, and neither")


def test_only_the_nix_command_builds_a_derivation(store: Store, tmp_path: Path) -> None:
    """Where `nix` is installed without `nix-store`: `nix build --no-link --print-out-paths`."""
    log = store.bin / "calls"
    script = store.bin / "nix"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho {store.hello}\n')
    script.chmod(0o755)
    drv = store.dir / f"{nix_hash('drv')}-hello-2.12.1.drv"
    image = pack_nix(drv, closure_file=store.closure)
    assert image.root.path == store.hello
    assert log.read_text() == f"build --no-link --print-out-paths {drv}^*\n"


# --- refusals ------------------------------------------------------------------------------


def test_bad_store_paths_are_usage_errors(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "x.tar"
    short = store.dir / "abc-hello-1.0"
    alphabet = store.dir / ("e" * 32 + "-hello-1.0")
    missing = store.dir / f"{nix_hash('gone')}-gone-1.0"
    assert fails("--from-nix", tmp_path, "--out", out) == (
        2,
        f"error: {tmp_path}: not a Nix store path; it should be {store.dir}/<hash>-<name> (a "
        "build's `result` link, or what `nix build --print-out-paths` printed)",
    )
    assert fails("--from-nix", short, "--out", out) == (
        2,
        f"error: {short}: the hash 'abc' has 3 characters; a Nix store hash has 32",
    )
    assert fails("--from-nix", alphabet, "--out", out) == (
        2,
        f"error: {alphabet}: the hash {'e' * 32!r} has 'e', which are not in Nix's base32 "
        f"alphabet ({NIX_BASE32})",
    )
    assert fails("--from-nix", missing, "--out", out) == (
        2,
        f"error: {missing}: no such store path; build it first (`nix build`), or pass its "
        "derivation with --derivation",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "entry", ["../../../etc/passwd", "/bin/sh", "bin/../../x/bin/sh", "{python} -c 1"]
)
def test_entries_out_of_the_closure_are_usage_errors(
    store: Store, tmp_path: Path, entry: str
) -> None:
    code, line = fails(
        "--from-nix", store.hello, "--closure", store.closure, "--entry", entry,
        "--out", tmp_path / "x.tar",
    )  # fmt: skip
    program = entry.split()[0]
    assert (code, line) == (
        2,
        f"error: the entry {program!r} is not inside {store.hello.name} or its closure; give a "
        "path relative to the store path (bin/PROGRAM) or a store path of the closure",
    )


def test_a_missing_entry_is_a_usage_error(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "x.tar"
    args = ("--from-nix", store.hello, "--closure", store.closure, "--out", out)
    assert fails(*args, "--entry", "bin/nope") == (
        2,
        f"error: the entry 'bin/nope': there is no nix/store/{store.hello.name}/bin/nope in "
        "the closure",
    )
    (store.hello / "bin" / "hello").unlink()
    assert fails(*args) == (
        2,
        f"error: {store.hello} has no bin/hello; say what to run with --entry 'bin/PROGRAM ARGS'",
    )


def test_a_link_out_of_the_closure_is_refused(store: Store, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.write_text(f"{store.hello}\n")
    args = ("--from-nix", store.hello, "--out", tmp_path / "x.tar")
    hint = (
        "pass the whole closure with --closure (where Nix is installed it is computed), or fix "
        "the package"
    )
    relative = store.hello / "lib"
    assert fails(*args, "--closure", partial) == (
        2,
        f"error: {relative}: symlink to '../{store.greeting.name}/lib' points outside the "
        f"closure; {hint}",
    )
    relative.unlink()
    absolute = store.hello / "share" / "greeting"
    assert fails(*args, "--closure", partial) == (
        2,
        f"error: {absolute}: symlink to '{store.greeting}/lib/greeting.txt' points outside the "
        f"closure; {hint}",
    )
    absolute.unlink()
    absolute.symlink_to("/etc/passwd")
    assert fails(*args, "--closure", store.closure) == (
        2,
        f"error: {absolute}: symlink to '/etc/passwd' points outside the closure; {hint}",
    )
    assert not (tmp_path / "x.tar").exists()


def test_a_name_the_manifest_cannot_take_is_a_usage_error(store: Store, tmp_path: Path) -> None:
    code, line = fails(
        "--from-nix", store.hello, "--closure", store.closure, "--name", "no spaces",
        "--out", tmp_path / "x.tar",
    )  # fmt: skip
    assert code == 2
    assert line.startswith(f"error: {store.hello}: manifest.toml: 'name' must be")
    assert line.endswith("; pass --name or --version")


def test_pack_takes_a_directory_or_from_nix(store: Store, tmp_path: Path) -> None:
    code, _, err = mkctl_pack(tmp_path, "--from-nix", store.hello, "--out", tmp_path / "x")
    assert code == 2
    assert "pack takes an image directory or --from-nix PATH (one of them)" in err
    code, _, err = mkctl_pack("--from-nix", store.hello, "--sign-key", "k", "--out", "x")
    assert (code, err.splitlines()[-1]) == (
        2,
        "mkctl image pack: error: --sign-key and --cert go together",
    )


def test_parse_store_path_takes_a_trailing_slash(store: Store) -> None:
    assert parse_store_path(f"{store.hello}/").path == store.hello


def test_a_closure_without_its_root_is_a_usage_error(store: Store, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text(f"{store.greeting}\n")
    assert fails("--from-nix", store.hello, "--closure", other, "--out", tmp_path / "x") == (
        2,
        f"error: {store.hello} is not in its own closure ({other}): a wrong closure?",
    )


def _loader_and_libc() -> tuple[Path, Path]:
    """This machine's dynamic loader and libc, as `ldd /bin/echo` names them."""
    listed = subprocess.run(
        ["/usr/bin/ldd", "/bin/echo"], capture_output=True, text=True, check=True
    )
    paths = [Path(w) for w in listed.stdout.split() if w.startswith("/")]
    libc = next(p for p in paths if p.name.startswith("libc.so"))
    loader = next(p for p in paths if p.name.startswith("ld-"))
    return loader, libc


def test_an_elf_program_runs_through_the_closures_own_loader(store: Store, tmp_path: Path) -> None:
    """What docs/images.md says to do for a host without Nix: the entry runs the program with
    the loader of the closure's glibc (PT_INTERP names /nix/store, which such a host lacks)."""
    loader, libc = _loader_and_libc()
    glibc = store.dir / f"{nix_hash('glibc')}-glibc-2.39"
    (glibc / "lib").mkdir(parents=True)
    shutil.copy(loader, glibc / "lib" / loader.name)
    shutil.copy(libc, glibc / "lib" / libc.name)
    echo = store.dir / f"{nix_hash('echo')}-echo-1.0"
    (echo / "bin").mkdir(parents=True)
    shutil.copy("/bin/echo", echo / "bin" / "echo")
    closure = tmp_path / "closure"
    closure.write_text(f"{echo}\n{glibc}\n")
    entry = f"{glibc}/lib/{loader.name} --library-path {glibc}/lib {echo}/bin/echo hi"
    image = pack_nix(echo, closure_file=closure, entry=entry)
    archive = tmp_path / "echo.tar"
    archive.write_bytes(image.payload)
    loaded = load_image(archive, tmp_path / "unpacked", trusted_certs=[], allow_unsigned=True)
    shutil.rmtree(store.dir)
    argv = [arg.replace("{image}", str(loaded.path)) for arg in loaded.manifest.entry]
    assert argv[0] == f"{loaded.path}/nix/store/{glibc.name}/lib/{loader.name}"
    assert subprocess.run(argv, capture_output=True, text=True, env={}, check=True).stdout == "hi\n"
