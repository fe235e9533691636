"""The endpoint's link to the hub: attach, the session channel, control requests, re-attach.

`HubLink` is what every endpoint does with the hub itself, whoever it is: connect to the control
socket (or use the one it inherited), take the session channel the hub hands over, say Hello,
send control requests and wait for their answers, read what the hub sends (publications, notices,
channel handles on the socket), and when the hub goes away, re-attach with back-off and let the
endpoint restore what it had registered. The `Endpoint` owns one and builds the user's API on it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Coroutine
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any, NoReturn, Protocol

import anyio
import anyio.abc

from multikernel.endpoints._calls import Correlations
from multikernel.endpoints._relayed import RelayedChannel
from multikernel.endpoints._subscription import Message, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import HANDLE_FDS, close_fds, receive_handle
from multikernel.protocol import (
    CONTROL_DECODER,
    DEFAULT_MAX_BODY,
    ERROR_DECODER,
    PROTOCOL_VERSION,
    ChannelReady,
    ChannelRevoke,
    Feature,
    Header,
    Hello,
    Kind,
    ProtocolError,
    StreamClose,
    StreamReaderGone,
    StreamReady,
    StreamRoute,
    Welcome,
    decode_body,
    decode_header,
    encode,
    raise_for_error,
)
from multikernel.shm import Channel, ChannelHandle, ShmError, WaitPolicy

log = get_logger("multikernel.endpoints")

FEATURES = (
    Feature.QUEUE_GROUPS | Feature.NAME_QUEUEING | Feature.DRAIN | Feature.MONITOR
    | Feature.NAME_HOLDS | Feature.SUBSCRIBE_MANY | Feature.STREAMS
)  # fmt: skip
_STREAM_SOCKET = (StreamReady, StreamReaderGone, StreamRoute, StreamClose)


async def _connect(sock: socket.socket, path: str) -> None:
    """Connect a non-blocking Unix socket without blocking the event loop."""
    try:
        sock.connect(path)
    except BlockingIOError:
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error), path) from None


def _unexpected(body: object, kind: type) -> NoReturn:
    raise ProtocolError(f"the hub answered with {type(body).__name__}, not {kind.__name__}")


class HubUnavailableError(anyio.BrokenResourceError):
    """The hub went away and the endpoint could not re-attach (or was not allowed to retry)."""


class HubPermissionError(HubUnavailableError, PermissionError):
    """A hub listens there, but this user may not connect to its control socket."""


class LinkOwner(Protocol):
    """What an endpoint does with what arrives on its link (the `Endpoint` implements it)."""

    def _on_publication(
        self, header: Header, frame: bytes
    ) -> tuple[Subscription, Message] | None: ...

    def _on_notice(self, header: Header, frame: bytes, body: object) -> None: ...

    def _on_server_channel(self, ready: ChannelReady, channel: Channel) -> None: ...

    def _on_stream(self, body: object, fds: list[int]) -> None:
        """A stream's side or news of it, from the control socket (in the hub's order)."""

    async def _restore(self) -> None:
        """After re-attaching to a (new) hub: register again what was registered."""

    async def _flush_mirror(self) -> None:
        """Runs for the life of each session: copies of direct-channel frames for a monitor."""


class HubLink:
    """An endpoint's session with the hub; its owner handles what arrives on it."""

    def __init__(
        self,
        owner: LinkOwner,
        name: str,
        path: Path | None,
        fd: int | None,
        wait: WaitPolicy,
        reconnect: bool,
        channel: Channel | None = None,
    ) -> None:
        self.owner = owner
        self.name = name
        self.id = 0
        self.max_body = DEFAULT_MAX_BODY
        self.features = 0  # granted at attach (Welcome.features)
        self._path = path
        self._fd = fd
        self._region = channel  # a session channel in a region: used once, no socket
        self.wait = wait
        # An inherited socket is used once; re-attaching needs the hub's path as well.
        self._reconnect = reconnect and channel is None and (fd is None or path is not None)
        self._gone = False  # the hub went away and we may not re-attach: fail, never wait
        self.session: Channel | None = None
        self.relays: dict[int, RelayedChannel] = {}  # over a region: channels the hub relays
        self._attached = anyio.Event()
        self._calls = Correlations()
        self._send_lock = anyio.Lock()
        self.tg: anyio.abc.TaskGroup | None = None
        self.closing = False
        self.async_errors = 0

    # -- the link -----------------------------------------------------------------------------

    @property
    def reattaches(self) -> bool:
        """Whether a hub that goes away is waited for (the endpoint re-attaches to the next)."""
        return self._reconnect and not self.closing and not self._gone

    async def to_hub(self, frame: bytes) -> None:
        while True:
            if self._gone:
                raise HubUnavailableError(
                    "the hub went away and this endpoint cannot re-attach (it has no path to "
                    "the hub, or was connected with reconnect=False)"
                )
            if not self._attached.is_set():  # an awaited set Event still costs a loop pass
                if self.closing:
                    raise HubUnavailableError("the endpoint is closing: nothing goes to the hub")
                await self._attached.wait()
            session = self.session
            if session is None:
                continue
            try:
                if not session.try_send(frame):
                    async with self._send_lock:
                        await session.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                if not self._reconnect or self.closing:
                    raise HubUnavailableError("the hub went away") from None
                if self.session is session and self._attached.is_set():
                    self._attached = anyio.Event()  # wait below until the session loop re-attaches
            else:
                return  # the session loop notices and re-attaches

    async def forget_channel(self, token: int) -> None:
        """Tell the hub a direct channel is gone (a hub that went away forgot it anyway)."""
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.to_hub(encode(Kind.CONTROL, ChannelRevoke(token)))

    async def control(self, body: object) -> Any:
        """Send a control request to the hub and wait for its answer (or raise its error)."""
        correlation, reply = self._calls.open()
        try:
            await self.to_hub(encode(Kind.CONTROL, body, correlation=correlation))
            answer = await reply.next()
        finally:
            self._calls.close(correlation)
        if answer is None:
            raise ProtocolError(f"the hub answered {type(body).__name__} with nothing")
        header, payload = answer
        if isinstance(payload, tuple):  # ChannelReady and its handle, from the control socket
            return payload
        return decode_body(header, payload, CONTROL_DECODER)

    async def _connect_socket(self) -> socket.socket:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            sock = socket.socket(fileno=fd)
        elif self._path is None:
            raise HubUnavailableError("the inherited bus socket is gone and there is no path")
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await _connect(sock, str(self._path))
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        return sock

    async def _attach(self, sock: socket.socket) -> Channel:
        frame, fds = await receive_handle(sock)
        header = decode_header(frame)
        if header.kind == Kind.ERROR:  # refused before a session (e.g. the hub is out of fds)
            close_fds(fds)
            raise_for_error(decode_body(header, frame, ERROR_DECODER))
        ready = decode_body(header, frame, CONTROL_DECODER)
        if not isinstance(ready, ChannelReady) or ready.role != "session" or len(fds) != HANDLE_FDS:
            close_fds(fds)
            raise ProtocolError("the hub's first message was not a session channel")
        return await self._greet(Channel.attach(ChannelHandle(1, fds), self.wait))

    async def _greet(self, session: Channel) -> Channel:
        """Hello on the session channel, the hub's Welcome back (closing it on failure)."""
        try:
            hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, FEATURES, self.name)
            await session.send(encode(Kind.CONTROL, hello))
            with anyio.fail_after(10):
                frame = await session.receive()
            header = decode_header(frame)
            if header.kind == Kind.ERROR:
                raise_for_error(decode_body(header, frame, ERROR_DECODER))
            welcome = decode_body(header, frame, CONTROL_DECODER)
            if not isinstance(welcome, Welcome):
                _unexpected(welcome, Welcome)
        except BaseException:
            await session.aclose()
            raise
        self.id = welcome.endpoint_id
        self.max_body = welcome.max_body
        self.features = welcome.features
        return session

    async def open_session(self) -> tuple[socket.socket | None, Channel]:
        """Connect to the hub and attach; raises HubUnavailableError saying what to do."""
        if self._region is not None:  # the hub is on the other side of a shared region
            region, self._region = self._region, None
            try:
                return None, await self._greet(region)
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                raise HubUnavailableError(
                    "the hub closed the region's session channel while we attached"
                ) from exc
        where = "the inherited bus socket" if self._fd is not None else self._path
        try:
            sock = await self._connect_socket()
        except PermissionError as exc:
            raise HubPermissionError(
                f"this user may not attach to the hub on {where} ({exc.strerror}): run as the "
                "host's user or root, or use a hub of your own (`mkctl host up --socket PATH`)"
            ) from None
        except OSError as exc:
            raise HubUnavailableError(
                f"no hub is listening on {where} ({exc.strerror}); start one with "
                "`mkctl host up` or `python -m multikernel.bus`, or set $MULTIKERNEL_BUS"
            ) from None
        try:
            return sock, await self._attach(sock)
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            sock.close()
            raise HubUnavailableError(f"the hub on {where} dropped us while attaching") from exc
        except BaseException:
            sock.close()
            raise

    async def run_sessions(
        self,
        sock: socket.socket | None,
        session: Channel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the session we have; when the hub goes, re-attach (with back-off) and restore."""
        first = True
        while True:
            with sock or nullcontext():
                async with session, anyio.create_task_group() as tg:
                    self.session = session
                    if sock is not None:  # a session over a region has no socket
                        tg.start_soon(self._read_socket, sock, tg.cancel_scope)
                    tg.start_soon(self.owner._flush_mirror)
                    if not first:
                        tg.start_soon(self.owner._restore)
                    self._attached.set()
                    log.debug("attached", endpoint=self.id, name=self.name)
                    if first:
                        first = False
                        task_status.started()
                    await self._read_session(session)
                    tg.cancel_scope.cancel()
                self.session = None
                for relayed in list(self.relays.values()):
                    relayed.close()  # the hub forgot them with the session
                if self._attached.is_set():
                    self._attached = anyio.Event()
                self._calls.fail_all(HubUnavailableError("the hub went away; re-attaching"))
            if not self._reconnect or self.closing:
                self._gone = True
                self._attached.set()  # wake whoever waits to send: they fail now
                return
            log.warning("hub went away; re-attaching", endpoint=self.id, name=self.name)
            backoff = 0.02
            while True:
                try:
                    sock, session = await self.open_session()
                    break
                except (HubUnavailableError, ProtocolError):
                    await anyio.sleep(backoff)  # the hub is restarting: try again, backing off
                    backoff = min(backoff * 2, 1.0)

    async def _read_session(self, session: Channel) -> None:
        try:
            while True:
                for frame in await session.receive_many():
                    full = self._on_session_frame(frame)
                    if full is not None:  # backpressure: read on once it has room (patience)
                        await full[0].offer(full[1])
        except (anyio.EndOfStream, anyio.BrokenResourceError, ProtocolError):
            return

    def _on_session_frame(self, frame: bytes) -> tuple[Subscription, Message] | None:
        header = decode_header(frame)
        kind = header.kind
        if kind == Kind.PUBLISH:
            return self.owner._on_publication(header, frame)
        if self.relays and (relayed := self.relays.get(header.destination)) is not None:
            relayed.reader.put(frame)  # an answer on a channel the hub relays for us
            return None
        if header.correlation and self._calls.deliver(header, frame):
            return None
        if kind == Kind.ERROR:
            self.async_errors += 1  # e.g. a publication the policy kept from some subscribers
            error = decode_body(header, frame, ERROR_DECODER)
            log.warning("hub reported an error", code=error.code, message=error.message)
            return None
        if kind == Kind.CONTROL:
            self.owner._on_notice(header, frame, decode_body(header, frame, CONTROL_DECODER))
        return None

    def relayed(self, token: int) -> RelayedChannel:
        """The direct channel `token`, which the hub relays (we are attached over a region)."""
        channel = self.relays[token] = RelayedChannel(self, token)
        return channel

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self.tg is None:
            raise RuntimeError("the endpoint is not connected")
        self.tg.start_soon(func, *args)

    async def _read_socket(self, sock: socket.socket, scope: anyio.CancelScope) -> None:
        """Channel handles from the hub: answers to our ChannelOpen, and callers of our services."""
        try:
            while True:
                frame, fds = await receive_handle(sock)
                header = decode_header(frame)
                ready = decode_body(header, frame, CONTROL_DECODER)
                if isinstance(ready, _STREAM_SOCKET):
                    if not (header.correlation and self._calls.deliver(header, (ready, fds))):
                        self.owner._on_stream(ready, fds)  # StreamOpen's answer goes above
                elif not isinstance(ready, ChannelReady) or len(fds) != (
                    1 if ready.role == "attach" else HANDLE_FDS
                ):
                    close_fds(fds)
                elif ready.role == "attach":
                    attached = socket.socket(fileno=fds[0])
                    if not self._calls.deliver(header, (ready, attached)):
                        attached.close()
                elif ready.role == "server":
                    try:
                        channel = Channel.attach(ChannelHandle(1, fds), self.wait)
                    except ShmError as exc:  # unsafe to attach: refuse this channel alone
                        log.warning("refused a direct channel", target=ready.target, error=str(exc))
                    else:
                        self.owner._on_server_channel(ready, channel)
                elif not self._calls.deliver(header, (ready, ChannelHandle(0, fds))):
                    close_fds(fds)  # nobody waits for it any more (the caller gave up)
        except (anyio.EndOfStream, anyio.BrokenResourceError, ProtocolError):
            scope.cancel()
