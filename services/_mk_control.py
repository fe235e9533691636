"""The host's end of an instance's control connection, and the sessions it asks for.

The first stream the host opens to an instance's init (`_mk_init`) carries the launch; after that
the init writes lines on it: `exit <status>` when the agent has ended, and `session` each time a
process of the instance (the agent, its workload) re-attaches at the init's bus socket because
its session's host end died. A host answers `session` by opening a new hub session for the
instance (`open_instance_socket`: the hub binds it to the instance, as at launch) and a stream to
the init announced `{"resume": true}`, and bridging the two (`host_bridge`).

A host that adopts a running instance after a restart opens a new control connection
(`{"reattach": true}`, `reattach`): the init then asks it for a session per waiting process, so
`mkctl exec` and the agent's heartbeats reach the instance again, and the agent's exit status
comes to the new host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc

from multikernel.endpoints.log import get_logger
from multikernel.services._mk_session import OpenStream, host_bridge
from multikernel.services._mk_vsock import AGENT_PORT, Connector, relay, send_line

log = get_logger("multikernel.services.multikernel")

#: Opens a hub session bound to an instance (the hub's `open_instance_socket`).
OpenSession = Callable[[int], socket.socket]
_MAX_LINE = 4096  # the init writes short lines; more without a newline is garbage


class Control:
    """An instance's control connection as the host reads it (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.exit_status: int | None = None
        self._buffer = b""
        self._wanted = 0  # sessions asked for and not yet opened

    def drain(self) -> None:
        """Read what the init wrote so far, without waiting."""
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            while True:
                data = self.sock.recv(4096)
                if not data:
                    break
                self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            self._buffer = b""
        for line in lines:
            text = line.decode(errors="replace").strip()
            if text == "session":
                self._wanted += 1
            elif text.startswith("exit "):
                with contextlib.suppress(ValueError):
                    self.exit_status = int(text[5:])

    async def serve(self, open_one: Callable[[], Awaitable[None]]) -> None:
        """Answer the init's lines until the connection ends: `open_one` per `session`."""
        while True:
            try:
                await anyio.wait_readable(self.sock)
            except (OSError, anyio.ClosedResourceError):
                return
            self.drain()
            while self._wanted:
                self._wanted -= 1
                await open_one()
            if self._ended():
                return

    def _ended(self) -> bool:
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


async def reattach(connector: Connector, cid: int) -> socket.socket:
    """A new control connection to instance `cid`'s init, for a host that adopted it."""
    sock = await connector.connect(cid, AGENT_PORT)
    sock.setblocking(False)
    try:
        await send_line(sock, {"reattach": True})
    except BaseException:
        sock.close()
        raise
    return sock


async def collect_output(connector: Connector, cid: int, sink: int) -> None:
    """Bring instance `cid`'s output back to a host that adopted it: a stream the init writes
    it to (`{"output": true}`), copied into the pipe `sink` (closed here) until either ends."""
    try:
        stream = await connector.connect(cid, AGENT_PORT)
    except OSError as error:
        os.close(sink)
        log.warning("output not collected again", instance=cid, error=str(error))
        return
    with stream:
        try:
            stream.setblocking(False)
            os.set_blocking(sink, False)
            await send_line(stream, {"output": True})
            await relay(sink, stream.fileno(), both_ways=False)
        finally:
            os.close(sink)


async def resume(
    connector: Connector,
    cid: int,
    open_session: OpenSession,
    open_stream: OpenStream,
    tg: anyio.abc.TaskGroup,
    *,
    shared: Path | None,
) -> None:
    """One session for instance `cid`'s waiting process: a hub session and a `resume` stream,
    bridged in `tg` until either ends."""
    hub = open_session(cid)
    key = secrets.token_hex(8)
    stream: socket.socket | None = None
    try:
        stream = await connector.connect(cid, AGENT_PORT)
        stream.setblocking(False)
        await send_line(stream, {"resume": True, "key": key})
    except BaseException as error:
        hub.close()
        if stream is not None:
            stream.close()
        if not isinstance(error, OSError):
            raise
        log.warning("session not resumed", instance=cid, error=str(error))
        return

    async def bridge() -> None:
        with hub, stream:
            await host_bridge(hub, stream, open_stream, key=key, shared=shared)

    tg.start_soon(bridge)
    log.info("agent session resumed", instance=cid)
