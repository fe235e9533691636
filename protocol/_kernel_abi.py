"""Messages that mirror the multikernel kernel's ``mk_message`` ABI.

The kernel (``include/linux/multikernel.h``) sends ``struct mk_message {msg_type, msg_subtype,
msg_id, payload_len, payload[]}`` over its IPI buffers. Our resource and lifecycle messages speak
the same vocabulary so an agent can translate one to the other field by field:

* each struct's msgspec tag (field ``op``) *is* the kernel subtype (``MK_RES_CPU_ADD`` = 0x2001…),
  so the category is ``op & 0xF000`` (``msg_type_of``);
* the fields are the kernel payload's fields, with the kernel's widths (checked on decode), plus
  ``instance``, the instance the operation is about, which the kernel carries as
  ``sender_instance_id`` or implicitly in the IPI target.

Resource add/remove/query are answered by ``ResourceAck`` (``result`` 0 or a negative errno, as
the kernel does). Shutdown is negotiated: SHUTDOWN → SHUTDOWN_ACK → HALTED.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

from multikernel.protocol._codes import MemType, MsgType, ResourceOp, ShutdownFlag, SystemOp
from multikernel.protocol._fields import I32, U8, U16, U32, U64


class _KernelMessage(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="op"):
    """Common base: every kernel message names the instance it is about."""

    instance: U32


class CpuAdd(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_CPU_ADD)):
    """Give a physical CPU to an instance (``mk_cpu_resource_payload``)."""

    cpu_id: U64
    numa_node: U32 = 0
    flags: U32 = 0  # CpuFlag bits


class CpuRemove(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_CPU_REMOVE)):
    """Take a physical CPU back from an instance."""

    cpu_id: U64


class MemAdd(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_MEM_ADD)):
    """Give a range of page frames to an instance (``mk_mem_resource_payload``)."""

    start_pfn: U64
    nr_pages: U64
    numa_node: U32 = 0
    mem_type: U32 = int(MemType.MK_MEM_NORMAL)  # MemType bits


class MemRemove(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_MEM_REMOVE)):
    """Take a range of page frames back from an instance."""

    start_pfn: U64
    nr_pages: U64


class DeviceAdd(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_DEVICE_ADD)):
    """Give a PCI device to an instance (``mk_device_resource_payload``)."""

    domain: U16
    bus: U8
    devfn: U8
    flags: U32 = 0  # DeviceFlag bits
    driver_override: Annotated[str, msgspec.Meta(max_length=63)] = ""  # char[64] in the kernel


class DeviceRemove(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_DEVICE_REMOVE)):
    """Take a PCI device back from an instance."""

    domain: U16
    bus: U8
    devfn: U8


class ResourceQuery(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_QUERY)):
    """Ask an instance which resources it holds."""


class ResourceAck(_KernelMessage, frozen=True, tag=int(ResourceOp.MK_RES_ACK)):
    """The answer to a resource operation (``mk_resource_ack``)."""

    operation: U32  # the ResourceOp being acknowledged
    result: I32 = 0  # 0 on success, a negative errno on failure
    resource_id: U64 = 0  # the CPU id, first PFN or PCI address concerned


class SystemHeartbeat(_KernelMessage, frozen=True, tag=int(SystemOp.MK_SYS_HEARTBEAT)):
    """An instance is alive."""

    seq: U64 = 0


class Shutdown(_KernelMessage, frozen=True, tag=int(SystemOp.MK_SYS_SHUTDOWN)):
    """Ask an instance to shut down (``mk_shutdown_payload``)."""

    flags: U32 = int(ShutdownFlag.MK_SHUTDOWN_GRACEFUL)  # ShutdownFlag bits


class ShutdownAck(_KernelMessage, frozen=True, tag=int(SystemOp.MK_SYS_SHUTDOWN_ACK)):
    """The instance accepted a shutdown and is going down."""


class Halted(_KernelMessage, frozen=True, tag=int(SystemOp.MK_SYS_HALTED)):
    """The instance has stopped; its resources may be reclaimed."""


ResourceMessage: TypeAlias = (
    CpuAdd | CpuRemove | MemAdd | MemRemove | DeviceAdd | DeviceRemove | ResourceQuery | ResourceAck
)
SystemMessage: TypeAlias = SystemHeartbeat | Shutdown | ShutdownAck | Halted
KernelMessage: TypeAlias = ResourceMessage | SystemMessage

KERNEL_DECODER: Final = msgspec.msgpack.Decoder(KernelMessage)


def msg_type_of(message: KernelMessage) -> MsgType:
    """The kernel ``msg_type`` (category) a message belongs to."""
    match message:
        case SystemHeartbeat() | Shutdown() | ShutdownAck() | Halted():
            return MsgType.MK_MSG_SYSTEM
        case _:
            return MsgType.MK_MSG_RESOURCE


def op_of(message: KernelMessage) -> ResourceOp | SystemOp:
    """The kernel ``msg_subtype`` of a message (its msgspec tag)."""
    tag = type(message).__struct_config__.tag
    assert isinstance(tag, int)
    return SystemOp(tag) if tag & 0xF000 == MsgType.MK_MSG_SYSTEM else ResourceOp(tag)
