"""docs/protocol.md is the specification: its tables agree with the code's tables."""

import re
import struct
from enum import IntEnum, IntFlag
from pathlib import Path

import msgspec
import msgspec.inspect
import pytest

import multikernel.protocol as protocol
from multikernel.protocol._envelope import HEADER_FIELDS

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TYPE_OF_FORMAT = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64"}
ENUM_TABLES: list[type[IntEnum] | type[IntFlag]] = [
    protocol.Kind,
    protocol.Flag,
    protocol.Feature,
    protocol.NameFlag,
    protocol.RequestNameResult,
    protocol.ReleaseNameResult,
    protocol.ErrorCode,
    protocol.MsgType,
    protocol.ResourceOp,
    protocol.SystemOp,
    protocol.CpuFlag,
    protocol.MemType,
    protocol.DeviceFlag,
    protocol.ShutdownFlag,
    protocol.InstanceState,
]


def _tables() -> dict[str, list[list[str]]]:
    """Every table after a ``<!-- table: NAME -->`` marker, as rows of cells (header skipped)."""
    tables: dict[str, list[list[str]]] = {}
    name = None
    rows: list[list[str]] = []
    for line in [*SPEC.read_text().splitlines(), ""]:
        marker = re.fullmatch(r"<!-- table: (\S+) -->", line.strip())
        if marker:
            name, rows = marker.group(1), []
        elif name is not None and line.startswith("|"):
            rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
        elif name is not None and rows:
            tables[name] = rows[2:]  # skip the column names and the |---| line
            name = None
    return tables


TABLES = _tables()


def test_header_table_matches_the_struct_format() -> None:
    expected = []
    offset = 0
    for field, code in HEADER_FIELDS:
        size = struct.calcsize("<" + code)
        expected.append([str(offset), str(size), field, TYPE_OF_FORMAT[code]])
        offset += size
    assert [row[:4] for row in TABLES["header"]] == expected
    assert offset == protocol.HEADER_SIZE


@pytest.mark.parametrize("enum", ENUM_TABLES, ids=lambda e: e.__name__)
def test_code_table_matches_the_enum(enum: type[IntEnum] | type[IntFlag]) -> None:
    documented = {int(row[0], 0): row[1] for row in TABLES[enum.__name__]}
    assert documented == {member.value: member.name for member in enum}


def test_error_table_names_the_class_each_code_raises() -> None:
    for code, name, exception, *_ in TABLES["ErrorCode"]:
        body = protocol.ErrorBody(code=int(code), message="m")
        assert type(protocol.error_from_body(body)).__name__ == exception, name


def test_control_tag_table_matches_the_control_union() -> None:
    documented = {row[0]: row[1] for row in TABLES["control-tags"]}
    union = {cls.__struct_config__.tag: cls.__name__ for cls in protocol.Control.__args__}
    assert documented == union


def test_kernel_tag_table_matches_the_kernel_union() -> None:
    documented = {row[0]: (row[1], row[3]) for row in TABLES["kernel-tags"]}
    union = {}
    for cls in protocol.KernelMessage.__args__:
        tag = cls.__struct_config__.tag
        op = (protocol.SystemOp if tag & 0xF000 == 0x3000 else protocol.ResourceOp)(tag)
        union[op.name] = (cls.__name__, ", ".join(cls.__struct_fields__))
    assert documented == union


def test_fault_method_table_matches_the_fault_methods() -> None:
    documented = {row[0]: (row[1], row[2]) for row in TABLES["fault-methods"]}
    code = {m: (req.__name__, resp.__name__) for m, (req, resp) in protocol.FAULT_METHODS.items()}
    assert documented == code


def test_upgrade_tables_match_the_code() -> None:
    documented = {row[0]: (row[1], row[2]) for row in TABLES["upgrade-methods"]}
    code = {m: (req.__name__, resp.__name__) for m, (req, resp) in protocol.UPGRADE_METHODS.items()}
    assert documented == code
    assert [row[0] for row in TABLES["upgrade-steps"]] == list(protocol.UPGRADE_STEPS)
    assert [row[1] for row in TABLES["upgrade-steps"]] == list(protocol.UPGRADE_STEPS.values())
    documented = {row[0]: (row[1], row[2]) for row in TABLES["workload-methods"]}
    code = {
        m: (req.__name__ if req else "-", resp.__name__ if resp else "-")
        for m, (req, resp) in protocol.WORKLOAD_METHODS.items()
    }
    assert documented == code


def test_fault_event_and_cause_tables_match_the_code() -> None:
    assert [row[0] for row in TABLES["fault-events"]] == list(protocol.FAULT_EVENTS)
    info = msgspec.inspect.type_info(protocol.FaultEvent)
    (event,) = (f.type for f in info.fields if f.name == "event")  # type: ignore[attr-defined]
    assert set(event.values) == set(protocol.FAULT_EVENTS)
    assert [row[0] for row in TABLES["causes"]] == list(protocol.CAUSES)


def test_restart_policy_table_matches_the_struct() -> None:
    policy = protocol.RestartPolicy()
    documented = {row[0]: row[2] for row in TABLES["RestartPolicy"]}
    assert documented == {f: str(getattr(policy, f)) for f in policy.__struct_fields__}


def test_resource_method_table_matches_the_service_contract() -> None:
    documented = {(row[0], row[1]): (row[2], row[3]) for row in TABLES["resource-methods"]}
    contract = {
        ("resource", method): (request.__name__, response.__name__)
        for method, (request, response) in protocol.RESOURCE_METHODS.items()
    }
    for method, request, response in (
        protocol.AGENT_RESOURCE_METHOD,
        protocol.AGENT_ELASTIC_METHOD,
    ):
        contract[("instance.<id>.agent", method)] = (request.__name__, response.__name__)
    assert documented == contract


def test_resource_message_table_matches_the_structs() -> None:
    documented = {row[0]: row[1] for row in TABLES["resource-messages"]}
    structs = {
        name: ", ".join(value.__struct_fields__)
        for name in dir(protocol)
        if isinstance(value := getattr(protocol, name), type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == "multikernel.protocol._resource"
    }
    assert documented == structs


def test_every_table_marker_is_checked() -> None:
    checked = {e.__name__ for e in ENUM_TABLES} | {"header", "control-tags", "kernel-tags"}
    checked |= {"fault-methods", "fault-events", "causes", "RestartPolicy"}
    checked |= {"resource-methods", "resource-messages"}
    checked |= {"upgrade-methods", "upgrade-steps", "workload-methods"}
    assert set(TABLES) == checked


def test_spec_states_the_default_body_limit() -> None:
    assert protocol.DEFAULT_MAX_BODY == 1 << 20
    assert "1 MiB (`DEFAULT_MAX_BODY`)" in SPEC.read_text()


def test_spec_states_the_subject_limits() -> None:
    text = SPEC.read_text()
    assert f"{protocol.MAX_SUBJECT_BYTES} bytes (`MAX_SUBJECT_BYTES`)" in text
    assert f"{protocol.MAX_SUBJECT_TOKENS} tokens (`MAX_SUBJECT_TOKENS`)" in text
