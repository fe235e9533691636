"""A fake ivshmem client (what QEMU's ivshmem-doorbell device does on its socket), blocking.

Used from async tests through `anyio.to_thread.run_sync`. It keeps every fd it receives and
closes them all in `close()`, so the suite's fd leak check sees what the server leaks, not us.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

_MESSAGE = struct.Struct("<q")


@dataclass
class Handshake:
    version: int
    peer_id: int
    memory_fd: int
    peers: dict[int, list[int]] = field(default_factory=dict)  # other peers' eventfds
    own: list[int] = field(default_factory=list)  # our own, rung by the others


class FakeClient:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.fds: list[int] = []
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise

    def message(self) -> tuple[int, int | None]:
        """The next message, (number, fd or None); EOFError when the server hung up."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 8, 4)
        except ConnectionResetError:  # the server hung up with our bytes unread
            raise EOFError from None
        self.fds.extend(fds)
        if not data:
            raise EOFError
        assert len(data) == 8, data
        assert len(fds) <= 1, fds
        return _MESSAGE.unpack(data)[0], fds[0] if fds else None

    def handshake(self, vectors: int) -> Handshake:
        version, _ = self.message()
        peer_id, _ = self.message()
        minus_one, memory = self.message()
        assert minus_one == -1
        assert memory is not None
        shake = Handshake(version, peer_id, memory)
        while len(shake.own) < vectors:
            number, fd = self.message()
            assert fd is not None, f"a notification without fd during the handshake: {number}"
            if number == peer_id:
                shake.own.append(fd)
            else:
                shake.peers.setdefault(number, []).append(fd)
        return shake

    def until_closed(self) -> None:
        """Read (and keep) messages until the server hangs up."""
        try:
            while True:
                self.message()
        except EOFError:
            return

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def readable_count(fd: int) -> int:
    """An eventfd's counter, read (and so cleared); 0 if nothing was written."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
