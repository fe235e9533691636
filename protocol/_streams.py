"""Bus control messages for broadcast streams (docs/bus.md, "Streams").

A publisher asks for a stream on a literal subject (``StreamOpen``); the hub checks the policy,
makes the stream's memory and hands it over the control socket (``StreamReady``, role "writer");
the writer maps it, seals it against writing by anyone else and says so (``StreamStart``). From
then on the hub hands every endpoint whose subscriptions the stream should feed a reader
(``StreamReady`` role "reader", with the stream read-only and a cursor page of its own), the
writer that reader's ends (role "add"), and each reader the sids of its subscriptions it feeds
(``StreamSids``, on the session channel so it is in order with the answers to Subscribe). A
reader that goes (unsubscribed, revoked by a policy reload, its endpoint gone) is removed on
both sides (``StreamSids`` with no sids, ``StreamReaderGone``); the writer reports readers it
dropped itself the same way. ``StreamRoute`` tells the writer whether some subscriptions still
need the stream's messages through the hub (queue groups, endpoints without streams), and
``StreamClose`` ends a stream from either side.
"""

from __future__ import annotations

import msgspec

from multikernel.protocol._fields import U32, U64, ShortStr


class _StreamMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Common configuration: frozen, defaults left off the wire, unknown fields skipped."""


class StreamOpen(_StreamMessage, frozen=True, tag="stream_open"):
    """Endpoint → hub: a broadcast stream on the literal ``subject``, with me as its writer.

    ``slow`` is "block" or "drop" (what the writer does about a reader that falls behind), or
    empty for the hub's slow-consumer policy."""

    subject: ShortStr
    slow: ShortStr = ""


class StreamReady(_StreamMessage, frozen=True, tag="stream_ready"):
    """Hub → endpoint, over the control socket with fds: a side of stream ``token``.

    ``role`` "writer" (fds: the stream memfd, not yet sealed; the answer to ``StreamOpen``),
    "reader" (fds: the stream, sealed; this reader's cursor page; the read end of its doorbell;
    the write end of the writer's; the peer is the writer) or "add" (to the writer: a new
    reader's cursor page, the write end of its doorbell, the read end of the writer's; the peer
    is the reader's endpoint). ``reader`` numbers the reader within the stream.
    """

    token: U64
    role: ShortStr
    subject: ShortStr
    peer_id: U64 = 0
    peer_name: ShortStr = ""
    peer_instance: U32 = 0
    reader: U64 = 0
    slow: ShortStr = "block"
    patience_ms: U32 = 0
    hub_routed: bool = False


class StreamStart(_StreamMessage, frozen=True, tag="stream_start"):
    """Endpoint → hub: I mapped stream ``token`` and sealed it against writing: give it
    readers. Answered with ``Ok`` once the subscriptions that match it have their readers."""

    token: U64


class StreamSids(_StreamMessage, frozen=True, tag="stream_sids"):
    """Hub → reader: the subscriptions that ``reader`` of stream ``token`` feeds on this
    endpoint (none: close that reader)."""

    token: U64
    reader: U64
    sids: tuple[U64, ...] = ()


class StreamReaderGone(_StreamMessage, frozen=True, tag="stream_reader_gone"):
    """Hub → writer: stop writing for ``reader`` (and stop waiting for it). Writer → hub: I
    dropped ``reader`` (``reason``: it closed, its process died, or it wrote a bad cursor)."""

    token: U64
    reader: U64
    reason: str = ""


class StreamRoute(_StreamMessage, frozen=True, tag="stream_route"):
    """Hub → writer: whether to publish through the hub as well (``hub_routed``): some
    subscriptions take the stream's messages only that way."""

    token: U64
    hub_routed: bool = False


class StreamClose(_StreamMessage, frozen=True, tag="stream_close"):
    """Writer → hub: the stream is closed. Hub → writer: the stream was withdrawn (policy)."""

    token: U64
    reason: str = ""


class StreamInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One stream in a `BusSnapshot`: its writer, the endpoints reading it, what it wrote."""

    token: U64
    subject: str
    writer: U64
    readers: tuple[U64, ...] = ()
    frames: U64 = 0
    slow: str = "block"
    hub_routed: bool = False
    dropped_readers: U64 = 0  # readers the writer dropped (dead, closed, or a bad cursor)
