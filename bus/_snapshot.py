"""Introspection: the hub's state as one `BusSnapshot` (what `mkctl bus list` shows)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from multikernel.bus._names import NameRegistry
from multikernel.bus._session import Session, SubscriptionRecord
from multikernel.protocol import BusSnapshot, ChannelInfo, EndpointInfo, SubscriptionInfo


def build_snapshot(
    sessions: Iterable[Session],
    subscriptions: Iterable[SubscriptionRecord],
    names: NameRegistry,
    channels: tuple[ChannelInfo, ...],
    counters: Mapping[str, int],
    uptime: float,
) -> BusSnapshot:
    sessions = tuple(sessions)
    now = time.monotonic()
    endpoints = tuple(_endpoint(s, names, now) for s in sessions)
    subs = tuple(
        SubscriptionInfo(
            r.session.id, r.sid, r.pattern, r.queue_group or "", r.delivered, r.dropped
        )
        for r in subscriptions
    )
    services = tuple(info for s in sessions for info in s.services.values())
    lines = {name: tuple(line) for name, line in names.snapshot().items()}
    return BusSnapshot(
        os.getpid(), uptime, endpoints, lines, services, subs, channels, dict(counters)
    )


def _endpoint(s: Session, names: NameRegistry, now: float) -> EndpointInfo:
    try:
        ring = s.channel.statistics()
    except (ValueError, OSError):  # closed meanwhile: no ring counters
        ring = None
    return EndpointInfo(
        s.id,
        s.identity.name,
        s.identity.instance,
        s.identity.uid,
        s.identity.pid,
        tuple(names.names_of(s.id)),
        tuple(r.pattern for r in s.subscriptions.values()),
        s.frames_in,
        s.frames_out,
        s.dropped,
        s.pending,
        s.denied,
        s.draining,
        age_s=round(now - s.attached, 3),
        bytes_in=ring.received.bytes if ring else 0,
        bytes_out=ring.sent.bytes if ring else 0,
        ring_depth=ring.sent.backlog if ring else 0,
        ring_full=ring.sent.full_events if ring else 0,
        wakeups=ring.sent.wakeups_sent if ring else 0,
    )
