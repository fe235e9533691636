"""Guest images: the initramfs is reproducible and cached by content, and a guest boots to our
Python, whose first line reaches the host on the serial console."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from multikernel.services._qemu_image import (
    GuestImage,
    ImageBuildError,
    _Cpio,
    build_initramfs,
    fetch_kernel,
    guest_tree,
)
from multikernel.services._qemu_vm import Vm, VmConfig, qemu_argv


def _entries(archive: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, contents) of every entry of a gzip-compressed newc archive."""
    data = gzip.decompress(archive.read_bytes())
    entries, at = {}, 0
    while True:
        assert data[at : at + 6] == b"070701"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = data[at + 110 : at + 110 + name_size - 1].decode()
        at += 110 + name_size
        at += -at % 4
        contents = data[at : at + size]
        at += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, contents)


def test_cpio_entries_are_newc_and_aligned(tmp_path: Path) -> None:
    out = tmp_path / "a.cpio.gz"
    with gzip.open(out, "wb") as gz:
        cpio = _Cpio(gz)  # type: ignore[arg-type]
        cpio.file("/a/b/c.txt", b"hello", 0o644)
        cpio.symlink("/bin/sh", "busybox")
        cpio.close()
    assert _entries(out) == {"a": (0o040755, b""), "a/b": (0o040755, b""),
                             "a/b/c.txt": (0o100644, b"hello"), "bin": (0o040755, b""),
                             "bin/sh": (0o120777, b"busybox")}  # fmt: skip


def test_initramfs_is_reproducible_and_cached(guest_image: GuestImage, tmp_path: Path) -> None:
    """The same inputs make the same entries and contents (bytecode aside: marshal's output
    follows reference counts), kept under their digest and not rebuilt."""
    tree = guest_tree()
    assert "/init" in tree.data
    assert any(path.endswith("/multikernel/shm/_channel.py") for path in tree.files)
    assert any("/msgspec/_core" in path for path in tree.files)  # its C extension, copied
    assert not any("/site-packages/rich/" in path for path in tree.files)
    first, digest = build_initramfs(tmp_path)
    again, same = build_initramfs(tmp_path)
    assert (again, same) == (first, digest)
    assert digest == guest_image.digest
    ours, cached = _entries(first), _entries(guest_image.initramfs)
    assert list(ours) == list(cached)  # the same names, in the same order
    for name, (mode, contents) in ours.items():
        assert mode == cached[name][0]
        assert name.endswith(".pyc") or contents == cached[name][1], name
    assert ours["init"][0] & 0o777 == 0o755
    assert any(name.endswith("_channel.cpython-311.pyc") for name in ours)


def test_auto_takes_the_cached_kernel_without_asking_apt(tmp_path: Path) -> None:
    for release in ("6.1.0-1-cloud-amd64", "6.1.0-2-cloud-amd64"):
        (tmp_path / "kernel" / release).mkdir(parents=True)
        (tmp_path / "kernel" / release / "vmlinuz").write_bytes(b"kernel " + release.encode())
    newest = tmp_path / "kernel" / "6.1.0-1-cloud-amd64" / "vmlinuz"
    os.utime(newest, (2e9, 2e9))  # fetched last
    assert fetch_kernel(tmp_path) == (newest, "6.1.0-1-cloud-amd64")
    with pytest.raises(ImageBuildError, match="bad kernel release"):
        fetch_kernel(tmp_path, "../../etc")


def test_qemu_command_line(guest_image: GuestImage, tmp_path: Path) -> None:
    config = VmConfig(guest_image, memory_mib=256, cpus=2, args=(("mode", "echo"),),
                      ivshmem_socket=tmp_path / "ivshmem.sock")  # fmt: skip
    argv = qemu_argv(config)
    assert argv[argv.index("-m") + 1] == "256"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "mk.mode=echo" in argv[argv.index("-append") + 1]
    assert "ivshmem-doorbell,chardev=ivsh,vectors=1" in argv
    with pytest.raises(ValueError, match="bad guest argument"):
        VmConfig(guest_image, args=(("mode", "a b"),))


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_guest_boots_to_python(guest_image: GuestImage) -> None:
    """A real kernel boots our initramfs; guest Python's first line comes over the serial
    console, and the guest powers off by itself (QEMU exits 0)."""
    async with await Vm.start(VmConfig(guest_image)) as vm:
        line = await vm.console_line("hello")
        assert line.startswith("hello python 3.11")
        await vm.drain()
        assert await vm.wait() == 0
