"""The public API of multikernel.protocol is exactly what we mean it to be."""

import ast
import sys
from pathlib import Path

import multikernel.protocol as protocol

PUBLIC = {
    # envelope
    "DEFAULT_MAX_BODY", "DESTINATION_OFFSET", "HEADER_SIZE", "MISSED_OFFSET", "Header",
    "body_view", "deadline_after", "decode", "decode_body", "decode_header", "encode",
    "seconds_left", "stamp_source",
    # the one table of codes
    "MAGIC", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "CpuFlag", "DeviceFlag", "ErrorCode",
    "Feature", "Flag", "InstanceState", "Kind", "MemType", "MsgType", "NameFlag",
    "ReleaseNameResult", "RequestNameResult", "ResourceOp", "ShutdownFlag", "SystemOp",
    # control messages
    "CONTROL_DECODER", "Control", "Drain", "Heartbeat", "Hello", "NameOwnerChanged",
    "NameRelease", "NameReleaseReply", "NameRequest", "NameRequestReply", "Subscribe",
    "Unsubscribe", "SubscribeMany", "SubscribedMany", "UnsubscribeMany", "Welcome", "HoldNames",
    "NameHeld", "NameHoldEnded", "NameMove",
    "ReleaseNames", "SwitchNames",
    # direct channels, services, monitor, introspection
    "AttachRequest", "BusSnapshot", "ChannelInfo", "ChannelOpen", "ChannelReady",
    "ChannelRevoke", "EndpointInfo", "Introspect", "MethodInfo", "Mirror", "MonitorRecord",
    "MonitorStart", "MonitorStop", "Ok", "ServiceInfo", "SubscriptionInfo",
    "join_snapshot_pages", "snapshot_page",
    # broadcast streams
    "StreamClose", "StreamInfo", "StreamOpen", "StreamReaderGone", "StreamReady", "StreamRoute",
    "StreamSids", "StreamStart",
    # the lifecycle actor's contract
    "AgentHello", "AgentStatus", "CreateInstance", "DeleteInstance", "ExecRequest", "ExecResult",
    "InstanceInfo", "InstanceList", "InstanceStateChanged", "KillInstance", "LoadImage",
    "ShowInstances", "StartInstance", "UpdateInstance", "ExecOutput", "TtyOpen", "TtySession",
    "TtyInput", "ReadLogs", "LogLine", "LogLines",
    # the fault actor's contract, and the lifecycle methods it calls
    "CAUSES", "FAULT_EVENTS", "FAULT_METHODS", "FailInstance", "FaultEvent", "FaultHistory",
    "FaultStatus", "FaultStatusList", "FaultStatusRequest", "HistoryRequest", "PolicyGet",
    "PolicyInfo", "PolicySet", "RestartInstance", "RestartPolicy", "fault_subject",
    "format_restart", "parse_restart", "EndpointCutOff",
    # the upgrade actor's contract and an upgradable workload's control
    "UPGRADE_STEPS", "OUTCOMES", "WORKLOAD_METHODS", "UPGRADE_METHODS", "ControlInfo", "Freeze",
    "StateChunk", "Restored", "Health", "Deadlines", "StartRollout", "UndoRollout", "RolloutRef",
    "InstanceUpgrade", "RolloutStatus", "RolloutList", "ListRollouts", "Revision",
    "RevisionsQuery", "RevisionHistory", "UpgradeEvent", "control_name", "upgrade_subject",
    "rollout_subject",
    # the resource actor's contract, and how CPUs and sizes are written
    "AGENT_RESOURCE_METHOD", "RESOURCE_METHODS", "CpuInfo", "CpuSpec", "Grant",
    "AGENT_ELASTIC_METHOD", "ElasticRequest", "LOAD_SUBJECT", "LoadReport",
    "GrantFailedError", "GrantList", "GrantOp", "GrantRequest", "GrantsQuery", "History",
    "HistoryQuery", "InstanceRef", "InvalidResourceRequestError", "NodeInfo", "PoolInfo",
    "PoolQuery", "QueueInfo", "Reconcile", "Release", "ResourceError", "ResourceTransaction",
    "ResourceTransactionAck", "ResourceUnavailableError", "TxRecord", "UnknownGrantError",
    "MAX_CPU_ID", "format_cpu_list", "format_cpus", "format_size", "parse_cpu_list",
    "parse_cpus", "parse_size",
    # errors
    "ERROR_DECODER", "AccessDeniedError", "BusyError", "DeadlineExceededError", "ErrorBody",
    "InvalidSubjectError", "MalformedFrameError", "MultikernelError", "NoRespondersError",
    "NotFoundError", "ProtocolError", "RefusedError", "RemoteError", "TooLargeError",
    "UnsupportedVersionError",
    "error_from_body", "error_to_body", "raise_for_error",
    # kernel ABI
    "KERNEL_DECODER", "CpuAdd", "CpuRemove", "DeviceAdd", "DeviceRemove", "Halted",
    "KernelMessage", "MemAdd", "MemRemove", "ResourceAck", "ResourceMessage", "ResourceQuery",
    "Shutdown", "ShutdownAck", "SystemHeartbeat", "SystemMessage", "msg_type_of", "op_of",
    # subjects
    "MAX_SUBJECT_BYTES", "MAX_SUBJECT_TOKENS", "subject_matches", "validate_pattern",
    "validate_subject",
}  # fmt: skip


def test_public_names_are_exactly_the_curated_set() -> None:
    exported = {name for name in dir(protocol) if not name.startswith("_")}
    assert exported == PUBLIC


def test_public_classes_and_functions_come_from_private_modules() -> None:
    for name in PUBLIC:
        module = getattr(getattr(protocol, name), "__module__", None)
        if module is not None and module.startswith("multikernel"):
            assert module.startswith("multikernel.protocol._"), name


def test_package_imports_only_the_stdlib_msgspec_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgspec"}
    for path in Path(protocol.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in allowed or name.startswith("multikernel.protocol")
                assert ok, f"{path.name} imports {name}"
