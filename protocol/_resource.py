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

``RESOURCE_METHODS`` is the service's method table (request and response type of each), checked
against the actor and against docs/protocol.md by the tests. Sizes are bytes; CPUs are host CPU
ids; queues are named ``net/<interface>/rx-<n>``, ``net/<interface>/tx-<n>``,
``block/<disk>/mq-<n>`` and ``gpu/<card>``.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from multikernel.protocol._codes import ErrorCode
from multikernel.protocol._errors import NotFoundError, RefusedError
from multikernel.protocol._fields import U32, U64, ShortStr
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
    """The answer to ``pool``: the machine, what the host keeps, who holds what, what is free."""

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


GrantOp: TypeAlias = CpuAdd | CpuRemove | MemAdd | MemRemove | DeviceAdd | DeviceRemove


class TxRecord(_ResourceMessage, frozen=True):
    """One transaction, in the history and on ``mk.resource.<instance id>.tx``.

    ``kind``: allocate, update, release, reconcile or recover; ``state``: pending, committed or
    rolled-back (``reason`` says why); ``ops`` are the kernel messages sent, ``acks`` the answers;
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
}

#: The method every instance agent serves for the resource actor.
AGENT_RESOURCE_METHOD: Final = ("resource", ResourceTransaction, ResourceTransactionAck)
