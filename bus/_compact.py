"""Giving back memory: a Python dict never shrinks its table, and freed memory stays in the process.

A table that held 100k subscriptions keeps room for 100k after they are all gone (~40 bytes a
slot). The tables that grow with subscriptions (the router's, the hub's, a session's) track their
peak size and are rebuilt by ``compacted`` once they are down to a quarter of it: a copy costs
O(size) and happens once per quartering of the peak, so O(1) amortized per deletion.

Freed objects go back to Python's allocator and large blocks (dict tables) to glibc's, which
keeps most of them for reuse: after unsubscribing 100k of 100k, the hub still held ~180 of its
~590 bytes per subscription (RssAnon). So a rebuild of a table that had been large also asks
glibc to hand its free pages back to the kernel (``malloc_trim``; ~75 bytes per subscription
stay). That walks the heap, a millisecond or so, and happens a few times per mass unsubscribe.
"""

from __future__ import annotations

import ctypes
from typing import Final, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: Tables whose peak was smaller than this are left alone (a few KiB at most).
SHRINK_FLOOR: Final = 256
#: Rebuilding a table whose peak was at least this also returns free heap pages to the kernel.
TRIM_FLOOR: Final = 1024


def _malloc_trim() -> None:
    """glibc's malloc_trim(0), where there is one (a no-op elsewhere)."""


try:
    _trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    pass
else:
    _trim.argtypes = [ctypes.c_size_t]

    def _malloc_trim() -> None:
        _trim(0)


def compacted(table: dict[K, V], peak: int) -> tuple[dict[K, V], int]:
    """``table`` and its peak, rebuilt to its size if it is down to a quarter of ``peak``."""
    size = len(table)
    if peak < SHRINK_FLOOR or size * 4 > peak:
        return table, peak
    rebuilt = dict(table)
    if peak >= TRIM_FLOOR:
        table.clear()  # frees its table now (the caller drops it for `rebuilt` anyway)
        _malloc_trim()
    return rebuilt, size
