"""The application's handle on the bus: `async with connect() as endpoint`.

An endpoint attaches to the hub over its control socket (or a socket it inherited at spawn), gets
a session channel in shared memory, and then: publishes and subscribes through the hub, calls
services over direct channels the hub sets up (lazily, on first use, following the name's owner
when it moves), and serves its own methods. If the hub restarts, the endpoint re-attaches and
re-registers its subscriptions, names and services; direct channels keep flowing meanwhile.
Works under asyncio, uvloop and trio (anyio).
"""

from __future__ import annotations

import socket
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Mapping,
)
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, overload

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints._calls import Decoders
from multikernel.endpoints._clients import ClientChannels
from multikernel.endpoints._contracts import Bus
from multikernel.endpoints._direct import DirectChannel, Mirroring
from multikernel.endpoints._hublink import HubLink, HubUnavailableError
from multikernel.endpoints._pubsub import PubSub
from multikernel.endpoints._service import Service
from multikernel.endpoints._streams import Stream, StreamReaders
from multikernel.endpoints._subscription import Message, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    AttachRequest,
    BusSnapshot,
    ChannelReady,
    ChannelRevoke,
    Drain,
    Flag,
    Header,
    HoldNames,
    Introspect,
    Kind,
    Mirror,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
    NameHeld,
    NameHoldEnded,
    NameMove,
    NameOwnerChanged,
    NameRelease,
    NameRequest,
    NameRequestReply,
    ProtocolError,
    ReleaseNames,
    RequestNameResult,
    StreamSids,
    SwitchNames,
    deadline_after,
    decode_body,
    encode,
    join_snapshot_pages,
)
from multikernel.shm import Channel, WaitPolicy

T = TypeVar("T")
log = get_logger("multikernel.endpoints")

#: Endpoints spin up to 100 µs for an imminent answer (a requester with calls in flight, a
#: server that just replied): a Python round trip takes 30-50 µs here, so a 50 µs window missed
#: often and every miss cost a ~60 µs cross-core wake-up (docs/bus.md, "Waiting").
ENDPOINT_WAIT = WaitPolicy(spin=100e-6)

_MORE = int(Flag.MORE)  # a plain int: `int & IntFlag` runs enum's Python code


class Endpoint(PubSub):
    """One attachment to the bus. Create it with `connect()`.

    It owns a `HubLink` (the session with the hub, re-attached when the hub restarts) and the
    `ClientChannels` it calls services on, and implements what arrives on the link.
    """

    def __init__(
        self,
        name: str,
        path: Path | None,
        fd: int | None,
        wait: WaitPolicy | None,
        reconnect: bool,
        channel: Channel | None = None,
    ) -> None:
        self._link = HubLink(self, name, path, fd, wait or ENDPOINT_WAIT, reconnect, channel)
        self._mirror = Mirroring()
        self._clients = ClientChannels(self._link, self._mirror)
        self._subs: dict[int, Subscription] = {}
        self._subs_peak = 0  # its largest size since rebuilt: see `_unsubscribe`
        self._next_sid = 1
        self._services: dict[str, Service] = {}
        self._monitor: Subscription | None = None
        self._decoder = Decoders()
        self._valid_subjects: set[str] = set()
        self._writing: dict[int, Stream] = {}
        self._stream_readers = StreamReaders(lambda: self._subs, self._link.spawn)
        self.drain_requested = anyio.Event()

    @property
    def name(self) -> str:
        return self._link.name

    @property
    def id(self) -> int:
        """This endpoint's unique id on the bus, as the hub bound it (changes on re-attach)."""
        return self._link.id

    @property
    def async_errors(self) -> int:
        """Errors the hub reported unasked (e.g. a publication the policy kept from someone)."""
        return self._link.async_errors

    # -- requests -----------------------------------------------------------------------------

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
        direct, correlation, reply = await self._clients.send_request(target, method, body)
        try:
            answer = await direct.next_reply(reply)
        finally:
            self._clients.abandon(direct, correlation, reply)
        if answer is None:
            raise ProtocolError(f"{target}.{method} answered with an empty stream")
        header, frame = answer
        return decode_body(header, frame, self._decoder(response))

    def request_stream(
        self, target: str, method: str, body: object = None, *, response: type[T] | Any = Any
    ) -> AsyncGenerator[T, None]:
        """Call a streaming method: yields each reply until the service ends the stream."""
        return self._stream(target, method, body, response)

    async def _stream(
        self, target: str, method: str, body: object, response: Any
    ) -> AsyncGenerator[Any, None]:
        decoder = self._decoder(response)
        direct, correlation, reply = await self._clients.send_request(target, method, body)
        try:
            while (item := await direct.next_reply(reply)) is not None:
                header, frame = item
                if header.flags & _MORE:
                    yield decoder.decode(frame[header.body_offset :])
        finally:
            self._clients.abandon(direct, correlation, reply)

    async def _serve_direct(self, direct: DirectChannel, service: Service | None) -> None:
        """Serve the requests of one caller until it goes away."""
        try:
            await direct.run(service)
        finally:
            if not self._link.closing and self._link.session is not None:
                with anyio.move_on_after(1, shield=True):  # bounded: the hub may be going too
                    await self._link.forget_channel(direct.token)

    # -- services -----------------------------------------------------------------------------

    def service(self, name: str, *, concurrency: int = 64, flags: int = 0) -> Service:
        """A service to serve under the well-known `name`; add methods, then `await start()`."""
        if name in self._services:
            raise ValueError(f"this endpoint already serves {name!r}")
        service = self._services[name] = Service(self, name, concurrency=concurrency, flags=flags)
        return service

    async def _start_service(self, service: Service) -> RequestNameResult:
        """Ask for the service's name and describe it. A hub that goes away before it answers
        is not the caller's failure when the endpoint re-attaches: the new hub is asked again
        (re-attaching restores started services too; asking twice answers ALREADY_OWNER)."""
        while True:
            try:
                reply = await self._link.control(NameRequest(service.name, service.flags))
                assert isinstance(reply, NameRequestReply)
                if reply.result in (
                    RequestNameResult.PRIMARY_OWNER,
                    RequestNameResult.ALREADY_OWNER,
                ):
                    service.primary = True
                    await self._link.control(service.info())
            except HubUnavailableError:
                if not self._link.reattaches:
                    raise
            else:
                return reply.result

    async def _release_service(self, service: Service) -> None:
        service.primary = False
        await self._link.control(NameRelease(service.name))

    async def _drain_quietly(self) -> None:
        """The hub asked us to drain; if it goes away meanwhile, there is nobody to answer.

        Each service drains in a task of its own, so a hub gone meanwhile comes out of `drain`
        in an exception group, which `contextlib.suppress` does not look into before 3.12.
        """
        try:
            await self.drain()
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def drain(self) -> None:
        """Lame duck: hand every service's name to the next owner, finish requests in flight."""
        with suppress(anyio.BrokenResourceError, HubUnavailableError):
            await self._link.control(Drain())  # the hub shows us as draining
        async with anyio.create_task_group() as tg:
            for service in self._services.values():
                tg.start_soon(service.drain)

    async def attachment(self) -> socket.socket:
        """A new, connected bus socket for a process this endpoint starts in its own instance.

        Pass it to the child (`pass_fds`, and its number in $MULTIKERNEL_BUS_FD); the child's
        `connect()` attaches through it and the hub binds it to this endpoint's instance.
        """
        result = await self._link.control(AttachRequest())
        if not isinstance(result, tuple) or not isinstance(result[1], socket.socket):
            raise ProtocolError("the hub answered AttachRequest without a socket")
        sock: socket.socket = result[1]
        sock.setblocking(True)
        return sock

    # -- holding and switching names (for the upgrade actor) ----------------------------------

    async def hold_names(self, names: Collection[str], *, hold_for: float) -> None:
        """Hold new calls to `names` for a switch, for at most `hold_for` seconds.

        Calls already made finish on the current owners; new ones wait until `switch_names`,
        `release_names` or the end of `hold_for`, after which the current owners keep the
        names. Raises AccessDeniedError unless this endpoint owns each name or may own it,
        BusyError if someone else holds one, RefusedError past the hub's `Limits.max_hold`.
        """
        await self._link.control(HoldNames(tuple(names), deadline_after(hold_for)))

    async def switch_names(self, moves: Mapping[str, int]) -> None:
        """Give each name its new owner (an endpoint id), all or none, then end their holds.

        Each new owner must be attached and waiting for the name (queued) or allowed to own it:
        NotFoundError or AccessDeniedError otherwise, and no name moves.
        """
        await self._link.control(SwitchNames(tuple(NameMove(n, o) for n, o in moves.items())))

    async def release_names(self, names: Collection[str]) -> None:
        """End the holds on `names` without moving them (roll back): the owners keep them."""
        await self._link.control(ReleaseNames(tuple(names)))

    # -- introspection and monitor ------------------------------------------------------------

    async def introspect(self) -> BusSnapshot:
        """What the hub knows: endpoints, names, services, subscriptions, counters."""
        pages: list[BusSnapshot] = []
        cursor = 0
        while True:  # in pages, so an answer of any size fits the session's frames
            page = await self._link.control(Introspect(cursor))
            assert isinstance(page, BusSnapshot)
            pages.append(page)
            if not page.next_cursor:
                return join_snapshot_pages(pages)
            cursor = page.next_cursor

    @asynccontextmanager
    async def monitor(
        self, pattern: str = ">", *, max_pending: int = 65536
    ) -> AsyncIterator[AsyncIterator[MonitorRecord]]:
        """(Privileged) every frame the bus carries whose subject matches, with timestamps."""
        sub = Subscription(0, pattern, None, max_pending, self._stop_monitor)
        self._monitor = sub
        try:
            await self._link.control(MonitorStart(pattern))
        except BaseException:
            self._monitor = None
            sub.discard()
            raise

        async def records() -> AsyncGenerator[MonitorRecord, None]:
            async for message in sub:
                yield msgspec.msgpack.decode(message.data, type=MonitorRecord)

        iterator = records()
        try:
            yield iterator
        finally:
            await iterator.aclose()  # not left to the garbage collector (trio warns of that)
            await sub.aclose()

    async def _stop_monitor(self, sub: Subscription) -> None:
        self._monitor = None
        if not self._link.closing:
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._link.control(MonitorStop())

    # -- what arrives from the hub ------------------------------------------------------------

    def _on_publication(self, header: Header, frame: bytes) -> tuple[Subscription, Message] | None:
        """Hand a publication to its subscription; (it, the message) when its buffer is full
        and the reader should wait (`Subscription.offer`) before reading on."""
        sub = self._subs.get(header.destination)
        if sub is not None:
            message = Message(
                header.subject, header.source, frame[header.body_offset :], header.missed
            )
            if not sub.try_push(message):
                return sub, message
        return None

    def _on_server_channel(self, ready: ChannelReady, channel: Channel) -> None:
        direct = DirectChannel(ready, channel, self._mirror)
        self._link.spawn(self._serve_direct, direct, self._services.get(ready.target))

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self._link.spawn(func, *args)

    def _encode_reply(self, body: object, correlation: int, flags: int) -> bytes:
        return encode(
            Kind.REPLY, body, correlation=correlation, flags=flags, max_body=self.max_body
        )

    async def _restore(self) -> None:
        """After re-attaching to a (new) hub: subscriptions, names and services as they were."""
        self._clients.end_holds()  # a new hub holds nothing
        self._streams_lost()
        await self._resubscribe()
        for service in self._services.values():
            if service.started and not service.draining:
                service.primary = False
                await self._start_service(service)
        if self._monitor is not None:
            await self._link.control(MonitorStart(self._monitor.pattern))

    def _on_notice(self, header: Header, frame: bytes, body: object) -> None:
        """Control frames the hub sends unasked."""
        match body:
            case MonitorRecord() if self._monitor is not None:
                data = frame[header.body_offset :]
                self._monitor.push(Message(header.subject, header.source, data))
            case NameOwnerChanged(name=name, old_owner=old, new_owner=new):
                self._clients.name_moved(name, old, new)
                service = self._services.get(name)
                if service is not None and new == self.id and not service.primary:
                    service.primary = True
                    self._link.spawn(self._describe, service)
                elif service is not None and new != self.id:
                    service.primary = False
            case NameHeld(name=name, deadline_ns=deadline_ns):
                self._clients.name_held(name, deadline_ns)
            case NameHoldEnded(name=name):
                self._clients.hold_ended(name)
            case StreamSids(token=token, reader=reader, sids=sids):
                self._stream_readers.on_sids(token, reader, sids)
            case ChannelRevoke(token=token):
                self._clients.revoke(token)
            case Mirror(on=on):
                self._mirror.on = on
            case Drain():
                self.drain_requested.set()
                self._link.spawn(self._drain_quietly)
            case _:
                pass

    async def _describe(self, service: Service) -> None:
        try:
            await self._link.control(service.info())
        except (anyio.BrokenResourceError, ProtocolError) as exc:
            log.warning("could not describe service", service=service.name, error=str(exc))

    async def _flush_mirror(self) -> None:
        mirror = self._mirror
        while True:
            await mirror.wait()
            async with mirror.lock:
                while mirror.queue:
                    await self._link.to_hub(mirror.queue[0])
                    mirror.queue.pop(0)

    async def _flush_mirror_now(self) -> None:
        """On the way out: send the mirror copies still queued (at most 1 s, shielded), so a
        monitor sees every frame of a caller that exits right after its last call, even when
        its copier task never ran (the reply came while the caller spun)."""
        mirror = self._mirror
        if not mirror.queue or self._link.session is None:
            return
        with anyio.move_on_after(1, shield=True):
            async with mirror.lock:  # not while the copier is half-way through one
                while mirror.queue:
                    await self._link.to_hub(mirror.queue[0])
                    mirror.queue.pop(0)

    def statistics(self) -> dict[str, Any]:
        """Counters of this endpoint, its session channel and its direct channels."""
        return {
            "id": self.id,
            "session": session.statistics() if (session := self._link.session) else None,
            "direct": self._clients.statistics(),
            "held": self._clients.held_calls(),  # names held for a switch: calls waiting
            "subscriptions": {s.pattern: s.statistics() for s in self._subs.values()},
            "streams": {s.subject: s.statistics() for s in self._writing.values()},
            "stream_readers": self._stream_readers.statistics(),
            "services": {
                n: {"served": s.served, "failed": s.failed, "in_flight": s.in_flight}
                for n, s in self._services.items()
            },
            "async_errors": self.async_errors,
            "mirror_dropped": self._mirror.dropped,
        }


def _is_a_bus(endpoint: Endpoint) -> Bus:
    return endpoint  # mypy checks here that `Endpoint` satisfies `Bus`
