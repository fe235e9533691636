"""Every number the protocol puts on the wire, in one table.

Kinds, flags, feature bits, error codes, name-ownership flags and results, and the multikernel
kernel's ``mk_message`` vocabulary live here and nowhere else, so ``docs/protocol.md`` can be
checked against a single module (``tests/protocol/test_protocol_spec.py`` does that).

Rules: a value, once published, keeps its meaning forever; retired values are never reused.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

#: First two bytes of every frame: ``b"MK"`` read as a little-endian u16.
MAGIC: Final = 0x4B4D
#: The envelope version this code writes.
PROTOCOL_VERSION: Final = 1
#: Every envelope version this code reads; anything else is refused with UnsupportedVersionError.
SUPPORTED_VERSIONS: Final = frozenset({1})


class Kind(IntEnum):
    """What a frame is; the hub's first routing decision. 0 is never valid."""

    PUBLISH = 1  # one-way event on a subject, fanned out to subscribers
    REQUEST = 2  # expects replies correlated by the correlation id
    REPLY = 3  # answer to a request (more may follow when Flag.MORE is set)
    ERROR = 4  # the answer to a request is an ErrorBody
    CONTROL = 5  # a bus control message between an endpoint and the hub


class Flag(IntFlag):
    """Header flag bits (u16). v1 receivers ignore bits they do not know."""

    MORE = 0x0001  # a reply stream continues after this reply
    NO_REPLY = 0x0002  # the requester does not want a reply
    COPY = 0x0004  # a monitor copy: observe it, never act on it


class Feature(IntFlag):
    """Optional capabilities negotiated at attach (Hello/Welcome, u64)."""

    MULTI_REPLY = 0x0001  # many replies to one request (Flag.MORE)
    QUEUE_GROUPS = 0x0002  # Subscribe.queue_group is honoured
    NAME_QUEUEING = 0x0004  # name requests may queue behind the owner
    DRAIN = 0x0008  # Drain (lame-duck mode) is understood
    MONITOR = 0x0010  # the endpoint may receive Flag.COPY frames
    NAME_HOLDS = 0x0020  # NameHeld and NameHoldEnded notices are understood
    SUBSCRIBE_MANY = 0x0040  # SubscribeMany and UnsubscribeMany are understood
    STREAMS = 0x0080  # the endpoint reads broadcast streams (StreamReady, StreamSids)


class ErrorCode(IntEnum):
    """ErrorBody.code (u16). Unknown codes arrive as a generic RemoteError."""

    INTERNAL = 1  # the remote side failed; see the remote type name and message
    PROTOCOL = 2  # the peer broke the protocol
    MALFORMED_FRAME = 3  # a frame or body could not be decoded
    UNSUPPORTED_VERSION = 4  # no common protocol version
    TOO_LARGE = 5  # a body exceeds the receiver's limit
    INVALID_SUBJECT = 6  # a subject or pattern breaks the grammar
    NO_RESPONDERS = 16  # nobody serves that subject or name right now
    DEADLINE_EXCEEDED = 17  # the deadline in the envelope passed
    ACCESS_DENIED = 18  # the ACL forbids it
    BUSY = 19  # the receiver is saturated; retry later
    NOT_FOUND = 20  # the thing named in the request does not exist (an instance, an image)
    REFUSED = 21  # understood, and refused as asked: wrong state, resources, an untrusted image


class NameFlag(IntFlag):
    """NameRequest.flags, with D-Bus's RequestName values and semantics."""

    ALLOW_REPLACEMENT = 0x1  # the owner lets a later REPLACE_EXISTING take the name over
    REPLACE_EXISTING = 0x2  # take the name over if the owner allows replacement
    DO_NOT_QUEUE = 0x4  # fail with EXISTS instead of waiting in the queue


class RequestNameResult(IntEnum):
    """NameRequestReply.result, with D-Bus's values."""

    PRIMARY_OWNER = 1
    IN_QUEUE = 2
    EXISTS = 3
    ALREADY_OWNER = 4


class ReleaseNameResult(IntEnum):
    """NameReleaseReply.result, with D-Bus's values."""

    RELEASED = 1
    NON_EXISTENT = 2
    NOT_OWNER = 3


# --- the multikernel kernel ABI (include/linux/multikernel.h) ----------------------------------


class MsgType(IntEnum):
    """``mk_message.msg_type``: the kernel's top-level message categories."""

    MK_MSG_IO = 0x1000
    MK_MSG_RESOURCE = 0x2000
    MK_MSG_SYSTEM = 0x3000
    MK_MSG_USER = 0x4000
    MK_MSG_NETWORK = 0x5000


class ResourceOp(IntEnum):
    """``mk_message.msg_subtype`` for MK_MSG_RESOURCE."""

    MK_RES_CPU_ADD = 0x2001
    MK_RES_CPU_REMOVE = 0x2002
    MK_RES_MEM_ADD = 0x2003
    MK_RES_MEM_REMOVE = 0x2004
    MK_RES_QUERY = 0x2005
    MK_RES_DEVICE_ADD = 0x2006
    MK_RES_DEVICE_REMOVE = 0x2007
    MK_RES_ACK = 0x2100


class SystemOp(IntEnum):
    """``mk_message.msg_subtype`` for MK_MSG_SYSTEM."""

    MK_SYS_HEARTBEAT = 0x3001
    MK_SYS_SHUTDOWN = 0x3002
    MK_SYS_SHUTDOWN_ACK = 0x3003
    MK_SYS_HALTED = 0x3004  # inferred: used by the kernel, its #define not seen (docs/protocol.md)


class CpuFlag(IntFlag):
    """``mk_cpu_resource_payload.flags``."""

    MK_CPU_HAS_AVX512 = 0x01
    MK_CPU_HAS_TSX = 0x02
    MK_CPU_HYPERTHREAD = 0x04


class MemType(IntFlag):
    """``mk_mem_resource_payload.mem_type``."""

    MK_MEM_NORMAL = 0x01
    MK_MEM_DMA = 0x02
    MK_MEM_DMA32 = 0x04
    MK_MEM_HIGHMEM = 0x08


class DeviceFlag(IntFlag):
    """``mk_device_resource_payload.flags``."""

    MK_DEVICE_BIND_VFIO = 0x01
    MK_DEVICE_BIND_STUB = 0x02


class ShutdownFlag(IntFlag):
    """``mk_shutdown_payload.flags``."""

    MK_SHUTDOWN_GRACEFUL = 0x01
    MK_SHUTDOWN_IMMEDIATE = 0x02


class InstanceState(IntEnum):
    """``enum mk_instance_state``: the kernel's instance lifecycle states."""

    MK_STATE_EMPTY = 0
    MK_STATE_READY = 1
    MK_STATE_LOADED = 2
    MK_STATE_ACTIVE = 3
    MK_STATE_FAILED = 4
