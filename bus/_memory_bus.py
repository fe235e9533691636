"""The hub's half of the in-memory bus: routing, names, policy and introspection, without I/O.

`MemoryBus` keeps what `multikernel.bus.Hub` keeps, with the same pieces: a `SubjectRouter` of
subscriptions keyed ``(endpoint id, sid)``, a `NameRegistry` of well-known names, a `Policy` asked
about the `Identity` it binds to each endpoint, and the hub's counters. Each method here is the
hub's handling of one control message or publication, in the hub's order, raising the hub's
errors with its messages; an error the hub would send back over the bus makes the same round trip
through `error_to_body`/`error_from_body`, so the caller sees a remote error, as it would.

What is gone is the transport: a publication is routed in the publisher's task straight into the
subscribers' bounded buffers, and a request reaches the owner's `Service` through a `Link`
(`_memory_link`), an in-memory stand-in for a direct channel.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import msgspec

from multikernel.bus._compact import compacted
from multikernel.bus._delivery import (
    denial_message,
    publish_decisions,
    route,
    subscribe_decisions,
)
from multikernel.bus._holds import HOLDS_SUBJECT, check_hold, check_may_hold, check_switch
from multikernel.bus._memory_endpoint import MemoryEndpoint
from multikernel.bus._memory_link import Link
from multikernel.bus._names import NameRegistry
from multikernel.bus._policy import Identity, Policy
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Limits
from multikernel.endpoints import Message, Service, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    AccessDeniedError,
    BusSnapshot,
    BusyError,
    ChannelInfo,
    EndpointInfo,
    MultikernelError,
    NameHeld,
    NameHoldEnded,
    NameMove,
    NameOwnerChanged,
    NoRespondersError,
    ReleaseNameResult,
    RequestNameResult,
    ServiceInfo,
    SubscriptionInfo,
    error_from_body,
    error_to_body,
)

log = get_logger("multikernel.bus.testing")

#: Where the hub publishes name-owner changes (``mk.bus.names.<name>``), as `Hub` does.
NAMES_SUBJECT = "mk.bus.names"


@dataclass(slots=True, eq=False)
class _SubscriptionRecord:
    session: _Session
    subscription: Subscription
    within: bool
    across: bool
    delivered: int = 0


@dataclass
class _Session:
    """The bus's record of one endpoint, like the hub's `Session` without a channel."""

    identity: Identity
    endpoint: MemoryEndpoint
    subscriptions: dict[int, _SubscriptionRecord] = field(default_factory=dict)
    subscriptions_peak: int = 0  # its largest size since rebuilt (compacted)
    services: dict[str, ServiceInfo] = field(default_factory=dict)
    publish_decisions: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    denials_reported: set[str] = field(default_factory=set)
    frames_in: int = 0
    frames_out: int = 0
    denied: int = 0


@dataclass
class _Hold:
    """A held name: new calls to it wait (in `_wait_if_held`) until it ends."""

    holder: int
    deadline_ns: int
    ended: anyio.Event = field(default_factory=anyio.Event)
    waiting: int = 0


class MemoryBus:
    """A bus in one process: `connect()` endpoints to it; `snapshot()` is what `Introspect` says.

    `policy` defaults to `Policy.default()` (same-instance traffic allowed, cross-instance
    denied); `limits` are the hub's (`max_body`, `max_names`, `max_subscriptions` apply here).
    """

    def __init__(self, policy: Policy | None = None, *, limits: Limits | None = None) -> None:
        self.policy = policy or Policy.default()
        self.limits = limits or Limits()
        self._sessions: dict[int, _Session] = {}
        self._router: SubjectRouter[tuple[int, int]] = SubjectRouter()
        self._subs: dict[tuple[int, int], _SubscriptionRecord] = {}
        self._subs_peak = 0  # its largest size since rebuilt (compacted)
        self._names = NameRegistry()
        self._links: dict[int, Link] = {}
        self._holds: dict[str, _Hold] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._started = time.monotonic()
        self._draining = False
        self._emptied: anyio.Event | None = None  # made by `drain`: MemoryBus() may be made sync
        self.counters = dict.fromkeys(
            (
                "sessions", "published", "delivered", "dropped", "denied", "channels", "errors",
                "holds", "held",
            ),
            0,
        )  # fmt: skip

    @asynccontextmanager
    async def connect(
        self, name: str = "", *, instance: int = 0, uid: int = 0, pid: int | None = None
    ) -> AsyncIterator[MemoryEndpoint]:
        """Attach an endpoint as (`instance`, `uid`, `pid`), the identity the policy decides on.

        The real hub binds these from the socket's credentials and the instance the process runs
        in. The default, instance 0 and uid 0, is the host's privileged endpoint, which the
        built-in rules allow everything, whoever runs the tests; pass `instance` and `uid` to test
        as a guest or an ordinary user. Detaches on exit: subscriptions end, names pass to the
        next in line, calls in flight to this endpoint fail with NoRespondersError.
        """
        if self._draining:
            raise ConnectionRefusedError("the bus is draining and accepts no new endpoints")
        await anyio.lowlevel.checkpoint()
        pid = os.getpid() if pid is None else pid
        identity = Identity(next(self._ids), instance, uid, pid, name or f"pid{pid}")
        endpoint = MemoryEndpoint(self, identity)
        session = self._sessions[identity.endpoint_id] = _Session(identity, endpoint)
        self.counters["sessions"] += 1
        try:
            async with anyio.create_task_group() as tg:
                endpoint._tg = tg
                try:
                    yield endpoint
                finally:
                    endpoint._closing = True
                    self._detach(session)
                    await endpoint._close()
                    tg.cancel_scope.cancel()
        finally:
            self._detach(session)

    async def drain(self, grace: float = 10.0) -> None:
        """Like `Hub.drain`: refuse newcomers, ask every endpoint to drain, wait for them to go."""
        self._draining = True
        for session in list(self._sessions.values()):
            session.endpoint.drain_requested.set()
            session.endpoint._spawn(session.endpoint.drain)
        with anyio.move_on_after(grace):
            while self._sessions:
                self._emptied = emptied = anyio.Event()
                await emptied.wait()

    def reload_policy(self, policy: Policy) -> None:
        """Swap the policy and re-check subscriptions and direct channels, as `Hub` does."""
        self.policy = policy
        for session in self._sessions.values():
            session.publish_decisions.clear()
            session.denials_reported.clear()
        for record in self._subs.values():
            who, pattern = record.session.identity, record.subscription.pattern
            record.within, record.across = policy.subscribe_verdicts(who, pattern)
        for token, link in list(self._links.items()):
            client, server = self._sessions[link.client.id], self._sessions[link.server.id]
            if not policy.may_connect(client.identity, server.identity, link.target):
                del self._links[token]
                link.retire()  # calls in flight finish; the next call asks again, and is refused

    # -- what the hub does for each message from an endpoint ---------------------------------

    def _fail(self, session: _Session, error: MultikernelError) -> MultikernelError:
        """Count an error the hub would send back, and make it arrive as a remote one."""
        self.counters["errors"] += 1
        if isinstance(error, AccessDeniedError):
            session.denied += 1
            self.counters["denied"] += 1
        session.frames_out += 1
        return error_from_body(error_to_body(error))

    def _answer(self, session: _Session) -> None:
        session.frames_in += 1
        session.frames_out += 1

    def _subscribe(self, endpoint_id: int, subscription: Subscription) -> bool:
        """Register a subscription; True if it may also hear other instances (`Ok.value`)."""
        session = self._sessions[endpoint_id]
        session.frames_in += 1
        who, pattern = session.identity, subscription.pattern
        try:
            within, across = subscribe_decisions(
                self.policy,
                who,
                pattern,
                len(session.subscriptions),
                self.limits.max_subscriptions,
            )
            key = (endpoint_id, subscription.sid)
            self._router.subscribe(key, pattern, subscription.queue_group)
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        record = _SubscriptionRecord(session, subscription, bool(within), bool(across))
        self._subs[key] = session.subscriptions[subscription.sid] = record
        self._subs_peak = max(self._subs_peak, len(self._subs))
        session.subscriptions_peak = max(session.subscriptions_peak, len(session.subscriptions))
        session.frames_out += 1
        return bool(across)

    def _unsubscribe(self, endpoint_id: int, sid: int) -> None:
        session = self._sessions.get(endpoint_id)
        if session is not None and session.subscriptions.pop(sid, None) is not None:
            del self._subs[(endpoint_id, sid)]
            self._router.unsubscribe((endpoint_id, sid))
            self._subs, self._subs_peak = compacted(self._subs, self._subs_peak)
            session.subscriptions, session.subscriptions_peak = compacted(
                session.subscriptions, session.subscriptions_peak
            )

    def _publish(
        self, endpoint_id: int, subject: str, data: bytes
    ) -> list[tuple[Subscription, Message]]:
        """Route a publication as `Hub._publish` does: policy per side, one per queue group.

        Returns the deliveries whose subscription buffer was full: the publisher waits on them
        (`Subscription.offer`), as a real hub holds a publisher for a slow subscriber."""
        session = self._sessions[endpoint_id]
        session.frames_in += 1
        self.counters["published"] += 1
        decisions = publish_decisions(
            self.policy, session.publish_decisions, session.identity, subject
        )
        keys, denied = route(
            self._router, self._subs, subject, session.identity.instance, decisions
        )
        full = []
        for key in keys:
            record = self._subs[key]
            message = Message(subject, endpoint_id, data)
            if not record.subscription.try_push(message):
                full.append((record.subscription, message))
            record.delivered += 1
            record.session.frames_out += 1
            self.counters["delivered"] += 1
        if denied:
            session.denied += denied
            self.counters["denied"] += denied
            if subject not in session.denials_reported:  # once per subject per policy
                session.denials_reported.add(subject)
                error = AccessDeniedError(
                    denial_message(self.policy, session.identity, subject, decisions)
                )
                session.frames_out += 1
                session.endpoint._async_error(error_from_body(error_to_body(error)))
        return full

    def _request_name(self, endpoint_id: int, service: Service) -> RequestNameResult:
        session = self._sessions[endpoint_id]
        self._answer(session)
        name = service.name
        try:
            decision = self.policy.may_own(session.identity, name)
            if not decision:
                raise AccessDeniedError(f"owning {name!r} refused: {decision.reason}")
            if len(self._names.names_of(endpoint_id)) >= self.limits.max_names:
                raise BusyError(f"an endpoint may own at most {self.limits.max_names} names")
            result, changes = self._names.request(name, endpoint_id, service.flags)
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        self._owner_changes(changes)
        if result in (RequestNameResult.PRIMARY_OWNER, RequestNameResult.ALREADY_OWNER):
            service.primary = True
            session.services[name] = service.info()
        return result

    def _release_name(self, endpoint_id: int, name: str) -> ReleaseNameResult:
        session = self._sessions.get(endpoint_id)
        if session is None:
            return ReleaseNameResult.NOT_OWNER
        self._answer(session)
        released, changes = self._names.release(name, endpoint_id)
        self._owner_changes(changes)
        return released

    def _open_link(self, client: MemoryEndpoint, target: str) -> Link:
        """A direct channel to `target`'s owner, after the hub's checks (`ChannelOpen`)."""
        session = self._sessions[client.id]
        self._answer(session)
        owner = self._names.owner(target)
        server = self._sessions.get(owner) if owner is not None else None
        try:
            if server is None:
                raise NoRespondersError(f"nobody owns {target!r}; the request was not delivered")
            decision = self.policy.may_connect(session.identity, server.identity, target)
            if not decision:
                raise AccessDeniedError(f"calling {target!r} refused: {decision.reason}")
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        service = server.endpoint._services[target]  # names are owned only through services
        link = Link(next(self._tokens), target, client, server.endpoint, service)
        self._links[link.token] = link
        self.counters["channels"] += 1
        return link

    # -- holds: as the hub's, with every call waiting in one place (there is no transport) ----

    def _holder_of(self, name: str) -> int | None:
        hold = self._holds.get(name)
        return None if hold is None else hold.holder

    def _hold_names(self, holder: MemoryEndpoint, names: tuple[str, ...], deadline_ns: int) -> None:
        session = self._sessions[holder.id]
        self._answer(session)
        try:
            for name in names:
                check_may_hold(self.policy, self._names, session.identity, name,
                               self._holder_of(name))  # fmt: skip
            mine = sum(h.holder == holder.id for h in self._holds.values())
            left = check_hold(names, deadline_ns, self._holder_of, mine, self.limits)
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        holds = {}
        for name in names:
            holds[name] = self._holds[name] = _Hold(holder.id, deadline_ns)
            self._publish_event(f"{HOLDS_SUBJECT}.{name}", NameHeld(name, deadline_ns, holder.id))
        self.counters["holds"] += len(names)
        holder._spawn(self._expire, holds, left)

    async def _expire(self, holds: dict[str, _Hold], left: float) -> None:
        await anyio.sleep(left)
        for name, hold in holds.items():
            if self._holds.get(name) is hold:
                self._end_hold(name, "deadline")

    def _end_hold(self, name: str, reason: str) -> None:
        hold = self._holds.pop(name, None)
        if hold is not None:
            hold.ended.set()
            self._publish_event(f"{HOLDS_SUBJECT}.{name}", NameHoldEnded(name, reason))

    async def _wait_if_held(self, caller: int, target: str) -> None:
        """A call to a held name waits for the end of the hold (`max_held_requests` at most)."""
        hold = self._holds.get(target)
        if hold is None:
            return
        if hold.waiting >= self.limits.max_held_requests:
            error = BusyError(
                f"{target!r} is held for a switch and {hold.waiting} callers already wait for it "
                "(Limits.max_held_requests); retry after the switch"
            )
            raise self._fail(self._sessions[caller], error)
        hold.waiting += 1
        self.counters["held"] += 1
        try:
            with anyio.move_on_after(max(0.0, (hold.deadline_ns - time.monotonic_ns()) / 1e9)):
                await hold.ended.wait()
        finally:
            hold.waiting -= 1

    def _switch_names(self, endpoint_id: int, moves: tuple[NameMove, ...]) -> None:
        session = self._sessions[endpoint_id]
        self._answer(session)

        def identity_of(endpoint: int) -> Identity | None:
            new = self._sessions.get(endpoint)
            return None if new is None else new.identity

        try:
            check_switch(self.policy, self._names, session.identity, moves, self._holder_of,
                         identity_of, self.limits.max_names)  # fmt: skip
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        changes: list[NameOwnerChanged] = []
        for move in moves:
            changes += self._names.move(move.name, move.new_owner)
        self._owner_changes(changes)
        for move in moves:
            self._end_hold(move.name, "switched")

    def _release_names(self, endpoint_id: int, names: tuple[str, ...]) -> None:
        session = self._sessions[endpoint_id]
        self._answer(session)
        try:
            for name in names:
                check_may_hold(self.policy, self._names, session.identity, name,
                               self._holder_of(name), released=True)  # fmt: skip
        except MultikernelError as exc:
            raise self._fail(session, exc) from None
        for name in names:
            self._end_hold(name, "released")

    def _publish_event(self, subject: str, body: object) -> None:
        data = msgspec.msgpack.encode(body)
        for key in self._router.match(subject):
            self._subs[key].subscription.push(Message(subject, 0, data))

    def _owner_changes(self, changes: list[NameOwnerChanged]) -> None:
        """Promote the new owner's service, move channels, publish on mk.bus.names.<name>."""
        for change in changes:
            old, new = self._sessions.get(change.old_owner), self._sessions.get(change.new_owner)
            for session in (old, new):
                if session is not None:  # `name:` selectors look at the names an endpoint owns
                    names = frozenset(self._names.names_of(session.identity.endpoint_id))
                    session.identity = dataclasses.replace(session.identity, names=names)
                    session.publish_decisions.clear()
            if old is not None and (service := old.endpoint._services.get(change.name)) is not None:
                service.primary = False
            if new is not None and (service := new.endpoint._services.get(change.name)) is not None:
                service.primary = True
                new.services[change.name] = service.info()
            for token, link in list(self._links.items()):
                if link.target == change.name and link.server.id != change.new_owner:
                    del self._links[token]
                    link.retire()  # calls in flight finish; new ones go to the new owner
            self._publish_event(f"{NAMES_SUBJECT}.{change.name}", change)
            log.debug(
                "name owner changed", name=change.name, old=change.old_owner, new=change.new_owner
            )

    def _detach(self, session: _Session) -> None:
        """The endpoint went away: forget its subscriptions and channels, pass its names on."""
        if self._sessions.pop(session.identity.endpoint_id, None) is None:
            return
        for sid in list(session.subscriptions):
            self._unsubscribe(session.identity.endpoint_id, sid)
        self._owner_changes(self._names.remove_owner(session.identity.endpoint_id))
        for name in [n for n, h in self._holds.items() if h.holder == session.identity.endpoint_id]:
            self._end_hold(name, "holder left")
        for token, link in list(self._links.items()):
            if session.endpoint in (link.client, link.server):
                del self._links[token]
        if not self._sessions and self._emptied is not None:
            self._emptied.set()

    # -- introspection --------------------------------------------------------------------------

    def snapshot(self) -> BusSnapshot:
        """What the hub's `Introspect` answers: endpoints, names, services, subscriptions."""
        endpoints = tuple(
            EndpointInfo(
                s.identity.endpoint_id,
                s.identity.name,
                s.identity.instance,
                s.identity.uid,
                s.identity.pid,
                tuple(self._names.names_of(s.identity.endpoint_id)),
                tuple(r.subscription.pattern for r in s.subscriptions.values()),
                s.frames_in,
                s.frames_out,
                0,
                0,
                s.denied,
            )
            for s in self._sessions.values()
        )
        subscriptions = tuple(
            SubscriptionInfo(
                r.session.identity.endpoint_id,
                r.subscription.sid,
                r.subscription.pattern,
                r.subscription.queue_group or "",
                r.delivered,
            )
            for r in self._subs.values()
        )
        return BusSnapshot(
            os.getpid(),
            time.monotonic() - self._started,
            endpoints,
            {name: tuple(line) for name, line in self._names.snapshot().items()},
            tuple(info for s in self._sessions.values() for info in s.services.values()),
            subscriptions,
            tuple(
                ChannelInfo(c.token, c.target, c.client.id, c.server.id)
                for c in self._links.values()
            ),
            dict(self.counters),
        )
