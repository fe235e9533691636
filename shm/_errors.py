"""Errors of the shared-memory layer.

They reuse anyio's vocabulary so callers can handle every transport alike: our side closed is
`anyio.ClosedResourceError`, a peer that closed cleanly ends the stream with `anyio.EndOfStream`,
and a peer that broke the channel (died, or wrote garbage) raises a `BrokenResourceError`
subclass from here. `ShmError` is the root of the errors this layer defines itself.
"""

from __future__ import annotations

import anyio


class ShmError(Exception):
    """Root of the errors defined by `multikernel.shm`."""


class LayoutError(ShmError, ValueError):
    """A region does not hold the layout we expect (bad magic, version, sizes or offsets).

    Raised at attach time, before anything is read from the data area.
    """


class FrameTooLargeError(ShmError, ValueError):
    """A frame is larger than the ring's maximum payload (half its capacity, less the header).

    Nothing was written; split the payload or create the ring with a larger capacity.
    """


class RingCorruptedError(ShmError, anyio.BrokenResourceError):
    """The peer wrote an impossible counter or frame header; the ring is quarantined.

    Every later call on this ring raises the same error. Frames that were received before the
    corruption was seen were valid and stay delivered.
    """


class PeerDiedError(ShmError, anyio.BrokenResourceError):
    """The peer process went away without closing its side of the channel.

    Frames it had published before it died are still delivered first.
    """
