"""Name-owner changes and cut-off endpoints: who hears of them, and how.

When a well-known name moves, the hub tells the old and the new owner (their identity's `names`,
which `name:` policy selectors look at, is refreshed, and the old owner's service description
goes), every endpoint holding a direct channel to that name (so it opens a channel to the new
owner for its next call while calls in flight finish), and every subscriber of
`mk.bus.names.<name>`: the primitive that zero-downtime upgrade builds on.

When the hub cuts an endpoint off, it says so on `mk.bus.cutoff.<instance>` (`EndpointCutOff`):
the fault actor counts garbage an endpoint wrote as a fault of its instance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from multikernel.bus._channels import ChannelBroker
from multikernel.bus._hub_sessions import NAMES_SUBJECT
from multikernel.bus._names import NameRegistry
from multikernel.bus._router import SubjectRouter
from multikernel.bus._session import Session, SubscriptionRecord
from multikernel.endpoints.log import get_logger
from multikernel.protocol import EndpointCutOff, Kind, NameOwnerChanged, encode

log = get_logger("multikernel.bus")

#: Where the hub stamps a routed frame: the publisher it came from and the subscription it is for
#: (docs/protocol.md, header table).
SOURCE_OFFSET = 16
DESTINATION_OFFSET = 24

#: Where the hub announces an endpoint it cut off: ``mk.bus.cutoff.<instance>``.
CUTOFF_SUBJECT = "mk.bus.cutoff"


def announce_owner_changes(
    changes: list[NameOwnerChanged],
    sessions: Mapping[int, Session],
    names: NameRegistry,
    channels: ChannelBroker,
    router: SubjectRouter[tuple[int, int]],
    subscriptions: Mapping[tuple[int, int], SubscriptionRecord],
) -> None:
    """Publish each change on mk.bus.names.<name> and tell the owners and the channels' clients."""
    for change in changes:
        frame = encode(Kind.CONTROL, change)
        notified = set()
        for owner in (change.old_owner, change.new_owner):  # the owners hear of it too
            session = sessions.get(owner)
            if session is None:
                continue
            # `name:` selectors look at the names an endpoint owns
            owned = frozenset(names.names_of(owner))
            session.identity = dataclasses.replace(session.identity, names=owned)
            session.publish_decisions.clear()
            if owner == change.old_owner:
                session.services.pop(change.name, None)  # its description goes too
            notified.add(owner)
            session.deliver(frame, droppable=False)
        for endpoint in channels.clients_of(change.name):
            if endpoint not in notified:
                notified.add(endpoint)
                client = sessions.get(endpoint)
                if client is not None:
                    client.deliver(frame, droppable=False)
        publish_event(f"{NAMES_SUBJECT}.{change.name}", change, router, subscriptions)
        log.info("name owner changed", name=change.name, old=change.old_owner, new=change.new_owner)


def announce_cutoff(
    session: Session,
    router: SubjectRouter[tuple[int, int]],
    subscriptions: Mapping[tuple[int, int], SubscriptionRecord],
) -> None:
    """Publish `EndpointCutOff` on mk.bus.cutoff.<instance>: the fault actor counts garbage
    an endpoint wrote as a fault of its instance. Only subscribers allowed to see that
    instance's traffic get it (its own instance, or the host's privileged endpoints)."""
    who = session.identity
    event = EndpointCutOff(
        who.endpoint_id, who.name, who.instance, who.pid, session.cut_reason, session.garbage
    )
    subject = f"{CUTOFF_SUBJECT}.{who.instance}"
    stamped = bytearray(encode(Kind.PUBLISH, event, subject=subject))
    for key in router.match(subject):
        record = subscriptions[key]
        if record.session is session or not (
            record.across or record.session.identity.instance == who.instance
        ):
            continue
        stamped[DESTINATION_OFFSET : DESTINATION_OFFSET + 8] = record.sid_bytes
        record.session.deliver(stamped)


def publish_event(
    subject: str,
    body: object,
    router: SubjectRouter[tuple[int, int]],
    subscriptions: Mapping[tuple[int, int], SubscriptionRecord],
) -> None:
    """Publish one of the hub's own events (source 0) to every subscription matching ``subject``."""
    stamped = bytearray(encode(Kind.PUBLISH, body, subject=subject))
    for key in router.match(subject):
        subscription = subscriptions[key]
        stamped[DESTINATION_OFFSET : DESTINATION_OFFSET + 8] = subscription.sid_bytes
        subscription.session.deliver(stamped)  # copied into its ring (or queue) at once
