"""Running one grant transaction on both sides: the host's end, then the instance's agent.

`Applier.apply` takes an instance from `before` to `after`:

1. the host's end first lets the instance reach every CPU it may have during the change
   (`HostSide.apply` with the CPUs of both; memory untouched), so the instance can move onto a
   new CPU before it lets go of an old one;
2. the instance's agent gets the `ResourceTransaction` (the `MK_RES_*` ops) and answers one
   `ResourceAck` per op, within `ack_timeout` seconds. No agent (`NoRespondersError`: the
   instance is not running) means the host's end is the only end: the grant is applied at the
   next launch;
3. the host's end then holds the instance to `after`: CPUs, and the memory limit if it changed
   (lowered only after the instance has agreed, raised only once it has acknowledged).

A refusal, a timeout, a dead agent or a host error raises `TransactionFailed` with what
happened. `roll_back` then undoes both sides (the instance gets the inverse ops, named as the
rollback of that transaction), best effort, and says what could not be undone.
"""

from __future__ import annotations

import anyio

from multikernel.endpoints import Bus
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    MultikernelError,
    NoRespondersError,
    ResourceAck,
    ResourceOp,
    ResourceTransaction,
    ResourceTransactionAck,
    TxRecord,
)
from multikernel.services._enforce import HostSide, HostSideError
from multikernel.services._placement import Holding
from multikernel.services._pool import Pool
from multikernel.services._resource_ops import undo

log = get_logger("multikernel.resource")


class TransactionFailed(Exception):
    """A transaction could not be applied; `reason` says why, `acks` what the instance said."""

    def __init__(self, reason: str, acks: tuple[ResourceAck, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.acks = acks


class Applier:
    """Applies and rolls back transactions on the host's end and the instance's."""

    def __init__(self, bus: Bus, pool: Pool, host: HostSide, *, ack_timeout: float) -> None:
        self.bus = bus
        self.pool = pool
        self.host = host
        self.ack_timeout = ack_timeout

    def _memory(self, holding: Holding) -> int:
        return len(holding.blocks) * self.pool.block_size

    async def apply(
        self, record: TxRecord, before: Holding, after: Holding
    ) -> tuple[str, tuple[ResourceAck, ...]]:
        """Apply `record` (see the module docstring); returns who applied it and the acks."""
        name = record.instance
        await self._host(name, before.cpus | after.cpus, None)
        request = ResourceTransaction(
            tx=record.tx,
            instance=record.instance_id,
            ops=record.ops,
            cpus=tuple(sorted(after.cpus)),
            memory=self._memory(after),
            queues=tuple(sorted(after.queues)),
        )
        applied_by, acks = "instance", tuple[ResourceAck, ...]()
        try:
            answer = await self._ask(request)
        except NoRespondersError:
            applied_by = "host"  # not running: its next launch gets the grant
        else:
            acks = answer.acks
            refused = [a for a in acks if a.result != 0]
            if answer.error or refused or len(acks) != len(record.ops):
                raise TransactionFailed(
                    f"the instance refused it: {answer.error or _describe(refused)}", acks
                )
        memory = None if after.blocks == before.blocks else self._memory(after)
        try:
            await self._host(
                name, after.cpus, memory, running=applied_by == "instance",
                devices=self._devices(after),
            )  # fmt: skip
        except TransactionFailed as failed:
            raise TransactionFailed(failed.reason, acks) from None
        return applied_by, acks

    async def roll_back(self, record: TxRecord, before: Holding, after: Holding) -> str:
        """Undo `record` on both sides, best effort; what could not be undone ("" if nothing)."""
        name, problems = record.instance, []
        try:
            await self._host(name, before.cpus | after.cpus, None)
        except TransactionFailed as failed:
            problems.append(failed.reason)
        request = ResourceTransaction(
            tx=record.tx,
            instance=record.instance_id,
            ops=undo(self.pool, record.ops),
            cpus=tuple(sorted(before.cpus)),
            memory=self._memory(before),
            queues=tuple(sorted(before.queues)),
            rollback_of=record.tx,
        )
        try:
            await self._ask(request)
        except NoRespondersError:
            pass  # no agent: nothing was applied inside the instance, or it is gone
        except TransactionFailed as failed:
            problems.append(f"the instance did not confirm the rollback ({failed.reason})")
        memory = None if after.blocks == before.blocks else self._memory(before)
        try:
            await self._host(name, before.cpus, memory, devices=self._devices(before))
        except TransactionFailed as failed:
            problems.append(failed.reason)
        if problems:
            log.warning("rollback incomplete", tx=record.tx, instance=name, problems=problems)
        return "; ".join(problems)

    async def _ask(self, request: ResourceTransaction) -> ResourceTransactionAck:
        target = f"instance.{request.instance}.agent"
        try:
            with anyio.fail_after(self.ack_timeout):
                answer: ResourceTransactionAck = await self.bus.request(
                    target, "resource", request, response=ResourceTransactionAck
                )
                return answer
        except NoRespondersError:
            raise
        except TimeoutError:
            raise TransactionFailed(
                f"the instance did not acknowledge it within {self.ack_timeout:g} s"
            ) from None
        except (MultikernelError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            raise TransactionFailed(f"the instance's agent failed: {e}") from None

    def _devices(self, holding: Holding) -> frozenset[str]:
        """The PCI addresses of the whole devices among `holding`'s queues (kind `device`)."""
        queues = [self.pool.queues.get(q) for q in holding.queues]
        return frozenset(q.device for q in queues if q is not None and q.kind == "device")

    async def _host(
        self,
        name: str,
        cpus: frozenset[int],
        memory: int | None,
        *,
        running: bool = False,
        devices: frozenset[str] | None = None,
    ) -> None:
        try:
            await self.host.apply(name, cpus, memory, running=running, devices=devices)
        except HostSideError as error:
            raise TransactionFailed(f"the host could not apply it: {error}") from None


def _describe(refused: list[ResourceAck]) -> str:
    known = {op.value for op in ResourceOp}
    ops = sorted({ResourceOp(a.operation).name for a in refused if a.operation in known})
    return f"{', '.join(ops) or 'an op'} answered {refused[0].result}" if refused else "no answer"
