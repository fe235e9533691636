"""The host's stream to an instance's agent across kernels: AF_VSOCK, or a stand-in for tests.

On a multikernel machine userspace reaches another kernel over AF_VSOCK with the kernel's
multikernel transport: CID = the instance id, `setsockopt(AF_VSOCK, SO_VM_SOCKETS_TRANSPORT=9,
1)`, and a source port below 1024, which only root can bind, so the instance's init knows the
host's root is calling (as `kerf exec` does with kerf-init on port 1023). `VsockConnector` is that
(`connect`); `UnixVsock` is the stand-in with the same interface for machines without the
transport (this kernel has AF_VSOCK but no loopback transport): (cid, port) is a Unix socket
`vsock-<cid>-<port>` in a directory of the test's own, and `listen` is the instance's side.

`relay` copies bytes between the host's end of a passed fd and the instance's stream. It carries no
fds (SCM_RIGHTS does not cross kernels): what needs shared memory across kernels needs DAX
regions (docs/platform.md, "multikernel").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
from pathlib import Path
from typing import Final, Protocol

import anyio
import anyio.to_thread

#: SO_VM_SOCKETS_TRANSPORT and the multikernel transport's number (include/linux/multikernel.h).
SO_VM_SOCKETS_TRANSPORT: Final = 9
VSOCK_TRANSPORT_MULTIKERNEL: Final = 1
#: The port our in-instance init (`_mk_init`) listens on; kerf-init has 1023.
AGENT_PORT: Final = 1022
_RESERVED: Final = range(1023, 511, -1)  # source ports tried, as kerf does


class Connector(Protocol):
    """How the host opens a stream to port `port` of instance `cid`."""

    async def connect(self, cid: int, port: int) -> socket.socket: ...


class VsockConnector:
    """AF_VSOCK over the kernel's multikernel transport, from a reserved port (needs root)."""

    async def connect(self, cid: int, port: int) -> socket.socket:
        return await anyio.to_thread.run_sync(self._connect, cid, port)

    @staticmethod
    def _connect(cid: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_TRANSPORT, VSOCK_TRANSPORT_MULTIKERNEL)
            _bind_reserved(sock)
            sock.connect((cid, port))
        except BaseException:
            sock.close()
            raise
        return sock


def _bind_reserved(sock: socket.socket) -> None:
    for source in _RESERVED:
        try:
            sock.bind((socket.VMADDR_CID_ANY, source))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
        else:
            return
    raise OSError(errno.EADDRINUSE, "no free reserved vsock port (512-1023)")


class UnixVsock:
    """The stand-in: (cid, port) is the Unix socket `<directory>/vsock-<cid>-<port>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, cid: int, port: int) -> Path:
        return self.directory / f"vsock-{cid}-{port}"

    async def connect(self, cid: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await anyio.to_thread.run_sync(_blocking_connect, sock, str(self.path(cid, port)))
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, cid: int, port: int) -> socket.socket:
        """The instance's side: a listening socket for (cid, port)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.path(cid, port)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock.bind(str(path))
        sock.listen(8)
        return sock


def _blocking_connect(sock: socket.socket, path: str) -> None:
    sock.setblocking(True)
    try:
        sock.connect(path)
    finally:
        sock.setblocking(False)


async def relay(host: int, instance: int, *, both_ways: bool = True) -> None:
    """Copy bytes from the instance's stream to `host` (and back, `both_ways`) until one side
    ends or breaks. Both fds must be non-blocking; neither is closed here."""
    async with anyio.create_task_group() as tg:

        async def pump(src: int, dst: int) -> None:
            try:
                while True:
                    await anyio.wait_readable(src)
                    try:
                        data = os.read(src, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        break
                    view = memoryview(data)
                    while view:
                        await anyio.wait_writable(dst)
                        try:
                            view = view[os.write(dst, view) :]
                        except BlockingIOError:
                            continue
            except OSError:
                pass  # one side broke: the relay ends; the instance's watcher says why
            tg.cancel_scope.cancel()

        tg.start_soon(pump, instance, host)
        if both_ways:
            tg.start_soon(pump, host, instance)


async def send_line(stream: socket.socket, value: object) -> None:
    """One JSON line (how each stream to an instance's init says what it is)."""
    data = memoryview(json.dumps(value).encode() + b"\n")
    while data:
        await anyio.wait_writable(stream)
        with contextlib.suppress(BlockingIOError):
            data = data[stream.send(data) :]


def crossing(fd: int) -> str:
    """How an fd the agent gets crosses to its kernel: `rw` (a socket: relayed both ways), `w`
    (a pipe it writes: relayed to here), `hold` (anything else: a pipe of its own there)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return "rw"
    if stat.S_ISFIFO(mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        return "w"
    return "hold"
