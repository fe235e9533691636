"""The kernel seam over a Unix socket: a fake kernel served to other processes.

The fake kernel (`_mk_fake`) keeps its state in the process that made it: its overlay writes,
`kexec_file_load` and `reboot` are method calls there. A whole host (its own process, its
resource actor's process) runs over it only if those calls cross processes, as they cross into
the real kernel. `KernelServer(kernel, path)` serves any `MultikernelKernel` on a Unix socket (a
per-run path) from a thread, one thread per client; `RemoteKernel(path)` is the seam at the other
end, the same interface, so the platform is the same code. A host is pointed at it with
`--kernfs PATH-OF-THE-SOCKET` (`open_kernel`): the host can then be SIGKILLed while its
instances, the fake's processes, run on.

Each call is `<u32 length><msgpack [op, args]>`, the answer `<u32 length><msgpack {"ok": value}
| {"errno": n, "error": text}>`, so the kernel's errno reaches the caller as the `OSError` it would
get from the kernel. `kexec_file_load`'s kernel and initrd fds cross with SCM_RIGHTS, so the fake
reads what they are open on, as the kernel does. `info` tells the client where kerf's lock is and
where the fake's instances listen (the vsock stand-in's directory).
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Final

import msgspec

from multikernel.services._mk_kernel import MultikernelKernel, SysfsKernel
from multikernel.services._mk_vsock import Connector, UnixVsock, VsockConnector

_LENGTH: Final = struct.Struct(">I")
_MAX: Final = 16 << 20  # a DTBO or a device tree is far smaller
_OPS: Final = frozenset(
    {
        "read",
        "write",
        "listdir",
        "mkdir",
        "rmdir",
        "iomem",
        "kexec_file_load",
        "reboot",
        "signatures_enforced",
        "info",
    }
)


def open_kernel(kernfs: Path) -> MultikernelKernel:
    """The kernel at `kernfs`: its file system (`SysfsKernel`), or a fake kernel served on the
    Unix socket at that path (`RemoteKernel`)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(kernfs).st_mode):
            return RemoteKernel(kernfs)
    return SysfsKernel(kernfs)


def connector_for(kernel: MultikernelKernel) -> tuple[Connector, Path | None]:
    """How the host reaches the instances of `kernel` (AF_VSOCK, or a served fake's stand-in)
    and the directory standing in for memory both kernels map (the stand-in's; None: none)."""
    if isinstance(kernel, RemoteKernel) and kernel.vsock is not None:
        return UnixVsock(kernel.vsock), kernel.vsock
    return VsockConnector(), None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the other side closed")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, value: object, fds: list[int] | None = None) -> None:
    body = msgspec.msgpack.encode(value)
    data = _LENGTH.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class RemoteKernel:
    """The seam over a `KernelServer`'s socket; thread-safe (one call at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(str(path))
        info = self._call("info")
        self.lock_path = Path(info["lock_path"])
        self.vsock = Path(info["vsock"]) if info["vsock"] else None

    def close(self) -> None:
        self._sock.close()

    def _call(self, op: str, *args: object, fds: list[int] | None = None) -> Any:
        with self._lock:
            _send(self._sock, [op, list(args)], fds)
            (size,) = _LENGTH.unpack(_recv_exactly(self._sock, _LENGTH.size))
            answer = msgspec.msgpack.decode(_recv_exactly(self._sock, size))
        if "errno" in answer:
            raise OSError(answer["errno"], answer["error"])  # FileNotFoundError for ENOENT, …
        return answer["ok"]

    def read(self, path: str) -> bytes:
        data: bytes = self._call("read", path)
        return data

    def write(self, path: str, data: bytes) -> None:
        self._call("write", path, data)

    def listdir(self, path: str) -> list[str]:
        names: list[str] = self._call("listdir", path)
        return names

    def mkdir(self, path: str) -> None:
        self._call("mkdir", path)

    def rmdir(self, path: str) -> None:
        self._call("rmdir", path)

    def iomem(self) -> str:
        text: str = self._call("iomem")
        return text

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: bytes, flags: int) -> None:
        fds = [kernel_fd] if initrd_fd < 0 else [kernel_fd, initrd_fd]
        self._call("kexec_file_load", cmdline, flags, fds=fds)

    def reboot(self, cmd: int, instance_id: int) -> None:
        self._call("reboot", cmd, instance_id)

    def signatures_enforced(self) -> bool:
        return bool(self._call("signatures_enforced"))


class KernelServer:
    """Serves `kernel` on the Unix socket `path` (mode 0600) from a thread until closed; a
    context manager. `vsock` is the directory of the instances' vsock stand-in, if any."""

    def __init__(self, kernel: MultikernelKernel, path: Path, *, vsock: Path | None = None) -> None:
        self.kernel = kernel
        self.path = path
        self.vsock = vsock
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> KernelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                head, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, 2)
                if not head:
                    return
                try:
                    (size,) = _LENGTH.unpack(head + _recv_exactly(sock, _LENGTH.size - len(head)))
                    if size > _MAX:
                        return  # garbage: this client is done
                    answer = self._answer(_recv_exactly(sock, size), fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                _send(sock, answer)

    def _answer(self, body: bytes, fds: list[int]) -> dict[str, object]:
        try:
            op, args = msgspec.msgpack.decode(body, type=tuple[str, list[Any]])
        except msgspec.DecodeError as error:
            return {"errno": 22, "error": f"not a call: {error}"}
        if op not in _OPS:
            return {"errno": 22, "error": f"no such call {op!r}"}
        try:
            if op == "info":
                vsock = str(self.vsock) if self.vsock is not None else ""
                return {"ok": {"lock_path": str(self.kernel.lock_path), "vsock": vsock}}
            if op == "kexec_file_load":
                cmdline, flags = args
                initrd = fds[1] if len(fds) > 1 else -1
                if not fds:
                    return {"errno": 9, "error": "kexec_file_load needs the kernel's fd"}
                self.kernel.kexec_file_load(fds[0], initrd, bytes(cmdline), int(flags))
                return {"ok": None}
            return {"ok": getattr(self.kernel, op)(*args)}
        except OSError as error:
            return {"errno": error.errno or 5, "error": error.strerror or str(error)}
        except (TypeError, ValueError) as error:
            return {"errno": 22, "error": str(error)}
