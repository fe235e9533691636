"""The kernel seam over a Unix socket (`_mk_remote`): the fake kernel served to other processes.

`RemoteKernel` must be the same seam as the fake itself: the same answers, the kernel's errno as
the same `OSError` subclass, `kexec_file_load`'s fds crossing so the fake records the files they
are open on. A client that sends garbage ends its own connection, never the server.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from multikernel.services import _mk_dt as dt
from multikernel.services._mk_fake import FakeMultikernel, KexecCall, RebootCall
from multikernel.services._mk_kernel import REBOOT_CMD_BOOT, SysfsKernel, kexec_flags
from multikernel.services._mk_remote import KernelServer, RemoteKernel, connector_for, open_kernel
from multikernel.services._mk_vsock import UnixVsock

MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeMultikernel, RemoteKernel]]:
    kernel = FakeMultikernel(tmp_path / "m", cpus={1, 2, 3}, memory=[(1 << 32, 64 * MiB)])
    with KernelServer(kernel, tmp_path / "k.sock", vsock=tmp_path) as server:
        remote = open_kernel(server.path)
        assert isinstance(remote, RemoteKernel)
        try:
            yield kernel, remote
        finally:
            remote.close()


def test_the_remote_seam_answers_as_the_fake_does(served, tmp_path):
    kernel, remote = served
    assert remote.lock_path == kernel.lock_path
    assert remote.signatures_enforced() is False
    assert remote.read("device_tree") == kernel.read("device_tree")
    remote.write("overlays/new", dt.create_overlay("web", 3, frozenset({1}), 16 * MiB))
    assert remote.read("instances/web/status") == b"ready\n"
    assert sorted(remote.listdir("overlays")) == ["new", "tx_1"]
    assert "mk-instance-3" in remote.iomem()
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    fd = os.open(tmp_path / "vmlinux", os.O_RDONLY)
    try:
        remote.kexec_file_load(fd, -1, b"quiet", kexec_flags(3, initramfs=False))
    finally:
        os.close(fd)
    remote.reboot(REBOOT_CMD_BOOT, 3)
    assert remote.read("instances/web/status") == b"active\n"
    assert kernel.calls == [
        KexecCall(str(tmp_path / "vmlinux"), None, b"quiet", kexec_flags(3, initramfs=False)),
        RebootCall(REBOOT_CMD_BOOT, 3),
    ]


def test_the_kernels_refusals_cross_as_the_same_errors(served):
    _, remote = served
    with pytest.raises(FileNotFoundError):
        remote.read("instances/ghost/status")
    with pytest.raises(PermissionError):
        remote.mkdir("instances/web")
    remote.write("overlays/new", dt.create_overlay("web", 3, frozenset({1}), 16 * MiB))
    with pytest.raises(OSError) as busy:
        remote.write("overlays/new", dt.create_overlay("db", 4, frozenset({1}), 16 * MiB))
    assert busy.value.errno == errno.EBUSY


def test_a_host_given_the_socket_gets_the_served_kernel_and_its_stand_in(served, tmp_path):
    _, remote = served
    connector, shared = connector_for(remote)
    assert isinstance(connector, UnixVsock)
    assert connector.directory == tmp_path
    assert shared == tmp_path
    assert isinstance(open_kernel(tmp_path / "m" / "kernfs"), SysfsKernel)


def test_a_client_sending_garbage_ends_its_own_connection_only(served, tmp_path):
    _, remote = served
    for garbage in (b"\xff\xff\xff\xff", struct.pack(">I", 3) + b"\xc1\xc1\xc1"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(str(tmp_path / "k.sock"))
            bad.sendall(garbage)
            bad.shutdown(socket.SHUT_WR)
            bad.settimeout(10)
            while bad.recv(4096):  # an error answer, then the end: nothing else happens
                pass
    assert remote.listdir("instances") == []  # the server still answers
