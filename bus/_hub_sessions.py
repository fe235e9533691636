"""The hub's sessions: listening, attaching endpoints, reading their frames, letting them go.

`Sessions` is everything about one endpoint's session from accept to detach: the control socket
(or a socket made for an instance, or no socket: a channel in a region shared with another
kernel, `serve_region`), the session channel it hands over, Hello/Welcome, the read
loop that hands each frame to the hub and flushes after each batch, and telling the hub when an
endpoint goes. What the frames ask for (routing, control requests, names, direct channels) is
the hub's (bus/_hub.py), through the `SessionHandler` it implements.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc

from multikernel.bus._policy import Identity
from multikernel.bus._session import Limits, Session, wrote_garbage
from multikernel.bus._socket_access import BIND_MODE, SocketAccess
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import (
    send_handle,
    send_with_fds,
    wait_closed,
)
from multikernel.protocol import (
    CONTROL_DECODER,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    BusyError,
    ChannelReady,
    Drain,
    Feature,
    Hello,
    Kind,
    ProtocolError,
    UnsupportedVersionError,
    Welcome,
    decode_body,
    decode_header,
    encode,
    error_to_body,
)
from multikernel.shm import (
    Channel,
    PeerDiedError,
    ShmError,
    WaitPolicy,
    create_channel,
    max_payload,
)

log = get_logger("multikernel.bus")

#: The hub never spins: on an oversubscribed host it would steal the CPU its endpoints need.
HUB_WAIT = WaitPolicy(spin=0)
#: How long the hub waits for the Hello of a process it made a socket for before the process
#: was spawned (`open_instance_socket`); a process that dies first ends the wait at once.
SPAWN_HELLO_TIMEOUT = 60.0
FEATURES = (
    Feature.QUEUE_GROUPS | Feature.NAME_QUEUEING | Feature.DRAIN | Feature.MONITOR
    | Feature.NAME_HOLDS | Feature.SUBSCRIBE_MANY | Feature.STREAMS
)  # fmt: skip
NAMES_SUBJECT = "mk.bus.names"
_PEERCRED = struct.Struct("3i")


def _reserve_fd() -> int:
    """An fd held so that, out of fds, the hub can still accept one newcomer to refuse it."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


async def refuse(sock: socket.socket, why: str) -> None:
    """Tell an endpoint that has no session yet why it gets none (a BusyError it will raise)."""
    frame = encode(Kind.ERROR, error_to_body(BusyError(why)))
    with contextlib.suppress(OSError, anyio.BrokenResourceError):
        await send_with_fds(sock, frame, [])


def _new_ids() -> itertools.count[int]:
    """Endpoint ids are never reused, not even by a restarted hub: they start at the clock (µs)."""
    return itertools.count(time.time_ns() // 1000)


class SessionHandler(Protocol):
    """What the hub does with its sessions (the `Hub` implements it)."""

    def attached(self, session: Session) -> None: ...

    def dispatch(self, session: Session, frame: bytes) -> None:
        """One frame from an endpoint; a ProtocolError cuts the endpoint off."""

    def flush(self) -> list[Session]:
        """After each batch of frames: send what the batch staged for other sessions; returns
        the sessions the batch left congested (its publisher waits for them, by policy)."""

    def detached(self, session: Session) -> None: ...


class Sessions:
    """The hub's endpoints' sessions, by endpoint id (see the module docstring)."""

    def __init__(
        self,
        handler: SessionHandler,
        path: Path,
        limits: Limits,
        instance_of: Callable[[int], int],
        counters: dict[str, int],
        access: SocketAccess | None = None,
    ) -> None:
        self._handler = handler
        self.path = path
        self.access = access or SocketAccess()
        self.limits = limits
        self._instance_of = instance_of
        self.counters = counters
        self.by_id: dict[int, Session] = {}
        self._ids = _new_ids()
        self.tg: anyio.abc.TaskGroup | None = None
        self._emptied = anyio.Event()
        self._listener: anyio.abc.SocketListener | None = None

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the control socket and serve until cancelled (or drained)."""
        listener = await self._listen()
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                tg.start_soon(self._accept_until_closed, listener, tg)
                log.info("hub listening", socket=str(self.path), pid=os.getpid())
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self.path.unlink(missing_ok=True)

    async def _accept_until_closed(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        """Accept endpoints until drain() closes the listener.

        Out of file descriptors (EMFILE/ENFILE), accept fails while the connection waits in the
        backlog: say so once per episode, wait a little for sessions to end, and go on; the hub
        keeps serving everyone already attached.
        """
        reserve = _reserve_fd()
        try:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    return  # drain() closed it: no newcomers
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    log.warning(
                        "hub out of file descriptors", error=str(exc), sessions=len(self.by_id)
                    )
                    if reserve < 0:  # nothing in hand to make room with: wait for sessions to end
                        await anyio.sleep(0.1)
                        reserve = _reserve_fd()
                        continue
                    # The reserved fd makes room to accept the newcomer and tell it why it is
                    # refused, instead of leaving it hanging in the listen backlog.
                    os.close(reserve)
                    try:
                        stream = await listener.accept()
                        async with stream:
                            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                            await refuse(sock, "the hub is out of file descriptors; retry later")
                    except OSError:
                        pass
                    reserve = _reserve_fd()
                    continue
                tg.start_soon(self._accept_any, stream)
        finally:
            if reserve >= 0:
                os.close(reserve)

    async def _listen(self) -> anyio.abc.SocketListener:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists():
            try:
                probe = await anyio.connect_unix(self.path)
            except OSError:
                self.path.unlink()  # a stale socket left by a hub that died
            else:
                await probe.aclose()
                raise RuntimeError(f"a hub is already running on {self.path}; stop it first")
        listener = await anyio.create_unix_listener(self.path, mode=BIND_MODE)
        self.access.apply(self.path)  # its group and mode, never wider than asked
        self._listener = listener
        return listener

    def open_instance_socket(
        self, instance: int, *, uid: int | None = None, pid: int = 0
    ) -> socket.socket:
        """A socket for a process we spawn as part of `instance` (it inherits it at spawn).

        The hub serves the other end as a session bound to `instance` and to `uid` (default: the
        hub's own, for the host's actors' processes): the identity comes from how the socket was
        made, not from anything the process says. SO_PEERCRED cannot tell us here, since for a
        socketpair it names its creator, the hub.
        """
        if self.tg is None:
            raise RuntimeError("the hub is not serving yet")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        credentials = (pid, os.getuid() if uid is None else uid)

        async def serve_it() -> None:
            with ours:
                await self._serve_socket(ours, instance, credentials)

        ours.setblocking(False)
        self.tg.start_soon(serve_it)
        return theirs

    async def drain(self, grace: float = 10.0) -> None:
        """Lame duck: accept no one new, ask every endpoint to drain, wait `grace` s for them."""
        if self._listener is not None:
            await self._listener.aclose()
        deadline = time.monotonic_ns() + int(grace * 1e9)
        for session in list(self.by_id.values()):
            session.deliver(encode(Kind.CONTROL, Drain(deadline_ns=deadline)), droppable=False)
        with anyio.move_on_after(grace):
            while self.by_id:
                self._emptied = anyio.Event()
                await self._emptied.wait()
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    async def _accept_any(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await self._serve_socket(stream.extra(anyio.abc.SocketAttribute.raw_socket), None)

    async def _serve_socket(
        self,
        sock: socket.socket,
        instance: int | None,
        credentials: tuple[int, int] | None = None,
    ) -> None:
        if credentials is not None:
            pid, uid = credentials
        else:
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        if instance is None:
            instance = self._instance_of(pid)
        # A socket the hub made for a process the host is about to spawn (`open_instance_socket`)
        # is served at once, before that process exists: its Hello comes after the spawn, the
        # interpreter's start and its imports, which took more than `hello_timeout` on a loaded
        # machine. Its patience is the spawn's; a socket that connected is already running.
        patience = self.limits.hello_timeout
        if credentials is not None:
            patience = max(patience, SPAWN_HELLO_TIMEOUT)
        try:
            await self._run_session(sock, pid, uid, instance, patience)
        except TimeoutError:  # an OSError: before the catch-all for OSErrors below
            log.warning("endpoint refused at attach", pid=pid, uid=uid, error="no Hello in time")
        except (ProtocolError, ShmError) as exc:
            log.warning("endpoint refused at attach", pid=pid, uid=uid, error=str(exc))
        except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError):
            pass  # the endpoint went away during attach
        except OSError as exc:
            log.warning("endpoint refused at attach", pid=pid, uid=uid, error=str(exc))
        except Exception as exc:
            # The one boundary between a session and the hub: whatever went wrong with one
            # endpoint ends that endpoint alone, and is logged with its stack.
            log.error("endpoint cut off: internal error", pid=pid, uid=uid, error=repr(exc),
                      exc_info=True)  # fmt: skip

    async def _run_session(
        self, sock: socket.socket, pid: int, uid: int, instance: int, patience: float
    ) -> None:
        try:
            ours, theirs = create_channel(self.limits.session_capacity, policy=HUB_WAIT)
        except OSError as exc:  # out of fds or memory: say so to the newcomer, keep serving
            await refuse(sock, f"the hub cannot take another endpoint now ({exc.strerror})")
            raise
        async with ours:
            try:
                ready = ChannelReady(token=0, role="session", target="", peer_id=0)
                await send_handle(sock, encode(Kind.CONTROL, ready), theirs)
            finally:
                theirs.close()
            with anyio.fail_after(patience):
                frame = await ours.receive()
            await self._greet_and_serve(ours, sock, frame, pid, uid, instance)

    async def serve_region(
        self, instance: int, channel: Channel, *, uid: int | None = None, pid: int = 0
    ) -> None:
        """Serve one session over `channel`, a channel laid out in a region shared with another
        kernel (a guest's ivshmem memory), until the peer closes its side, garbage cuts it off,
        or the caller cancels (the peer's death is the caller's to see: QEMU's exit).

        The session is bound to `instance`, `uid` (default: the hub's own) and `pid` (QEMU's,
        say) as the caller says, never as the peer says. No fd crosses a region, so such a
        session has no control socket: direct channels to or from it are refused (docs/bus.md).
        No hello timeout: a guest says Hello once it has booted, and how long that may take is
        the caller's cancel scope. The hub closes `channel` when the session ends.
        """
        uid = os.getuid() if uid is None else uid
        with channel:
            needed = max_payload(self.limits.session_capacity)
            if min(channel.writer.max_payload, channel.reader.max_payload) < needed:
                raise ValueError(
                    f"a session channel must carry frames of {needed} bytes both ways: format "
                    f"it with a capacity of at least Limits.session_capacity "
                    f"({self.limits.session_capacity})"
                )
            try:
                frame = await channel.receive()
                await self._greet_and_serve(channel, None, frame, pid, uid, instance)
            except (ProtocolError, ShmError) as exc:
                log.warning(
                    "endpoint refused at attach", instance=instance, region=True, error=str(exc)
                )
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the peer closed its side before it said Hello
            except Exception as exc:  # the same boundary as a socket session's
                log.error("endpoint cut off: internal error", instance=instance, region=True,
                          error=repr(exc), exc_info=True)  # fmt: skip

    async def _greet_and_serve(
        self,
        ours: Channel,
        sock: socket.socket | None,
        frame: bytes,
        pid: int,
        uid: int,
        instance: int,
    ) -> None:
        """Hello (`frame`, the session's first) → Welcome, then the session until it ends."""
        header = decode_header(frame, max_body=self.limits.max_body)
        hello = decode_body(header, frame, CONTROL_DECODER) if header.kind == Kind.CONTROL else None
        if not isinstance(hello, Hello):
            raise ProtocolError("the first frame on a session must be a Hello control message")
        version = min(hello.max_version, PROTOCOL_VERSION)
        if version < hello.min_version or version not in SUPPORTED_VERSIONS:
            error = UnsupportedVersionError(
                f"this hub speaks protocol versions {sorted(SUPPORTED_VERSIONS)}, the "
                f"endpoint {hello.min_version}..{hello.max_version}"
            )
            ours.try_send(encode(Kind.ERROR, error_to_body(error), correlation=header.correlation))
            raise error
        if len(self.by_id) >= self.limits.max_sessions:
            busy = BusyError(
                f"the hub serves its maximum of {self.limits.max_sessions} endpoints "
                "(Limits.max_sessions); retry when some have left"
            )
            ours.try_send(encode(Kind.ERROR, error_to_body(busy), correlation=header.correlation))
            raise ProtocolError(f"refused: {busy}")
        identity = Identity(next(self._ids), instance, uid, pid, hello.name)
        session = Session(identity, ours, sock, self.limits)
        session.features = hello.features & FEATURES
        self.by_id[session.id] = session
        self.counters["sessions"] += 1
        welcome = encode(
            Kind.CONTROL,
            Welcome(version, session.id, session.features, self.limits.max_body),
            correlation=header.correlation,
        )
        session.deliver(welcome, droppable=False)
        self._handler.attached(session)
        log.info(
            "endpoint attached",
            endpoint=session.id,
            name=hello.name,
            pid=pid,
            instance=instance,
            region=sock is None,
        )
        try:
            async with anyio.create_task_group() as tg:
                session.cancel_scope = tg.cancel_scope
                tg.start_soon(session.flush_forever)
                if sock is not None:
                    tg.start_soon(self._watch_socket, session)
                await self._receive_loop(session)
        finally:
            self._end_session(session)

    async def _watch_socket(self, session: Session) -> None:
        """The endpoint never writes on its control socket after attach: EOF means it went;
        a byte means it misbehaves (and would otherwise wake the hub over and over)."""
        assert session.sock is not None  # only sessions that came over a socket are watched
        if await wait_closed(session.sock):
            session.cut_off("wrote on its control socket after attach")
        elif session.cancel_scope is not None:
            session.cancel_scope.cancel()

    async def _receive_loop(self, session: Session) -> None:
        dispatch, flush = self._handler.dispatch, self._handler.flush
        try:
            while True:
                for frame in await session.channel.receive_many():
                    dispatch(session, frame)
                congested = flush()
                if congested:
                    await self._wait_for(session, congested)
        except (anyio.EndOfStream, PeerDiedError, anyio.ClosedResourceError):
            session.closed = True  # it went away; nothing to blame it for
        except (ProtocolError, ShmError, anyio.BrokenResourceError) as exc:
            self.counters["errors"] += 1
            garbage = isinstance(exc, ProtocolError) or wrote_garbage(exc)
            session.cut_off(f"{type(exc).__name__}: {exc}", garbage=garbage)
        if session.cancel_scope is not None:
            session.cancel_scope.cancel()

    async def _wait_for(self, publisher: Session, congested: list[Session]) -> None:
        """Backpressure (`slow_consumer = "block"`): read nothing more from `publisher` until
        the subscribers it just congested have room, each for at most `block_patience`."""
        deadline = time.monotonic() + self.limits.block_patience
        for target in congested:
            if target is publisher:
                continue  # its own reader drains it; waiting on itself would only stall it
            if not await target.wait_for_room(deadline):
                self.counters["stalled"] += 1
                log.warning(
                    "slow consumer: dropping its publications until it catches up",
                    endpoint=target.id,
                    name=target.identity.name,
                    waiting=target.pending,
                    publisher=publisher.id,
                )

    def _end_session(self, session: Session) -> None:
        session.closed = True
        self.by_id.pop(session.id, None)
        if not self.by_id:
            self._emptied.set()
        self._handler.detached(session)
        if session.cut_reason:
            self.counters["cut_off"] += 1
            log.warning(
                "endpoint cut off",
                endpoint=session.id,
                name=session.identity.name,
                pid=session.identity.pid,
                uid=session.identity.uid,
                instance=session.identity.instance,
                reason=session.cut_reason,
            )
        else:
            log.info("endpoint detached", endpoint=session.id)
