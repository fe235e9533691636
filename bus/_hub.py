"""The hub: attaches endpoints, owns names, subscriptions and policy, and sets up direct channels.

The hub is not on the request/reply data path. It accepts endpoints on a Unix control socket (or
on a socket an instance inherited at spawn), gives each a session channel in shared memory, and
then only: routes publications to subscribers (header-only, the body bytes untouched), answers
control requests (subscribe, names, channel setup, monitor, introspection), and publishes
name-owner changes. Requests and replies flow on direct channels it creates between the two
endpoints, so a hub restart does not interrupt them: endpoints re-attach and re-register.
"""

from __future__ import annotations

import dataclasses
import os
import time

import anyio
import anyio.abc

from multikernel.bus._delivery import (
    denial_message,
    publish_decisions,
    route,
    subscribe_decisions,
)
from multikernel.bus._hub_sessions import NAMES_SUBJECT, ChannelRecord, HubSessions
from multikernel.bus._policy import Policy
from multikernel.bus._session import Session, SubscriptionRecord
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import (
    send_handle,
    send_with_fds,
)
from multikernel.protocol import (
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
    Heartbeat,
    Introspect,
    Kind,
    Mirror,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
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
    decode_header,
    encode,
    error_to_body,
    subject_matches,
    validate_pattern,
)
from multikernel.shm import create_channel_handles

log = get_logger("multikernel.bus")

#: Where the hub stamps a routed frame: the publisher it came from and the subscription it is for
#: (docs/protocol.md, header table).
_SOURCE_OFFSET = 16
_DESTINATION_OFFSET = 24


class Hub(HubSessions):
    """The bus hub. Run it with `serve()` inside a task group, or `python -m multikernel.bus`."""

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

    # -- frames from endpoints ----------------------------------------------------------------

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
            case MonitorRecord(frame=frame, channel=token):
                channel = self._channels.get(token)
                if channel is not None and session.id in (channel.client, channel.server):
                    # Only a side of that channel may report its frames, and the other side is
                    # what the hub recorded, not what the record says.
                    other = channel.server if session.id == channel.client else channel.client
                    self._mirrored(session, other, frame, token)
            case Introspect():
                self._reply(session, correlation, self.snapshot())
            case Heartbeat(seq=seq):
                self._reply(session, correlation, Heartbeat(seq=seq, sent_ns=time.monotonic_ns()))
            case Drain():
                session.draining = True
                self._reply(session, correlation, Ok())
            case _:
                raise ProtocolError(f"unexpected {type(body).__name__} from an attached endpoint")

    def _mirrored(self, session: Session, other: int, frame: bytes, token: int) -> None:
        if self._monitors:
            try:
                subject = decode_header(frame).subject
            except ProtocolError:
                subject = ""
            self._to_monitors(subject or "mk.direct", "direct", session.id, other, frame, token)

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
            frame = encode(Kind.CONTROL, change)
            notified = set()
            for owner in (change.old_owner, change.new_owner):  # the owners hear of it too
                session = self._sessions.get(owner)
                if session is None:
                    continue
                # `name:` selectors look at the names an endpoint owns
                names = frozenset(self._names.names_of(owner))
                session.identity = dataclasses.replace(session.identity, names=names)
                session.publish_decisions.clear()
                if owner == change.old_owner:
                    session.services.pop(change.name, None)  # its description goes too
                notified.add(owner)
                session.deliver(frame, droppable=False)
            for record in self._channels.values():
                if record.target == change.name and record.client not in notified:
                    notified.add(record.client)
                    client = self._sessions.get(record.client)
                    if client is not None:
                        client.deliver(frame, droppable=False)
            subject = f"{NAMES_SUBJECT}.{change.name}"
            event = encode(Kind.PUBLISH, change, subject=subject)
            stamped = bytearray(event)
            for key in self._router.match(subject):
                subscription = self._subs[key]
                stamped[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 8] = subscription.sid_bytes
                subscription.session.deliver(stamped)  # copied into its ring (or queue) at once
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
        # Bound to the requester's instance and uid: an attachment never widens who it is.
        theirs = self.open_instance_socket(instance, uid=session.identity.uid)
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
