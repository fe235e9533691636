"""Introspection: the hub's state as one `BusSnapshot` (what `mkctl bus list` shows)."""

from __future__ import annotations

import os
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
    endpoints = tuple(
        EndpointInfo(
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
        )
        for s in sessions
    )
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
