"""Control and kernel-ABI messages: round trips, tags, widths, immutability."""

import msgspec
import pytest

from multikernel.protocol import (
    CONTROL_DECODER,
    DEFAULT_MAX_BODY,
    KERNEL_DECODER,
    CpuAdd,
    CpuRemove,
    DeviceAdd,
    DeviceRemove,
    Drain,
    Halted,
    Heartbeat,
    Hello,
    HoldNames,
    Kind,
    MalformedFrameError,
    MemAdd,
    MemRemove,
    MsgType,
    NameFlag,
    NameHeld,
    NameHoldEnded,
    NameMove,
    NameOwnerChanged,
    NameRelease,
    NameReleaseReply,
    NameRequest,
    NameRequestReply,
    ReleaseNameResult,
    ReleaseNames,
    RequestNameResult,
    ResourceAck,
    ResourceOp,
    ResourceQuery,
    Shutdown,
    ShutdownAck,
    ShutdownFlag,
    Subscribe,
    SubscribedMany,
    SubscribeMany,
    SwitchNames,
    SystemHeartbeat,
    SystemOp,
    Unsubscribe,
    UnsubscribeMany,
    Welcome,
    decode,
    encode,
    msg_type_of,
    op_of,
)

CONTROL: list[msgspec.Struct] = [
    Hello(min_version=1, max_version=1, features=0b101, name="agent-3"),
    Welcome(version=1, endpoint_id=17, features=0b1),
    Subscribe("mk.instance.*.state", queue_group="workers"),
    Unsubscribe("mk.instance.*.state"),
    SubscribeMany((Subscribe("a.x", sid=1), Subscribe("a.*", queue_group="g", sid=2))),
    SubscribedMany(across=b"\x00\x01"),
    UnsubscribeMany(sids=(1, 2)),
    NameRequest("resource", flags=NameFlag.ALLOW_REPLACEMENT | NameFlag.DO_NOT_QUEUE),
    NameRequestReply("resource", RequestNameResult.IN_QUEUE),
    NameRelease("resource"),
    NameReleaseReply("resource", ReleaseNameResult.NOT_OWNER),
    NameOwnerChanged("resource", old_owner=3, new_owner=4),
    Heartbeat(seq=9, sent_ns=123),
    Drain(deadline_ns=5),
    HoldNames(("resource", "fault"), deadline_ns=7),
    SwitchNames((NameMove("resource", 5), NameMove("fault", 6))),
    ReleaseNames(("resource",)),
    NameHeld("resource", deadline_ns=7, holder=9),
    NameHoldEnded("resource", reason="switched"),
]

KERNEL: list[msgspec.Struct] = [
    CpuAdd(instance=1, cpu_id=4, numa_node=1, flags=2),
    CpuRemove(instance=1, cpu_id=4),
    MemAdd(instance=1, start_pfn=0x100000, nr_pages=32768),
    MemRemove(instance=1, start_pfn=0x100000, nr_pages=32768),
    DeviceAdd(instance=2, domain=0, bus=3, devfn=0x10, driver_override="vfio-pci"),
    DeviceRemove(instance=2, domain=0, bus=3, devfn=0x10),
    ResourceQuery(instance=2),
    ResourceAck(instance=1, operation=ResourceOp.MK_RES_CPU_ADD, result=-16, resource_id=4),
    SystemHeartbeat(instance=1, seq=3),
    Shutdown(instance=1),
    ShutdownAck(instance=1),
    Halted(instance=1),
]


@pytest.mark.parametrize("message", CONTROL, ids=lambda m: type(m).__name__)
def test_control_message_round_trips_in_a_frame(message: object) -> None:
    assert decode(encode(Kind.CONTROL, message), CONTROL_DECODER)[1] == message


@pytest.mark.parametrize("message", KERNEL, ids=lambda m: type(m).__name__)
def test_kernel_message_round_trips_in_a_frame(message: object) -> None:
    assert (
        decode(encode(Kind.REQUEST, message, subject="mk.resource"), KERNEL_DECODER)[1] == message
    )


@pytest.mark.parametrize("message", CONTROL + KERNEL, ids=lambda m: type(m).__name__)
def test_messages_are_frozen(message: msgspec.Struct) -> None:
    field = message.__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(message, field, getattr(message, field))


@pytest.mark.parametrize("message", CONTROL + KERNEL, ids=lambda m: type(m).__name__)
def test_messages_accept_unknown_fields(message: msgspec.Struct) -> None:
    assert not message.__struct_config__.forbid_unknown_fields


def test_control_tags_are_unique() -> None:
    tags = [type(m).__struct_config__.tag for m in CONTROL]
    assert len(set(tags)) == len(tags)


@pytest.mark.parametrize("message", KERNEL, ids=lambda m: type(m).__name__)
def test_kernel_message_tag_is_its_kernel_subtype(message: object) -> None:
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(message))
    assert raw["op"] == op_of(message)  # type: ignore[arg-type]
    assert raw["op"] & 0xF000 == msg_type_of(message)  # type: ignore[arg-type]


def test_resource_and_system_messages_fall_in_their_kernel_categories() -> None:
    assert msg_type_of(CpuAdd(instance=1, cpu_id=2)) is MsgType.MK_MSG_RESOURCE
    assert msg_type_of(Halted(instance=1)) is MsgType.MK_MSG_SYSTEM
    assert op_of(Halted(instance=1)) is SystemOp.MK_SYS_HALTED
    assert op_of(ResourceQuery(instance=1)) is ResourceOp.MK_RES_QUERY


def test_defaults_follow_the_kernel() -> None:
    assert Shutdown(instance=1).flags == ShutdownFlag.MK_SHUTDOWN_GRACEFUL
    assert Welcome(version=1, endpoint_id=1).max_body == DEFAULT_MAX_BODY


def test_defaults_are_left_off_the_wire() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Heartbeat())) == {"type": "heartbeat"}


@pytest.mark.parametrize(
    "raw",
    [
        {"op": 0x2006, "instance": 1, "domain": 0, "bus": 256, "devfn": 0},
        {"op": 0x2001, "instance": 1, "cpu_id": -1},
        {"op": 0x2001, "instance": 2**32, "cpu_id": 1},
        {"op": 0x2100, "instance": 1, "operation": 0x2001, "result": 2**31},
        {
            "op": 0x2006,
            "instance": 1,
            "domain": 0,
            "bus": 0,
            "devfn": 0,
            "driver_override": "x" * 64,
        },
    ],
)
def test_kernel_fields_wider_than_the_kernel_are_refused(raw: dict[str, int]) -> None:
    frame = encode(Kind.REQUEST, raw, subject="mk.resource")
    with pytest.raises(MalformedFrameError, match="request body"):
        decode(frame, KERNEL_DECODER)


def test_unknown_control_tag_is_refused_naming_the_tag() -> None:
    frame = encode(Kind.CONTROL, {"type": "teleport", "where": "mars"})
    with pytest.raises(MalformedFrameError, match="teleport"):
        decode(frame, CONTROL_DECODER)


def test_unknown_kernel_subtype_is_refused() -> None:
    frame = encode(Kind.REQUEST, {"op": 0x2008, "instance": 1}, subject="mk.resource")
    with pytest.raises(MalformedFrameError, match="8200"):
        decode(frame, KERNEL_DECODER)


def test_unknown_name_result_is_refused() -> None:
    frame = encode(Kind.CONTROL, {"type": "name_request_reply", "name": "x", "result": 9})
    with pytest.raises(MalformedFrameError):
        decode(frame, CONTROL_DECODER)
