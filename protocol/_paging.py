"""Introspection in pages: a `BusSnapshot` of any size crosses the bus in frames of bounded size.

A snapshot is a sequence of items (endpoints, names, services, subscriptions, channels, in that
order); a page holds the items from a cursor on, as many as fit a byte budget (at least one, so
paging always advances), and the cursor of the next page (0 after the last). Each endpoint's own
list of subscription patterns is left out of pages, since one endpoint with 100k subscriptions
would not fit a frame: `join_snapshot_pages` rebuilds it from the subscriptions section. Joining
the pages of a snapshot gives the snapshot back (tests/protocol/test_protocol_paging.py); pages
asked for while the bus changes may show an item twice or miss one, like any paged listing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec

from multikernel.protocol._bus import BusSnapshot

_encoder = msgspec.msgpack.Encoder()
#: Bytes a page's fixed fields take beyond its items (pid, uptime, counters, cursor, field names).
_PAGE_OVERHEAD = 1024


def _items(snapshot: BusSnapshot) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [
        ("endpoints", msgspec.structs.replace(e, subscriptions=())) for e in snapshot.endpoints
    ]
    items += [("names", pair) for pair in snapshot.names.items()]
    items += [("services", s) for s in snapshot.services]
    items += [("subscriptions", s) for s in snapshot.subscriptions]
    items += [("channels", c) for c in snapshot.channels]
    items += [("streams", s) for s in snapshot.streams]
    return items


def snapshot_page(snapshot: BusSnapshot, cursor: int, budget: int) -> BusSnapshot:
    """The page of `snapshot` from item `cursor` on, its items within `budget` encoded bytes."""
    items = _items(snapshot)
    sections: dict[str, list[Any]] = defaultdict(list)
    used = _PAGE_OVERHEAD + len(_encoder.encode(snapshot.counters))
    end = cursor
    while end < len(items):
        section, item = items[end]
        size = len(_encoder.encode(item)) + 8
        if end > cursor and used + size > budget:
            break
        sections[section].append(item)
        used += size
        end += 1
    return BusSnapshot(
        snapshot.hub_pid,
        snapshot.uptime_s,
        tuple(sections["endpoints"]),
        dict(sections["names"]),
        tuple(sections["services"]),
        tuple(sections["subscriptions"]),
        tuple(sections["channels"]),
        snapshot.counters,
        next_cursor=end if end < len(items) else 0,
        streams=tuple(sections["streams"]),
    )


def join_snapshot_pages(pages: list[BusSnapshot]) -> BusSnapshot:
    """One snapshot from its pages (the last page's pid, uptime and counters)."""
    last = pages[-1]
    subscriptions = tuple(s for page in pages for s in page.subscriptions)
    patterns: dict[int, list[str]] = defaultdict(list)
    for sub in subscriptions:
        patterns[sub.endpoint_id].append(sub.pattern)
    endpoints = tuple(
        msgspec.structs.replace(e, subscriptions=tuple(patterns.get(e.endpoint_id, ())))
        for page in pages
        for e in page.endpoints
    )
    return BusSnapshot(
        last.hub_pid,
        last.uptime_s,
        endpoints,
        {name: owners for page in pages for name, owners in page.names.items()},
        tuple(s for page in pages for s in page.services),
        subscriptions,
        tuple(c for page in pages for c in page.channels),
        last.counters,
        streams=tuple(s for page in pages for s in page.streams),
    )
