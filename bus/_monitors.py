"""Monitors: privileged sessions that see a copy of every frame whose subject matches their pattern.

The hub copies what it routes itself; frames on direct channels never pass through it, so while at
least one monitor is on, the hub tells every endpoint to mirror its direct-channel frames
(`Mirror(on=True)`) and passes the copies on as `MonitorRecord`s. A record an endpoint sends is
only accepted for a channel it is a side of, with the other side taken from the hub's own record,
not from what the sender wrote.
"""

from __future__ import annotations

import time

from multikernel.bus._policy import Policy
from multikernel.bus._session import Session
from multikernel.protocol import (
    Kind,
    Mirror,
    MonitorRecord,
    ProtocolError,
    decode_header,
    encode,
    subject_matches,
)


class Monitors:
    """The monitoring sessions, by endpoint id."""

    def __init__(self, sessions: dict[int, Session]) -> None:
        self._sessions = sessions
        self._by_id: dict[int, Session] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def start(self, session: Session, pattern: str) -> None:
        first = not self._by_id
        session.monitor = pattern
        self._by_id[session.id] = session
        if first:
            self._broadcast(Mirror(on=True))

    def stop(self, session: Session) -> None:
        session.monitor = None
        if self._by_id.pop(session.id, None) is not None and not self._by_id:
            self._broadcast(Mirror(on=False))

    def attached(self, session: Session) -> None:
        """A newcomer mirrors its direct channels too while anyone monitors."""
        if self._by_id:
            session.deliver(encode(Kind.CONTROL, Mirror(on=True)), droppable=False)

    def recheck(self, policy: Policy) -> None:
        """After a policy reload: monitors the new policy refuses stop seeing anything."""
        for sid, monitor in list(self._by_id.items()):
            if not policy.may_monitor(monitor.identity):
                del self._by_id[sid]
                monitor.monitor = None

    def copy(
        self,
        subject: str,
        path: str,
        source: int,
        destination: int,
        frame: bytes,
        channel: int = 0,
        service: str = "",
        source_name: str = "",
    ) -> None:
        """A copy of `frame` to every monitor whose pattern matches `subject`."""
        record = MonitorRecord(
            time.monotonic_ns(), path, source, destination, frame, channel, service, source_name
        )
        out = encode(Kind.CONTROL, record, subject=subject)
        for monitor in self._by_id.values():
            if monitor.monitor is not None and subject_matches(monitor.monitor, subject):
                monitor.deliver(out)

    def mirrored(
        self, session: Session, other: int, frame: bytes, token: int, service: str = ""
    ) -> None:
        """A frame `session` sent or received on direct channel `token` (opened to `service`),
        with peer `other`."""
        if self._by_id:
            try:
                subject = decode_header(frame).subject
            except ProtocolError:
                subject = ""
            self.copy(
                subject or "mk.direct", "direct", session.id, other, frame, token, service,
                session.identity.name,
            )  # fmt: skip

    def _broadcast(self, body: object) -> None:
        frame = encode(Kind.CONTROL, body)
        for session in self._sessions.values():
            session.deliver(frame, droppable=False)
