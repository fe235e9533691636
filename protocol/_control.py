"""Bus control messages: the body of every ``Kind.CONTROL`` frame.

An endpoint attaches with ``Hello`` (the versions it speaks and the features it wants) and the hub
answers ``Welcome`` (the version and features chosen, and the endpoint's unique id, never reused)
or an ``UnsupportedVersionError`` error frame. Then: subscriptions with optional queue groups,
well-known names with D-Bus's ordered ownership hand-off, heartbeats, and drain (lame duck).

All control messages share one tagged union, ``Control``, and one decoder, ``CONTROL_DECODER``,
because heartbeat and drain travel in both directions; tags are unique across the union either
way. Every struct is frozen and does *not* forbid unknown fields, so an older decoder skips fields
a newer peer added (docs/protocol.md, evolution rules).
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from multikernel.protocol._bus import (
    AttachRequest,
    BusSnapshot,
    ChannelOpen,
    ChannelReady,
    ChannelRevoke,
    Introspect,
    Mirror,
    MonitorRecord,
    MonitorStart,
    MonitorStop,
    Ok,
    ServiceInfo,
)
from multikernel.protocol._codes import ReleaseNameResult, RequestNameResult
from multikernel.protocol._envelope import DEFAULT_MAX_BODY
from multikernel.protocol._fields import U8, U32, U64, ShortStr
from multikernel.protocol._streams import (
    StreamClose,
    StreamOpen,
    StreamReaderGone,
    StreamReady,
    StreamRoute,
    StreamSids,
    StreamStart,
)


class _ControlMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Common configuration: frozen, defaults left off the wire, unknown fields skipped."""


class Hello(_ControlMessage, frozen=True, tag="hello"):
    """Endpoint → hub, first frame on a channel: the versions spoken and the features wanted.

    ``name`` is diagnostic only: identity is bound by the hub when it creates the channel.
    """

    min_version: U8
    max_version: U8
    features: U64 = 0
    name: ShortStr = ""


class Welcome(_ControlMessage, frozen=True, tag="welcome"):
    """Hub → endpoint: the chosen version, the granted features and the endpoint's unique id."""

    version: U8
    endpoint_id: U64
    features: U64 = 0
    max_body: U32 = DEFAULT_MAX_BODY


class Subscribe(_ControlMessage, frozen=True, tag="subscribe"):
    """Deliver frames whose subject matches ``subject`` (a pattern; ``*`` and ``>`` allowed).

    Within one ``queue_group`` each message goes to one member only. ``sid`` is the endpoint's
    own number for the subscription; the hub puts it in the destination field of every frame it
    delivers for this subscription.
    """

    subject: ShortStr
    queue_group: ShortStr | None = None
    sid: U64 = 0


class Unsubscribe(_ControlMessage, frozen=True, tag="unsubscribe"):
    """Undo the Subscribe with the same ``sid`` (or, without one, subject and queue group)."""

    subject: ShortStr = ""
    queue_group: ShortStr | None = None
    sid: U64 = 0


class SubscribeMany(_ControlMessage, frozen=True, tag="subscribe_many"):
    """Several Subscribes in one frame (feature SUBSCRIBE_MANY), all made or none: the first
    refused one is the error answer. Answered with ``SubscribedMany``."""

    subscriptions: tuple[Subscribe, ...]


class SubscribedMany(_ControlMessage, frozen=True, tag="subscribed_many"):
    """Hub → endpoint: every Subscribe of a SubscribeMany was made; ``across[i]`` is what
    ``Ok.value`` answers to the i-th alone (1: it may also hear other instances)."""

    across: bytes


class UnsubscribeMany(_ControlMessage, frozen=True, tag="unsubscribe_many"):
    """Undo the Subscribes with these ``sids`` (feature SUBSCRIBE_MANY); answered with Ok."""

    sids: tuple[U64, ...]


class NameRequest(_ControlMessage, frozen=True, tag="name_request"):
    """Ask to own a well-known name (``flags``: NameFlag bits, D-Bus semantics)."""

    name: ShortStr
    flags: U32 = 0


class NameRequestReply(_ControlMessage, frozen=True, tag="name_request_reply"):
    """Hub → endpoint: the outcome of a NameRequest."""

    name: ShortStr
    result: RequestNameResult


class NameRelease(_ControlMessage, frozen=True, tag="name_release"):
    """Give up a well-known name (or leave its queue); the next queued owner gets it."""

    name: ShortStr


class NameReleaseReply(_ControlMessage, frozen=True, tag="name_release_reply"):
    """Hub → endpoint: the outcome of a NameRelease."""

    name: ShortStr
    result: ReleaseNameResult


class NameOwnerChanged(_ControlMessage, frozen=True, tag="name_owner_changed"):
    """Hub → subscribers: a well-known name moved; 0 means "no owner" on either side."""

    name: ShortStr
    old_owner: U64 = 0
    new_owner: U64 = 0


class NameMove(msgspec.Struct, frozen=True, omit_defaults=True):
    """One move of a SwitchNames: ``name`` goes to the endpoint ``new_owner``."""

    name: ShortStr
    new_owner: U64


class HoldNames(_ControlMessage, frozen=True, tag="hold_names"):
    """Endpoint → hub: hold new channels to ``names`` until a switch, a release or ``deadline_ns``.

    Only an endpoint the policy lets own a name, or its current owner, may hold it. While a name
    is held, ``ChannelOpen`` to it waits at the hub and callers with a channel to it are told
    (``NameHeld``) to make new calls wait. Answered ``Ok``.
    """

    names: tuple[ShortStr, ...]
    deadline_ns: U64


class SwitchNames(_ControlMessage, frozen=True, tag="switch_names"):
    """Endpoint → hub: give every name its new owner at once, or none of them; then end the
    holds on those names. Each new owner must be attached and waiting for the name or allowed to
    own it. Answered ``Ok``."""

    moves: tuple[NameMove, ...]


class ReleaseNames(_ControlMessage, frozen=True, tag="release_names"):
    """Endpoint → hub: end the holds on ``names`` without moving them (roll back). ``Ok``."""

    names: tuple[ShortStr, ...]


class NameHeld(_ControlMessage, frozen=True, tag="name_held"):
    """Hub → callers of ``name`` and subscribers: the name is held until at most ``deadline_ns``;
    send no new calls to it until ``NameHoldEnded`` (calls already sent finish)."""

    name: ShortStr
    deadline_ns: U64 = 0
    holder: U64 = 0


class NameHoldEnded(_ControlMessage, frozen=True, tag="name_hold_ended"):
    """Hub → callers of ``name`` and subscribers: the hold ended (``reason``: "switched",
    "released", "deadline" or "holder left"); call whoever owns the name now."""

    name: ShortStr
    reason: ShortStr = ""


class Heartbeat(_ControlMessage, frozen=True, tag="heartbeat"):
    """Liveness, either direction; ``sent_ns`` is CLOCK_MONOTONIC at the sender."""

    seq: U64 = 0
    sent_ns: U64 = 0


class Drain(_ControlMessage, frozen=True, tag="drain"):
    """Lame-duck mode, either direction: take no new work, finish what is in flight.

    ``deadline_ns`` (CLOCK_MONOTONIC, 0 = none) is when the sender will stop waiting.
    """

    deadline_ns: U64 = 0


Control: TypeAlias = (
    Ok
    | AttachRequest
    | ChannelOpen
    | ChannelReady
    | ChannelRevoke
    | ServiceInfo
    | MonitorStart
    | MonitorStop
    | Mirror
    | MonitorRecord
    | Introspect
    | BusSnapshot
    | Hello
    | Welcome
    | Subscribe
    | Unsubscribe
    | SubscribeMany
    | SubscribedMany
    | UnsubscribeMany
    | NameRequest
    | NameRequestReply
    | NameRelease
    | NameReleaseReply
    | NameOwnerChanged
    | HoldNames
    | SwitchNames
    | ReleaseNames
    | NameHeld
    | NameHoldEnded
    | Heartbeat
    | Drain
    | StreamOpen
    | StreamReady
    | StreamStart
    | StreamSids
    | StreamReaderGone
    | StreamRoute
    | StreamClose
)

CONTROL_DECODER: Final = msgspec.msgpack.Decoder(Control)
