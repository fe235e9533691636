"""Broadcast streams: the hub sets up one writer and many readers, then stays off the data path.

A publisher asks for a stream on a literal subject (`StreamOpen`). The hub checks that the policy
lets it publish there, makes the stream's memory (`multikernel.shm._stream`) and hands it to the
writer, which maps it and seals it against writing by anyone else (`StreamStart`; the hub checks
the seal before any reader gets it). From then on the hub keeps, for every stream, the readers
it should have: one per endpoint with a subscription that matches the subject and that the
policy lets receive from the writer (the same rule as routing, `bus/_delivery.py`), and the sids
each feeds. `refresh` computes that from the subscription table and hands out the differences:
a new reader gets the stream (read-only), a cursor page and its doorbell ends; the writer gets
that reader's cursor page and the other ends; each reader is told its sids (`StreamSids`, on the
session channel, before the answer to the Subscribe that caused it). It runs when a matching
subscription comes or goes, when an endpoint goes, and on policy reload.

Queue groups, endpoints without the STREAMS feature and endpoints over a region (no fd reaches
them) keep the hub-routed path: while any such subscription matches, the writer is told to
publish through the hub as well (`StreamRoute`), and the hub skips the subscriptions the stream
feeds (`served`). Messages to one endpoint's socket go out in order, from one task at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from multikernel.bus._delivery import publish_decisions
from multikernel.bus._monitors import Monitors
from multikernel.bus._policy import Policy
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Limits, Session, SubscriptionRecord
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import close_fds, send_with_fds
from multikernel.protocol import (
    AccessDeniedError,
    BusyError,
    Feature,
    Kind,
    MonitorRecord,
    Ok,
    ProtocolError,
    RefusedError,
    StreamClose,
    StreamInfo,
    StreamOpen,
    StreamReaderGone,
    StreamReady,
    StreamRoute,
    StreamSids,
    StreamStart,
    encode,
    subject_matches,
    validate_subject,
)
from multikernel.shm import create_stream, reader_handles, sealed_for_readers, stream_position

log = get_logger("multikernel.bus")


@dataclass(eq=False, slots=True)
class StreamReaderRecord:
    id: int  # numbers the reader within its stream
    session: Session
    sids: tuple[int, ...] = ()


@dataclass(eq=False)
class StreamRecord:
    """One stream as the hub keeps it: its writer, memory, readers by endpoint and their sids."""

    token: int
    subject: str
    writer: Session
    fd: int  # the stream memfd: handed to each new reader
    slow: str
    started: bool = False
    readers: dict[int, StreamReaderRecord] = field(default_factory=dict)  # by endpoint
    refused: set[int] = field(default_factory=set)  # endpoints the writer dropped for cause
    served: set[tuple[int, int]] = field(default_factory=set)  # (endpoint, sid) it feeds
    hub_routed: bool = False
    next_reader: int = 1
    dropped_readers: int = 0


class StreamBroker:
    """The streams of the hub, by token and by writer."""

    def __init__(
        self,
        router: SubjectRouter[tuple[int, int]],
        subs: Callable[[], dict[tuple[int, int], SubscriptionRecord]],
        limits: Limits,
        counters: dict[str, int],
        tg: Callable[[], anyio.abc.TaskGroup],
    ) -> None:
        self._router = router
        self._subs = subs
        self._limits = limits
        self._counters = counters
        self._tg = tg
        self.by_token: dict[int, StreamRecord] = {}
        self._tokens = 0
        self._outbox: dict[int, list[tuple[Session, bytes, list[int]]]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_token)

    # -- the writer's requests ----------------------------------------------------------------

    def open(
        self, policy: Policy, session: Session, subject: str, slow: str, correlation: int
    ) -> None:
        """Make a stream for `session` on `subject`; its memory goes over the socket."""
        validate_subject(subject)  # literal: no wildcards
        within, across = publish_decisions(
            policy, session.publish_decisions, session.identity, subject
        )
        if not within and not across:
            reason = policy.may_publish(session.identity, subject).reason
            raise AccessDeniedError(f"stream on {subject!r} refused: {reason}")
        if session.sock is None:
            raise RefusedError(
                "a stream's memory is handed over as a file descriptor, and this endpoint is "
                "attached over a region where none can reach it: publish through the hub"
            )
        if subject in session.streams:
            raise BusyError(f"this endpoint already writes a stream on {subject!r}: use it")
        if len(session.streams) >= self._limits.max_streams:
            raise BusyError(
                f"an endpoint may write {self._limits.max_streams} streams "
                "(Limits.max_streams); close one"
            )
        slow = slow or ("drop" if self._limits.slow_consumer == "drop" else "block")
        if slow not in ("block", "drop"):
            raise ProtocolError(f"a stream's slow-reader policy is block or drop, not {slow!r}")
        try:
            fd = create_stream(self._limits.channel_capacity)
        except OSError as exc:
            raise BusyError(f"the hub cannot make a stream now ({exc.strerror})") from None
        self._tokens += 1
        record = StreamRecord(self._tokens, subject, session, fd, slow)
        self.by_token[record.token] = session.streams[subject] = record
        patience = int(self._limits.block_patience * 1000)
        ready = StreamReady(record.token, "writer", subject, slow=slow, patience_ms=patience)
        self._send(session, ready, [os.dup(fd)], correlation)

    def control(
        self, policy: Policy, session: Session, body: object, correlation: int
    ) -> object | None:
        """A stream request from an endpoint; the answer to send it, if any (StreamOpen's goes
        over the socket)."""
        match body:
            case StreamOpen(subject=subject, slow=slow):
                self.open(policy, session, subject, slow, correlation)
            case StreamStart(token=token):
                return Ok(value=self.start(policy, session, token))
            case StreamReaderGone(token=token, reader=reader, reason=reason):
                self.writer_dropped(session, token, reader, reason)
            case StreamClose(token=token):
                record = self.by_token.get(token)
                if record is not None and record.writer is session:
                    self.close(token)
        return None

    def mirrored(self, session: Session, record: MonitorRecord, monitors: Monitors) -> None:
        """A copy of a frame the writer of stream `record.channel` wrote, for the monitors:
        passed on only from that stream's own writer."""
        stream = self.by_token.get(record.channel)
        if stream is not None and stream.writer is session and monitors:
            monitors.copy(
                stream.subject, "stream", session.id, 0, record.frame, record.channel,
                source_name=session.identity.name,
            )  # fmt: skip

    def start(self, policy: Policy, session: Session, token: int) -> int:
        """The writer mapped and sealed stream `token`: give it its readers; how many."""
        record = self._of_writer(session, token)
        if not sealed_for_readers(record.fd):
            raise ProtocolError(
                f"stream {token} is not sealed against writing: map it, then seal it "
                "(F_SEAL_FUTURE_WRITE | F_SEAL_SEAL; StreamWriter does) before StreamStart"
            )
        record.started = True
        self.refresh(record, policy)
        return len(record.readers)

    def _of_writer(self, session: Session, token: int) -> StreamRecord:
        record = self.by_token.get(token)
        if record is None or record.writer is not session:
            raise ProtocolError(f"this endpoint writes no stream {token}")
        return record

    def writer_dropped(self, session: Session, token: int, reader: int, reason: str) -> None:
        """The writer dropped one of its readers (closed, died, or wrote a bad cursor)."""
        record = self.by_token.get(token)
        if record is None or record.writer is not session:
            return
        for endpoint, held in list(record.readers.items()):
            if held.id == reader:
                record.dropped_readers += 1
                if "cursor" in reason:  # it wrote garbage: no reader for it on this stream
                    record.refused.add(endpoint)
                    log.warning(
                        "stream reader dropped", subject=record.subject, endpoint=endpoint,
                        reason=reason,
                    )  # fmt: skip
                self._remove_reader(record, endpoint, tell_writer=False)

    def close(self, token: int, reason: str = "", *, tell_writer: bool = False) -> None:
        record = self.by_token.pop(token, None)
        if record is None:
            return
        record.writer.streams.pop(record.subject, None)
        for endpoint in list(record.readers):
            # A writer that closes marks the stream closed: its readers read what is left,
            # then end. One the hub withdraws is cut off now on both sides.
            self._remove_reader(record, endpoint, tell_writer=False, tell_reader=tell_writer)
        if tell_writer:
            self._send(record.writer, StreamClose(token, reason), [])
        os.close(record.fd)

    # -- keeping the readers right ------------------------------------------------------------

    def refresh(self, record: StreamRecord, policy: Policy) -> None:
        """Give `record` exactly the readers and sids the subscription table and policy say."""
        if not record.started:
            return
        writer = record.writer
        within, across = publish_decisions(
            policy, writer.publish_decisions, writer.identity, record.subject
        )
        if not within and not across:
            self.close(record.token, "the policy no longer lets it publish here", tell_writer=True)
            return
        subs = self._subs()
        wanted: dict[int, list[int]] = {}
        hub_routed = False
        sessions: dict[int, Session] = {}
        for key in self._router.match(record.subject):
            sub = subs[key]
            target = sub.session
            same = target.identity.instance == writer.identity.instance
            if not ((within and sub.within) if same else (across and sub.across)):
                continue
            if (
                sub.queue_group is not None
                or target.sock is None
                or not target.features & Feature.STREAMS
                or target.id in record.refused
            ):
                hub_routed = True
                continue
            wanted.setdefault(target.id, []).append(sub.sid)
            sessions[target.id] = target
        for endpoint in list(record.readers):
            if endpoint not in wanted:
                self._remove_reader(record, endpoint, tell_writer=True)
        for endpoint, sid_list in wanted.items():
            sids = tuple(sorted(sid_list))
            target = sessions[endpoint]
            held = record.readers.get(endpoint)
            if held is None:
                if not self._add_reader(record, target):
                    hub_routed = True
                    continue
                held = record.readers[endpoint]
            if held.sids != sids:
                held.sids = sids
                target.deliver(
                    encode(Kind.CONTROL, StreamSids(record.token, held.id, sids)), droppable=False
                )
        record.served = {(e, sid) for e, held in record.readers.items() for sid in held.sids}
        if hub_routed != record.hub_routed:
            record.hub_routed = hub_routed
            self._send(writer, StreamRoute(record.token, hub_routed), [])

    def _add_reader(self, record: StreamRecord, target: Session) -> bool:
        """Make a reader's cursor page and doorbells; hand them out. False if the hub cannot."""
        try:
            theirs, ours = reader_handles(record.fd)
        except OSError as exc:
            log.warning("cannot make a stream reader", subject=record.subject, error=str(exc))
            return False
        reader = record.next_reader
        record.next_reader += 1
        record.readers[target.id] = StreamReaderRecord(reader, target)
        writer = record.writer
        w = writer.identity
        self._send(
            target,
            StreamReady(
                record.token, "reader", record.subject, writer.id, w.name, w.instance, reader,
                record.slow,
            ),
            theirs,
        )  # fmt: skip
        t = target.identity
        add = StreamReady(
            record.token, "add", record.subject, target.id, t.name, t.instance, reader
        )
        self._send(writer, add, ours)
        return True

    def _remove_reader(
        self, record: StreamRecord, endpoint: int, *, tell_writer: bool, tell_reader: bool = True
    ) -> None:
        held = record.readers.pop(endpoint, None)
        if held is None:
            return
        record.served = {(e, s) for e, s in record.served if e != endpoint}
        if tell_reader:
            frame = encode(Kind.CONTROL, StreamSids(record.token, held.id))
            held.session.deliver(frame, droppable=False)
        if tell_writer:
            self._send(record.writer, StreamReaderGone(record.token, held.id), [])

    def matching(self, pattern: str) -> list[StreamRecord]:
        """The streams a subscription to `pattern` may concern."""
        return [r for r in self.by_token.values() if subject_matches(pattern, r.subject)]

    def forget_endpoint(self, session: Session) -> None:
        """An endpoint went: the streams it wrote close (their readers see the writer gone)."""
        for record in list(session.streams.values()):
            self.close(record.token)
        self._outbox.pop(session.id, None)

    def info(self) -> tuple[StreamInfo, ...]:
        out = []
        for r in self.by_token.values():
            frames = stream_position(r.fd)[1] if r.started else 0
            out.append(
                StreamInfo(
                    r.token, r.subject, r.writer.id, tuple(sorted(r.readers)), frames, r.slow,
                    r.hub_routed, r.dropped_readers,
                )
            )  # fmt: skip
        return tuple(out)

    # -- the control socket, in order per endpoint --------------------------------------------

    def _send(self, session: Session, body: object, fds: list[int], correlation: int = 0) -> None:
        """Queue `body` (with `fds`, closed once sent) for `session`'s control socket."""
        if session.closed or session.sock is None:
            close_fds(fds)
            return
        frame = encode(Kind.CONTROL, body, correlation=correlation)
        queue = self._outbox.setdefault(session.id, [])
        queue.append((session, frame, fds))
        if len(queue) == 1:
            self._tg().start_soon(self._flush_socket, session.id, queue)

    async def _flush_socket(
        self, endpoint: int, queue: list[tuple[Session, bytes, list[int]]]
    ) -> None:
        try:
            while queue:
                session, frame, fds = queue[0]
                try:
                    if not session.closed and session.sock is not None:
                        async with session.socket_lock:
                            await send_with_fds(session.sock, frame, fds)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # it went away; its session's end cleans up
                finally:
                    close_fds(fds)
                    queue.pop(0)
        finally:
            close_fds([fd for _, _, fds in queue for fd in fds])
            if self._outbox.get(endpoint) is queue:
                del self._outbox[endpoint]
