"""The hub's side of one attached endpoint: identity, session channel, outgoing queue, counters.

Frames for an endpoint go into its session channel with a non-blocking send. When the ring is
full (the endpoint is slow) they wait in a bounded queue that a flusher task drains; publications
beyond `Limits.max_pending` are dropped and counted (or the endpoint is disconnected, by policy),
so a slow subscriber never slows the hub or anyone else. Replies to the endpoint's own control
requests are never dropped: there are at most as many as requests it has in flight.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import anyio

from multikernel.bus._policy import Decision, Identity
from multikernel.protocol import HEADER_SIZE, MAX_SUBJECT_BYTES, ServiceInfo
from multikernel.shm import Channel, max_payload


@dataclass(frozen=True)
class Limits:
    """The hub's limits; every one is a documented setting (docs/bus.md)."""

    max_body: int = 256 << 10
    max_pending: int = 4096
    slow_consumer: Literal["drop", "disconnect"] = "drop"
    session_capacity: int = 1 << 20
    channel_capacity: int = 1 << 20
    hello_timeout: float = 5.0
    max_names: int = 256
    max_subscriptions: int = 4096

    def __post_init__(self) -> None:
        largest = self.max_body + HEADER_SIZE + MAX_SUBJECT_BYTES
        for name in ("session_capacity", "channel_capacity"):
            if largest > max_payload(getattr(self, name)):
                raise ValueError(
                    f"Limits: a {name} of {getattr(self, name)} bytes cannot carry a frame with "
                    f"a max_body of {self.max_body}; use at least {4 * largest} (a power of two)"
                )


@dataclass
class SubscriptionRecord:
    """One subscription as the hub keeps it, with its access decisions precomputed."""

    session: Session
    sid: int
    pattern: str
    queue_group: str | None
    within: Decision
    across: Decision
    sid_bytes: bytes = b""  # the sid as it goes into a frame's destination field
    delivered: int = 0
    dropped: int = 0


class SlowConsumerError(Exception):
    """An endpoint's queue overflowed under the "disconnect" slow-consumer policy."""


class Session:
    """One attached endpoint."""

    def __init__(
        self,
        identity: Identity,
        channel: Channel,
        sock: socket.socket,
        limits: Limits,
    ) -> None:
        self.identity = identity
        self.attached = time.monotonic()
        self.id = identity.endpoint_id
        self.id_bytes = self.id.to_bytes(8, "little")  # as stamped into a frame's source field
        self.staged: list[tuple[bytes, SubscriptionRecord]] = []
        self.channel = channel
        self.sock = sock
        self.limits = limits
        self.socket_lock = anyio.Lock()
        self.subscriptions: dict[int, SubscriptionRecord] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.monitor: str | None = None
        self.draining = False
        self.publish_decisions: dict[str, tuple[Decision, Decision]] = {}
        self.denials_reported: set[str] = set()
        self.frames_in = self.frames_out = self.dropped = self.denied = 0
        self._pending: deque[bytes] = deque()
        self._wake = anyio.Event()
        self.closed = False
        self.overflowed = False
        self.cancel_scope: anyio.CancelScope | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def deliver(self, frame: bytes | bytearray, *, droppable: bool = True) -> bool:
        """Queue a frame for the endpoint without waiting; False if it was dropped."""
        if self.closed:
            return False
        try:
            if not self._pending and self.channel.try_send(frame):  # copies into the ring now
                self.frames_out += 1
                return True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.closed = True  # the endpoint is going away; its own session loop cleans up
            return False
        frame = bytes(frame)  # the caller may reuse its buffer: the queue keeps a copy
        if droppable and len(self._pending) >= self.limits.max_pending:
            self.dropped += 1
            if self.limits.slow_consumer == "disconnect" and not self.overflowed:
                self.overflowed = True
                if self.cancel_scope is not None:
                    self.cancel_scope.cancel()
            return False
        self._pending.append(frame)
        self._wake.set()
        return True

    def deliver_many(self, frames: list[bytes]) -> int:
        """Deliver publications in order, in one ring publish when they fit; returns how many
        were delivered or queued (the rest were dropped by the slow-consumer policy)."""
        if self.closed:
            return 0
        sent = 0
        if not self._pending:
            try:
                sent = self.channel.writer.try_send_many(frames)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.closed = True  # the endpoint is going away; its session loop cleans up
                return 0
            self.frames_out += sent
        for frame in frames[sent:]:
            if not self.deliver(frame):
                return sent
            sent += 1
        return sent

    async def flush_forever(self) -> None:
        """Drain the queue into the session channel, waiting for room as the endpoint reads."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                await self.channel.send(self._pending[0])
                self._pending.popleft()
                self.frames_out += 1
