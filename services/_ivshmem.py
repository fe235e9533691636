"""An ivshmem server: shared memory and doorbell eventfds for QEMU's `ivshmem-doorbell` devices.

QEMU's `ivshmem-doorbell` device gets its shared memory and its interrupts from a server on a
UNIX socket (QEMU's docs/specs/ivshmem-spec.rst; Debian packages no server). The protocol is
one-way, 8-byte little-endian signed numbers, some carrying one fd (SCM_RIGHTS). To each client
that connects, in order: the protocol version (0); its peer id; -1 with the shared-memory fd;
for every other peer, its id once per vector, each with that peer's eventfd for the vector; then
its own id once per vector with its own eventfds (those it is interrupted through). Every other
client is then told of the new one the same way, and, when a client goes, its id with no fd.

The host process is peer 0 of its own server: it has eventfds like any peer (a guest rings it by
writing `(0 << 16) | vector` to its doorbell register, and QEMU writes that eventfd), and it
rings a guest by writing the guest's eventfd (`ring`), which QEMU turns into an MSI-X interrupt.
Clients get ids from 1 up, the lowest free one.

Nothing a client does can hurt the server or another client. A client sends nothing in this
protocol: a byte from it is garbage and ends its connection, as does its hanging up, at any
point of the handshake. Every send has a deadline, so a client that stops reading cannot hold
the server. At most `max_peers` clients are served; more are refused at once. The socket is
made 0600 (its directory should be ours alone), and a client whose uid is neither ours nor
root is refused. Every eventfd a peer had is closed when it goes; everything is closed, and the
socket removed, when the server's `async with` ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketStream

from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import wait_closed

log = get_logger("multikernel.services.ivshmem")

PROTOCOL_VERSION: Final = 0
HOST_PEER: Final = 0
MAX_PEER_ID: Final = 0xFFFF  # the doorbell register has 16 bits for it
#: How long one client may take to accept the handshake or a notification.
SEND_DEADLINE: Final = 5.0
_MESSAGE: Final = struct.Struct("<q")


@dataclass(frozen=True)
class Peer:
    """A peer of the server: its id and its eventfds, one per vector (the server owns them)."""

    id: int
    vectors: tuple[int, ...]


def make_peer(peer_id: int, vectors: int) -> Peer:
    """A peer with a fresh eventfd per vector (close them with `close_peer`)."""
    return Peer(peer_id, _eventfds(vectors))


def _eventfds(count: int) -> tuple[int, ...]:
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


def close_peer(peer: Peer) -> None:
    """Close a peer's eventfds (idempotent per fd: errors are ignored)."""
    for fd in peer.vectors:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Client:
    """One connected client: its stream, and its peer once the handshake made it one."""

    def __init__(self, stream: SocketStream, peer: Peer) -> None:
        self.stream = stream
        self.sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.peer = peer


class IvshmemServer:
    """The server (see the module docstring): `async with IvshmemServer(path, memory_fd):`.

    `memory_fd` is the shared memory every client maps (a sealed memfd: `Region.create`); the
    server does not own it. `vectors` is the number of interrupt vectors of every peer.
    """

    def __init__(
        self, path: Path, memory_fd: int, *, vectors: int = 1, max_peers: int = 16
    ) -> None:
        if not 1 <= vectors <= 64:
            raise ValueError(f"an ivshmem peer has 1 to 64 vectors, not {vectors}")
        if not 1 <= max_peers <= MAX_PEER_ID:
            raise ValueError(f"max_peers is 1 to {MAX_PEER_ID}, not {max_peers}")
        self.path = path
        self.memory_fd = memory_fd
        self.vectors = vectors
        self.max_peers = max_peers
        self.host = Peer(HOST_PEER, ())
        self._clients: dict[int, _Client] = {}  # by peer id, once announced
        self._pending = 0  # clients in their handshake
        self._lock = anyio.Lock()  # handshakes and notifications, one at a time
        self._changed = anyio.Condition()  # a peer joined or left
        self._tg: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.SocketListener | None = None

    @property
    def peers(self) -> Mapping[int, Peer]:
        """The connected clients' peers, by id (the host, peer 0, is `host`)."""
        return {peer_id: client.peer for peer_id, client in self._clients.items()}

    async def __aenter__(self) -> Self:
        self.host = Peer(HOST_PEER, _eventfds(self.vectors))
        try:
            self._listener = await anyio.create_unix_listener(self.path)
            os.chmod(self.path, 0o600)
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            await self._close()
            raise
        self._tg.start_soon(self._listener.serve, self._serve_client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            # Not the body's exception: it goes on as it is, never wrapped in a group.
            await self._tg.__aexit__(None, None, None)
        finally:
            await self._close()
        return None

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._listener is not None:
                await self._listener.aclose()
            for client in list(self._clients.values()):
                await client.stream.aclose()
                close_peer(client.peer)
            self._clients.clear()
            close_peer(self.host)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # -- serving ------------------------------------------------------------------------------

    def _next_id(self) -> int | None:
        for peer_id in range(1, MAX_PEER_ID + 1):
            if peer_id not in self._clients:
                return peer_id
        return None

    def _allowed(self, stream: SocketStream) -> bool:
        sock = stream.extra(SocketAttribute.raw_socket)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

    async def _serve_client(self, stream: SocketStream) -> None:
        async with stream:
            full = len(self._clients) + self._pending >= self.max_peers
            if not self._allowed(stream) or full:
                log.warning("ivshmem client refused", peers=len(self._clients))
                return
            self._pending += 1
            try:
                client = await self._join(stream)
            finally:
                self._pending -= 1
                with anyio.CancelScope(shield=True):
                    await self._notify()
            if client is None:
                return
            try:
                await self._watch(client)
            finally:
                await self._leave(client)

    async def _join(self, stream: SocketStream) -> _Client | None:
        """Hand a new client its handshake, then announce it; None if it went meanwhile."""
        async with self._lock:
            peer_id = self._next_id()
            if peer_id is None:
                return None
            peer = Peer(peer_id, _eventfds(self.vectors))
            client = _Client(stream, peer)
            sock = client.sock
            try:
                with anyio.fail_after(SEND_DEADLINE):
                    known = (self.host, *(c.peer for c in self._clients.values()))
                    await send_handshake(sock, peer, self.memory_fd, known)
            except (OSError, TimeoutError):
                log.info("ivshmem client left during its handshake", peer=peer_id)
                close_peer(peer)
                return None
            for other in list(self._clients.values()):
                await self._tell(other, functools.partial(_announce, other.sock, peer))
            self._clients[peer_id] = client
        log.info("ivshmem peer joined", peer=peer_id)
        return client

    async def _tell(self, client: _Client, send: Callable[[], Awaitable[None]]) -> None:
        """Send a notification to `client`; a client that cannot take it is disconnected."""
        try:
            with anyio.fail_after(SEND_DEADLINE):
                await send()
        except (OSError, TimeoutError):
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)  # its own task sees it and leaves

    async def _watch(self, client: _Client) -> None:
        """Return when the client hangs up, or sends anything (the protocol has it send none)."""
        with contextlib.suppress(OSError):
            if await wait_closed(client.sock):
                log.warning("ivshmem client sent data; disconnecting it", peer=client.peer.id)

    async def _leave(self, client: _Client) -> None:
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._clients.pop(client.peer.id, None)
                close_peer(client.peer)
                for other in list(self._clients.values()):
                    await self._tell(other, functools.partial(_send, other.sock, client.peer.id))
            await self._notify()
        log.info("ivshmem peer left", peer=client.peer.id)

    # -- for the host -------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_peer(self, peer_id: int | None = None) -> Peer:
        """The peer `peer_id` (default: the first client) once it has joined."""
        async with self._changed:
            while True:
                if peer_id is None and self._clients:
                    return next(iter(self._clients.values())).peer
                if peer_id is not None and peer_id in self._clients:
                    return self._clients[peer_id].peer
                await self._changed.wait()

    async def wait_until_gone(self, peer_id: int) -> None:
        """Return once peer `peer_id` is not connected (left, or never joined)."""
        async with self._changed:
            while peer_id in self._clients or self._pending:
                await self._changed.wait()

    def ring(self, peer_id: int, vector: int = 0) -> None:
        """Interrupt peer `peer_id` on `vector` (QEMU raises it in the guest as MSI-X)."""
        client = self._clients.get(peer_id)
        if client is None:
            raise LookupError(f"no ivshmem peer {peer_id} is connected")
        with contextlib.suppress(BlockingIOError):  # the counter is full: it is rung already
            os.eventfd_write(client.peer.vectors[vector], 1)


async def send_handshake(
    sock: socket.socket, peer: Peer, memory_fd: int, others: Iterable[Peer]
) -> None:
    """What a client hears on connecting: the version, its id, the memory, every other peer's
    eventfds, then its own (last: those it is interrupted through). `sock` is non-blocking."""
    await _send(sock, PROTOCOL_VERSION)
    await _send(sock, peer.id)
    await _send(sock, -1, memory_fd)
    for other in others:
        await _announce(sock, other)
    await _announce(sock, peer)


async def _send(sock: socket.socket, number: int, fd: int | None = None) -> None:
    """One message: `number`, with `fd` if given (the socket is non-blocking)."""
    message = _MESSAGE.pack(number)
    while True:
        try:
            sent = socket.send_fds(sock, [message], [] if fd is None else [fd], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        if sent != len(message):  # 8 bytes into a socket with room: all or nothing in practice
            raise BrokenPipeError("the ivshmem client's socket took part of a message")
        return


async def _announce(sock: socket.socket, peer: Peer) -> None:
    """`peer`'s id once per vector, each with the eventfd of that vector."""
    for fd in peer.vectors:
        await _send(sock, peer.id, fd)
