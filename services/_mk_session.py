"""An agent's hub session carried across kernels: shared-memory rings at both ends, frames between.

On one machine the hub hands an endpoint its session as a channel (a memfd region and eventfd
doorbells) over a Unix socket, with SCM_RIGHTS. Neither crosses kernels. So the session is
carried by two bridges and a byte stream (AF_VSOCK between real kernels, `UnixVsock` in tests):

- `host_bridge`, on the host, takes the session the hub hands the instance's socket, as the
  agent would, and forwards its frames over the stream;
- `instance_bridge`, in the instance (run by `_mk_init`), plays the hub's part of the hand-over
  for the agent: it makes a channel, hands it over a socketpair as the hub does
  (`ChannelReady(role="session")`), and forwards its frames over the stream.

The agent and the hub see the session they always see; frames cross as `<u32 length><frame>`.
Direct channels the hub hands a process there (fds on its socket) cross through memory both
kernels map (`_mk_channels`), when the host has such memory (`shared`).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import receive_handle, send_handle, send_with_fds
from multikernel.protocol import (
    CONTROL_DECODER,
    ChannelReady,
    Kind,
    decode_body,
    decode_header,
    encode,
)
from multikernel.services import _mk_channels
from multikernel.services._mk_vsock import send_line
from multikernel.shm import Channel, ChannelHandle, create_channel

log = get_logger("multikernel.services.multikernel")

_LENGTH = struct.Struct(">I")
#: Opens another stream to the instance's init (for an attach socket).
OpenStream = Callable[[], Awaitable[socket.socket]]
#: The largest frame carried (the hub's own limit is lower); a larger length is garbage.
MAX_FRAME = 64 << 20


async def send_frame(stream: socket.socket, frame: bytes) -> None:
    data = memoryview(_LENGTH.pack(len(frame)) + frame)
    while data:
        await anyio.wait_writable(stream)
        with contextlib.suppress(BlockingIOError):
            data = data[stream.send(data) :]


async def _read_exactly(stream: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        await anyio.wait_readable(stream)
        try:
            chunk = stream.recv(size - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            raise anyio.EndOfStream
        data += chunk
    return bytes(data)


async def receive_frame(stream: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(await _read_exactly(stream, _LENGTH.size))
    if size > MAX_FRAME:
        raise anyio.BrokenResourceError(f"a frame of {size} bytes on the session stream")
    return await _read_exactly(stream, size)


async def _forward(session: Channel, stream: socket.socket) -> None:
    """Frames both ways until either side ends."""
    stream.setblocking(False)
    async with anyio.create_task_group() as tg:

        async def out() -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    for frame in await session.receive_many():
                        await send_frame(stream, frame)
            tg.cancel_scope.cancel()

        async def back() -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    await session.send(await receive_frame(stream))
            tg.cancel_scope.cancel()

        tg.start_soon(out)
        tg.start_soon(back)


async def host_bridge(
    instance_socket: socket.socket,
    stream: socket.socket,
    open_stream: OpenStream,
    *,
    key: str = "0",
    shared: Path | None = None,
) -> None:
    """Take the session the hub hands `instance_socket` and carry it over `stream`; `key` names
    this session to the instance's init. An attach socket the hub hands later
    (`ChannelReady(role="attach")`: for a process the agent starts) gets a stream of its own
    (`open_stream`), announced with the hub's frame, and a bridge. A direct channel is carried
    through a region in `shared` (`_mk_channels.share`), or dropped if there is none."""
    instance_socket.setblocking(False)
    try:
        frame, fds = await receive_handle(instance_socket)
    except (anyio.EndOfStream, OSError):
        return
    ready = decode_body(decode_header(frame), frame, CONTROL_DECODER)
    if not isinstance(ready, ChannelReady) or ready.role != "session":
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        log.warning("hub refused the instance's session", answer=type(ready).__name__)
        return
    async with Channel.attach(ChannelHandle(1, fds)) as session, anyio.create_task_group() as tg:

        async def handles() -> None:
            with contextlib.suppress(anyio.EndOfStream, OSError):
                while True:
                    frame, fds = await receive_handle(instance_socket)
                    ready = decode_body(decode_header(frame), frame, CONTROL_DECODER)
                    if isinstance(ready, ChannelReady) and ready.role == "attach" and len(fds) == 1:
                        attach = socket.socket(fileno=fds[0])
                        tg.start_soon(_carry_attach, frame, attach, open_stream, key, shared)
                        continue
                    if shared is not None and isinstance(ready, ChannelReady):
                        tg.start_soon(_carry_channel, frame, fds, open_stream, key, shared)
                        continue
                    for fd in fds:  # no memory both kernels map: nothing to carry it in
                        socket.close(fd)
                    log.warning("direct channel not carried to another kernel")

        tg.start_soon(handles)
        await _forward(session, stream)
        tg.cancel_scope.cancel()


async def _carry_attach(
    frame: bytes, attach: socket.socket, open_stream: OpenStream, via: str, shared: Path | None
) -> None:
    with attach:
        try:
            stream = await open_stream()
        except OSError as error:
            log.warning("attach not carried to the instance", error=str(error))
            return
        with stream:
            stream.setblocking(False)
            key = secrets.token_hex(8)
            await send_line(stream, {"attach": frame.hex(), "key": key, "via": via})
            await host_bridge(attach, stream, open_stream, key=key, shared=shared)


async def _carry_channel(
    frame: bytes, fds: list[int], open_stream: OpenStream, key: str, shared: Path
) -> None:
    try:
        stream = await open_stream()
    except OSError as error:
        for fd in fds:
            socket.close(fd)
        log.warning("direct channel not carried to the instance", error=str(error))
        return
    await _mk_channels.share(frame, fds, shared=shared, stream=stream, key=key)


async def attach_for_agent(
    agent_socket: socket.socket,
    frame: bytes,
    stream: socket.socket,
    on_socket: Callable[[socket.socket], None] = lambda sock: None,
) -> None:
    """In the instance: give the agent the attach socket the hub's `frame` announced (one end
    of a socketpair, sent with that frame on its bus socket) and bridge the other end (told to
    `on_socket`: channels for that process are handed there)."""
    ours, agents = socket.socketpair()
    on_socket(ours)
    with ours:
        try:
            await send_with_fds(agent_socket, frame, [agents.fileno()])
        finally:
            agents.close()
        await instance_bridge(ours, stream)


async def instance_bridge(agent_socket: socket.socket, stream: socket.socket) -> None:
    """Hand the agent (at the other end of `agent_socket`) a session, as the hub would, and
    carry it over `stream`."""
    agent_socket.setblocking(False)
    ours, theirs = create_channel()
    async with ours:
        try:
            ready = ChannelReady(token=0, role="session", target="", peer_id=0)
            await send_handle(agent_socket, encode(Kind.CONTROL, ready), theirs)
        finally:
            theirs.close()
        await _forward(ours, stream)
