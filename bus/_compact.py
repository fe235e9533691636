"""Giving back a dict's memory: a Python dict never shrinks its table when entries are deleted.

A table that held 100k subscriptions keeps room for 100k after they are all gone (~40 bytes a
slot). The tables that grow with subscriptions (the router's, the hub's, a session's) track their
peak size and are rebuilt by ``compacted`` once they are down to a quarter of it: a copy costs
O(size) and happens at most once per halving of the peak twice over, so it is O(1) amortized per
deletion.
"""

from __future__ import annotations

from typing import Final, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: Tables whose peak was smaller than this are left alone (a few KiB at most).
SHRINK_FLOOR: Final = 256


def compacted(table: dict[K, V], peak: int) -> tuple[dict[K, V], int]:
    """``table`` and its peak, rebuilt to its size if it is down to a quarter of ``peak``."""
    size = len(table)
    if peak < SHRINK_FLOOR or size * 4 > peak:
        return table, peak
    return dict(table), size
