"""The hub: attaches endpoints, owns names, subscriptions and policy, and sets up direct channels.

The hub is not on the request/reply data path. It accepts endpoints on a Unix control socket (or
on a socket an instance inherited at spawn), gives each a session channel in shared memory, and
then only: routes publications to subscribers (header-only, the body bytes untouched), answers
control requests (subscribe, names, channel setup, monitor, introspection), and publishes
name-owner changes. Requests and replies flow on direct channels it creates between the two
endpoints, so a hub restart does not interrupt them: endpoints re-attach and re-register.

An endpoint in another kernel attaches over a channel in memory shared with it instead
(`serve_region`): no fd reaches it, so the hub relays its direct channels (bus/_relay.py), the
one case where the hub is on the request path.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import msgspec

from multikernel.bus._channels import ChannelBroker
from multikernel.bus._holds import Holds, check_may_hold, check_switch
from multikernel.bus._hub_pubsub import HubPubSub
from multikernel.bus._hub_sessions import Sessions
from multikernel.bus._monitors import Monitors
from multikernel.bus._name_events import announce_cutoff, announce_owner_changes, publish_event
from multikernel.bus._names import NameRegistry
from multikernel.bus._policy import Identity, Policy
from multikernel.bus._relay import end_relay, forward
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Limits, Session, SubscriptionRecord
from multikernel.bus._snapshot import build_snapshot
from multikernel.bus._socket_access import SocketAccess
from multikernel.bus._streams import StreamBroker
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import default_socket_path
from multikernel.protocol import (
    CONTROL_DECODER,
    AccessDeniedError,
    AttachRequest,
    BusSnapshot,
    BusyError,
    ChannelOpen,
    ChannelRevoke,
    Drain,
    Heartbeat,
    HoldNames,
    Introspect,
    Kind,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
    MultikernelError,
    NameMove,
    NameOwnerChanged,
    NameRelease,
    NameReleaseReply,
    NameRequest,
    NameRequestReply,
    Ok,
    ProtocolError,
    ReleaseNames,
    ServiceInfo,
    StreamClose,
    StreamOpen,
    StreamReaderGone,
    StreamStart,
    Subscribe,
    SubscribedMany,
    SubscribeMany,
    SwitchNames,
    TooLargeError,
    Unsubscribe,
    UnsubscribeMany,
    decode_body,
    decode_header,
    encode,
    error_to_body,
    snapshot_page,
    validate_pattern,
)
from multikernel.shm import Channel

log = get_logger("multikernel.bus")

#: Room left in a page of introspection for its envelope (header, subject, msgpack framing).
PAGE_SLACK = 4096


_OK: Final = Ok()
_OK_ACROSS: Final = Ok(value=1)  # Subscribe's answer when the subscription reaches across instances


class Hub(HubPubSub):
    """The bus hub. Run it with `serve()` inside a task group, or `python -m multikernel.bus`."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        policy: Policy | None = None,
        limits: Limits | None = None,
        instance_of: Callable[[int], int] | None = None,
        socket_access: SocketAccess | None = None,
    ) -> None:
        self.policy = policy or Policy.default()
        self.limits = limits or Limits()
        self.counters = dict.fromkeys(
            (
                "sessions",
                "published",
                "delivered",
                "dropped",
                "denied",
                "channels",
                "errors",
                "cut_off",
                "stalled",
                "holds",
                "held",
            ),
            0,
        )
        where = Path(path) if path is not None else default_socket_path()
        self._endpoints = Sessions(
            self, where, self.limits, instance_of or (lambda pid: 0), self.counters, socket_access
        )
        self._sessions = self._endpoints.by_id
        self._router: SubjectRouter[tuple[int, int]] = SubjectRouter()
        self._subs: dict[tuple[int, int], SubscriptionRecord] = {}
        self._subs_peak = 0  # its largest size since rebuilt (compacted)
        self._restricted = 0  # subscriptions some publisher may be denied: the slow path
        self._names = NameRegistry()
        self._channels = ChannelBroker(
            self._sessions, self.limits, self.counters, self._fail, self.open_instance_socket
        )
        self._monitors = Monitors(self._sessions)
        self._streams = StreamBroker(
            self._router, lambda: self._subs, self.limits, self.counters, self._tg
        )
        self._holds = Holds(
            self._sessions,
            self.limits,
            self.counters,
            self._channels.clients_of,
            self._open_channel,
            self._fail,
            lambda subject, body: publish_event(subject, body, self._router, self._subs),
        )
        self._started = time.monotonic()
        self._published = self._delivered = 0  # hot counters, merged into `counters` on read
        self._dirty: list[Session] = []  # sessions with staged publications

    @property
    def path(self) -> Path:
        """The control socket endpoints attach on."""
        return self._endpoints.path

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the control socket and serve until cancelled (or drained)."""
        await self._endpoints.serve(task_status=task_status)

    def open_instance_socket(
        self, instance: int, *, uid: int | None = None, pid: int = 0
    ) -> socket.socket:
        """A socket for a process we spawn as part of `instance` (it inherits it at spawn).

        The hub serves the other end as a session bound to `instance` and to `uid` (default: the
        hub's own, for the host's actors' processes): the identity comes from how the socket was
        made, not from anything the process says.
        """
        return self._endpoints.open_instance_socket(instance, uid=uid, pid=pid)

    async def serve_region(
        self, instance: int, channel: Channel, *, uid: int | None = None, pid: int = 0
    ) -> None:
        """Serve a session over `channel`, one laid out in a region shared with another kernel
        (a guest's ivshmem memory, the analogue of the boot-time IPI buffer), until it ends.

        The session's identity is `instance`, `uid` (default: the hub's own) and `pid`, from
        which region the caller handed over, never from what the peer says. The protocol is a
        socket session's (Hello, Welcome, then frames on the channel), without a socket: direct
        channels to or from it are refused with `RefusedError`. Run it in a task group while the
        hub serves; cancel it when the peer dies (QEMU exits). The hub closes `channel`.
        """
        await self._endpoints.serve_region(instance, channel, uid=uid, pid=pid)

    async def drain(self, grace: float = 10.0) -> None:
        """Lame duck: accept no one new, ask every endpoint to drain, wait `grace` s for them."""
        await self._endpoints.drain(grace)

    def reload_policy(self, policy: Policy) -> None:
        """Swap the policy and re-check every subscription, monitor and direct channel."""
        self.policy = policy
        for session in self._sessions.values():
            session.publish_decisions.clear()
            session.denials_reported.clear()
        for record in self._subs.values():
            who = record.session.identity
            record.within, record.across = policy.subscribe_verdicts(who, record.pattern)
        self._restricted = sum(not (r.within and r.across) for r in self._subs.values())
        self._monitors.recheck(policy)
        self._channels.recheck(policy)
        for stream in list(self._streams.by_token.values()):
            self._streams.refresh(stream, policy)
        log.info("policy reloaded", policy=repr(policy))

    # -- sessions -----------------------------------------------------------------------------

    def attached(self, session: Session) -> None:
        self._monitors.attached(session)

    def detached(self, session: Session) -> None:
        """An endpoint went: its subscriptions, monitor, names and channels go with it."""
        for sid in list(session.subscriptions):
            self._unsubscribe(session, sid)
        self._monitors.stop(session)
        self._owner_changes(self._names.remove_owner(session.id))  # clients hear of it first
        self._holds.holder_left(session.id)  # what waited goes to whoever owns the name now
        self._channels.forget_endpoint(session.id)
        self._streams.forget_endpoint(session)
        for token in list(session.relays):
            end_relay(session, token)
        if session.cut_reason:
            announce_cutoff(session, self._router, self._subs)

    def dispatch(self, session: Session, frame: bytes) -> None:
        session.frames_in += 1
        header = decode_header(frame, max_body=self.limits.max_body)  # garbage ends the session
        try:
            if header.kind == Kind.PUBLISH:
                self._publish(session, header.subject, header.correlation, frame)
            elif header.kind == Kind.CONTROL:
                body = decode_body(header, frame, CONTROL_DECODER)
                self._control(session, header.correlation, body, header.deadline_ns)
            elif not (session.relays and forward(session, header, frame)):
                raise ProtocolError(
                    f"{header.kind.name.lower()} frames travel on direct channels, not through "
                    "the hub; open one with ChannelOpen"
                )
        except MultikernelError as exc:
            self._fail(session, header.correlation, exc)

    def _reply(self, session: Session, correlation: int, body: object) -> None:
        frame = encode(Kind.CONTROL, body, correlation=correlation)
        if len(frame) > session.max_frame:  # an error for the requester, never for the hub
            raise TooLargeError(
                f"the answer to this {type(body).__name__} would take {len(frame)} bytes, more "
                f"than one frame of this session ({session.max_frame})"
            )
        session.deliver(frame, droppable=False)

    def _answer_with_batch(self, session: Session, correlation: int, body: object) -> None:
        """Like `_reply`, sent at the end of the batch being dispatched (`flush`): many
        Subscribes in one batch are answered in one ring publish and one doorbell, not one each
        (the doorbell was most of a subscribe's cost at the hub)."""
        if not session.staged and not session.answers:
            self._dirty.append(session)
        session.answers.append(encode(Kind.CONTROL, body, correlation=correlation))

    def _fail(self, session: Session, correlation: int, error: MultikernelError) -> None:
        self.counters["errors"] += 1
        if isinstance(error, AccessDeniedError):
            session.denied += 1
            self.counters["denied"] += 1
        frame = encode(Kind.ERROR, error_to_body(error), correlation=correlation)
        session.deliver(frame, droppable=False)

    # -- frames from endpoints ----------------------------------------------------------------

    def _control(
        self, session: Session, correlation: int, body: object, deadline_ns: int = 0
    ) -> None:
        who = session.identity
        match body:
            case Subscribe():
                across = self._subscribe(session, body)
                self._answer_with_batch(session, correlation, _OK_ACROSS if across else _OK)
            case Unsubscribe(sid=sid):
                self._unsubscribe(session, sid)
                self._answer_with_batch(session, correlation, _OK)
            case SubscribeMany(subscriptions=items):
                made: list[int] = []
                try:
                    for item in items:
                        made.append(int(self._subscribe(session, item)))
                except MultikernelError:
                    for item in items[: len(made)]:  # all or none
                        self._unsubscribe(session, item.sid)
                    raise
                self._answer_with_batch(session, correlation, SubscribedMany(bytes(made)))
            case UnsubscribeMany(sids=sids):
                for sid in sids:
                    self._unsubscribe(session, sid)
                self._answer_with_batch(session, correlation, _OK)
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
                if not self._holds.wait(session, target, correlation, deadline_ns):
                    owner = self._names.owner(target)
                    self._channels.open(
                        self._tg(), self.policy, session, owner, target, correlation
                    )
            case HoldNames(names=names, deadline_ns=until):
                for name in names:
                    self._check_may_hold(session, name)
                self._holds.hold(self._tg(), session, names, until)
                self._reply(session, correlation, Ok())
            case SwitchNames(moves=moves):
                self._switch(session, moves)
                self._reply(session, correlation, Ok())
            case ReleaseNames(names=names):
                for name in names:
                    self._check_may_hold(session, name, released=True)
                for name in names:
                    self._holds.end(name, "released")
                self._reply(session, correlation, Ok())
            case AttachRequest():
                self._tg().start_soon(self._channels.hand_over_attachment, session, correlation)
            case ChannelRevoke(token=token):
                if self._channels.side_of(session, token) is not None:
                    del self._channels.records[token]
                    end_relay(session, token)
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
                self._monitors.start(session, pattern)
                self._reply(session, correlation, Ok())
            case MonitorStop():
                self._monitors.stop(session)
                self._reply(session, correlation, Ok())
            case MonitorRecord(path="stream"):
                self._streams.mirrored(session, body, self._monitors)
            case MonitorRecord(frame=frame, channel=token):
                channel = self._channels.side_of(session, token)
                if channel is not None:
                    # Only a side of that channel may report its frames, and the other side is
                    # what the hub recorded, not what the record says.
                    other = channel.server if session.id == channel.client else channel.client
                    self._monitors.mirrored(session, other, frame, token, channel.target)
            case StreamOpen() | StreamStart() | StreamReaderGone() | StreamClose():
                answer = self._streams.control(self.policy, session, body, correlation)
                if answer is not None:
                    self._reply(session, correlation, answer)
            case Introspect(cursor=cursor):
                budget = min(self.limits.max_body, session.max_frame) - PAGE_SLACK
                self._reply(session, correlation, snapshot_page(self.snapshot(), cursor, budget))
            case Heartbeat(seq=seq):
                self._reply(session, correlation, Heartbeat(seq=seq, sent_ns=time.monotonic_ns()))
            case Drain():
                session.draining = True
                self._reply(session, correlation, Ok())
            case _:
                raise ProtocolError(f"unexpected {type(body).__name__} from an attached endpoint")

    def _open_channel(self, session: Session, target: str, correlation: int) -> None:
        """A ChannelOpen that waited for a hold: served against the name's owner now."""
        try:
            owner = self._names.owner(target)
            self._channels.open(self._tg(), self.policy, session, owner, target, correlation)
        except MultikernelError as exc:
            self._fail(session, correlation, exc)

    def _check_may_hold(self, session: Session, name: str, *, released: bool = False) -> None:
        check_may_hold(
            self.policy, self._names, session.identity, name, self._holds.holder_of(name), released
        )

    def _switch(self, session: Session, moves: tuple[NameMove, ...]) -> None:
        """Move every name to its new owner, or none (each move is checked first), announce
        every change, then end the holds: what waited goes to the new owners."""

        def identity_of(endpoint: int) -> Identity | None:
            new = self._sessions.get(endpoint)
            return None if new is None or new.closed else new.identity

        check_switch(
            self.policy, self._names, session.identity, moves, self._holds.holder_of,
            identity_of, self.limits.max_names,
        )  # fmt: skip
        changes: list[NameOwnerChanged] = []
        for move in moves:
            changes += self._names.move(move.name, move.new_owner)
        self._owner_changes(changes)
        for move in moves:
            self._holds.end(move.name, "switched")

    def _owner_changes(self, changes: list[NameOwnerChanged]) -> None:
        announce_owner_changes(
            changes, self._sessions, self._names, self._channels, self._router, self._subs
        )

    def _tg(self) -> anyio.abc.TaskGroup:
        if self._endpoints.tg is None:
            raise RuntimeError("the hub is not serving yet")
        return self._endpoints.tg

    # -- introspection ------------------------------------------------------------------------

    def snapshot(self) -> BusSnapshot:
        """What the hub knows now: endpoints, names, services, subscriptions, channels, counters."""
        self.counters["published"] = self._published
        self.counters["delivered"] = self._delivered
        snapshot = build_snapshot(
            self._sessions.values(),
            self._subs.values(),
            self._names,
            self._channels.info(),
            self.counters,
            time.monotonic() - self._started,
        )
        return msgspec.structs.replace(snapshot, streams=self._streams.info())
