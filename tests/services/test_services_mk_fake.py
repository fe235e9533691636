"""The fake multikernel kernel acts like the kernel's documented interfaces (docs/platform.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from multikernel.services import _mk_dt as dt
from multikernel.services._mk_fake import FakeMultikernel, KexecCall, RebootCall
from multikernel.services._mk_kernel import (
    REBOOT_CMD_BOOT,
    REBOOT_CMD_HALT_FORCE,
    kexec_flags,
)

MiB = 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> FakeMultikernel:
    return FakeMultikernel(tmp_path, cpus={1, 2, 3}, memory=[(0x1_0000_0000, 64 * MiB)])


def status(kernel: FakeMultikernel, name: str) -> str:
    return kernel.read(f"instances/{name}/status").decode().strip()


def create(
    kernel: FakeMultikernel, name: str = "web", cpus: frozenset[int] = frozenset({1})
) -> None:
    kernel.write("overlays/new", dt.create_overlay(name, 3, cpus, 16 * MiB))


def free_cpus(kernel: FakeMultikernel) -> list[int]:
    pool = dt.parse(kernel.read("device_tree")).child("resources")
    assert pool is not None
    return pool.cells("cpus-available")


def elf(tmp_path: Path) -> int:
    image = tmp_path / "vmlinux"
    image.write_bytes(b"\x7fELF" + bytes(60))
    return os.open(image, os.O_RDONLY)


def test_instance_create_makes_a_ready_instance_and_an_applied_transaction(kernel):
    create(kernel)
    assert status(kernel, "web") == "ready"
    assert kernel.read("instances/web/id") == b"3\n"
    assert sorted(kernel.listdir("overlays")) == ["new", "tx_1"]
    assert kernel.read("overlays/tx_1/status") == b"applied\n"
    assert kernel.read("overlays/tx_1/instance") == b"/instances\n"
    tree = dt.parse(kernel.read("instances/web/device_tree"))
    resources = tree.child("resources")
    assert resources is not None
    assert resources.cells("cpus") == [1]
    assert free_cpus(kernel) == [2, 3]
    assert "mk-instance-3" in kernel.iomem()


def test_rmdir_of_the_transaction_rolls_the_instance_back(kernel):
    create(kernel)
    kernel.rmdir("overlays/tx_1")
    assert "web" not in kernel.listdir("instances")
    assert "tx_1" not in kernel.listdir("overlays")
    assert free_cpus(kernel) == [1, 2, 3]


@pytest.mark.parametrize(
    ("overlay", "code"),
    [
        (b"not a device tree", errno.EINVAL),
        (dt.create_overlay("other", 4, frozenset({9}), 16 * MiB), errno.EINVAL),  # not in the pool
        (dt.create_overlay("other", 4, frozenset({1}), 16 * MiB), errno.EBUSY),  # lent to web
        (dt.create_overlay("web", 4, frozenset({2}), 16 * MiB), errno.EEXIST),
        (dt.create_overlay("other", 4, frozenset({2}), 1 << 30), errno.ENOMEM),
        (
            dt.update_overlay(
                "ghost", (frozenset({1}), MiB), (frozenset({1, 2}), MiB), regions=[], add_base=None
            ),
            errno.ENOENT,
        ),
    ],
)
def test_refused_overlays_fail_the_write_and_leave_a_failed_transaction(kernel, overlay, code):
    create(kernel)
    with pytest.raises(OSError) as refused:
        kernel.write("overlays/new", overlay)
    assert refused.value.errno == code
    failed = [d for d in kernel.listdir("overlays") if d not in ("new", "tx_1")]
    if overlay.startswith(b"\xd0\x0d\xfe\xed"):  # a blob: a transaction, failed
        assert [kernel.read(f"overlays/{d}/status") for d in failed] == [b"failed\n"]
        kernel.rmdir(f"overlays/{failed[0]}")
    else:  # not even a device tree: refused before any transaction
        assert failed == []
    assert sorted(kernel.listdir("instances")) == ["web"]
    assert free_cpus(kernel) == [2, 3]


def test_kernfs_refuses_mkdir_and_writes_outside_overlays_new(kernel):
    with pytest.raises(PermissionError):
        kernel.mkdir("instances/web")
    create(kernel)
    with pytest.raises(OSError) as refused:
        kernel.write("instances/web/status", b"active")
    assert refused.value.errno == errno.EINVAL


def test_load_boot_panic_and_halt_follow_the_kernel_states(kernel, tmp_path):
    create(kernel)
    fd = elf(tmp_path)
    try:
        kernel.kexec_file_load(fd, -1, b"console=ttyS0", kexec_flags(3, initramfs=False))
    finally:
        os.close(fd)
    assert status(kernel, "web") == "loaded"
    kernel.reboot(REBOOT_CMD_BOOT, 3)
    assert status(kernel, "web") == "active"
    with pytest.raises(OSError) as busy:
        kernel.rmdir("overlays/tx_1")  # would destroy an active instance
    assert busy.value.errno == errno.EBUSY
    kernel.panic("web")
    assert status(kernel, "web") == "loaded"
    kernel.reboot(REBOOT_CMD_BOOT, 3)
    kernel.reboot(REBOOT_CMD_HALT_FORCE, 3)
    assert status(kernel, "web") == "loaded"
    assert kernel.calls == [
        KexecCall(str(tmp_path / "vmlinux"), None, b"console=ttyS0", 0x10 | (3 << 5) | 0x4),
        RebootCall(0x4D4B4C49, 3),
        RebootCall(0x4D4B4C49, 3),
        RebootCall(0x4D4B4C46, 3),
    ]


def test_kexec_refuses_an_unknown_instance_and_a_non_elf_image(kernel, tmp_path):
    create(kernel)
    (tmp_path / "bzImage").write_bytes(b"MZ" + bytes(62))
    fd = os.open(tmp_path / "bzImage", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as unknown:
            kernel.kexec_file_load(fd, -1, b"", kexec_flags(7))
        assert unknown.value.errno == errno.ENOENT
        with pytest.raises(OSError) as not_elf:
            kernel.kexec_file_load(fd, -1, b"", kexec_flags(3))
        assert not_elf.value.errno == errno.ENOEXEC
    finally:
        os.close(fd)


def test_kexec_flags_carry_the_instance_id_as_documented():
    assert kexec_flags(1) == 0x30
    assert kexec_flags(511) == 0x10 | (511 << 5)
    assert kexec_flags(5, unload=True) == 0x10 | (5 << 5) | 0x1
    with pytest.raises(ValueError):
        kexec_flags(512)


def test_our_kernel_abi_numbers_are_kerfs():
    """The flags and commands we pass are the ones kerf passes to the same kernel."""
    from kerf.kill import main as kill
    from kerf.load import main as load
    from kerf.start import main as start
    from kerf.unload import main as unload

    from multikernel.services import _mk_kernel as ours

    assert (ours.KEXEC_MULTIKERNEL, ours.KEXEC_MK_ID_MASK, ours.KEXEC_MK_ID_SHIFT) == (
        load.KEXEC_MULTIKERNEL, load.KEXEC_MK_ID_MASK, load.KEXEC_MK_ID_SHIFT,
    )  # fmt: skip
    assert (ours.KEXEC_FILE_NO_INITRAMFS, ours.KEXEC_FILE_UNLOAD) == (
        load.KEXEC_FILE_NO_INITRAMFS, unload.KEXEC_FILE_UNLOAD,
    )  # fmt: skip
    assert ours.kexec_flags(7) == load.KEXEC_MULTIKERNEL | load.KEXEC_MK_ID(7)
    assert (ours.REBOOT_MAGIC1, ours.REBOOT_MAGIC2) == (
        start.LINUX_REBOOT_MAGIC1, start.LINUX_REBOOT_MAGIC2,
    )  # fmt: skip
    assert ours.REBOOT_CMD_BOOT == start.LINUX_REBOOT_CMD_MULTIKERNEL
    assert (ours.REBOOT_CMD_HALT, ours.REBOOT_CMD_HALT_FORCE) == (
        kill.LINUX_REBOOT_CMD_MULTIKERNEL_HALT, kill.LINUX_REBOOT_CMD_MULTIKERNEL_HALT_FORCE,
    )  # fmt: skip


def test_device_overlays_lend_the_pools_devices_and_refuse_the_rest(tmp_path):
    kernel = FakeMultikernel(tmp_path, cpus={1, 2}, devices={"nvme0": "0000:01:00.0"})
    pool = dt.parse(kernel.read("device_tree")).child("resources")
    assert pool is not None
    devices = pool.child("devices")
    assert devices is not None
    assert [(d.name, d.string("pci-id")) for d in devices.children] == [("nvme0", "0000:01:00.0")]
    kernel.write("overlays/new", dt.create_overlay("web", 3, frozenset({1}), 16 * MiB))
    kernel.write("overlays/new", dt.create_overlay("db", 4, frozenset({2}), 16 * MiB))

    def lend(name: str, before: set[str], after: set[str]) -> None:
        cpus = frozenset({1 if name == "web" else 2})
        overlay = dt.update_overlay(
            name, (cpus, 16 * MiB), (cpus, 16 * MiB), regions=[], add_base=None,
            devices=(frozenset(before), frozenset(after)),
        )  # fmt: skip
        kernel.write("overlays/new", overlay)

    lend("web", set(), {"0000:01:00.0"})
    web = dt.parse(kernel.read("instances/web/device_tree")).child("resources")
    assert web is not None
    assert web.strings("devices") == ["0000:01:00.0"]
    with pytest.raises(OSError) as busy:
        lend("db", set(), {"0000:01:00.0"})  # lent to web
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(OSError) as unknown:
        lend("db", set(), {"0000:02:00.0"})  # not in the pool
    assert unknown.value.errno == errno.ENODEV
    with pytest.raises(OSError) as not_its:
        lend("db", {"0000:01:00.0"}, set())  # removing a device db does not have
    assert not_its.value.errno == errno.EINVAL
    kernel.rmdir("overlays/tx_3")  # web's device-add, rolled back
    lend("db", set(), {"0000:01:00.0"})


@pytest.mark.anyio
async def test_a_host_that_enforces_signatures_loads_only_a_signed_vmlinux(tmp_path):
    """kerf's check (`kexec_signatures_enforced`, through the seam) before the load; the kernel's
    own refusals (here the fake's, as a locked-down kernel's) with what to do."""
    from multikernel.services._mk_steps import BootImage, KernelSteps
    from multikernel.services._platform import PlatformError
    from multikernel.services._signature import make_signing_key, sign

    key, cert = make_signing_key("kernel", algorithm="ec-p256")
    other_key, other_cert = make_signing_key("someone else", algorithm="ec-p256")
    kernel = FakeMultikernel(tmp_path / "m", cpus={1}, trusted=[cert])
    assert kernel.signatures_enforced()
    kernel.write("overlays/new", dt.create_overlay("web", 3, frozenset({1}), 16 * MiB))
    vmlinux = b"\x7fELF" + bytes(60)
    images = {
        "plain": vmlinux,
        "bzImage": bytes(0x202) + b"HdrS" + bytes(600),
        "foreign": sign(vmlinux, other_key, other_cert),
        "tampered": sign(vmlinux, key, cert).replace(bytes(60), b"\1" * 60, 1),
        "signed": sign(vmlinux, key, cert),
    }
    refusals = {}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        try:
            await KernelSteps(kernel, BootImage(tmp_path / name)).load("web", 3)
        except PlatformError as error:
            refusals[name] = str(error).removeprefix("cannot load a kernel into 'web': ")
    assert refusals == {
        "plain": f"this host enforces kernel signatures and {tmp_path / 'plain'} is not signed: "
        "sign it (kerf sign)",
        "bzImage": f"this host enforces kernel signatures and {tmp_path / 'bzImage'} is a "
        "bzImage, whose extracted vmlinux is unsigned: give a signed ELF vmlinux (kerf sign)",
        "foreign": "ENOKEY: the kernel image's signer is not trusted by this host (enroll its "
        "certificate, e.g. as a MOK)",
        "tampered": "EBADMSG: the kernel image's signature does not match it (re-sign it: kerf "
        "sign)",
    }
    assert status(kernel, "web") == "loaded"
    # Refused before the kernel saw them: only the foreign, tampered and signed loads reached it.
    assert [c.kernel for c in kernel.calls if isinstance(c, KexecCall)] == [
        str(tmp_path / n) for n in ("foreign", "tampered", "signed")
    ]
