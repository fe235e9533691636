"""The binary layout of a ring in one place (docs/shm.md, "Binary layout", has the offsets).

A ring is a 256-byte header followed by a data area whose size (the capacity) is a power of two.
All integers are little-endian. Every field of the header is an aligned 64-bit slot so it can be
read and published with one 8-byte load or store.

Header slots (index = byte offset / 8):

    cache line 0, written once by the creator
      0  magic     b"MKRING\\x00\\x00" as u64
      1  version   1
      2  capacity  bytes in the data area, a power of two, >= 64
      3  header    header size in bytes (256), i.e. where the data area starts
    cache line 1, written only by the consumer
      8  head            total bytes consumed since creation (monotonic)
    cache line 2, written only by the producer
     16  tail            total bytes published since creation (monotonic)
    cache line 3, written rarely (going to sleep, closing), read after every publish/consume
     24  consumer_flags  bit 0: may be asleep on the data doorbell; bit 1: closed
     25  producer_flags  bit 0: may be asleep on the space doorbell; bit 1: closed

The flags live apart from the counters: each side reads the other's flags after every
publish or consume, and a flag word on the peer's counter line would drag that line across cores
on every message.

A frame starts at an 8-byte-aligned offset of the data area with an 8-byte header slot whose low
32 bits are the payload length and whose high 32 bits are flags (bit 0: padding), followed by the
payload, padded to a multiple of 8. A frame never wraps: when it does not fit before the end of the
data area the producer writes a padding frame that fills the rest, and the frame starts at offset 0.
The largest payload is capacity / 2 - 8, which guarantees that a frame always fits once the
consumer catches up.
"""

from __future__ import annotations

RING_MAGIC = int.from_bytes(b"MKRING\x00\x00", "little")
RING_VERSION = 1
HEADER_SIZE = 256
HEADER_SLOTS = HEADER_SIZE // 8
MIN_CAPACITY = 64
MAX_CAPACITY = 1 << 40

SLOT_MAGIC = 0
SLOT_VERSION = 1
SLOT_CAPACITY = 2
SLOT_HEADER = 3
SLOT_HEAD = 8
SLOT_CONSUMER_FLAGS = 24
SLOT_TAIL = 16
SLOT_PRODUCER_FLAGS = 25

SIDE_SLEEPING = 1
SIDE_CLOSED = 2

FRAME_HEADER = 8
FRAME_ALIGN = 8
FLAG_PADDING = 1
LENGTH_MASK = 0xFFFF_FFFF


def ring_size(capacity: int) -> int:
    """Bytes a ring with `capacity` data bytes occupies in a region."""
    return HEADER_SIZE + capacity


def max_payload(capacity: int) -> int:
    """The largest payload one frame of a ring of `capacity` bytes can carry."""
    return capacity // 2 - FRAME_HEADER


def frame_size(payload: int) -> int:
    """Bytes a frame with `payload` bytes takes in the data area (header + padded payload)."""
    return (payload + FRAME_HEADER + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1)


def check_capacity(capacity: int) -> None:
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY} "
            f"bytes, got {capacity}"
        )
