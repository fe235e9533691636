"""Bus control messages beyond attach, subscribe and names: direct channels, services, monitor.

*Direct channels.* Requests and replies do not go through the hub: an endpoint that wants to call
a well-known name sends ``ChannelOpen``; the hub checks the access policy, creates a channel
between the caller and the name's current owner, and hands each side its end over the endpoint's
Unix control socket together with a ``ChannelReady`` that names the peer as the hub knows it
(identity is never taken from what a peer writes). ``ChannelRevoke`` tells both ends that the hub
withdrew the channel (policy reload).

*Services.* An endpoint that serves methods describes them with ``ServiceInfo`` (msgspec JSON
schemas of each request and response), for introspection.

*Monitor.* A privileged endpoint sends ``MonitorStart``; the hub then sends it a
``MonitorRecord`` for every frame it routes and asks every endpoint (``Mirror``) to copy the
frames of its direct channels to the hub as ``MonitorRecord``s too, with their own timestamps.

*Introspection.* ``Introspect`` is answered with a ``BusSnapshot``: endpoints, names, services,
subscriptions and statistics.
"""

from __future__ import annotations

import msgspec

from multikernel.protocol._fields import U32, U64, ShortStr
from multikernel.protocol._streams import StreamInfo


class _BusMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Common configuration: frozen, defaults left off the wire, unknown fields skipped."""


class Ok(_BusMessage, frozen=True, tag="ok"):
    """Hub → endpoint: the control request with this frame's correlation id succeeded."""

    value: U64 = 0


class ChannelOpen(_BusMessage, frozen=True, tag="channel_open"):
    """Endpoint → hub: open a direct channel to the owner of the well-known name ``target``."""

    target: ShortStr


class ChannelReady(_BusMessage, frozen=True, tag="channel_ready"):
    """Hub → endpoint, over the control socket with the channel's fds: a direct channel is up.

    ``role`` is "client" for the side that asked and "server" for the name's owner. The peer
    fields are the hub's record of who is at the other end.
    """

    token: U64
    role: ShortStr
    target: ShortStr
    peer_id: U64
    peer_name: ShortStr = ""
    peer_instance: U32 = 0
    peer_uid: U32 = 0
    peer_pid: U32 = 0


class ChannelRevoke(_BusMessage, frozen=True, tag="channel_revoke"):
    """Hub → endpoint: stop using the direct channel ``token`` (the policy no longer allows it)."""

    token: U64
    reason: str = ""


class AttachRequest(_BusMessage, frozen=True, tag="attach_request"):
    """Endpoint → hub: another attachment for my own instance (a socket, sent over the control
    socket with a ChannelReady of role "attach"), for a process I start inside the instance."""


class MethodInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One method of a service: its name and the JSON schemas of its request and response."""

    name: ShortStr
    request_schema: str = ""
    response_schema: str = ""


class ServiceInfo(_BusMessage, frozen=True, tag="service_info"):
    """Endpoint → hub: the methods the endpoint serves under the well-known name ``name``."""

    name: ShortStr
    methods: tuple[MethodInfo, ...] = ()
    concurrency: U32 = 0


class MonitorStart(_BusMessage, frozen=True, tag="monitor_start"):
    """Endpoint → hub: send me a MonitorRecord for every frame whose subject matches."""

    pattern: ShortStr = ">"


class MonitorStop(_BusMessage, frozen=True, tag="monitor_stop"):
    """Endpoint → hub: stop monitoring."""


class Mirror(_BusMessage, frozen=True, tag="mirror"):
    """Hub → endpoint: copy (``on``) or stop copying the frames of your direct channels to me."""

    on: bool = True


class MonitorRecord(_BusMessage, frozen=True, tag="monitor_record"):
    """One observed frame: when (CLOCK_MONOTONIC ns), on which path, between whom, and the frame.

    ``path`` is "hub" for frames the hub routed and "direct" for frames mirrored by an endpoint
    from one of its direct channels (``channel`` is then the channel's token).
    """

    ts_ns: U64
    path: ShortStr
    source: U64
    destination: U64
    frame: bytes
    channel: U64 = 0
    service: ShortStr = ""  # the name a direct channel was opened to (the hub's record)
    source_name: ShortStr = ""  # the sender's name, as it attached


class Introspect(_BusMessage, frozen=True, tag="introspect"):
    """Endpoint → hub: describe the bus, one page from `cursor` on (answered with a BusSnapshot).

    Pages keep every answer within one frame however large the bus is; ask again with the
    answer's `next_cursor` until it is 0.
    """

    cursor: U64 = 0


class EndpointInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the hub knows of one attached endpoint, with its counters."""

    endpoint_id: U64
    name: str
    instance: U32
    uid: U32
    pid: U32
    names: tuple[str, ...] = ()
    subscriptions: tuple[str, ...] = ()
    frames_in: U64 = 0
    frames_out: U64 = 0
    dropped: U64 = 0
    pending: U64 = 0
    denied: U64 = 0
    draining: bool = False
    age_s: float = 0.0  # seconds since it attached
    bytes_in: U64 = 0  # body and header bytes it sent the hub (its session ring to the hub)
    bytes_out: U64 = 0  # bytes the hub sent it
    ring_depth: U64 = 0  # bytes the hub wrote to its ring that it has not read yet
    ring_full: U64 = 0  # times the hub found its ring full (a slow consumer)
    wakeups: U64 = 0  # doorbells the hub rang for it (the rest of the time it was awake)


class SubscriptionInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One subscription: owner, pattern, queue group and delivery counters."""

    endpoint_id: U64
    sid: U64
    pattern: str
    queue_group: str = ""
    delivered: U64 = 0
    dropped: U64 = 0


class ChannelInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One direct channel the hub set up."""

    token: U64
    target: str
    client: U64
    server: U64


class BusSnapshot(_BusMessage, frozen=True, tag="bus_snapshot"):
    """Hub → endpoint: the answer to Introspect."""

    hub_pid: U32
    uptime_s: float
    endpoints: tuple[EndpointInfo, ...] = ()
    names: dict[str, tuple[U64, ...]] = {}
    services: tuple[ServiceInfo, ...] = ()
    subscriptions: tuple[SubscriptionInfo, ...] = ()
    channels: tuple[ChannelInfo, ...] = ()
    counters: dict[str, U64] = {}
    next_cursor: U64 = 0
    streams: tuple[StreamInfo, ...] = ()


class EndpointCutOff(msgspec.Struct, frozen=True, omit_defaults=True):
    """Published by the hub on ``mk.bus.cutoff.<instance>`` when it cuts an endpoint off.

    ``garbage`` is true when the endpoint broke its session ring or the protocol (a frame that
    does not decode, a bogus ring counter): its channel was quarantined for what it wrote, which
    the fault actor counts as a fault of the writer's instance.
    """

    endpoint: U64
    name: str
    instance: U32
    pid: U32
    reason: str
    garbage: bool = False
