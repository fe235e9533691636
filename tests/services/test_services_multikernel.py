"""The multikernel platform against the fake kernel: the lifecycle, grants, a panic, refusals.

The instance's userspace is a local process (`boot_init`: our in-instance init) reached over the
vsock stand-in; the agent here is a small program that answers on its bus fd and writes a line
to its output fd, so what crosses the "kernels" is checked byte for byte.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import anyio
import pytest

from multikernel.services import _mk_dt as dt
from multikernel.services._mk_fake import FakeMultikernel, KexecCall, RebootCall, boot_init
from multikernel.services._mk_kernel import (
    KEXEC_FILE_UNLOAD,
    KEXEC_MULTIKERNEL,
    REBOOT_CMD_BOOT,
    REBOOT_CMD_HALT_FORCE,
)
from multikernel.services._mk_vsock import UnixVsock
from multikernel.services._multikernel import KERNEL_DOWN, BootImage, MultikernelPlatform
from multikernel.services._platform import (
    InvalidSpecError,
    LaunchError,
    LaunchSpec,
    PlatformError,
    Resources,
)

pytestmark = pytest.mark.anyio

MiB = 1 << 20
POOL = 0x1_0000_0000
AGENT = r"""
import os, signal, socket, sys
bus = socket.socket(fileno=int(os.environ["BUS_FD"]))
os.write(int(os.environ["OUT_FD"]), b"hello from instance %d\n" % int(os.environ["ID"]))
data = bus.recv(100)
bus.sendall(data.upper())
if os.environ.get("EXIT"):
    sys.exit(int(os.environ["EXIT"]))
signal.pause()
"""


@pytest.fixture
def vsock() -> Iterator[UnixVsock]:
    """The stand-in's sockets in a short directory of this test's own (Unix paths are short)."""
    directory = Path(tempfile.mkdtemp(prefix="mkvs-"))
    try:
        yield UnixVsock(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def kernel(tmp_path: Path, vsock: UnixVsock) -> Iterator[FakeMultikernel]:
    with FakeMultikernel(
        tmp_path / "machine", cpus={1, 2, 3}, memory=[(POOL, 256 * MiB)], boot=boot_init(vsock)
    ) as fake:
        yield fake


@pytest.fixture
def image(tmp_path: Path) -> BootImage:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "initrd").write_bytes(b"070701")
    return BootImage(tmp_path / "vmlinux", tmp_path / "initrd", "console=hvc0")


@pytest.fixture
async def platform(
    kernel: FakeMultikernel, image: BootImage, vsock: UnixVsock
) -> AsyncIterator[MultikernelPlatform]:
    async with MultikernelPlatform(kernel, image, connector=vsock, poll=0.01) as mk:
        yield mk


class Wiring:
    """The host's ends of what an agent gets: a bus socket and an output pipe."""

    def __init__(self) -> None:
        self.bus, self._theirs = socket.socketpair()
        self.output, self._output_w = os.pipe()

    def spec(self, name: str = "web", instance_id: int = 3, **env: str) -> LaunchSpec:
        fds = (self._theirs.fileno(), self._output_w, self.output)
        environ = {"BUS_FD": str(fds[0]), "OUT_FD": str(fds[1]), "ID": str(instance_id), **env}
        resources = Resources(frozenset({1}), 16 * MiB)
        return LaunchSpec(name, instance_id, [sys.executable, "-c", AGENT], environ, fds, resources)

    def launched(self) -> None:
        """What the supervisor does once launch returns: the agent holds its ends now."""
        self._theirs.close()
        os.close(self._output_w)

    def close(self) -> None:
        for sock in (self.bus, self._theirs):
            sock.close()
        for fd in (self.output, self._output_w):
            with contextlib.suppress(OSError):  # closed by `launched` already
                os.close(fd)


@pytest.fixture
def wiring() -> Iterator[Wiring]:
    wires = Wiring()
    try:
        yield wires
    finally:
        wires.close()


async def read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        await anyio.wait_readable(fd)
        line += os.read(fd, 100)
    return line


async def exchange(wiring: Wiring, data: bytes) -> bytes:
    wiring.bus.setblocking(False)
    wiring.bus.send(data)
    await anyio.wait_readable(wiring.bus)
    return wiring.bus.recv(100)


def status(kernel: FakeMultikernel, name: str) -> str:
    try:
        return kernel.read(f"instances/{name}/status").decode().strip()
    except FileNotFoundError:
        return "absent"


def transactions(kernel: FakeMultikernel) -> list[str]:
    return sorted(d for d in kernel.listdir("overlays") if d.startswith("tx_"))


async def test_the_full_lifecycle_drives_the_kernel_with_the_documented_calls(
    platform, kernel, wiring, tmp_path
):
    with anyio.fail_after(30):
        proc = await platform.launch(wiring.spec())
        wiring.launched()
        assert status(kernel, "web") == "active"
        assert await read_line(wiring.output) == b"hello from instance 3\n"
        assert await exchange(wiring, b"ping") == b"PING"
        report = platform.inspect(proc)
        assert (report.affinity, report.memory_limit) == (frozenset({1}), 16 * MiB)
        assert report.own_pid_namespace

        await platform.update(proc, Resources(frozenset({1, 2}), 32 * MiB))
        assert platform.steps.held("web")[0] == frozenset({1, 2})
        assert sum(size for _, size in platform.steps.held("web")[1]) == 32 * MiB

        await platform.kill(proc)
        assert await platform.wait(proc) == -9
        assert status(kernel, "web") == "loaded"
        await platform.reclaim(proc)
        await platform.reclaim(proc)  # idempotent

    assert status(kernel, "web") == "absent"
    assert transactions(kernel) == []
    assert "mk-instance" not in kernel.iomem()
    load = 0x10 | (3 << 5)  # KEXEC_MULTIKERNEL | KEXEC_MK_ID(3), with an initramfs
    assert kernel.calls == [
        KexecCall(str(tmp_path / "vmlinux"), str(tmp_path / "initrd"), b"console=hvc0", load),
        RebootCall(0x4D4B4C49, 3),  # MULTIKERNEL: boot
        RebootCall(0x4D4B4C46, 3),  # MULTIKERNEL_HALT_FORCE
        KexecCall(str(tmp_path / "vmlinux"), str(tmp_path / "initrd"), b"console=hvc0", load | 1),
    ]
    assert (KEXEC_MULTIKERNEL, KEXEC_FILE_UNLOAD) == (0x10, 0x1)
    assert (REBOOT_CMD_BOOT, REBOOT_CMD_HALT_FORCE) == (0x4D4B4C49, 0x4D4B4C46)


async def test_an_agent_that_exits_reports_its_status_through_the_init(platform, wiring):
    with anyio.fail_after(30):
        async with await platform.launch(wiring.spec(EXIT="3")) as proc:
            wiring.launched()
            assert await exchange(wiring, b"bye") == b"BYE"
            assert await platform.wait(proc) == 3


async def test_a_kernel_panic_ends_the_launch(platform, kernel, wiring):
    with anyio.fail_after(30):
        async with await platform.launch(wiring.spec()) as proc:
            wiring.launched()
            assert await read_line(wiring.output) == b"hello from instance 3\n"
            kernel.panic("web")
            assert await platform.wait(proc) == KERNEL_DOWN
            assert status(kernel, "web") == "loaded"
            assert await wiring_closed(wiring)
    assert status(kernel, "web") == "absent"


async def wiring_closed(wiring: Wiring) -> bool:
    """The agent's bus stream ends on the host when its kernel went down."""
    wiring.bus.setblocking(False)
    await anyio.wait_readable(wiring.bus)
    return wiring.bus.recv(100) == b""


async def test_busy_cpus_refuse_the_launch_and_leave_nothing(platform, kernel, wiring):
    kernel.write("overlays/new", dt.create_overlay("other", 7, frozenset({1}), 16 * MiB))
    with anyio.fail_after(30), pytest.raises(LaunchError) as refused:
        await platform.launch(wiring.spec())
    assert str(refused.value).startswith(
        "cannot create instance 'web': EBUSY: a CPU or memory range it names is lent to another"
    )
    assert transactions(kernel) == ["tx_1"]  # other's; web's failed one is cleared
    assert status(kernel, "web") == "absent"
    assert kernel.calls == []


async def test_a_kernel_image_the_kernel_refuses_rolls_the_instance_back(
    kernel, vsock, wiring, tmp_path
):
    (tmp_path / "bzImage").write_bytes(b"MZ" + bytes(62))
    async with MultikernelPlatform(kernel, BootImage(tmp_path / "bzImage"), connector=vsock) as mk:
        with anyio.fail_after(30), pytest.raises(LaunchError) as refused:
            await mk.launch(wiring.spec())
    assert "ENOEXEC: the kernel image is not an ELF vmlinux" in str(refused.value)
    assert status(kernel, "web") == "absent"
    assert transactions(kernel) == []


async def test_a_bad_overlay_and_an_unknown_instance_are_clear_errors(platform, kernel):
    with pytest.raises(PlatformError) as bad:
        await platform.steps.apply("cannot apply", b"\xd0\x0d\xfe\xed" + bytes(60))
    assert str(bad.value) == "cannot apply: EINVAL: the kernel refused it as invalid (see dmesg)"
    grow = dt.update_overlay(
        "ghost", (frozenset({1}), MiB), (frozenset({1, 2}), MiB), regions=[], add_base=None
    )
    with pytest.raises(PlatformError) as unknown:
        await platform.steps.apply("cannot give 'ghost' its new resources", grow)
    assert str(unknown.value).startswith("cannot give 'ghost' its new resources: ENOENT")
    with pytest.raises(PlatformError, match="no instance 'ghost' in the kernel"):
        platform.steps.held("ghost")
    assert transactions(kernel) == []


async def test_a_refused_grant_is_undone_and_the_instance_keeps_what_it_had(
    platform, kernel, wiring
):
    kernel.write("overlays/new", dt.create_overlay("other", 7, frozenset({3}), 16 * MiB))
    with anyio.fail_after(30):
        async with await platform.launch(wiring.spec()) as proc:
            wiring.launched()
            before = transactions(kernel)
            with pytest.raises(PlatformError, match="EBUSY"):
                await platform.update(proc, Resources(frozenset({1, 2, 3}), 64 * MiB))
            assert platform.steps.held("web")[0] == frozenset({1})
            assert sum(size for _, size in platform.steps.held("web")[1]) == 16 * MiB
            assert transactions(kernel) == before
            assert proc.resources == Resources(frozenset({1}), 16 * MiB)

            tx = await platform.steps.grant("web", Resources(frozenset({1, 2}), 16 * MiB))
            assert tx is not None
            await platform.steps.rollback(tx)  # rmdir tx_<N>: the CPU goes back to the pool
            assert platform.steps.held("web")[0] == frozenset({1})


async def test_specs_the_kernel_cannot_take_are_refused_before_anything(platform, wiring):
    with pytest.raises(InvalidSpecError, match="1 to 511"):
        await platform.launch(wiring.spec(instance_id=512))


async def test_a_grant_the_kernel_did_not_apply_as_asked_is_rolled_back(
    platform, kernel, wiring, monkeypatch
):
    with anyio.fail_after(30):
        async with await platform.launch(wiring.spec()):
            wiring.launched()
            before = transactions(kernel)
            truth = platform.steps.held
            calls = iter([truth("web"), (frozenset({1}), truth("web")[1])])
            monkeypatch.setattr(
                platform.steps, "held", lambda name: next(calls)
            )  # a lying read-back
            with pytest.raises(PlatformError) as wrong:
                await platform.steps.grant("web", Resources(frozenset({1, 2}), 16 * MiB))
            monkeypatch.undo()
            expected = "holds CPUs [1] and devices [], not [1, 2] and []: rolled back"
            assert expected in str(wrong.value)
            assert transactions(kernel) == before
            assert platform.steps.held("web")[0] == frozenset({1})


class RecordingSocket:
    """What `VsockConnector` does to its socket, with no vsock transport needed."""

    made: ClassVar[list[RecordingSocket]] = []

    def __init__(self, family: int, kind: int) -> None:
        self.family, self.kind, self.calls = family, kind, []
        RecordingSocket.made.append(self)

    def setsockopt(self, *args: int) -> None:
        self.calls.append(("setsockopt", args))

    def bind(self, address: tuple[int, int]) -> None:
        self.calls.append(("bind", address))
        if address[1] == 1023:
            raise OSError(98, "Address already in use")  # kerf exec holds it: take the next

    def connect(self, address: tuple[int, int]) -> None:
        self.calls.append(("connect", address))

    def close(self) -> None:
        self.calls.append(("close", ()))


def test_the_vsock_connector_uses_the_multikernel_transport_from_a_reserved_port(monkeypatch):
    from multikernel.services import _mk_vsock

    RecordingSocket.made.clear()
    fake = SimpleNamespace(**{n: getattr(socket, n) for n in dir(socket) if n.isupper()})
    fake.socket = RecordingSocket
    monkeypatch.setattr(_mk_vsock, "socket", fake)  # this module's sockets only
    _mk_vsock.VsockConnector._connect(5, 1022)
    (made,) = RecordingSocket.made
    assert made.family == socket.AF_VSOCK
    assert made.calls == [
        ("setsockopt", (socket.AF_VSOCK, 9, 1)),  # SO_VM_SOCKETS_TRANSPORT = multikernel
        ("bind", (socket.VMADDR_CID_ANY, 1023)),
        ("bind", (socket.VMADDR_CID_ANY, 1022)),  # reserved: only root binds it
        ("connect", (5, 1022)),  # CID = the instance id
    ]


async def test_the_real_kernel_seam_reads_and_writes_under_its_root(tmp_path):
    from multikernel.services._mk_kernel import SysfsKernel

    (tmp_path / "instances" / "web").mkdir(parents=True)
    (tmp_path / "instances" / "web" / "status").write_text("active\n")
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "new").write_bytes(b"")
    real = SysfsKernel(tmp_path, lock_path=tmp_path / "kerf.lock")
    assert real.read("instances/web/status") == b"active\n"
    assert real.listdir("instances") == ["web"]
    real.write("overlays/new", b"\xd0\x0d\xfe\xed")
    assert (tmp_path / "overlays" / "new").read_bytes() == b"\xd0\x0d\xfe\xed"


def bzimage(vmlinux: bytes) -> bytes:
    """A bzImage (x86 boot protocol 2.15) whose gzip payload is `vmlinux`."""
    payload = gzip.compress(vmlinux)
    image = bytearray(1024)  # the boot sector and one setup sector
    image[0x1F1] = 1  # setup_sects
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")
    image[0x248:0x250] = (0).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    return bytes(image) + payload


async def test_a_bzimage_is_loaded_as_the_vmlinux_kerf_extracts(kernel, vsock, wiring, tmp_path):
    (tmp_path / "bzImage").write_bytes(bzimage(b"\x7fELF\x02\x01" + bytes(58)))
    image = BootImage(tmp_path / "bzImage", cmdline="quiet")
    async with MultikernelPlatform(kernel, image, connector=vsock, poll=0.01) as mk:
        with anyio.fail_after(30):
            async with await mk.launch(wiring.spec()):
                wiring.launched()
                assert status(kernel, "web") == "active"
    (load, *_) = kernel.calls
    assert isinstance(load, KexecCall)
    assert load.kernel.startswith("/memfd:kerf-vmlinux")
    assert load.flags == 0x10 | (3 << 5) | 0x4  # no initrd: KEXEC_FILE_NO_INITRAMFS


def test_the_real_seam_makes_its_system_calls_through_kerf(monkeypatch, tmp_path):
    from kerf.kill import main as kill
    from kerf.load import main as load
    from kerf.start import main as start

    from multikernel.services._mk_kernel import REBOOT_CMD_HALT, SysfsKernel, kexec_flags

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(load, "kexec_file_load", lambda *a: calls.append(("kexec", *a)))
    monkeypatch.setattr(start, "boot_multikernel", lambda i: calls.append(("boot", i)))
    monkeypatch.setattr(kill, "halt_multikernel", lambda i, force: calls.append(("halt", i, force)))
    real = SysfsKernel(tmp_path, lock_path=tmp_path / "kerf.lock")
    real.kexec_file_load(5, -1, b"quiet", kexec_flags(3))
    real.reboot(REBOOT_CMD_BOOT, 3)
    real.reboot(REBOOT_CMD_HALT, 3)
    real.reboot(REBOOT_CMD_HALT_FORCE, 3)
    assert calls == [
        ("kexec", 5, -1, "quiet", 0x10 | 3 << 5),
        ("boot", 3),
        ("halt", 3, False),
        ("halt", 3, True),
    ]
