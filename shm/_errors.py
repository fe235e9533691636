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


class UnsafeHandleError(ShmError, ValueError):
    """Something a peer handed us could let it hurt this process, so it is refused before use.

    A region that is not a memfd sealed against shrinking and growing (a peer holding it could
    truncate it, and our next access would die of SIGBUS), a region smaller than it claims, or a
    doorbell fd that is not the end of a pipe we expect (an eventfd, for one, shares its flags
    and counter with the peer). Every fd of the refused handle is closed.
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
