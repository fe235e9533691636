"""The hub's side of one attached endpoint: identity, session channel, outgoing queue, counters.

Frames for an endpoint go into its session channel with a non-blocking send. When the ring is
full (the endpoint is slow) they wait in a queue that a flusher task drains. Past
`Limits.max_pending` publications the endpoint is *congested*, and what happens is the
slow-consumer policy: `block` (the default) slows the publishers that feed it, for at most
`Limits.block_patience` seconds, after which it is *stalled*: publications for it are dropped
until it catches up, and the next one it gets says how many it missed; `drop` drops at once
(counted and reported the same way); `disconnect` cuts it off. A slow subscriber never slows the
hub, and slows a publisher only for a bounded time. Replies to the endpoint's own control
requests are never dropped, but an endpoint that asks and never reads cannot grow the queue
without bound: past `Limits.max_queued_bytes` it is cut off.

Cutting an endpoint off (`cut_off`) is the one way a session ends for cause: whatever the endpoint
did to its side of the channel (died with a backlog, wrote a bogus counter, stopped reading), the
session's own task group is cancelled with the reason recorded, the hub logs one event for it, and
nothing escapes to the hub or to another session.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from multikernel.bus._policy import Identity
from multikernel.protocol import HEADER_SIZE, MAX_SUBJECT_BYTES, ServiceInfo
from multikernel.shm import Channel, PeerDiedError, ShmError, max_payload

if TYPE_CHECKING:
    from multikernel.bus._relay import Relay
    from multikernel.bus._streams import StreamRecord

#: What a misbehaving endpoint can do to its own side of a session, and is cut off for.
PEER_FAULTS = (anyio.BrokenResourceError, anyio.ClosedResourceError, ShmError)


@dataclass(frozen=True)
class Limits:
    """The hub's limits; every one is a documented setting (docs/bus.md)."""

    max_body: int = 256 << 10
    max_pending: int = 4096
    slow_consumer: Literal["block", "drop", "disconnect"] = "block"
    block_patience: float = 2.0  # how long `block` slows a publisher before dropping instead
    session_capacity: int = 1 << 20
    channel_capacity: int = 1 << 20
    hello_timeout: float = 5.0
    max_names: int = 256
    max_subscriptions: int = 4096
    max_queued_bytes: int = 16 << 20
    max_sessions: int = 4096
    max_channels: int = 1024
    max_channels_to_one_name: int = 8
    max_served_channels: int = 8192
    max_held_requests: int = 1024  # ChannelOpens waiting for one held name (BusyError beyond)
    max_hold: float = 60.0  # the longest a name may be held (HoldNames.deadline_ns)
    max_streams: int = 64  # broadcast streams one endpoint writes at once

    def __post_init__(self) -> None:
        largest = self.max_body + HEADER_SIZE + MAX_SUBJECT_BYTES
        for name in ("session_capacity", "channel_capacity"):
            if largest > max_payload(getattr(self, name)):
                raise ValueError(
                    f"Limits: a {name} of {getattr(self, name)} bytes cannot carry a frame with "
                    f"a max_body of {self.max_body}; use at least {4 * largest} (a power of two)"
                )


@dataclass(slots=True, eq=False)
class SubscriptionRecord:
    """One subscription as the hub keeps it, with its access decisions precomputed (slots: the
    hub holds one per subscription, and a dict per record cost ~300 bytes each)."""

    session: Session
    sid: int
    pattern: str
    queue_group: str | None
    within: bool  # may it receive from its own instance (the decision's reason is not kept)
    across: bool  # from other instances
    sid_bytes: bytes = b""  # the sid as it goes into a frame's destination field
    delivered: int = 0
    dropped: int = 0
    unreported: int = 0  # dropped since the last delivered one: told with the next (its gap)


def wrote_garbage(exc: BaseException) -> bool:
    """Whether a failure of a session is garbage its endpoint wrote (not its going away)."""
    return isinstance(exc, ShmError) and not isinstance(exc, PeerDiedError)


class SlowConsumerError(Exception):
    """An endpoint's queue overflowed under the "disconnect" slow-consumer policy."""


class Session:
    """One attached endpoint."""

    def __init__(
        self,
        identity: Identity,
        channel: Channel,
        sock: socket.socket | None,  # None: a session over a region (no fds can reach it)
        limits: Limits,
    ) -> None:
        self.identity = identity
        self.attached = time.monotonic()
        self.id = identity.endpoint_id
        self.id_bytes = self.id.to_bytes(8, "little")  # as stamped into a frame's source field
        self.staged: list[tuple[bytes, SubscriptionRecord]] = []
        self.answers: list[bytes] = []  # control answers staged with the batch (Subscribe's Ok)
        self.channel = channel
        self.sock = sock
        self.limits = limits
        self.max_frame = max_payload(limits.session_capacity)
        self.socket_lock = anyio.Lock()
        self.subscriptions: dict[int, SubscriptionRecord] = {}
        self.subscriptions_peak = 0  # its largest size since rebuilt (compacted)
        self.services: dict[str, ServiceInfo] = {}
        self.relays: dict[int, Relay] = {}  # direct channels the hub relays for it, by token
        self.streams: dict[str, StreamRecord] = {}  # the streams it writes, by subject
        self.monitor: str | None = None
        self.draining = False
        self.features = 0  # granted at attach (Welcome.features)
        self.publish_decisions: dict[str, tuple[bool, bool]] = {}
        self.denials_reported: set[str] = set()
        self.frames_in = self.frames_out = self.dropped = self.denied = 0
        self._pending: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = anyio.Event()
        self._room = anyio.Event()  # set when the queue falls back to half of max_pending
        self.stalled = False  # `block` ran out of patience: drop until it catches up
        self.closed = False
        self.overflowed = False
        self.cut_reason = ""
        self.garbage = False  # cut off for what it wrote (a bad frame or ring counter)
        self.cancel_scope: anyio.CancelScope | None = None

    def cut_off(self, reason: str, *, garbage: bool = False) -> None:
        """End this session for cause (the first reason is the one logged); `garbage` when the
        cause is what the endpoint wrote, which the hub announces on mk.bus.cutoff.<instance>."""
        if not self.cut_reason:
            self.cut_reason = reason
            self.garbage = garbage
        self.closed = True
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def deliver(self, frame: bytes | bytearray, *, droppable: bool = True) -> bool:
        """Queue a frame for the endpoint without waiting; False if it was dropped."""
        if self.closed:
            return False
        if len(frame) > self.max_frame:
            self.dropped += 1  # what the hub checks never gets here; never the hub's error
            return False
        try:
            if not self._pending and self.channel.try_send(frame):  # copies into the ring now
                self.frames_out += 1
                return True
        except PEER_FAULTS as exc:
            self.cut_off(f"its session channel failed: {exc!r}", garbage=wrote_garbage(exc))
            return False
        frame = bytes(frame)  # the caller may reuse its buffer: the queue keeps a copy
        full = self._queued_bytes + len(frame) > self.limits.max_queued_bytes
        if droppable and (full or self._over_limit()):
            self.dropped += 1
            if self.limits.slow_consumer == "disconnect" and not self.overflowed:
                self.overflowed = True
                self.cut_off(f"slow consumer: {len(self._pending)} frames waiting")
            return False
        if full:  # an answer to its own request: never dropped, so the asker goes
            self.cut_off(f"reads nothing: {self._queued_bytes} bytes already waiting for it")
            return False
        self._pending.append(frame)
        self._queued_bytes += len(frame)
        self._wake.set()
        return True

    def _over_limit(self) -> bool:
        """Past max_pending, and the policy drops now (`block` only once stalled)."""
        if len(self._pending) < self.limits.max_pending:
            return False
        return self.limits.slow_consumer != "block" or self.stalled

    @property
    def congested(self) -> bool:
        """Publications for it wait beyond max_pending: under `block`, its publishers wait."""
        return len(self._pending) >= self.limits.max_pending and not self.closed

    async def wait_for_room(self, deadline: float) -> bool:
        """Wait until the queue is back to half of max_pending, or `deadline` (monotonic):
        False when the deadline passed first (the session is stalled from then on)."""
        while self.congested and not self.stalled:
            if self._room.is_set():  # a stale one: every waiter shares the next
                self._room = anyio.Event()
            with anyio.move_on_after(deadline - time.monotonic()):
                await self._room.wait()
                continue
            self.stalled = True
            return False
        return True

    def answer_many(self, frames: list[bytes]) -> None:
        """Send control answers in order, in one ring publish (one doorbell) when they fit;
        never dropped, like `deliver(droppable=False)`."""
        if self.closed:
            return
        sent = 0
        if not self._pending:
            try:
                sent = self.channel.writer.try_send_many(frames)
            except PEER_FAULTS as exc:
                self.cut_off(f"its session channel failed: {exc!r}", garbage=wrote_garbage(exc))
                return
            self.frames_out += sent
        for frame in frames[sent:]:
            self.deliver(frame, droppable=False)

    def deliver_many(self, frames: list[bytes]) -> int:
        """Deliver publications in order, in one ring publish when they fit; returns how many
        were delivered or queued (the rest were dropped by the slow-consumer policy)."""
        if self.closed:
            return 0
        sent = 0
        if not self._pending:
            try:
                sent = self.channel.writer.try_send_many(frames)
            except PEER_FAULTS as exc:
                self.cut_off(f"its session channel failed: {exc!r}", garbage=wrote_garbage(exc))
                return 0
            self.frames_out += sent
        for frame in frames[sent:]:
            if not self.deliver(frame):
                return sent
            sent += 1
        return sent

    async def flush_forever(self) -> None:
        """Drain the queue into the session channel, waiting for room as the endpoint reads.

        Whatever the endpoint does to its ring (dies with a backlog, writes a bogus head) ends
        its own session, never the hub.
        """
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                low = self.limits.max_pending // 2
                while self._pending:
                    await self.channel.send(self._pending[0])
                    self._queued_bytes -= len(self._pending.popleft())
                    self.frames_out += 1
                    if len(self._pending) <= low:
                        self.stalled = False  # caught up: its publishers may wait for it again
                        self._room.set()
        except (PeerDiedError, anyio.ClosedResourceError):
            self.closed = True  # it went away with frames still waiting for it: nobody to blame
            if self.cancel_scope is not None:
                self.cancel_scope.cancel()
        except PEER_FAULTS as exc:
            self.cut_off(f"its session channel failed: {exc!r}", garbage=wrote_garbage(exc))
