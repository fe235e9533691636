"""The instance's side of a resource transaction, in its agent (the `resource` method).

On a multikernel machine the instance's kernel gets `MK_RES_CPU_ADD` and brings the CPU online,
or `MK_RES_MEM_REMOVE` and offlines the memory, then answers `MK_RES_ACK`. The agent does what
that means for a process tree: CPUs become the affinity of every thread of the instance (the
host has already widened, or will then narrow, its cpuset); memory is checked before it is given
back (usage above the new size refuses the whole transaction with `-EBUSY`, so nothing is
OOM-killed); queues are recorded. What the instance holds is then visible inside it: in `status`,
and in the JSON file `$MULTIKERNEL_RESOURCES_FILE` (written atomically) if the host set one.

Every transaction is all or nothing: checks first, then changes, undone if one fails. The agent
remembers the transactions it applied and those rolled back before they arrived, so a rollback
undoes only what was applied and a late transaction that was rolled back is refused
(`-ECANCELED`). Transactions run one at a time, whole, whatever the caller's deadline: one that
runs out is rolled back by the resource actor, not cut in half here (applying one has no await
inside, so no cancellation can land in the middle).
"""

from __future__ import annotations

import errno
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    CpuAdd,
    CpuRemove,
    DeviceAdd,
    DeviceRemove,
    GrantOp,
    MemAdd,
    MemRemove,
    ResourceAck,
    ResourceTransaction,
    ResourceTransactionAck,
    format_cpu_list,
    format_size,
    op_of,
)
from multikernel.services._cgroups import process_tree

log = get_logger("multikernel.agent")
#: How many transactions the agent remembers (applied, and rolled back before they came).
REMEMBERED = 64


@dataclass
class InstanceResources:
    """What the instance holds, as its agent last applied it."""

    instance: int
    cpus: frozenset[int]
    memory: int = 0
    queues: tuple[str, ...] = ()
    tx: int = 0
    file: Path | None = None
    applied: OrderedDict[int, tuple[frozenset[int], int, tuple[str, ...], int]] = field(
        default_factory=OrderedDict
    )  # tx -> (cpus, memory, queues, tx) before it
    aborted: OrderedDict[int, None] = field(default_factory=OrderedDict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @classmethod
    def from_environment(cls, instance: int) -> InstanceResources:
        """The grant the instance was launched with (set by the lifecycle actor)."""
        env = os.environ
        file = env.get("MULTIKERNEL_RESOURCES_FILE")
        resources = cls(
            instance,
            frozenset(os.sched_getaffinity(0)),
            int(env.get("MULTIKERNEL_MEMORY", "0")),
            tuple(json.loads(env.get("MULTIKERNEL_QUEUES", "[]"))),
            int(env.get("MULTIKERNEL_RESOURCE_TX", "0")),
            Path(file) if file else None,
        )
        resources.publish()
        return resources

    async def handle(self, request: ResourceTransaction) -> ResourceTransactionAck:
        async with self.lock:
            return self._handle(request)  # no checkpoint inside: it cannot be cut in half

    def _handle(self, request: ResourceTransaction) -> ResourceTransactionAck:
        if request.rollback_of:
            return self._roll_back(request)
        if request.tx in self.aborted:
            return refused(request, -errno.ECANCELED, "it was rolled back before it came")
        if request.tx in self.applied:
            return _acked(request)  # asked again: already done
        shrink = request.memory and request.memory < self.memory
        if shrink and (used := self.memory_used()) > request.memory:
            return refused(
                request,
                -errno.EBUSY,
                f"the instance uses {format_size(used)} of memory, more than the "
                f"{format_size(request.memory)} asked: free memory inside it or ask for more",
                failing=(MemRemove,),
            )
        before = (self.cpus, self.memory, self.queues, self.tx)
        try:
            self._apply(frozenset(request.cpus), request.memory, request.queues)
        except OSError as error:
            self._apply(*before[:3])
            return refused(
                request,
                -(error.errno or errno.EIO),
                f"cannot run on CPUs {format_cpu_list(request.cpus)}: {error.strerror}",
                failing=(CpuAdd, CpuRemove),
            )
        self.applied[request.tx] = before
        _trim(self.applied)
        self.tx = request.tx
        self.publish()
        log.info(
            "resources applied", instance=self.instance, tx=request.tx,
            cpus=format_cpu_list(self.cpus), memory=format_size(self.memory),
            queues=list(self.queues),
        )  # fmt: skip
        return _acked(request)

    def _roll_back(self, request: ResourceTransaction) -> ResourceTransactionAck:
        undone = request.rollback_of
        before = self.applied.pop(undone, None)
        if before is None:
            self.aborted[undone] = None  # if it comes late, it is refused
            _trim(self.aborted)
        else:
            try:
                self._apply(*before[:3])
            except OSError as error:
                log.warning("rollback incomplete", tx=undone, error=str(error))
            self.tx = before[3]
            self.publish()
            log.info("resources rolled back", instance=self.instance, tx=undone)
        return _acked(request)

    def _apply(self, cpus: frozenset[int], memory: int, queues: tuple[str, ...]) -> None:
        if cpus and cpus != self.cpus:
            self.set_affinity(cpus)
        self.cpus = cpus or self.cpus
        self.memory = memory or self.memory
        self.queues = tuple(queues)

    def set_affinity(self, cpus: frozenset[int]) -> None:
        """Move the instance onto `cpus` (OSError if it may not run there)."""
        _set_affinity(cpus)

    def memory_used(self) -> int:
        """What the instance uses now."""
        return _memory_used()

    def publish(self) -> None:
        """Write what the instance holds where its processes can read it."""
        if self.file is None:
            return
        text = json.dumps(
            {"instance": self.instance, "tx": self.tx, "cpus": sorted(self.cpus),
             "memory": self.memory, "queues": list(self.queues)},
        )  # fmt: skip
        partial = self.file.with_name(self.file.name + ".partial")
        try:
            partial.write_text(text + "\n")
            partial.replace(self.file)
        except OSError as error:
            log.warning("cannot write the resources file", path=str(self.file), error=str(error))


def _set_affinity(cpus: frozenset[int]) -> None:
    """Every thread of every process of the instance onto `cpus` (the agent's first)."""
    os.sched_setaffinity(0, cpus)  # raises if the instance may not run there at all
    for pid in process_tree(os.getpid()):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except (ProcessLookupError, PermissionError):
                continue  # gone meanwhile, or a setuid program we may not touch


def _memory_used() -> int:
    """What the instance uses: its memory cgroup's usage, or the resident size of its tree."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            usage = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            try:
                return int(usage.read_text())
            except (OSError, ValueError):
                break
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in process_tree(os.getpid()):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _trim(remembered: OrderedDict[int, Any]) -> None:
    while len(remembered) > REMEMBERED:
        remembered.popitem(last=False)


def _resource_id(op: GrantOp) -> int:
    match op:
        case CpuAdd() | CpuRemove():
            return op.cpu_id
        case MemAdd() | MemRemove():
            return op.start_pfn
        case DeviceAdd() | DeviceRemove():
            return op.domain << 16 | op.bus << 8 | op.devfn


def _ack(request: ResourceTransaction, op: GrantOp, result: int) -> ResourceAck:
    return ResourceAck(request.instance, int(op_of(op)), result, _resource_id(op))


def _acked(request: ResourceTransaction) -> ResourceTransactionAck:
    return ResourceTransactionAck(request.tx, tuple(_ack(request, op, 0) for op in request.ops))


def refused(
    request: ResourceTransaction,
    result: int,
    error: str,
    failing: tuple[type, ...] = (),
) -> ResourceTransactionAck:
    """Every op refused: the failing kind with `result`, the others -ECANCELED (not applied)."""
    acks = tuple(
        _ack(request, op, result if not failing or isinstance(op, failing) else -errno.ECANCELED)
        for op in request.ops
    )
    if failing and not any(a.result == result for a in acks):  # no op of that kind: say why
        acks = tuple(_ack(request, op, result) for op in request.ops)
    return ResourceTransactionAck(request.tx, acks, error)
