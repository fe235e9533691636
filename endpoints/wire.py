"""The wire, as both sides of the bus make it: the control socket (where it is and how frames
with fds cross it) and the request frame every endpoint sends, real or in-memory.

The socket carries only what shared memory cannot: file descriptors. Every message on it is one
envelope frame (length-prefixed, so a short read is detected) sent with the fds of one channel
handle: the session channel at attach, then a ``ChannelReady`` for each direct channel the hub
sets up. Everything else travels on the session channel (a shared-memory ring pair).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

import anyio

from multikernel.protocol import Kind, MalformedFrameError, encode
from multikernel.shm import ChannelHandle

ENV_SOCKET = "MULTIKERNEL_BUS"
ENV_FD = "MULTIKERNEL_BUS_FD"
HANDLE_FDS = ChannelHandle.FDS  # region, four doorbell pipe ends, liveness
_LENGTH = struct.Struct("<I")


def default_socket_path() -> Path:
    """$MULTIKERNEL_BUS, else /run/multikernel/bus.sock as root, else a per-user runtime dir."""
    if env := os.environ.get(ENV_SOCKET):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/multikernel/bus.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/multikernel-{os.geteuid()}"
    return Path(runtime) / "multikernel" / "bus.sock"


async def send_handle(sock: socket.socket, frame: bytes, handle: ChannelHandle) -> None:
    """Send one frame with the fds of `handle` (which the caller still closes afterwards)."""
    await send_with_fds(sock, frame, handle.fds)


async def send_with_fds(sock: socket.socket, frame: bytes, fds: list[int]) -> None:
    """Send one frame with `fds` (which the caller still closes afterwards).

    `sock` is non-blocking; we wait with `anyio.wait_writable`, so this works under any loop.
    """
    message = _LENGTH.pack(len(frame)) + frame
    while True:
        try:
            sent = socket.send_fds(sock, [message], fds, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        if sent != len(message):  # a few hundred bytes into an empty socket buffer
            raise MalformedFrameError("the control socket took only part of a frame")
        return


async def receive_handle(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one frame and the fds that came with it (we own them): a channel handle's six,
    one socket for an attachment, or none with an ERROR frame (the hub refusing us); the caller
    checks the count against the frame's role.

    Raises `anyio.EndOfStream` when the peer closed the socket.
    """
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, HANDLE_FDS)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        break
    if not message and not fds:
        raise anyio.EndOfStream
    for fd in fds:
        os.set_inheritable(fd, False)
    problem = None
    if len(message) < _LENGTH.size:
        problem = f"{len(message)} bytes with {len(fds)} fds, not a frame"
    elif _LENGTH.unpack_from(message)[0] != len(message) - _LENGTH.size:
        problem = "a frame whose length prefix does not match what arrived"
    if problem is not None:
        close_fds(fds)
        raise MalformedFrameError(f"control socket carried {problem}")
    return message[_LENGTH.size :], fds


async def wait_closed(sock: socket.socket) -> bool:
    """Wait until the peer closes `sock` (False) or writes on it (True); nothing is consumed.

    For a socket the peer should never write on: the caller decides what a byte means.
    """
    while True:
        await anyio.wait_readable(sock)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            return False
        return bool(data)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def request_frame(method: str, body: object, correlation: int, max_body: int) -> bytes:
    """A request frame carrying the caller's deadline (its innermost cancel scope's)."""
    deadline = anyio.current_effective_deadline()
    deadline_ns = 0
    if deadline != math.inf:
        left = max(0.0, deadline - anyio.current_time())
        deadline_ns = time.monotonic_ns() + int(left * 1e9)
    return encode(
        Kind.REQUEST, body, subject=method, correlation=correlation,
        deadline_ns=deadline_ns, max_body=max_body,
    )  # fmt: skip
