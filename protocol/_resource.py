"""The resource actor's contract: the host's pool, grants as transactions, and their history.

The service is ``resource``. It owns the host's pool (CPUs with their NUMA node, core and sibling
threads; memory in blocks of the machine's memory-block size; I/O queues of NICs, block devices
and GPUs) and gives instances **grants** of it. A grant changes only through a **transaction**
(``tx``) that mirrors the multikernel kernel's resource messages: the actor sends the instance's
agent a ``ResourceTransaction`` whose ``ops`` are the kernel ABI's own ``CpuAdd``, ``CpuRemove``,
``MemAdd``, ``MemRemove``, ``DeviceAdd`` and ``DeviceRemove``, and the agent answers one
``ResourceAck`` per op (``MK_RES_ACK``: 0 or a negative errno). The grant counts once every op is
acknowledged; a refused or unanswered transaction is rolled back on both sides. Every transaction
keeps an id and a ``TxRecord`` in the history, and is published on ``mk.resource.<id>.tx``.

**Elastic grants.** An instance may ask for more or fewer CPUs or memory itself
(``ElasticRequest``, through its agent's ``elastic`` method, which forwards it to
``resource.elastic`` as the instance: the actor changes only the grant of the instance the hub
says is calling). Agents publish a ``LoadReport`` on ``mk.instance.<id>.load`` every few seconds;
the host's optional rebalancer turns sustained pressure or idleness into grant changes, through
the same transactions.

``RESOURCE_METHODS`` is the service's method table (request and response type of each), checked
against the actor and against docs/protocol.md by the tests. Sizes are bytes; CPUs are host CPU
ids; queues are named ``net/<interface>/rx-<n>``, ``net/<interface>/tx-<n>``,
``block/<disk>/mq-<n>`` and ``gpu/<card>``.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

from multikernel.protocol._codes import ErrorCode
from multikernel.protocol._errors import NotFoundError, RefusedError
from multikernel.protocol._fields import I32, I64, U32, U64, ShortStr
from multikernel.protocol._kernel_abi import (
    CpuAdd,
    CpuRemove,
    DeviceAdd,
    DeviceRemove,
    MemAdd,
    MemRemove,
    ResourceAck,
)

# -- errors -----------------------------------------------------------------------------------


class ResourceError(RefusedError):
    """Root of the resource service's errors; nothing changed when one is raised.

    They travel as refusals (``ErrorCode.REFUSED``; mkctl exits 4), except `UnknownGrantError`,
    which travels as ``NOT_FOUND``; the receiver sees the class of the code, with this module's
    type name in ``remote_type``.
    """


class InvalidResourceRequestError(ResourceError, ValueError):
    """The request itself is wrong (``--cpus 0``, no memory, an unknown CPU or queue, a size that
    is not a size); the message says what is accepted."""


class ResourceUnavailableError(ResourceError):
    """The pool cannot give what was asked without double allocation or over-commit.

    The message names who holds what was asked and what is free; ``details`` has ``free_cpus``,
    ``free_memory`` and, for a conflict, ``holder``.
    """


class GrantFailedError(ResourceError):
    """The instance refused a transaction, or did not acknowledge it in time; it was rolled back
    on both sides, and the instance keeps what it had (``details``: ``tx``)."""


class UnknownGrantError(ResourceError, NotFoundError):
    """The instance named has no grant (``allocate`` first), or is unknown to the pool."""

    code = ErrorCode.NOT_FOUND


# -- what is asked ----------------------------------------------------------------------------


class _ResourceMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Frozen, defaults left off the wire, unknown fields skipped (evolution rules)."""


class CpuSpec(_ResourceMessage, frozen=True):
    """CPUs asked for: a ``count`` the policy places, or explicit ``ids``; exactly one of them.

    ``parse_cpus`` and ``format_cpus`` are its text form (``2``, ``@0-3,6``).
    """

    count: U32 = 0
    ids: tuple[U32, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.count) == bool(self.ids):
            raise InvalidResourceRequestError(
                "a CPU spec is a count or a list of CPU ids, exactly one of them"
            )
        if list(self.ids) != sorted(set(self.ids)):
            raise InvalidResourceRequestError("the CPU ids of a spec are sorted and distinct")


class GrantRequest(_ResourceMessage, frozen=True):
    """What an instance should hold (``allocate``: a new grant; ``update``: a change).

    Left out: ``cpus`` None and ``memory`` 0 keep what the instance holds, ``queues`` None keeps
    its queues and ``()`` gives them all back. A new grant needs CPUs and memory. ``memory`` is
    rounded up to whole memory blocks of the pool.
    """

    instance: ShortStr
    instance_id: U32
    cpus: CpuSpec | None = None
    memory: U64 = 0
    queues: tuple[ShortStr, ...] | None = None


class Release(_ResourceMessage, frozen=True):
    """Give back everything an instance holds (it must not be running)."""

    instance: ShortStr


class InstanceRef(_ResourceMessage, frozen=True):
    """An instance as the lifecycle actor knows it."""

    name: ShortStr
    id: U32


class Reconcile(_ResourceMessage, frozen=True):
    """The lifecycle actor's instances: grants of any other instance are released."""

    instances: tuple[InstanceRef, ...] = ()


class PoolQuery(_ResourceMessage, frozen=True):
    """Describe the pool: every CPU, memory, queue, who holds what and what is free."""


class GrantsQuery(_ResourceMessage, frozen=True):
    """The grants of one instance (``instance``) or of all of them."""

    instance: ShortStr = ""


class HistoryQuery(_ResourceMessage, frozen=True):
    """Transactions, newest first: of one ``instance`` or all, at most ``limit``, older than
    ``before`` (a tx id; 0: from the newest)."""

    instance: ShortStr = ""
    limit: U32 = 50
    before: U64 = 0


# -- what the actor answers -------------------------------------------------------------------


class Grant(_ResourceMessage, frozen=True):
    """What an instance holds, as of transaction ``tx``.

    ``applied_by`` is ``instance`` when the instance's agent acknowledged it live, ``host`` when
    the instance was not running (the platform applies it at launch), ``""`` for no change.
    """

    instance: str
    instance_id: U32
    cpus: tuple[U32, ...] = ()
    memory: U64 = 0
    memory_blocks: tuple[U32, ...] = ()
    queues: tuple[str, ...] = ()
    numa_nodes: tuple[U32, ...] = ()
    tx: U64 = 0
    applied_by: str = ""


class GrantList(_ResourceMessage, frozen=True):
    """The answer to ``grants``, ``reconcile`` (the grants it released)."""

    grants: tuple[Grant, ...] = ()


class CpuInfo(_ResourceMessage, frozen=True):
    """One CPU of the machine: topology, and who holds it (``reserved``: kept for the host)."""

    id: U32
    node: U32 = 0
    package: U32 = 0
    core: U32 = 0
    siblings: tuple[U32, ...] = ()
    holders: tuple[str, ...] = ()
    reserved: bool = False


class NodeInfo(_ResourceMessage, frozen=True):
    """One NUMA node: its CPUs and memory blocks (the pool's part of them)."""

    id: U32
    cpus: tuple[U32, ...] = ()
    memory_blocks: U32 = 0
    free_blocks: U32 = 0


class QueueInfo(_ResourceMessage, frozen=True):
    """One I/O queue: ``kind`` is net-rx, net-tx, block or gpu; ``device`` the PCI address of
    the device it belongs to ("" when it has none)."""

    name: str
    kind: str
    device: str = ""
    node: U32 = 0
    holder: str = ""


class PoolInfo(_ResourceMessage, frozen=True):
    """The answer to ``pool``: the machine, what the host keeps, who holds what, what is free;
    the placement policy, the rebalancer (``""``: none) and how far an instance may grow by
    asking (``elastic_max_*``; 0: to what its operator granted)."""

    cpus: tuple[CpuInfo, ...] = ()
    nodes: tuple[NodeInfo, ...] = ()
    memory_block: U64 = 0
    memory_total: U64 = 0
    memory_free: U64 = 0
    memory_reserved: U64 = 0
    queues: tuple[QueueInfo, ...] = ()
    free_cpus: tuple[U32, ...] = ()
    policy: str = ""
    cpu_share: U32 = 1
    pending: U32 = 0
    rebalancer: str = ""
    elastic_max_cpus: U32 = 0
    elastic_max_memory: U64 = 0


GrantOp: TypeAlias = CpuAdd | CpuRemove | MemAdd | MemRemove | DeviceAdd | DeviceRemove


class TxRecord(_ResourceMessage, frozen=True):
    """One transaction, in the history and on ``mk.resource.<instance id>.tx``.

    ``kind``: allocate, update, release, reconcile, recover, elastic (the instance asked) or
    rebalance (the host's rebalancer); ``state``: pending, committed or rolled-back (``reason``
    says why; for elastic and rebalance, also why it was asked); ``ops`` are the kernel messages
    sent, ``acks`` the answers;
    ``before`` and ``after`` the grant on either side. Times are Unix seconds.
    """

    tx: U64
    instance: str
    instance_id: U32
    kind: str
    state: str
    ops: tuple[GrantOp, ...] = ()
    acks: tuple[ResourceAck, ...] = ()
    before: Grant | None = None
    after: Grant | None = None
    reason: str = ""
    started: float = 0.0
    finished: float = 0.0


class History(_ResourceMessage, frozen=True):
    """The answer to ``history``; ask again with ``before=next_before`` for older ones (0: none)."""

    transactions: tuple[TxRecord, ...] = ()
    next_before: U64 = 0


# -- elastic grants and load -----------------------------------------------------------------

#: A non-negative measurement (msgspec refuses NaN and negatives on decode).
_Measure: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0)]
#: A share of a period, 0 to 1.
_Share: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class ElasticRequest(_ResourceMessage, frozen=True):
    """An instance asks for more or fewer CPUs or memory for itself (``elastic``).

    Each of CPUs and memory is kept (all left out), set to a total (``cpus``: a count;
    ``memory``: bytes) or changed by an amount (``cpu_change``: +n or -n CPUs;
    ``memory_change``: bytes more or fewer); not both forms for one of them. Memory is rounded up
    to whole memory blocks of the pool. No instance is named: the resource actor changes the
    grant of the instance that calls (the hub binds the caller's instance). ``reason`` is kept in
    the transaction's history. Growing is bounded by the host (docs/resources.md, "Elastic
    grants and the rebalancer").
    """

    cpus: U32 = 0
    cpu_change: I32 = 0
    memory: U64 = 0
    memory_change: I64 = 0
    reason: ShortStr = ""

    def __post_init__(self) -> None:
        if self.cpus and self.cpu_change:
            raise InvalidResourceRequestError(
                "ask for a CPU count (cpus) or a change (cpu_change), not both"
            )
        if self.memory and self.memory_change:
            raise InvalidResourceRequestError(
                "ask for a memory size (memory) or a change (memory_change), not both"
            )
        if not (self.cpus or self.cpu_change or self.memory or self.memory_change):
            raise InvalidResourceRequestError(
                "an elastic request asks for CPUs or memory: cpus, cpu_change, memory or "
                "memory_change"
            )


class LoadReport(_ResourceMessage, frozen=True):
    """An instance's load over the last ``period`` seconds, from its agent, on
    ``mk.instance.<id>.load``.

    ``tx`` is the transaction of the grant it was measured under, ``cpus`` and ``memory`` what
    that grant holds. ``cpu_busy``: CPUs' worth of time the instance's threads ran (0 to
    ``cpus``); ``cpu_waiting``: threads' worth of time they were runnable but waited for a CPU
    (both from the scheduler's per-thread ``schedstat``). ``cpu_pressure`` and
    ``memory_pressure``: PSI "some", the share of the period in which at least one task was
    stalled, where the instance has pressure files of its own (None where it has not).
    ``memory_used``: its memory cgroup's usage, or its processes' resident memory. ``sources``
    names where each number came from (``schedstat``, ``memcg``, ``rss``, ``psi``).
    """

    instance: U32
    seq: U64 = 0
    period: _Measure = 0.0
    tx: U64 = 0
    cpus: U32 = 0
    cpu_busy: _Measure = 0.0
    cpu_waiting: _Measure = 0.0
    cpu_pressure: _Share | None = None
    memory: U64 = 0
    memory_used: U64 = 0
    memory_pressure: _Share | None = None
    sources: tuple[ShortStr, ...] = ()


# -- the agent's side -------------------------------------------------------------------------


class ResourceTransaction(_ResourceMessage, frozen=True):
    """What the resource actor asks of an instance's agent (its ``resource`` method).

    ``ops`` are the kernel ABI's messages, in the kernel's order (memory, CPUs, devices; removals
    before additions); ``cpus``, ``memory`` and ``queues`` are what the instance holds once they
    are applied. A rollback (``rollback_of``, the tx it undoes) carries the ops that undo it and
    what the instance held before; an agent that never applied that tx refuses it later.
    """

    tx: U64
    instance: U32
    ops: tuple[GrantOp, ...] = ()
    cpus: tuple[U32, ...] = ()
    memory: U64 = 0
    queues: tuple[str, ...] = ()
    rollback_of: U64 = 0


class ResourceTransactionAck(_ResourceMessage, frozen=True):
    """The agent's answer: one ``ResourceAck`` per op, in order; ``error`` says why one failed."""

    tx: U64
    acks: tuple[ResourceAck, ...] = ()
    error: str = ""


#: The ``resource`` service: method → (request type, response type).
RESOURCE_METHODS: Final[dict[str, tuple[type, type]]] = {
    "pool": (PoolQuery, PoolInfo),
    "grants": (GrantsQuery, GrantList),
    "allocate": (GrantRequest, Grant),
    "update": (GrantRequest, Grant),
    "release": (Release, Grant),
    "reconcile": (Reconcile, GrantList),
    "history": (HistoryQuery, History),
    "elastic": (ElasticRequest, Grant),
}

#: The method every instance agent serves for the resource actor.
AGENT_RESOURCE_METHOD: Final = ("resource", ResourceTransaction, ResourceTransactionAck)

#: The method every instance agent serves for the applications in its instance: it forwards the
#: request to ``resource.elastic`` as the instance.
AGENT_ELASTIC_METHOD: Final = ("elastic", ElasticRequest, Grant)

#: Where an instance's agent publishes its ``LoadReport`` (``{id}``: the instance id).
LOAD_SUBJECT: Final = "mk.instance.{id}.load"
