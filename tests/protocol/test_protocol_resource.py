"""The resource service's messages: kernel ops inside transactions, evolution, bad bodies."""

from __future__ import annotations

import re

import msgspec
import pytest

from multikernel.protocol import (
    CpuAdd,
    CpuSpec,
    DeviceAdd,
    ElasticRequest,
    Grant,
    GrantRequest,
    InvalidResourceRequestError,
    LoadReport,
    MemRemove,
    ResourceAck,
    ResourceOp,
    ResourceTransaction,
    ResourceTransactionAck,
    TxRecord,
)


def round_trip(value: object, kind: type) -> object:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=kind)


def test_a_transaction_carries_the_kernel_messages_with_their_subtypes() -> None:
    tx = ResourceTransaction(
        tx=7,
        instance=3,
        ops=(
            MemRemove(3, start_pfn=0x40000, nr_pages=0x8000),
            CpuAdd(3, cpu_id=5, numa_node=1),
            DeviceAdd(3, domain=0, bus=3, devfn=0),
        ),
        cpus=(4, 5),
        memory=256 << 20,
        queues=("net/eth0/rx-0",),
    )
    assert round_trip(tx, ResourceTransaction) == tx
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(tx))
    assert [op["op"] for op in raw["ops"]] == [
        ResourceOp.MK_RES_MEM_REMOVE,
        ResourceOp.MK_RES_CPU_ADD,
        ResourceOp.MK_RES_DEVICE_ADD,
    ]


def test_a_transaction_refuses_ops_that_are_not_grant_operations() -> None:
    body = msgspec.msgpack.encode(
        {"tx": 1, "instance": 1, "ops": [{"op": int(ResourceOp.MK_RES_ACK), "instance": 1,
                                          "operation": 1}]}
    )  # fmt: skip
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(body, type=ResourceTransaction)


def test_a_cpu_spec_on_the_wire_is_a_count_or_ids() -> None:
    good = GrantRequest("web", 1, cpus=CpuSpec(ids=(0, 3)), memory=1 << 30)
    assert round_trip(good, GrantRequest) == good
    for bad in ({}, {"count": 2, "ids": [1]}, {"ids": [3, 1]}):
        body = msgspec.msgpack.encode({"instance": "web", "instance_id": 1, "cpus": bad})
        with pytest.raises(msgspec.ValidationError, match="CPU"):
            msgspec.msgpack.decode(body, type=GrantRequest)


def test_queues_left_out_keep_them_and_an_empty_tuple_gives_them_back() -> None:
    keep = msgspec.msgpack.encode(GrantRequest("web", 1))
    assert msgspec.msgpack.decode(keep) == {"instance": "web", "instance_id": 1}
    assert msgspec.msgpack.decode(keep, type=GrantRequest).queues is None
    drop = round_trip(GrantRequest("web", 1, queues=()), GrantRequest)
    assert drop.queues == ()  # type: ignore[attr-defined]


def test_a_history_record_keeps_ops_acks_and_both_grants() -> None:
    record = TxRecord(
        tx=9, instance="web", instance_id=1, kind="update", state="rolled-back",
        ops=(CpuAdd(1, cpu_id=2),), acks=(ResourceAck(1, operation=0x2001, result=-16),),
        before=Grant("web", 1, cpus=(1,)), after=Grant("web", 1, cpus=(1, 2)),
        reason="the instance refused", started=1.5, finished=2.5,
    )  # fmt: skip
    assert round_trip(record, TxRecord) == record


def test_an_older_peer_reads_a_newer_ack_and_a_newer_peer_an_older_one() -> None:
    newer = msgspec.msgpack.encode({"tx": 1, "acks": [], "error": "", "hint": "new field"})
    assert msgspec.msgpack.decode(newer, type=ResourceTransactionAck).tx == 1
    older = msgspec.msgpack.encode({"instance": "web", "instance_id": 1, "cpus": [1]})
    assert msgspec.msgpack.decode(older, type=Grant).tx == 0  # filled with its default


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "an elastic request asks for CPUs or memory"),
        ({"cpus": 2, "cpu_change": 1}, "ask for a CPU count (cpus) or a change (cpu_change)"),
        ({"memory": 1 << 30, "memory_change": -(1 << 27)}, "ask for a memory size (memory)"),
    ],
)
def test_an_elastic_request_asks_for_one_form_of_each_and_something(
    fields: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidResourceRequestError, match=re.escape(message)):
        ElasticRequest(**fields)
    body = msgspec.msgpack.encode(fields)  # the same checks when it is decoded
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.msgpack.decode(body, type=ElasticRequest)


def test_an_elastic_request_grows_or_shrinks_by_signed_amounts() -> None:
    asked = ElasticRequest(cpu_change=-1, memory_change=256 << 20, reason="batch done")
    assert round_trip(asked, ElasticRequest) == asked
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(asked)) == {
        "cpu_change": -1, "memory_change": 256 << 20, "reason": "batch done"
    }  # fmt: skip


def test_a_load_report_refuses_negative_or_impossible_measurements() -> None:
    report = LoadReport(instance=3, period=2.0, cpus=2, cpu_busy=1.5, cpu_pressure=0.25)
    assert round_trip(report, LoadReport) == report
    assert round_trip(report, LoadReport).memory_pressure is None  # left out: no PSI
    for bad in ({"cpu_busy": -1.0}, {"cpu_pressure": 1.5}, {"cpu_waiting": float("nan")}):
        body = msgspec.msgpack.encode({"instance": 3, **bad})
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(body, type=LoadReport)
