"""Shared-memory transport: regions, rings, doorbells and channels. Bytes only.

A `Region` is a shared mapping of any mmap-able file (a sealed memfd by default). A ring is a
single-producer single-consumer queue of variable-length frames laid out in a region with a
documented binary format (docs/shm.md, "Binary layout"); `RingWriter` and `RingReader` are its
two sides, each in its own process. A doorbell (a pipe: the ringer holds the write end, the
sleeper the read end) wakes a side that sleeps; the "sleeping" flag in the ring header lets the
other side skip the doorbell while it is awake, and a short adaptive spin (`WaitPolicy`) keeps a
busy side from sleeping at all. A `Channel` is two rings in one region, one per direction: an
anyio `ObjectStream[bytes]` that works under asyncio, uvloop and trio. A broadcast stream
(`StreamWriter`, `StreamReader`) is one writer and many readers on one ring the readers map
read-only, each with a cursor page of its own.

What happens on every message runs in a native core (C, built at install) where it was built, else
in the pure-Python reference core, over the same binary layout (`native_available()`; the
environment variable `MULTIKERNEL_SHM_RING=python` forces the Python one).

Nothing a peer shares with us can hurt us (docs/security.md, "Shared objects"): a region handed
to a peer is a memfd sealed against resizing, the two sides of a doorbell never share an open
file description, and every call on a shared object is non-blocking; a handle that breaks these
rules is refused with `UnsafeHandleError`.

Errors use anyio's vocabulary (`ClosedResourceError`, `BrokenResourceError`, `EndOfStream`,
`BusyResourceError`); the ones defined here derive from `ShmError`.
"""

from multikernel.shm._channel import (
    Channel as Channel,
)
from multikernel.shm._channel import (
    ChannelHandle as ChannelHandle,
)
from multikernel.shm._channel import (
    ChannelStatistics as ChannelStatistics,
)
from multikernel.shm._channel import (
    channel_size as channel_size,
)
from multikernel.shm._channel import (
    create_channel as create_channel,
)
from multikernel.shm._channel import (
    create_channel_handles as create_channel_handles,
)
from multikernel.shm._channel import (
    format_channel as format_channel,
)
from multikernel.shm._core import native_available as native_available
from multikernel.shm._doorbell import Doorbell as Doorbell
from multikernel.shm._errors import (
    FrameTooLargeError as FrameTooLargeError,
)
from multikernel.shm._errors import (
    LayoutError as LayoutError,
)
from multikernel.shm._errors import (
    PeerDiedError as PeerDiedError,
)
from multikernel.shm._errors import (
    RingCorruptedError as RingCorruptedError,
)
from multikernel.shm._errors import (
    ShmError as ShmError,
)
from multikernel.shm._errors import (
    UnsafeHandleError as UnsafeHandleError,
)
from multikernel.shm._layout import max_payload as max_payload
from multikernel.shm._layout import ring_size as ring_size
from multikernel.shm._reader import RingReader as RingReader
from multikernel.shm._region import ENV_TAG as ENV_TAG
from multikernel.shm._region import Region as Region
from multikernel.shm._region import find_orphans as find_orphans
from multikernel.shm._region import name_prefix as name_prefix
from multikernel.shm._region import remove_orphans as remove_orphans
from multikernel.shm._ring import RingStatistics as RingStatistics
from multikernel.shm._ring import format_ring as format_ring
from multikernel.shm._stream import StreamReader as StreamReader
from multikernel.shm._stream import StreamReaderStatistics as StreamReaderStatistics
from multikernel.shm._stream import create_cursor as create_cursor
from multikernel.shm._stream import create_stream as create_stream
from multikernel.shm._stream import reader_handles as reader_handles
from multikernel.shm._stream import sealed_for_readers as sealed_for_readers
from multikernel.shm._stream import stream_position as stream_position
from multikernel.shm._stream_writer import StreamWriter as StreamWriter
from multikernel.shm._stream_writer import StreamWriterStatistics as StreamWriterStatistics
from multikernel.shm._wait import WaitPolicy as WaitPolicy
from multikernel.shm._writer import RingWriter as RingWriter
