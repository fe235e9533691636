"""Direct channels across kernels: rings in memory both kernels map, polled.

On one kernel the hub hands each end of a direct channel (a caller's, a service's) a sealed
memfd and doorbell pipes over its socket. Neither crosses kernels; memory both kernels map
does (DAXFS files on the multikernel DMA heap, kerf's `daxfs`). So when the hub hands a process
in an instance its end of a direct channel, the host's bridge of that process's session
(`_mk_session.host_bridge`) carries it:

- `share`, on the host: attach the end the hub handed over (the host holds it now), lay out a
  channel in a region of the shared memory, and tell the instance's init on a new stream
  (`{"channel": <the hub's ChannelReady frame>, "path": <the region's name>, "key": <the
  session>}`); then copy frames between the two until either ends, or the stream does;
- `receive`, in the instance (run by `_mk_init`): open that region by path (`Channel.open_path`:
  no doorbells, it is polled with back-off), hand the process a channel of its own with the
  hub's frame, as the hub would have, and copy frames between the two.

So the hop between the kernels is a ring pair in shared memory, not a byte stream; each kernel's
end is an ordinary channel, and the endpoints at both ends see what they always see.

The shared memory here: a directory both sides see (`shared`; the vsock stand-in's directory in
tests, standing in for the DAXFS mount). Each region is a sealed memfd, mode 0600, named in that
directory by a link to it, so an instance can write its rings (and garbage: each reader checks
every counter and length, and a bad one ends that channel alone) but cannot resize it, which
would kill the host with SIGBUS (docs/security.md; `tests/security/test_security_mk_channels.py`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path

import anyio

from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import send_handle
from multikernel.protocol import CONTROL_DECODER, ChannelReady, decode_body, decode_header
from multikernel.services._mk_vsock import send_line
from multikernel.shm import (
    Channel,
    ChannelHandle,
    Region,
    ShmError,
    channel_size,
    create_channel_handles,
    format_channel,
)

log = get_logger("multikernel.services.multikernel")

#: The ring capacity of a channel across kernels (each direction).
CAPACITY = 1 << 18
_ENDED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ShmError)


async def pump(a: Channel, b: Channel, *, until: socket.socket | None = None) -> None:
    """Copy frames both ways between `a` and `b` until either ends (or `until` is closed by
    the other side); neither is closed here."""
    async with anyio.create_task_group() as tg:

        async def one(src: Channel, dst: Channel) -> None:
            with contextlib.suppress(*_ENDED):
                while True:
                    for frame in await src.receive_many():
                        await dst.send(frame)
            tg.cancel_scope.cancel()

        async def watch(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while True:
                    await anyio.wait_readable(sock)
                    if not sock.recv(4096):
                        break
            tg.cancel_scope.cancel()

        tg.start_soon(one, a, b)
        tg.start_soon(one, b, a)
        if until is not None:
            tg.start_soon(watch, until)


def _side(frame: bytes) -> int:
    """The side of the channel the hub handed with `frame`: 0 to a caller, 1 to a server."""
    ready = decode_body(decode_header(frame), frame, CONTROL_DECODER)
    if not isinstance(ready, ChannelReady) or ready.role not in ("client", "server"):
        raise ValueError("not a direct channel")
    return 0 if ready.role == "client" else 1


async def share(
    frame: bytes, fds: list[int], *, shared: Path, stream: socket.socket, key: str
) -> None:
    """On the host: carry the direct channel the hub handed (`frame`, `fds`) to the process of
    session `key` in the instance, through a region in `shared` announced on `stream` (which
    this closes, like the fds)."""
    with stream:
        try:
            hub_end = Channel.attach(ChannelHandle(_side(frame), list(fds)))
        except (ValueError, ShmError) as error:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            log.warning("direct channel not carried", error=str(error))
            return
        region = Region.create(channel_size(CAPACITY))
        name = f"chan-{secrets.token_hex(8)}"
        link = shared / name
        try:
            os.fchmod(region.fd, 0o600)
            format_channel(region, CAPACITY)
            os.symlink(f"/proc/{os.getpid()}/fd/{region.fd}", link)
            async with hub_end, Channel.open_region(region, 0) as ours:
                stream.setblocking(False)
                await send_line(stream, {"channel": frame.hex(), "path": name, "key": key})
                await pump(hub_end, ours, until=stream)
        except OSError as error:
            log.warning("direct channel not carried", error=str(error))
        finally:
            link.unlink(missing_ok=True)
            region.close()


async def receive(process: socket.socket, frame: bytes, path: Path, stream: socket.socket) -> None:
    """In the instance: open the region at `path`, hand the process at the other end of
    `process` its own end of a channel with the hub's `frame`, and copy frames between the two
    until either ends or the host closes `stream`."""
    with stream:
        try:
            side = _side(frame)
            far = Channel.open_path(path, 1)
        except (ValueError, OSError, ShmError) as error:
            log.warning("direct channel not received", error=str(error))
            return
        handles = create_channel_handles()
        near: Channel | None = None
        try:
            near = Channel.attach(handles[1 - side])
            await send_handle(process, frame, handles[side])
        except BaseException as error:
            far.close()
            if near is not None:
                near.close()
            if isinstance(error, OSError):  # the process is gone: nobody to hand it to
                return
            raise
        finally:
            for handle in handles:
                handle.close()
        async with far, near:
            await pump(far, near, until=stream)
