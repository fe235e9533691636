"""The application's handle on the bus: `async with connect() as endpoint`.

An endpoint attaches to the hub over its control socket (or a socket it inherited at spawn), gets
a session channel in shared memory, and then: publishes and subscribes through the hub, calls
services over direct channels the hub sets up (lazily, on first use, following the name's owner
when it moves), and serves its own methods. If the hub restarts, the endpoint re-attaches and
re-registers its subscriptions, names and services; direct channels keep flowing meanwhile.
Works under asyncio, uvloop and trio (anyio).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, overload

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints._calls import Reply
from multikernel.endpoints._direct import DirectChannel, Mirroring
from multikernel.endpoints._hublink import HubLink, HubUnavailableError
from multikernel.endpoints._service import Service
from multikernel.endpoints._subscription import Message, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import ENV_FD, default_socket_path
from multikernel.protocol import (
    AttachRequest,
    BusSnapshot,
    ChannelOpen,
    ChannelReady,
    ChannelRevoke,
    Drain,
    Flag,
    Header,
    Introspect,
    Kind,
    Mirror,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
    NameOwnerChanged,
    NameRelease,
    NameRequest,
    NameRequestReply,
    NoRespondersError,
    ProtocolError,
    RequestNameResult,
    Subscribe,
    Unsubscribe,
    decode_body,
    encode,
    validate_pattern,
    validate_subject,
)
from multikernel.shm import Channel, ChannelHandle, WaitPolicy

T = TypeVar("T")
log = get_logger("multikernel.endpoints")

#: Endpoints spin up to 100 µs for an imminent answer (a requester with calls in flight, a
#: server that just replied): a Python round trip takes 30-50 µs here, so a 50 µs window missed
#: often and every miss cost a ~60 µs cross-core wake-up (docs/bus.md, "Waiting").
ENDPOINT_WAIT = WaitPolicy(spin=100e-6)


class Endpoint(HubLink):
    """One attachment to the bus. Create it with `connect()`."""

    def __init__(
        self,
        name: str,
        path: Path | None,
        fd: int | None,
        wait: WaitPolicy | None,
        reconnect: bool,
    ) -> None:
        super().__init__(name, path, fd, wait or ENDPOINT_WAIT, reconnect)
        self._subs: dict[int, Subscription] = {}
        self._next_sid = 1
        self._services: dict[str, Service] = {}
        self._direct: dict[str, DirectChannel] = {}
        self._opening: dict[str, anyio.Event] = {}
        self._moved_while_opening: dict[str, set[int]] = {}
        self._mirror = Mirroring()
        self._monitor: Subscription | None = None
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self._valid_subjects: set[str] = set()
        self.drain_requested = anyio.Event()

    # -- publish / subscribe ------------------------------------------------------------------

    async def publish(self, subject: str, body: object = None) -> None:
        """Publish `body` (any msgspec-encodable value) on `subject` to every subscriber."""
        if subject not in self._valid_subjects:
            validate_subject(subject)
            self._valid_subjects.add(subject)
        await self._to_hub(encode(Kind.PUBLISH, body, subject=subject, max_body=self.max_body))

    async def subscribe(
        self, pattern: str, *, queue_group: str | None = None, max_pending: int = 1024
    ) -> Subscription:
        """Subscribe to `pattern` (`*` one token, `>` the rest); use as `async with`."""
        validate_pattern(pattern)
        sid = self._next_sid
        self._next_sid += 1
        sub = Subscription(sid, pattern, queue_group, max_pending, self._unsubscribe)
        self._subs[sid] = sub
        try:
            ok = await self._control(Subscribe(pattern, queue_group, sid))
        except BaseException:
            del self._subs[sid]
            sub.discard()
            raise
        sub.cross_instance = bool(getattr(ok, "value", 0))
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is not None and not self._closing:
            # If the hub is gone, it forgot the subscription with the session.
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._control(Unsubscribe(sid=sub.sid))

    # -- requests -----------------------------------------------------------------------------

    def _decoder(self, kind: Any) -> msgspec.msgpack.Decoder[Any]:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.msgpack.Decoder(kind)
        return decoder

    @overload
    async def request(self, target: str, method: str, body: object = None) -> Any: ...

    @overload
    async def request(
        self, target: str, method: str, body: object = None, *, response: type[T]
    ) -> T: ...

    async def request(
        self, target: str, method: str, body: object = None, *, response: Any = Any
    ) -> Any:
        """Call `method` of the service `target`; the caller's cancel scope is the deadline.

        Raises NoRespondersError at once if nobody owns `target`, AccessDeniedError if the
        policy forbids the call, and the service's own error (same class, remote message) if the
        method failed.
        """
        direct, correlation, reply = await self._send_request(target, method, body)
        try:
            answer = await direct.next_reply(reply)
        finally:
            self._abandon(direct, correlation, reply)
        if answer is None:
            raise ProtocolError(f"{target}.{method} answered with an empty stream")
        header, frame = answer
        return decode_body(header, frame, self._decoder(response))

    async def _send_request(
        self, target: str, method: str, body: object
    ) -> tuple[DirectChannel, int, Reply]:
        """Send a request on the channel to `target`'s owner, opening one if needed.

        A channel whose server side is closed (the owner left, and the hub's notice has not
        reached us yet) did not take the request: retire it and ask the hub again, once.
        """
        for attempt in (1, 2):
            direct = await self._direct_to(target)
            correlation, reply = direct.calls.open()
            try:
                await direct.send(self._request_frame(method, body, correlation))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                direct.calls.close(correlation)
                direct.closed = True
                self._retire(direct)
                if attempt == 2:
                    raise NoRespondersError(f"the owner of {target!r} went away") from None
                continue
            except BaseException:
                self._abandon(direct, correlation, reply)
                raise
            direct.channel.reader.nudge()  # the reply is imminent: spin for it
            return direct, correlation, reply
        raise AssertionError("unreachable")

    def _request_frame(self, method: str, body: object, correlation: int) -> bytes:
        """A request frame carrying the caller's deadline (its innermost cancel scope's)."""
        deadline = anyio.current_effective_deadline()
        deadline_ns = 0
        if deadline != math.inf:
            left = max(0.0, deadline - anyio.current_time())
            deadline_ns = time.monotonic_ns() + int(left * 1e9)
        return encode(
            Kind.REQUEST, body, subject=method, correlation=correlation,
            deadline_ns=deadline_ns, max_body=self.max_body,
        )  # fmt: skip

    def _abandon(self, direct: DirectChannel, correlation: int, reply: Reply) -> None:
        if not reply.done:  # abandoned (cancelled, deadline): tell the server to stop
            direct.send_nowait(encode(Kind.ERROR, None, correlation=correlation))
        direct.calls.close(correlation)
        self._retire(direct)

    def _retire(self, direct: DirectChannel) -> None:
        """Close a client channel that is stale (the name moved) or broken, once unused."""
        if direct.release_if_idle():
            if self._direct.get(direct.target) is direct:
                del self._direct[direct.target]
            if not self._closing and self._tg is not None:
                self._tg.start_soon(self._forget_channel, direct.token)

    async def _forget_channel(self, token: int) -> None:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._to_hub(encode(Kind.CONTROL, ChannelRevoke(token)))

    def request_stream(
        self, target: str, method: str, body: object = None, *, response: type[T] | Any = Any
    ) -> AsyncIterator[T]:
        """Call a streaming method: yields each reply until the service ends the stream."""
        return self._stream(target, method, body, response)

    async def _stream(
        self, target: str, method: str, body: object, response: Any
    ) -> AsyncIterator[Any]:
        """Call a streaming method: yields each reply until the service ends the stream."""
        decoder = self._decoder(response)
        async for header, frame in self._call(target, method, body, single=False):
            if header.flags & Flag.MORE:
                yield decoder.decode(frame[header.body_offset :])

    async def _call(
        self, target: str, method: str, body: object, *, single: bool
    ) -> AsyncIterator[Any]:
        direct, correlation, reply = await self._send_request(target, method, body)
        try:
            while (item := await direct.next_reply(reply)) is not None:
                yield item
                if single:
                    return
        finally:
            self._abandon(direct, correlation, reply)

    async def _direct_to(self, target: str) -> DirectChannel:
        """The current direct channel to `target`'s owner, opened on first use."""
        while True:
            direct = self._direct.get(target)
            if direct is not None and not direct.stale and not direct.closed:
                return direct
            opening = self._opening.get(target)
            if opening is not None:
                await opening.wait()
                continue
            self._opening[target] = event = anyio.Event()
            moved: set[int] = set()
            self._moved_while_opening[target] = moved
            try:
                ready, handle = await self._open(target)
                old = self._direct.get(target)
                direct = DirectChannel(ready, Channel.attach(handle, self._wait), self._mirror)
                self._direct[target] = direct
                if old is not None:
                    self._retire(old)
                if ready.peer_id in moved:
                    # The name left that owner while the hub handed us the channel (the notice
                    # and the channel travel on different paths): retire it and ask again.
                    direct.stale = True
                    self._retire(direct)
                    continue
                return direct
            finally:
                del self._opening[target]
                del self._moved_while_opening[target]
                event.set()

    async def _open(self, target: str) -> tuple[ChannelReady, ChannelHandle]:
        result = await self._control(ChannelOpen(target))
        assert isinstance(result, tuple)
        ready, handle = result
        return ready, handle

    async def _serve_direct(self, direct: DirectChannel, service: Service | None) -> None:
        """Serve the requests of one caller until it goes away."""
        try:
            await direct.run(service)
        finally:
            if not self._closing and self._session is not None:
                with anyio.move_on_after(1, shield=True):  # bounded: the hub may be going too
                    await self._forget_channel(direct.token)

    # -- services -----------------------------------------------------------------------------

    def service(self, name: str, *, concurrency: int = 64, flags: int = 0) -> Service:
        """A service to serve under the well-known `name`; add methods, then `await start()`."""
        if name in self._services:
            raise ValueError(f"this endpoint already serves {name!r}")
        service = self._services[name] = Service(self, name, concurrency=concurrency, flags=flags)
        return service

    async def _start_service(self, service: Service) -> RequestNameResult:
        reply = await self._control(NameRequest(service.name, service.flags))
        assert isinstance(reply, NameRequestReply)
        if reply.result in (RequestNameResult.PRIMARY_OWNER, RequestNameResult.ALREADY_OWNER):
            service.primary = True
            await self._control(service.info())
        return reply.result

    async def _release_service(self, service: Service) -> None:
        service.primary = False
        await self._control(NameRelease(service.name))

    async def _drain_quietly(self) -> None:
        """The hub asked us to drain; if it goes away meanwhile, there is nobody to answer."""
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.drain()

    async def drain(self) -> None:
        """Lame duck: hand every service's name to the next owner, finish requests in flight."""
        with suppress(anyio.BrokenResourceError, HubUnavailableError):
            await self._control(Drain())  # the hub shows us as draining
        async with anyio.create_task_group() as tg:
            for service in self._services.values():
                tg.start_soon(service.drain)

    async def attachment(self) -> socket.socket:
        """A new, connected bus socket for a process this endpoint starts in its own instance.

        Pass it to the child (`pass_fds`, and its number in $MULTIKERNEL_BUS_FD); the child's
        `connect()` attaches through it and the hub binds it to this endpoint's instance.
        """
        result = await self._control(AttachRequest())
        if not isinstance(result, tuple) or not isinstance(result[1], socket.socket):
            raise ProtocolError("the hub answered AttachRequest without a socket")
        sock: socket.socket = result[1]
        sock.setblocking(True)
        return sock

    # -- introspection and monitor ------------------------------------------------------------

    async def introspect(self) -> BusSnapshot:
        """What the hub knows: endpoints, names, services, subscriptions, counters."""
        snapshot = await self._control(Introspect())
        assert isinstance(snapshot, BusSnapshot)
        return snapshot

    @asynccontextmanager
    async def monitor(
        self, pattern: str = ">", *, max_pending: int = 65536
    ) -> AsyncIterator[AsyncIterator[MonitorRecord]]:
        """(Privileged) every frame the bus carries whose subject matches, with timestamps."""
        sub = Subscription(0, pattern, None, max_pending, self._stop_monitor)
        self._monitor = sub
        try:
            await self._control(MonitorStart(pattern))
        except BaseException:
            self._monitor = None
            sub.discard()
            raise

        async def records() -> AsyncIterator[MonitorRecord]:
            async for message in sub:
                yield msgspec.msgpack.decode(message.data, type=MonitorRecord)

        try:
            yield records()
        finally:
            await sub.aclose()

    async def _stop_monitor(self, sub: Subscription) -> None:
        self._monitor = None
        if not self._closing:
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._control(MonitorStop())

    # -- what arrives from the hub ------------------------------------------------------------

    def _on_publication(self, header: Header, frame: bytes) -> None:
        sub = self._subs.get(header.destination)
        if sub is not None:
            sub.push(Message(header.subject, header.source, frame[header.body_offset :]))

    def _on_server_channel(self, ready: ChannelReady, channel: Channel) -> None:
        direct = DirectChannel(ready, channel, self._mirror)
        self._spawn(self._serve_direct, direct, self._services.get(ready.target))

    def _encode_reply(self, body: object, correlation: int, flags: int) -> bytes:
        return encode(
            Kind.REPLY, body, correlation=correlation, flags=flags, max_body=self.max_body
        )

    async def _restore(self) -> None:
        """After re-attaching to a (new) hub: subscriptions, names and services as they were."""
        for sub in list(self._subs.values()):
            await self._control(Subscribe(sub.pattern, sub.queue_group, sub.sid))
        for service in self._services.values():
            if service.started and not service.draining:
                service.primary = False
                await self._start_service(service)
        if self._monitor is not None:
            await self._control(MonitorStart(self._monitor.pattern))

    def _on_notice(self, header: Header, frame: bytes, body: object) -> None:
        """Control frames the hub sends unasked."""
        match body:
            case MonitorRecord() if self._monitor is not None:
                data = frame[header.body_offset :]
                self._monitor.push(Message(header.subject, header.source, data))
            case NameOwnerChanged(name=name, old_owner=old, new_owner=new):
                if (moved := self._moved_while_opening.get(name)) is not None:
                    moved.add(old)
                direct = self._direct.get(name)
                if direct is not None and direct.peer.endpoint_id != new:
                    direct.stale = True  # new calls go to the new owner; in-flight ones finish
                    self._retire(direct)
                service = self._services.get(name)
                if service is not None and new == self.id and not service.primary:
                    service.primary = True
                    self._spawn(self._describe, service)
                elif service is not None and new != self.id:
                    service.primary = False
            case ChannelRevoke(token=token):
                for direct in list(self._direct.values()):
                    if direct.token == token:
                        direct.stale = True
                        self._retire(direct)
            case Mirror(on=on):
                self._mirror.on = on
            case Drain():
                self.drain_requested.set()
                self._spawn(self._drain_quietly)
            case _:
                pass

    async def _describe(self, service: Service) -> None:
        try:
            await self._control(service.info())
        except (anyio.BrokenResourceError, ProtocolError) as exc:
            log.warning("could not describe service", service=service.name, error=str(exc))

    async def _flush_mirror(self) -> None:
        while True:
            for frame in await self._mirror.next_batch():
                await self._to_hub(frame)

    def statistics(self) -> dict[str, Any]:
        """Counters of this endpoint, its session channel and its direct channels."""
        return {
            "id": self.id,
            "session": self._session.statistics() if self._session is not None else None,
            "direct": {t: d.channel.statistics() for t, d in self._direct.items()},
            "subscriptions": {s.pattern: s.statistics() for s in self._subs.values()},
            "services": {
                n: {"served": s.served, "failed": s.failed, "in_flight": s.in_flight}
                for n, s in self._services.items()
            },
            "async_errors": self.async_errors,
            "mirror_dropped": self._mirror.dropped,
        }


@asynccontextmanager
async def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    fd: int | None = None,
    name: str = "",
    wait: WaitPolicy | None = None,
    reconnect: bool = True,
) -> AsyncIterator[Endpoint]:
    """Attach to the hub; detach (closing subscriptions and channels) on exit.

    The hub is found at `path`, else on the connected socket `fd` (which the endpoint then owns),
    else on the socket this process inherited ($MULTIKERNEL_BUS_FD, set for processes started
    inside an instance), else at `default_socket_path()`. With `reconnect`, a hub restart is
    survived: the endpoint re-attaches and re-registers (not possible over an inherited socket).
    """
    if path is None and fd is None and (env_fd := os.environ.get(ENV_FD)):
        fd = int(env_fd)
        os.environ.pop(ENV_FD)  # one owner: children do not inherit a claim to it
    where = Path(path) if path is not None else (None if fd is not None else default_socket_path())
    endpoint = Endpoint(name or f"pid{os.getpid()}", where, fd, wait, reconnect)
    sock, session = await endpoint._open_session()  # before the task group: a clean error
    try:
        async with anyio.create_task_group() as tg:
            endpoint._tg = tg
            await tg.start(endpoint._run_sessions, sock, session)
            try:
                yield endpoint
            finally:
                endpoint._closing = True
                for sub in list(endpoint._subs.values()):
                    await sub.aclose()
                tg.cancel_scope.cancel()
    finally:
        for direct in endpoint._direct.values():
            direct.close()
        endpoint._direct.clear()
