"""The hub: attaches endpoints, owns names, subscriptions and policy, and sets up direct channels.

The hub is not on the request/reply data path. It accepts endpoints on a Unix control socket (or
on a socket an instance inherited at spawn), gives each a session channel in shared memory, and
then only: routes publications to subscribers (header-only, the body bytes untouched), answers
control requests (subscribe, names, channel setup, monitor, introspection), and publishes
name-owner changes. Requests and replies flow on direct channels it creates between the two
endpoints, so a hub restart does not interrupt them: endpoints re-attach and re-register.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from multikernel.bus._delivery import (
    denial_message,
    publish_decisions,
    route,
    subscribe_decisions,
)
from multikernel.bus._names import NameRegistry
from multikernel.bus._policy import Identity, Policy
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Limits, Session, SubscriptionRecord
from multikernel.endpoints._logging import get_logger
from multikernel.endpoints._wire import (
    default_socket_path,
    send_handle,
    send_with_fds,
    wait_closed,
)
from multikernel.protocol import (
    CONTROL_DECODER,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AccessDeniedError,
    AttachRequest,
    BusSnapshot,
    BusyError,
    ChannelInfo,
    ChannelOpen,
    ChannelReady,
    ChannelRevoke,
    Drain,
    EndpointInfo,
    Feature,
    Heartbeat,
    Hello,
    Introspect,
    Kind,
    Mirror,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
    MultikernelError,
    NameOwnerChanged,
    NameRelease,
    NameReleaseReply,
    NameRequest,
    NameRequestReply,
    NoRespondersError,
    Ok,
    ProtocolError,
    ServiceInfo,
    Subscribe,
    SubscriptionInfo,
    Unsubscribe,
    UnsupportedVersionError,
    Welcome,
    decode_body,
    decode_header,
    encode,
    error_to_body,
    subject_matches,
    validate_pattern,
)
from multikernel.shm import WaitPolicy, create_channel, create_channel_handles

log = get_logger("multikernel.bus")

#: The hub never spins: on an oversubscribed host it would steal the CPU its endpoints need.
HUB_WAIT = WaitPolicy(spin=0)
FEATURES = Feature.QUEUE_GROUPS | Feature.NAME_QUEUEING | Feature.DRAIN | Feature.MONITOR
NAMES_SUBJECT = "mk.bus.names"
_DESTINATION = struct.Struct("<Q")
_DESTINATION_OFFSET = 24
_SOURCE_OFFSET = 16
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class ChannelRecord:
    token: int
    target: str
    client: int
    server: int


def _new_ids() -> itertools.count[int]:
    """Endpoint ids are never reused, not even by a restarted hub: they start at the clock (µs)."""
    return itertools.count(time.time_ns() // 1000)


class Hub:
    """The bus hub. Run it with `serve()` inside a task group, or `python -m multikernel.bus`."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        policy: Policy | None = None,
        limits: Limits | None = None,
        instance_of: Callable[[int], int] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.policy = policy or Policy.default()
        self.limits = limits or Limits()
        self._instance_of = instance_of or (lambda pid: 0)
        self._sessions: dict[int, Session] = {}
        self._router: SubjectRouter[tuple[int, int]] = SubjectRouter()
        self._subs: dict[tuple[int, int], SubscriptionRecord] = {}
        self._restricted = 0  # subscriptions some publisher may be denied: the slow path
        self._names = NameRegistry()
        self._channels: dict[int, ChannelRecord] = {}
        self._monitors: dict[int, Session] = {}
        self._ids = _new_ids()
        self._tokens = itertools.count(1)
        self._started = time.monotonic()
        self._tg: anyio.abc.TaskGroup | None = None
        self._emptied = anyio.Event()
        self._listener: anyio.abc.SocketListener | None = None
        self._published = self._delivered = 0  # hot counters, merged into `counters` on read
        self._dirty: list[Session] = []  # sessions with staged publications
        self.counters = dict.fromkeys(
            ("sessions", "published", "delivered", "dropped", "denied", "channels", "errors"), 0
        )

    # -- running ------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the control socket and serve until cancelled (or drained)."""
        listener = await self._listen()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
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
        with contextlib.suppress(anyio.ClosedResourceError):  # drain() closed it: no newcomers
            await listener.serve(self._accept_any, tg)

    async def _listen(self) -> anyio.abc.SocketListener:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            try:
                probe = await anyio.connect_unix(self.path)
            except OSError:
                self.path.unlink()  # a stale socket left by a hub that died
            else:
                await probe.aclose()
                raise RuntimeError(f"a hub is already running on {self.path}; stop it first")
        listener = await anyio.create_unix_listener(self.path, mode=0o666)
        self._listener = listener
        return listener

    def open_instance_socket(self, instance: int) -> socket.socket:
        """A socket for a process we spawn as part of `instance` (it inherits it at spawn).

        The hub serves the other end as a session bound to `instance`: the identity comes from
        how the socket was made, not from anything the process says.
        """
        if self._tg is None:
            raise RuntimeError("the hub is not serving yet")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        async def serve_it() -> None:
            with ours:
                await self._serve_socket(ours, instance)

        ours.setblocking(False)
        self._tg.start_soon(serve_it)
        return theirs

    async def drain(self, grace: float = 10.0) -> None:
        """Lame duck: accept no one new, ask every endpoint to drain, wait `grace` s for them."""
        if self._listener is not None:
            await self._listener.aclose()
        deadline = time.monotonic_ns() + int(grace * 1e9)
        for session in list(self._sessions.values()):
            session.deliver(encode(Kind.CONTROL, Drain(deadline_ns=deadline)), droppable=False)
        with anyio.move_on_after(grace):
            while self._sessions:
                self._emptied = anyio.Event()
                await self._emptied.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def reload_policy(self, policy: Policy) -> None:
        """Swap the policy and re-check every subscription, monitor and direct channel."""
        self.policy = policy
        for session in self._sessions.values():
            session.publish_decisions.clear()
            session.denials_reported.clear()
        for record in self._subs.values():
            who = record.session.identity
            record.within = policy.may_subscribe(who, record.pattern, within_instance=True)
            record.across = policy.may_subscribe(who, record.pattern)
        self._restricted = sum(not (r.within and r.across) for r in self._subs.values())
        for sid, monitor in list(self._monitors.items()):
            if not policy.may_monitor(monitor.identity):
                del self._monitors[sid]
                monitor.monitor = None
        for token, channel in list(self._channels.items()):
            client, server = self._sessions.get(channel.client), self._sessions.get(channel.server)
            if client is None or server is None:
                continue
            decision = policy.may_connect(client.identity, server.identity, channel.target)
            if not decision:
                del self._channels[token]
                revoke = encode(Kind.CONTROL, ChannelRevoke(token, reason=decision.reason))
                client.deliver(revoke, droppable=False)
                server.deliver(revoke, droppable=False)
        log.info("policy reloaded", policy=repr(policy))

    # -- sessions -----------------------------------------------------------------------------

    async def _accept_any(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await self._serve_socket(stream.extra(anyio.abc.SocketAttribute.raw_socket), None)

    async def _serve_socket(self, sock: socket.socket, instance: int | None) -> None:
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if instance is None:
            instance = self._instance_of(pid)
        try:
            await self._run_session(sock, pid, uid, instance)
        except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError, OSError):
            pass  # the endpoint went away during attach
        except (ProtocolError, TimeoutError) as exc:
            log.warning("endpoint refused at attach", pid=pid, error=str(exc))

    async def _run_session(self, sock: socket.socket, pid: int, uid: int, instance: int) -> None:
        ours, theirs = create_channel(self.limits.session_capacity, policy=HUB_WAIT)
        async with ours:
            try:
                ready = ChannelReady(token=0, role="session", target="", peer_id=0)
                await send_handle(sock, encode(Kind.CONTROL, ready), theirs)
            finally:
                theirs.close()
            with anyio.fail_after(self.limits.hello_timeout):
                frame = await ours.receive()
            header = decode_header(frame, max_body=self.limits.max_body)
            hello = (
                decode_body(header, frame, CONTROL_DECODER) if header.kind == Kind.CONTROL else None
            )
            if not isinstance(hello, Hello):
                raise ProtocolError("the first frame on a session must be a Hello control message")
            version = min(hello.max_version, PROTOCOL_VERSION)
            if version < hello.min_version or version not in SUPPORTED_VERSIONS:
                error = UnsupportedVersionError(
                    f"this hub speaks protocol versions {sorted(SUPPORTED_VERSIONS)}, the "
                    f"endpoint {hello.min_version}..{hello.max_version}"
                )
                ours.try_send(
                    encode(Kind.ERROR, error_to_body(error), correlation=header.correlation)
                )
                raise error
            identity = Identity(next(self._ids), instance, uid, pid, hello.name)
            session = Session(identity, ours, sock, self.limits)
            self._sessions[session.id] = session
            self.counters["sessions"] += 1
            welcome = encode(
                Kind.CONTROL,
                Welcome(version, session.id, hello.features & FEATURES, self.limits.max_body),
                correlation=header.correlation,
            )
            session.deliver(welcome, droppable=False)
            if self._monitors:
                session.deliver(encode(Kind.CONTROL, Mirror(on=True)), droppable=False)
            log.info(
                "endpoint attached",
                endpoint=session.id,
                name=hello.name,
                pid=pid,
                instance=instance,
            )
            try:
                async with anyio.create_task_group() as tg:
                    session.cancel_scope = tg.cancel_scope
                    tg.start_soon(session.flush_forever)
                    tg.start_soon(self._watch_socket, session.sock, tg.cancel_scope)
                    await self._receive_loop(session, tg.cancel_scope)
            finally:
                self._end_session(session)

    async def _watch_socket(self, sock: socket.socket, scope: anyio.CancelScope) -> None:
        await wait_closed(sock)  # the endpoint never writes here: this returns when it goes
        scope.cancel()

    async def _receive_loop(self, session: Session, scope: anyio.CancelScope) -> None:
        dispatch, flush = self._dispatch, self._flush
        try:
            while True:
                for frame in await session.channel.receive_many():
                    dispatch(session, frame)
                flush()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        except ProtocolError as exc:
            self.counters["errors"] += 1
            log.warning("endpoint cut off", endpoint=session.id, error=str(exc))
        scope.cancel()

    def _end_session(self, session: Session) -> None:
        session.closed = True
        self._sessions.pop(session.id, None)
        if not self._sessions:
            self._emptied.set()
        for sid in list(session.subscriptions):
            self._unsubscribe(session, sid)
        if self._monitors.pop(session.id, None) is not None and not self._monitors:
            self._broadcast(Mirror(on=False))
        self._owner_changes(self._names.remove_owner(session.id))  # clients hear of it first
        for token, channel in list(self._channels.items()):
            if session.id in (channel.client, channel.server):
                del self._channels[token]
        log.info("endpoint detached", endpoint=session.id, overflowed=session.overflowed)

    # -- frames from endpoints ----------------------------------------------------------------

    def _reply(self, session: Session, correlation: int, body: object) -> None:
        session.deliver(encode(Kind.CONTROL, body, correlation=correlation), droppable=False)

    def _fail(self, session: Session, correlation: int, error: MultikernelError) -> None:
        self.counters["errors"] += 1
        if isinstance(error, AccessDeniedError):
            session.denied += 1
            self.counters["denied"] += 1
        frame = encode(Kind.ERROR, error_to_body(error), correlation=correlation)
        session.deliver(frame, droppable=False)

    def _dispatch(self, session: Session, frame: bytes) -> None:
        session.frames_in += 1
        header = decode_header(frame, max_body=self.limits.max_body)  # garbage ends the session
        try:
            if header.kind == Kind.PUBLISH:
                self._publish(session, header.subject, header.correlation, frame)
            elif header.kind == Kind.CONTROL:
                self._control(
                    session, header.correlation, decode_body(header, frame, CONTROL_DECODER)
                )
            else:
                raise ProtocolError(
                    f"{header.kind.name.lower()} frames travel on direct channels, not through "
                    "the hub; open one with ChannelOpen"
                )
        except MultikernelError as exc:
            self._fail(session, header.correlation, exc)

    def _publish(self, session: Session, subject: str, correlation: int, frame: bytes) -> None:
        self._published += 1
        stamped = bytearray(frame)
        stamped[_SOURCE_OFFSET : _SOURCE_OFFSET + 8] = session.id_bytes
        decisions = publish_decisions(
            self.policy, session.publish_decisions, session.identity, subject
        )
        subs = self._subs
        keys, denied = route(
            self._router,
            subs,
            subject,
            session.identity.instance,
            decisions,
            anyone_restricted=bool(self._restricted),
        )
        dirty = self._dirty
        for key in keys:
            record = subs[key]
            stamped[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 8] = record.sid_bytes
            target = record.session
            if not target.staged:
                dirty.append(target)
            target.staged.append((bytes(stamped), record))  # sent with the batch, in order
        if denied:
            session.denied += denied
            self.counters["denied"] += denied
            if subject not in session.denials_reported:  # once per subject per policy
                session.denials_reported.add(subject)
                error = AccessDeniedError(denial_message(subject, decisions))
                frame = encode(Kind.ERROR, error_to_body(error), correlation=correlation)
                session.deliver(frame, droppable=False)
        if self._monitors:
            self._to_monitors(subject, "hub", session.id, 0, frame)

    def _flush(self) -> None:
        """Send the publications staged while dispatching a batch: one ring publish (and at
        most one doorbell) per subscriber per batch instead of one per message."""
        dirty, self._dirty = self._dirty, []
        delivered = dropped = 0
        for session in dirty:
            staged, session.staged = session.staged, []
            sent = session.deliver_many([frame for frame, _ in staged])
            for i, (_, record) in enumerate(staged):
                if i < sent:
                    record.delivered += 1
                else:
                    record.dropped += 1
            delivered += sent
            dropped += len(staged) - sent
        self._delivered += delivered
        self.counters["dropped"] += dropped

    def _to_monitors(
        self, subject: str, path: str, source: int, destination: int, frame: bytes, channel: int = 0
    ) -> None:
        record = MonitorRecord(time.monotonic_ns(), path, source, destination, frame, channel)
        out = encode(Kind.CONTROL, record, subject=subject)
        for monitor in self._monitors.values():
            if monitor.monitor is not None and subject_matches(monitor.monitor, subject):
                monitor.deliver(out)

    def _control(self, session: Session, correlation: int, body: object) -> None:
        who = session.identity
        match body:
            case Subscribe(subject=pattern, queue_group=group, sid=sid):
                within, across = subscribe_decisions(
                    self.policy,
                    who,
                    pattern,
                    len(session.subscriptions),
                    self.limits.max_subscriptions,
                )
                key = (session.id, sid)
                if key in self._subs:
                    raise ProtocolError(f"subscription id {sid} is already in use on this endpoint")
                self._router.subscribe(key, pattern, group)
                record = SubscriptionRecord(
                    session, sid, pattern, group, within, across, sid.to_bytes(8, "little")
                )
                self._subs[key] = session.subscriptions[sid] = record
                self._restricted += not (within and across)
                self._reply(session, correlation, Ok(value=int(bool(across))))
            case Unsubscribe(sid=sid):
                self._unsubscribe(session, sid)
                self._reply(session, correlation, Ok())
            case NameRequest(name=name, flags=flags):
                decision = self.policy.may_own(who, name)
                if not decision:
                    raise AccessDeniedError(f"owning {name!r} refused: {decision.reason}")
                if len(self._names.names_of(session.id)) >= self.limits.max_names:
                    raise BusyError(f"an endpoint may own at most {self.limits.max_names} names")
                result, changes = self._names.request(name, session.id, flags)
                self._reply(session, correlation, NameRequestReply(name, result))
                self._owner_changes(changes)
            case NameRelease(name=name):
                released, changes = self._names.release(name, session.id)
                self._reply(session, correlation, NameReleaseReply(name, released))
                self._owner_changes(changes)
            case ChannelOpen(target=target):
                self._open_channel(session, target, correlation)
            case AttachRequest():
                assert self._tg is not None
                self._tg.start_soon(self._hand_over_attachment, session, correlation)
            case ChannelRevoke(token=token):
                channel = self._channels.get(token)
                if channel is not None and session.id in (channel.client, channel.server):
                    del self._channels[token]
            case ServiceInfo(name=name):
                if self._names.owner(name) != session.id:
                    raise ProtocolError(f"describe {name!r} after owning it (NameRequest)")
                session.services[name] = body
                self._reply(session, correlation, Ok())
            case MonitorStart(pattern=pattern):
                decision = self.policy.may_monitor(who)
                if not decision:
                    raise AccessDeniedError(f"monitor refused: {decision.reason}")
                validate_pattern(pattern)
                first = not self._monitors
                session.monitor = pattern
                self._monitors[session.id] = session
                if first:
                    self._broadcast(Mirror(on=True))
                self._reply(session, correlation, Ok())
            case MonitorStop():
                session.monitor = None
                if self._monitors.pop(session.id, None) is not None and not self._monitors:
                    self._broadcast(Mirror(on=False))
                self._reply(session, correlation, Ok())
            case MonitorRecord(destination=destination, frame=frame, channel=token):
                if self._monitors:
                    try:
                        subject = decode_header(frame).subject
                    except ProtocolError:
                        subject = ""
                    self._to_monitors(
                        subject or "mk.direct", "direct", session.id, destination, frame, token
                    )
            case Introspect():
                self._reply(session, correlation, self.snapshot())
            case Heartbeat(seq=seq):
                self._reply(session, correlation, Heartbeat(seq=seq, sent_ns=time.monotonic_ns()))
            case Drain():
                session.draining = True
                self._reply(session, correlation, Ok())
            case _:
                raise ProtocolError(f"unexpected {type(body).__name__} from an attached endpoint")

    def _unsubscribe(self, session: Session, sid: int) -> None:
        record = session.subscriptions.pop(sid, None)
        if record is not None:
            self._restricted -= not (record.within and record.across)
            self._subs.pop((session.id, sid), None)
            self._router.unsubscribe((session.id, sid))

    def _broadcast(self, body: object) -> None:
        frame = encode(Kind.CONTROL, body)
        for session in self._sessions.values():
            session.deliver(frame, droppable=False)

    def _owner_changes(self, changes: list[NameOwnerChanged]) -> None:
        """Publish each change on mk.bus.names.<name> and tell the clients of direct channels."""
        for change in changes:
            for owner in (change.old_owner, change.new_owner):
                session = self._sessions.get(owner)
                if session is not None:  # `name:` selectors look at the names an endpoint owns
                    names = frozenset(self._names.names_of(owner))
                    session.identity = dataclasses.replace(session.identity, names=names)
                    session.publish_decisions.clear()
            frame = encode(Kind.CONTROL, change)
            notified = set()
            for owner in (change.old_owner, change.new_owner):  # the owners hear of it too
                session = self._sessions.get(owner)
                if session is not None:
                    notified.add(owner)
                    session.deliver(frame, droppable=False)
                    if owner == change.old_owner:
                        session.services.pop(change.name, None)  # its description goes too
            for record in self._channels.values():
                if record.target == change.name and record.client not in notified:
                    notified.add(record.client)
                    client = self._sessions.get(record.client)
                    if client is not None:
                        client.deliver(frame, droppable=False)
            subject = f"{NAMES_SUBJECT}.{change.name}"
            event = encode(Kind.PUBLISH, change, subject=subject)
            for key in self._router.match(subject):
                stamped = bytearray(event)
                stamped[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 8] = key[1].to_bytes(
                    8, "little"
                )
                self._subs[key].session.deliver(bytes(stamped))
            log.info(
                "name owner changed", name=change.name, old=change.old_owner, new=change.new_owner
            )

    # -- direct channels ----------------------------------------------------------------------

    def _open_channel(self, client: Session, target: str, correlation: int) -> None:
        owner = self._names.owner(target)
        server = self._sessions.get(owner) if owner is not None else None
        if server is None:
            raise NoRespondersError(f"nobody owns {target!r}; the request was not delivered")
        decision = self.policy.may_connect(client.identity, server.identity, target)
        if not decision:
            raise AccessDeniedError(f"calling {target!r} refused: {decision.reason}")
        assert self._tg is not None
        self._tg.start_soon(self._hand_over_channel, client, server, target, correlation)

    async def _hand_over_channel(
        self, client: Session, server: Session, target: str, correlation: int
    ) -> None:
        token = next(self._tokens)
        left, right = create_channel_handles(self.limits.channel_capacity)
        # Recorded before the hand-over: if the name moves meanwhile, the client is told.
        self._channels[token] = ChannelRecord(token, target, client.id, server.id)
        try:
            for session, peer, role, handle, corr in (
                (server, client, "server", right, 0),
                (client, server, "client", left, correlation),
            ):
                ready = ChannelReady(
                    token,
                    role,
                    target,
                    peer.id,
                    peer.identity.name,
                    peer.identity.instance,
                    peer.identity.uid,
                    peer.identity.pid,
                )
                async with session.socket_lock:
                    await send_handle(
                        session.sock, encode(Kind.CONTROL, ready, correlation=corr), handle
                    )
            self.counters["channels"] += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._channels.pop(token, None)
            if not client.closed:
                self._fail(
                    client, correlation, NoRespondersError(f"the owner of {target!r} went away")
                )
        finally:
            left.close()
            right.close()

    async def _hand_over_attachment(self, session: Session, correlation: int) -> None:
        """A new socket bound to the requester's own instance, for a process it starts there."""
        instance = session.identity.instance
        theirs = self.open_instance_socket(instance)
        try:
            ready = ChannelReady(0, "attach", "", session.id, peer_instance=instance)
            frame = encode(Kind.CONTROL, ready, correlation=correlation)
            async with session.socket_lock:
                await send_with_fds(session.sock, frame, [theirs.fileno()])
        except (anyio.BrokenResourceError, OSError):
            pass  # the requester went away; the served end sees EOF and ends
        finally:
            theirs.close()

    # -- introspection ------------------------------------------------------------------------

    def snapshot(self) -> BusSnapshot:
        endpoints = tuple(
            EndpointInfo(
                s.id,
                s.identity.name,
                s.identity.instance,
                s.identity.uid,
                s.identity.pid,
                tuple(self._names.names_of(s.id)),
                tuple(r.pattern for r in s.subscriptions.values()),
                s.frames_in,
                s.frames_out,
                s.dropped,
                s.pending,
                s.denied,
                s.draining,
            )
            for s in self._sessions.values()
        )
        subscriptions = tuple(
            SubscriptionInfo(
                r.session.id, r.sid, r.pattern, r.queue_group or "", r.delivered, r.dropped
            )
            for r in self._subs.values()
        )
        services = tuple(info for s in self._sessions.values() for info in s.services.values())
        channels = tuple(
            ChannelInfo(c.token, c.target, c.client, c.server) for c in self._channels.values()
        )
        names = {name: tuple(line) for name, line in self._names.snapshot().items()}
        return BusSnapshot(
            os.getpid(),
            time.monotonic() - self._started,
            endpoints,
            names,
            services,
            subscriptions,
            channels,
            dict(self.counters),
        )
