"""Direct channels relayed by the hub, for a caller attached over a region.

A caller in another kernel (a session over a region, docs/bus.md) cannot be handed a direct
channel: no fd crosses into its memory. So the hub stands in for it: it makes the channel as for
any caller, hands the server its side over the server's socket as usual, and keeps the caller's
side itself. The caller's frames for that channel come on its session channel with the channel's
token in the header's destination field; the hub forwards them onto the direct channel (a full
ring answers that request with BusyError rather than queue without bound), and a reader task
sends every frame the server writes back on the session, stamped with the token the same way.

This puts the hub on the request path of these callers only (two more ring hops per call);
callers with a socket keep their channels direct. A relay ends when the server closes its side
(the caller is told with ChannelRevoke), when the caller revokes it or detaches, or when the
hub stops.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import anyio

from multikernel.bus._session import PEER_FAULTS, Session
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    DESTINATION_OFFSET,
    BusyError,
    Header,
    Kind,
    ProtocolError,
    decode_header,
    encode,
    error_to_body,
)
from multikernel.shm import Channel, ChannelHandle, PeerDiedError, WaitPolicy

log = get_logger("multikernel.bus")
_TOKEN: Final = struct.Struct("<Q")
#: The hub never spins (bus/_hub_sessions.py), on a relayed channel either.
RELAY_WAIT: Final = WaitPolicy(spin=0)


@dataclass
class Relay:
    """The caller's side of one direct channel, held by the hub; cancel `scope` to end it."""

    channel: Channel
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def stamped(frame: bytes, token: int) -> bytes:
    """`frame` with `token` in its destination field (which the caller reads to route it)."""
    out = bytearray(frame)
    _TOKEN.pack_into(out, DESTINATION_OFFSET, token)
    return bytes(out)


def forward(session: Session, header: Header, frame: bytes) -> bool:
    """A frame from `session` for one of its relayed channels: onto it. False when the session
    relays no channel with that token (the frame is then the caller's protocol error)."""
    relay = session.relays.get(header.destination)
    if relay is None:
        return False
    try:
        sent = relay.channel.try_send(stamped(frame, 0))
    except PEER_FAULTS:
        sent = False  # the server went: the reader task tells the caller
    if not sent and header.kind == Kind.REQUEST:
        busy = BusyError("the relayed channel to this service is full or gone; retry later")
        reply = encode(Kind.ERROR, error_to_body(busy), correlation=header.correlation)
        session.deliver(stamped(reply, header.destination), droppable=False)
    return True


def open_relay(client: Session, token: int, handle: ChannelHandle) -> Relay:
    """Take the caller's side of a channel (`handle`, which it then owns) for `client`: its
    frames for `token` go onto it from now on (run `run_relay` for the other direction)."""
    relay = Relay(Channel.attach(handle, RELAY_WAIT))
    client.relays[token] = relay
    return relay


async def run_relay(client: Session, token: int, relay: Relay) -> None:
    """Send `client` what the server writes, until the server closes its side, garbage comes
    from it, or the relay is cancelled (`end_relay`); the hub's side is closed when it ends."""
    with relay.channel:
        try:
            with relay.scope:
                while True:
                    for frame in await relay.channel.receive_many():
                        try:  # garbage would end the caller's whole session, not a channel
                            decode_header(frame)
                        except ProtocolError as exc:
                            log.warning("relay ended: garbage from the server", token=token,
                                        caller=client.id, error=str(exc))  # fmt: skip
                            return
                        client.deliver(stamped(frame, token), droppable=False)
        except (anyio.EndOfStream, PeerDiedError, *PEER_FAULTS):
            pass  # the server's side closed, or garbage from it: this relay ends, nothing else
        finally:
            if client.relays.get(token) is relay:
                del client.relays[token]


def end_relay(session: Session, token: int) -> None:
    relay = session.relays.get(token)
    if relay is not None:
        relay.scope.cancel()
