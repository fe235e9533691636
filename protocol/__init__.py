"""The typed contract of the multikernel bus: everything on the wire, and no I/O.

Every frame on a ring is an **envelope**: a fixed 48-byte little-endian header, the subject, and a
msgpack body. The hub routes on the header alone (``decode_header`` is one ``struct`` unpack) and
forwards the frame's bytes untouched; only the endpoint that owns a body decodes it
(``decode_body``), with the one decoder of the message union the frame's kind calls for::

    frame = encode(Kind.CONTROL, Subscribe("mk.instance.*.state"), source=7)
    header = decode_header(frame)              # the hub's routing path
    match decode_body(header, frame, CONTROL_DECODER):
        case Subscribe(subject=pattern): ...

The **kinds** are publish, request, reply, error and control. Control bodies (``Control``) attach
an endpoint (Hello/Welcome with version and feature negotiation), subscribe with queue groups,
own well-known names with ordered hand-off (NameRequest/NameRelease/NameOwnerChanged), hold and
switch them atomically during an upgrade (HoldNames/SwitchNames/ReleaseNames), beat and drain.
Error bodies (``ErrorBody``) carry a code that maps back to the same exception class on the
other side (``error_to_body``, ``raise_for_error``), under the project's one root error,
``MultikernelError``. The resource and lifecycle vocabulary (``KernelMessage``) mirrors the
multikernel kernel's ``mk_message`` ABI, subtype for subtype; the resource actor's grants are
transactions of those messages (``ResourceTransaction``, ``RESOURCE_METHODS``), and CPUs and sizes
have one text syntax for every client (``parse_cpus``: ``2`` is a count, ``@0-3,6`` a list;
``parse_size``, ``format_size``).

Every number on the wire lives in one table (``Kind``, ``Flag``, ``Feature``, ``ErrorCode``, the
``MK_*`` enums); ``docs/protocol.md`` is the specification, checked against that table by tests,
and says how messages may evolve. Subjects are dot-separated tokens with ``*`` and ``>``
wildcards (``validate_subject``, ``validate_pattern``, ``subject_matches``).
"""

from multikernel.protocol._bus import AttachRequest as AttachRequest
from multikernel.protocol._bus import BusSnapshot as BusSnapshot
from multikernel.protocol._bus import ChannelInfo as ChannelInfo
from multikernel.protocol._bus import ChannelOpen as ChannelOpen
from multikernel.protocol._bus import ChannelReady as ChannelReady
from multikernel.protocol._bus import ChannelRevoke as ChannelRevoke
from multikernel.protocol._bus import EndpointCutOff as EndpointCutOff
from multikernel.protocol._bus import EndpointInfo as EndpointInfo
from multikernel.protocol._bus import Introspect as Introspect
from multikernel.protocol._bus import MethodInfo as MethodInfo
from multikernel.protocol._bus import Mirror as Mirror
from multikernel.protocol._bus import MonitorRecord as MonitorRecord
from multikernel.protocol._bus import MonitorStart as MonitorStart
from multikernel.protocol._bus import MonitorStop as MonitorStop
from multikernel.protocol._bus import Ok as Ok
from multikernel.protocol._bus import ServiceInfo as ServiceInfo
from multikernel.protocol._bus import SubscriptionInfo as SubscriptionInfo
from multikernel.protocol._codes import MAGIC as MAGIC
from multikernel.protocol._codes import PROTOCOL_VERSION as PROTOCOL_VERSION
from multikernel.protocol._codes import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS
from multikernel.protocol._codes import CpuFlag as CpuFlag
from multikernel.protocol._codes import DeviceFlag as DeviceFlag
from multikernel.protocol._codes import ErrorCode as ErrorCode
from multikernel.protocol._codes import Feature as Feature
from multikernel.protocol._codes import Flag as Flag
from multikernel.protocol._codes import InstanceState as InstanceState
from multikernel.protocol._codes import Kind as Kind
from multikernel.protocol._codes import MemType as MemType
from multikernel.protocol._codes import MsgType as MsgType
from multikernel.protocol._codes import NameFlag as NameFlag
from multikernel.protocol._codes import ReleaseNameResult as ReleaseNameResult
from multikernel.protocol._codes import RequestNameResult as RequestNameResult
from multikernel.protocol._codes import ResourceOp as ResourceOp
from multikernel.protocol._codes import ShutdownFlag as ShutdownFlag
from multikernel.protocol._codes import SystemOp as SystemOp
from multikernel.protocol._control import CONTROL_DECODER as CONTROL_DECODER
from multikernel.protocol._control import Control as Control
from multikernel.protocol._control import Drain as Drain
from multikernel.protocol._control import Heartbeat as Heartbeat
from multikernel.protocol._control import Hello as Hello
from multikernel.protocol._control import HoldNames as HoldNames
from multikernel.protocol._control import NameHeld as NameHeld
from multikernel.protocol._control import NameHoldEnded as NameHoldEnded
from multikernel.protocol._control import NameMove as NameMove
from multikernel.protocol._control import NameOwnerChanged as NameOwnerChanged
from multikernel.protocol._control import NameRelease as NameRelease
from multikernel.protocol._control import NameReleaseReply as NameReleaseReply
from multikernel.protocol._control import NameRequest as NameRequest
from multikernel.protocol._control import NameRequestReply as NameRequestReply
from multikernel.protocol._control import ReleaseNames as ReleaseNames
from multikernel.protocol._control import Subscribe as Subscribe
from multikernel.protocol._control import SubscribedMany as SubscribedMany
from multikernel.protocol._control import SubscribeMany as SubscribeMany
from multikernel.protocol._control import SwitchNames as SwitchNames
from multikernel.protocol._control import Unsubscribe as Unsubscribe
from multikernel.protocol._control import UnsubscribeMany as UnsubscribeMany
from multikernel.protocol._control import Welcome as Welcome
from multikernel.protocol._envelope import DEFAULT_MAX_BODY as DEFAULT_MAX_BODY
from multikernel.protocol._envelope import DESTINATION_OFFSET as DESTINATION_OFFSET
from multikernel.protocol._envelope import HEADER_SIZE as HEADER_SIZE
from multikernel.protocol._envelope import MISSED_OFFSET as MISSED_OFFSET
from multikernel.protocol._envelope import Header as Header
from multikernel.protocol._envelope import body_view as body_view
from multikernel.protocol._envelope import deadline_after as deadline_after
from multikernel.protocol._envelope import decode as decode
from multikernel.protocol._envelope import decode_body as decode_body
from multikernel.protocol._envelope import decode_header as decode_header
from multikernel.protocol._envelope import encode as encode
from multikernel.protocol._envelope import seconds_left as seconds_left
from multikernel.protocol._envelope import stamp_source as stamp_source
from multikernel.protocol._errors import ERROR_DECODER as ERROR_DECODER
from multikernel.protocol._errors import AccessDeniedError as AccessDeniedError
from multikernel.protocol._errors import BusyError as BusyError
from multikernel.protocol._errors import DeadlineExceededError as DeadlineExceededError
from multikernel.protocol._errors import ErrorBody as ErrorBody
from multikernel.protocol._errors import InvalidSubjectError as InvalidSubjectError
from multikernel.protocol._errors import MalformedFrameError as MalformedFrameError
from multikernel.protocol._errors import MultikernelError as MultikernelError
from multikernel.protocol._errors import NoRespondersError as NoRespondersError
from multikernel.protocol._errors import NotFoundError as NotFoundError
from multikernel.protocol._errors import ProtocolError as ProtocolError
from multikernel.protocol._errors import RefusedError as RefusedError
from multikernel.protocol._errors import RemoteError as RemoteError
from multikernel.protocol._errors import TooLargeError as TooLargeError
from multikernel.protocol._errors import UnsupportedVersionError as UnsupportedVersionError
from multikernel.protocol._errors import error_from_body as error_from_body
from multikernel.protocol._errors import error_to_body as error_to_body
from multikernel.protocol._errors import raise_for_error as raise_for_error
from multikernel.protocol._fault import CAUSES as CAUSES
from multikernel.protocol._fault import FAULT_EVENTS as FAULT_EVENTS
from multikernel.protocol._fault import FAULT_METHODS as FAULT_METHODS
from multikernel.protocol._fault import FailInstance as FailInstance
from multikernel.protocol._fault import FaultEvent as FaultEvent
from multikernel.protocol._fault import FaultHistory as FaultHistory
from multikernel.protocol._fault import FaultStatus as FaultStatus
from multikernel.protocol._fault import FaultStatusList as FaultStatusList
from multikernel.protocol._fault import FaultStatusRequest as FaultStatusRequest
from multikernel.protocol._fault import HistoryRequest as HistoryRequest
from multikernel.protocol._fault import PolicyGet as PolicyGet
from multikernel.protocol._fault import PolicyInfo as PolicyInfo
from multikernel.protocol._fault import PolicySet as PolicySet
from multikernel.protocol._fault import RestartInstance as RestartInstance
from multikernel.protocol._fault import RestartPolicy as RestartPolicy
from multikernel.protocol._fault import fault_subject as fault_subject
from multikernel.protocol._fault import format_restart as format_restart
from multikernel.protocol._fault import parse_restart as parse_restart
from multikernel.protocol._kernel_abi import KERNEL_DECODER as KERNEL_DECODER
from multikernel.protocol._kernel_abi import CpuAdd as CpuAdd
from multikernel.protocol._kernel_abi import CpuRemove as CpuRemove
from multikernel.protocol._kernel_abi import DeviceAdd as DeviceAdd
from multikernel.protocol._kernel_abi import DeviceRemove as DeviceRemove
from multikernel.protocol._kernel_abi import Halted as Halted
from multikernel.protocol._kernel_abi import KernelMessage as KernelMessage
from multikernel.protocol._kernel_abi import MemAdd as MemAdd
from multikernel.protocol._kernel_abi import MemRemove as MemRemove
from multikernel.protocol._kernel_abi import ResourceAck as ResourceAck
from multikernel.protocol._kernel_abi import ResourceMessage as ResourceMessage
from multikernel.protocol._kernel_abi import ResourceQuery as ResourceQuery
from multikernel.protocol._kernel_abi import Shutdown as Shutdown
from multikernel.protocol._kernel_abi import ShutdownAck as ShutdownAck
from multikernel.protocol._kernel_abi import SystemHeartbeat as SystemHeartbeat
from multikernel.protocol._kernel_abi import SystemMessage as SystemMessage
from multikernel.protocol._kernel_abi import msg_type_of as msg_type_of
from multikernel.protocol._kernel_abi import op_of as op_of
from multikernel.protocol._lifecycle import AgentHello as AgentHello
from multikernel.protocol._lifecycle import AgentStatus as AgentStatus
from multikernel.protocol._lifecycle import CreateInstance as CreateInstance
from multikernel.protocol._lifecycle import DeleteInstance as DeleteInstance
from multikernel.protocol._lifecycle import ExecOutput as ExecOutput
from multikernel.protocol._lifecycle import ExecRequest as ExecRequest
from multikernel.protocol._lifecycle import ExecResult as ExecResult
from multikernel.protocol._lifecycle import InstanceInfo as InstanceInfo
from multikernel.protocol._lifecycle import InstanceList as InstanceList
from multikernel.protocol._lifecycle import InstanceStateChanged as InstanceStateChanged
from multikernel.protocol._lifecycle import KillInstance as KillInstance
from multikernel.protocol._lifecycle import LoadImage as LoadImage
from multikernel.protocol._lifecycle import LogLine as LogLine
from multikernel.protocol._lifecycle import LogLines as LogLines
from multikernel.protocol._lifecycle import ReadLogs as ReadLogs
from multikernel.protocol._lifecycle import ShowInstances as ShowInstances
from multikernel.protocol._lifecycle import StartInstance as StartInstance
from multikernel.protocol._lifecycle import TtyInput as TtyInput
from multikernel.protocol._lifecycle import TtyOpen as TtyOpen
from multikernel.protocol._lifecycle import TtySession as TtySession
from multikernel.protocol._lifecycle import UpdateInstance as UpdateInstance
from multikernel.protocol._paging import join_snapshot_pages as join_snapshot_pages
from multikernel.protocol._paging import snapshot_page as snapshot_page
from multikernel.protocol._resource import AGENT_ELASTIC_METHOD as AGENT_ELASTIC_METHOD
from multikernel.protocol._resource import AGENT_RESOURCE_METHOD as AGENT_RESOURCE_METHOD
from multikernel.protocol._resource import LOAD_SUBJECT as LOAD_SUBJECT
from multikernel.protocol._resource import RESOURCE_METHODS as RESOURCE_METHODS
from multikernel.protocol._resource import CpuInfo as CpuInfo
from multikernel.protocol._resource import CpuSpec as CpuSpec
from multikernel.protocol._resource import ElasticRequest as ElasticRequest
from multikernel.protocol._resource import Grant as Grant
from multikernel.protocol._resource import GrantFailedError as GrantFailedError
from multikernel.protocol._resource import GrantList as GrantList
from multikernel.protocol._resource import GrantOp as GrantOp
from multikernel.protocol._resource import GrantRequest as GrantRequest
from multikernel.protocol._resource import GrantsQuery as GrantsQuery
from multikernel.protocol._resource import History as History
from multikernel.protocol._resource import HistoryQuery as HistoryQuery
from multikernel.protocol._resource import InstanceRef as InstanceRef
from multikernel.protocol._resource import (
    InvalidResourceRequestError as InvalidResourceRequestError,
)
from multikernel.protocol._resource import LoadReport as LoadReport
from multikernel.protocol._resource import NodeInfo as NodeInfo
from multikernel.protocol._resource import PoolInfo as PoolInfo
from multikernel.protocol._resource import PoolQuery as PoolQuery
from multikernel.protocol._resource import QueueInfo as QueueInfo
from multikernel.protocol._resource import Reconcile as Reconcile
from multikernel.protocol._resource import Release as Release
from multikernel.protocol._resource import ResourceError as ResourceError
from multikernel.protocol._resource import ResourceTransaction as ResourceTransaction
from multikernel.protocol._resource import ResourceTransactionAck as ResourceTransactionAck
from multikernel.protocol._resource import ResourceUnavailableError as ResourceUnavailableError
from multikernel.protocol._resource import TxRecord as TxRecord
from multikernel.protocol._resource import UnknownGrantError as UnknownGrantError
from multikernel.protocol._streams import StreamClose as StreamClose
from multikernel.protocol._streams import StreamInfo as StreamInfo
from multikernel.protocol._streams import StreamOpen as StreamOpen
from multikernel.protocol._streams import StreamReaderGone as StreamReaderGone
from multikernel.protocol._streams import StreamReady as StreamReady
from multikernel.protocol._streams import StreamRoute as StreamRoute
from multikernel.protocol._streams import StreamSids as StreamSids
from multikernel.protocol._streams import StreamStart as StreamStart
from multikernel.protocol._subjects import MAX_SUBJECT_BYTES as MAX_SUBJECT_BYTES
from multikernel.protocol._subjects import MAX_SUBJECT_TOKENS as MAX_SUBJECT_TOKENS
from multikernel.protocol._subjects import subject_matches as subject_matches
from multikernel.protocol._subjects import validate_pattern as validate_pattern
from multikernel.protocol._subjects import validate_subject as validate_subject
from multikernel.protocol._units import MAX_CPU_ID as MAX_CPU_ID
from multikernel.protocol._units import format_cpu_list as format_cpu_list
from multikernel.protocol._units import format_cpus as format_cpus
from multikernel.protocol._units import format_size as format_size
from multikernel.protocol._units import parse_cpu_list as parse_cpu_list
from multikernel.protocol._units import parse_cpus as parse_cpus
from multikernel.protocol._units import parse_size as parse_size
from multikernel.protocol._upgrade import OUTCOMES as OUTCOMES
from multikernel.protocol._upgrade import UPGRADE_METHODS as UPGRADE_METHODS
from multikernel.protocol._upgrade import UPGRADE_STEPS as UPGRADE_STEPS
from multikernel.protocol._upgrade import WORKLOAD_METHODS as WORKLOAD_METHODS
from multikernel.protocol._upgrade import ControlInfo as ControlInfo
from multikernel.protocol._upgrade import Deadlines as Deadlines
from multikernel.protocol._upgrade import Freeze as Freeze
from multikernel.protocol._upgrade import Health as Health
from multikernel.protocol._upgrade import InstanceUpgrade as InstanceUpgrade
from multikernel.protocol._upgrade import ListRollouts as ListRollouts
from multikernel.protocol._upgrade import Restored as Restored
from multikernel.protocol._upgrade import Revision as Revision
from multikernel.protocol._upgrade import RevisionHistory as RevisionHistory
from multikernel.protocol._upgrade import RevisionsQuery as RevisionsQuery
from multikernel.protocol._upgrade import RolloutList as RolloutList
from multikernel.protocol._upgrade import RolloutRef as RolloutRef
from multikernel.protocol._upgrade import RolloutStatus as RolloutStatus
from multikernel.protocol._upgrade import StartRollout as StartRollout
from multikernel.protocol._upgrade import StateChunk as StateChunk
from multikernel.protocol._upgrade import UndoRollout as UndoRollout
from multikernel.protocol._upgrade import UpgradeEvent as UpgradeEvent
from multikernel.protocol._upgrade import control_name as control_name
from multikernel.protocol._upgrade import rollout_subject as rollout_subject
from multikernel.protocol._upgrade import upgrade_subject as upgrade_subject
