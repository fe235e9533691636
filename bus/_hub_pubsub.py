"""The hub's publish and subscribe: routing a publication to its subscribers, staging it for the
batch, sending each subscriber its batch with one ring publish (gaps told in the header), and
the subscription table (compacted as it shrinks, so memory comes back).

`Hub` inherits `HubPubSub`; these are the attributes of the hub it uses.
"""

from __future__ import annotations

import struct
from typing import Final

from multikernel.bus._compact import compacted
from multikernel.bus._delivery import (
    denial_message,
    publish_decisions,
    route,
    subscribe_decisions,
)
from multikernel.bus._monitors import Monitors
from multikernel.bus._name_events import DESTINATION_OFFSET as _DESTINATION_OFFSET
from multikernel.bus._name_events import SOURCE_OFFSET as _SOURCE_OFFSET
from multikernel.bus._policy import Policy
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Limits, Session, SubscriptionRecord
from multikernel.bus._streams import StreamBroker
from multikernel.protocol import (
    MISSED_OFFSET,
    AccessDeniedError,
    Kind,
    ProtocolError,
    Subscribe,
    encode,
    error_to_body,
)

_GAP: Final = struct.Struct("<I")
_GAP_OFFSET: Final = MISSED_OFFSET


def _with_gap(frame: bytes, record: SubscriptionRecord) -> bytes:
    """The frame, telling its subscriber how many publications it missed just before it (the
    header's reserved word, on deliveries: docs/protocol.md); unchanged when none were."""
    if not record.unreported:
        return frame
    stamped = bytearray(frame)
    _GAP.pack_into(stamped, _GAP_OFFSET, min(record.unreported, 0xFFFFFFFF))
    return bytes(stamped)


class HubPubSub:
    """Publications and subscriptions of the hub (see the module docstring)."""

    policy: Policy
    limits: Limits
    counters: dict[str, int]
    _router: SubjectRouter[tuple[int, int]]
    _subs: dict[tuple[int, int], SubscriptionRecord]
    _subs_peak: int
    _restricted: int
    _monitors: Monitors
    _published: int
    _delivered: int
    _dirty: list[Session]
    _streams: StreamBroker

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
        if session.streams and (stream := session.streams.get(subject)) is not None:
            keys = [key for key in keys if key not in stream.served]  # the stream feeds them
        dirty = self._dirty
        for key in keys:
            record = subs[key]
            stamped[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 8] = record.sid_bytes
            target = record.session
            if not target.staged and not target.answers:
                dirty.append(target)
            target.staged.append((bytes(stamped), record))  # sent with the batch, in order
        if denied:
            session.denied += denied
            self.counters["denied"] += denied
            if subject not in session.denials_reported:  # once per subject per policy
                session.denials_reported.add(subject)
                error = AccessDeniedError(
                    denial_message(self.policy, session.identity, subject, decisions)
                )
                frame = encode(Kind.ERROR, error_to_body(error), correlation=correlation)
                session.deliver(frame, droppable=False)
        if self._monitors:
            self._monitors.copy(
                subject, "hub", session.id, 0, frame, source_name=session.identity.name
            )

    def flush(self) -> list[Session]:
        """Send the publications staged while dispatching a batch: one ring publish (and at
        most one doorbell) per subscriber per batch instead of one per message. Returns the
        subscribers left congested, for the publisher to wait on under `block`."""
        dirty, self._dirty = self._dirty, []
        delivered = dropped = 0
        congested: list[Session] = []
        for session in dirty:
            if session.answers:
                answers, session.answers = session.answers, []
                session.answer_many(answers)
            staged, session.staged = session.staged, []
            frames = [frame for frame, _ in staged]
            told: set[int] = set()
            for i, (frame, record) in enumerate(staged):
                if record.unreported and record.sid not in told:  # its first in this batch
                    told.add(record.sid)
                    frames[i] = _with_gap(frame, record)
            sent = session.deliver_many(frames)
            for i, (_, record) in enumerate(staged):
                if i < sent:
                    record.delivered += 1
                    record.unreported = 0  # told in this frame (or nothing to tell)
                else:
                    record.dropped += 1
                    record.unreported += 1
            delivered += sent
            dropped += len(staged) - sent
            if session.congested:
                congested.append(session)
        self._delivered += delivered
        self.counters["dropped"] += dropped
        return congested if self.limits.slow_consumer == "block" else []

    def _subscribe(self, session: Session, item: Subscribe) -> bool:
        """Make one subscription (or raise why not); whether it may hear other instances."""
        pattern, sid = item.subject, item.sid
        within, across = subscribe_decisions(
            self.policy,
            session.identity,
            pattern,
            len(session.subscriptions),
            self.limits.max_subscriptions,
        )
        key = (session.id, sid)
        if key in self._subs:
            raise ProtocolError(f"subscription id {sid} is already in use on this endpoint")
        self._router.subscribe(key, pattern, item.queue_group)
        record = SubscriptionRecord(
            session, sid, pattern, item.queue_group, bool(within), bool(across),
            sid.to_bytes(8, "little"),
        )  # fmt: skip
        self._subs[key] = session.subscriptions[sid] = record
        self._subs_peak = max(self._subs_peak, len(self._subs))
        session.subscriptions_peak = max(session.subscriptions_peak, len(session.subscriptions))
        self._restricted += not (within and across)
        if self._streams:
            for stream in self._streams.matching(pattern):
                self._streams.refresh(stream, self.policy)  # its StreamSids before our answer
        return bool(across)

    def _unsubscribe(self, session: Session, sid: int) -> None:
        record = session.subscriptions.pop(sid, None)
        if record is not None:
            self._restricted -= not (record.within and record.across)
            self._subs.pop((session.id, sid), None)
            self._router.unsubscribe((session.id, sid))
            self._subs, self._subs_peak = compacted(self._subs, self._subs_peak)
            if self._streams:
                for stream in self._streams.matching(record.pattern):
                    self._streams.refresh(stream, self.policy)
            session.subscriptions, session.subscriptions_peak = compacted(
                session.subscriptions, session.subscriptions_peak
            )
