"""The resource actor: the host's pool, and every grant of it, as the bus service `resource`.

It owns the `Pool` (`_pool`), a `Ledger` of who holds what (`_ledger`), made durable by a
`ResourceStore` (`_resource_store`, SQLite in the host's state dir), and a placement policy
(`_placement`, `_policies`). A request to change what an instance holds (`allocate`, `update`)
is decided and reserved in one step, under one lock, so two requests never both get a CPU; then
it runs as a transaction (`_resource_tx`): written as pending, applied at the host's end and
acknowledged op by op by the instance's agent, then committed, or rolled back on both sides if
anything fails or times out. Transactions of one instance run one after the other; those of
different instances in parallel. Every step is published on `mk.resource.<id>.tx` and kept in
the history.

At start the actor loads the store and rolls back the transactions left pending by its previous
run before it serves anything, so a restart neither loses a grant nor grants anything twice.
`reconcile` releases the grants of instances the lifecycle actor does not know (after a host
restart, its instances are gone).

Every method is the host's (callers on instance 0) except `elastic`, which an instance's agent
calls for its own instance (`_elastic`: the instance is the caller's, as the hub bound it, within
the host's `ElasticBounds`). With a `RebalancePolicy`, the actor also follows the agents' load
reports and resizes grants by the policy's decisions (`_rebalancing`), through the same
transactions (kind `rebalance`).
"""

from __future__ import annotations

import time
from typing import Final

import anyio
import anyio.abc
from msgspec.structs import replace

from multikernel.endpoints import Bus, current_caller
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    RESOURCE_METHODS,
    AccessDeniedError,
    CpuSpec,
    ElasticRequest,
    Grant,
    GrantFailedError,
    GrantList,
    GrantRequest,
    GrantsQuery,
    History,
    HistoryQuery,
    InvalidResourceRequestError,
    MultikernelError,
    PoolInfo,
    PoolQuery,
    Reconcile,
    Release,
    ResourceAck,
    TxRecord,
    UnknownGrantError,
    format_size,
)
from multikernel.services._elastic import ElasticBounds, resolve
from multikernel.services._enforce import HostSide, NoHostSide
from multikernel.services._ledger import Account, Ledger
from multikernel.services._placement import Holding, PlacementPolicy, PlacementRequest, place
from multikernel.services._platform import NAME_PATTERN
from multikernel.services._policies import PackPolicy
from multikernel.services._pool import Pool
from multikernel.services._rebalance import RebalancePolicy, Resize
from multikernel.services._rebalancing import Rebalancing
from multikernel.services._resource_ops import grant_of, holding_of, ops_for, pool_info
from multikernel.services._resource_store import ResourceStore
from multikernel.services._resource_tx import Applier, TransactionFailed

log = get_logger("multikernel.resource")

#: The least memory a grant may have: an instance's agent does not start in less.
MIN_MEMORY: Final = 16 << 20


class ResourceActor:
    """Serves `resource` on the bus (see the module docstring)."""

    def __init__(
        self,
        endpoint: Bus,
        pool: Pool,
        store: ResourceStore,
        *,
        policy: PlacementPolicy | None = None,
        host: HostSide | None = None,
        cpu_share: int = 1,
        ack_timeout: float = 5.0,
        elastic: ElasticBounds | None = None,
        rebalancer: RebalancePolicy | None = None,
    ) -> None:
        self.ep = endpoint
        self.pool = pool
        self.store = store
        self.policy = policy or PackPolicy()
        self.elastic = elastic or ElasticBounds()
        self.rebalancing = Rebalancing(endpoint, self, rebalancer) if rebalancer else None
        self.ledger = Ledger(pool, cpu_share=cpu_share)
        self.applier = Applier(endpoint, pool, host or NoHostSide(), ack_timeout=ack_timeout)
        self._decide = anyio.Lock()
        self._locks: dict[str, anyio.Lock] = {}
        self._next_tx = 1

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Recover, serve until cancelled."""
        await self.recover()
        svc = self.ep.service("resource", concurrency=64)
        for method in RESOURCE_METHODS:
            svc.method(getattr(self, f"serve_{method}"), name=method)
        await svc.start()
        async with anyio.create_task_group() as tg:
            if self.rebalancing is not None:
                await tg.start(self.rebalancing.run)
            log.info(
                "resource actor up", pool=self.pool.describe(), policy=self.policy.name,
                rebalancer=self.rebalancing.policy.name if self.rebalancing else None,
            )  # fmt: skip
            task_status.started()
            await anyio.sleep_forever()

    async def recover(self) -> None:
        """Load the store; roll back what the previous run left pending, on both sides."""
        accounts, pending, self._next_tx = await self.store.load()
        for stored in accounts:
            self.ledger.load(
                stored.name, stored.id, stored.held, stored.tx, stored.applied_by, stored.base
            )
        for record in pending:
            before = holding_of(record.before) if record.before else Holding()
            after = holding_of(record.after) if record.after else Holding()
            problems = await self.applier.roll_back(record, before, after)
            reason = "the resource actor stopped during it" + (f"; {problems}" if problems else "")
            await self._finish(replace(record, state="rolled-back", reason=reason))
        if accounts or pending:
            log.info("resource state recovered", grants=len(accounts), rolled_back=len(pending))

    # -- requests -----------------------------------------------------------------------------

    async def serve_pool(self, request: PoolQuery) -> PoolInfo:
        _from_host()
        return replace(
            pool_info(self.ledger, self.policy.name),
            rebalancer=self.rebalancing.policy.name if self.rebalancing else "",
            elastic_max_cpus=self.elastic.max_cpus,
            elastic_max_memory=self.elastic.max_memory,
        )

    async def serve_grants(self, request: GrantsQuery) -> GrantList:
        _from_host()
        accounts = [a for a in self.ledger.accounts.values() if a.tx]
        if request.instance:
            accounts = [a for a in accounts if a.name == request.instance]
            if not accounts:
                raise UnknownGrantError(
                    f"{request.instance!r} holds nothing (instances with grants: "
                    f"{', '.join(sorted(a.name for a in self.ledger.accounts.values())) or 'none'})"
                )
        return GrantList(
            tuple(grant_of(self.pool, a.name, a.id, a.held, a.tx, a.applied_by) for a in accounts)
        )

    async def serve_allocate(self, request: GrantRequest) -> Grant:
        _from_host()
        return await self._change(request, "allocate")

    async def serve_update(self, request: GrantRequest) -> Grant:
        _from_host()
        return await self._change(request, "update")

    async def serve_elastic(self, request: ElasticRequest) -> Grant:
        """An instance asks to grow or shrink: its own grant, within the host's bounds."""
        caller = current_caller().instance
        if caller == 0:
            raise InvalidResourceRequestError(
                "elastic is for an instance asking for itself (through its agent); the host "
                "changes a grant with update (mkctl update)"
            )
        account = self.ledger.by_id(caller)
        if account is None:
            raise UnknownGrantError(
                f"instance {caller} holds no grant to grow or shrink: its operator allocates one"
            )
        async with self._lock(account.name):
            current = self.ledger.account(account.name)
            if current is None or current.id != caller:
                raise UnknownGrantError(f"instance {caller}'s grant was released meanwhile")
            asked = resolve(request, current, self.ledger.state(), self.elastic)
            if asked is None:
                return _grant(self.pool, current)
            why = "the instance asked" + (f": {request.reason}" if request.reason else "")
            return await self._change_locked(asked, "elastic", why)

    async def serve_release(self, request: Release) -> Grant:
        _from_host()
        return await self._release(request.instance, "release", "")

    async def serve_reconcile(self, request: Reconcile) -> GrantList:
        _from_host()
        known = {(ref.name, ref.id) for ref in request.instances}
        released = []
        for account in list(self.ledger.accounts.values()):
            if (account.name, account.id) not in known:
                reason = "the lifecycle actor does not know this instance"
                released.append(await self._release(account.name, "reconcile", reason))
        return GrantList(tuple(released))

    async def serve_history(self, request: HistoryQuery) -> History:
        _from_host()
        limit = max(1, min(request.limit, 1000))
        records = await self.store.history(request.instance, limit, request.before)
        more = len(records) == limit and records[-1].tx > 1
        return History(tuple(records), records[-1].tx if more else 0)

    # -- transactions -------------------------------------------------------------------------

    def _lock(self, name: str) -> anyio.Lock:
        return self._locks.setdefault(name, anyio.Lock())

    def _take_tx(self) -> int:
        tx, self._next_tx = self._next_tx, self._next_tx + 1
        return tx

    def _checked(self, request: GrantRequest, kind: str) -> PlacementRequest:
        name = request.instance
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidResourceRequestError(
                f"bad instance name {name!r}: 1 to 31 lower-case letters, digits and '-'"
            )
        account = self.ledger.account(name)
        if kind == "allocate" and account is not None:
            raise InvalidResourceRequestError(
                f"{name!r} already holds a grant (tx {account.tx or account.pending_tx}): "
                "update it instead"
            )
        if kind == "update" and account is None:
            raise UnknownGrantError(f"{name!r} holds nothing to update: allocate a grant first")
        if account is not None and account.id != request.instance_id:
            raise InvalidResourceRequestError(
                f"{name!r} is instance {account.id} in the pool, not {request.instance_id}: "
                "release its grant first"
            )
        blocks = None
        if request.memory:
            if request.memory < MIN_MEMORY:
                raise InvalidResourceRequestError(
                    f"{format_size(request.memory)} of memory is below the "
                    f"{format_size(MIN_MEMORY)} an instance needs"
                )
            blocks = self.pool.blocks_for(request.memory)
        if kind == "allocate" and (request.cpus is None or blocks is None):
            raise InvalidResourceRequestError(
                f"a new grant for {name!r} needs CPUs and memory (--cpus N --memory SIZE)"
            )
        if request.cpus is None and blocks is None and request.queues is None:
            raise InvalidResourceRequestError(
                f"an update of {name!r} needs CPUs, memory or queues to change"
            )
        queues = frozenset(request.queues) if request.queues is not None else None
        return PlacementRequest(name, request.cpus, blocks, queues, self.ledger.holding(name))

    async def _change(self, request: GrantRequest, kind: str) -> Grant:
        async with self._lock(request.instance):
            return await self._change_locked(request, kind)

    async def _change_locked(self, request: GrantRequest, kind: str, reason: str = "") -> Grant:
        """One transaction, the instance's lock held; `reason` why it was asked (elastic,
        rebalance)."""
        name, id = request.instance, request.instance_id
        async with self._decide:
            asked = self._checked(request, kind)
            placed = place(self.policy, asked, self.ledger.state())
            before, after = asked.current, Holding(placed.cpus, placed.blocks, placed.queues)
            account = self.ledger.account(name)
            if after == before and account is not None:
                return grant_of(self.pool, name, id, before, account.tx, account.applied_by)
            tx = self._take_tx()
            record = TxRecord(
                tx, name, id, kind, "pending", ops=ops_for(self.pool, id, before, after),
                before=grant_of(self.pool, name, id, before, account.tx if account else 0),
                after=grant_of(self.pool, name, id, after, tx), reason=reason,
                started=time.time(),
            )  # fmt: skip
            base = _base(kind, request, account, after)
            self.ledger.reserve(tx, name, id, after)
            try:
                await self.store.begin(record)
            except BaseException:
                self.ledger.rollback(name)
                raise
        await self._publish(record)
        return await self._run(record, before, after, base)

    async def _run(
        self, record: TxRecord, before: Holding, after: Holding, base: tuple[int, int]
    ) -> Grant:
        name, acks = record.instance, tuple[ResourceAck, ...]()
        try:
            applied_by, acks = await self.applier.apply(record, before, after)
            assert record.after is not None
            done = replace(
                record, state="committed", acks=acks, finished=time.time(),
                after=replace(record.after, applied_by=applied_by),
            )  # fmt: skip
            await self.store.commit(done, record.instance_id, before, after, base)
        except BaseException as error:
            reason = error.reason if isinstance(error, TransactionFailed) else _why(error)
            acks = error.acks if isinstance(error, TransactionFailed) else acks
            with anyio.CancelScope(shield=True):
                problems = await self.applier.roll_back(record, before, after)
                full = reason + (f"; and {problems}" if problems else "")
                if record.reason:  # why it was asked, after why it failed
                    full += f" (asked because {record.reason})"
                await self._finish(replace(record, state="rolled-back", reason=full, acks=acks))
            if isinstance(error, TransactionFailed):
                raise GrantFailedError(
                    f"{name!r} did not get its new grant: {reason}; nothing changed "
                    f"(tx {record.tx} rolled back)",
                    details={"tx": record.tx},
                ) from None
            raise
        self.ledger.commit(name, applied_by, base)
        await self._publish(done)
        assert done.after is not None
        return done.after

    async def _finish(self, record: TxRecord) -> None:
        """Record a rolled-back transaction: the ledger keeps what the instance held before."""
        record = replace(record, finished=time.time())
        account = self.ledger.account(record.instance)
        if account is not None and account.pending_tx == record.tx:
            self.ledger.rollback(record.instance)
        try:
            await self.store.roll_back(record)
        except Exception as error:  # the ledger is right; the store says pending: recovered later
            log.exception("cannot record a rollback", tx=record.tx, error=str(error))
        await self._publish(record)

    async def _release(self, name: str, kind: str, reason: str) -> Grant:
        async with self._lock(name), self._decide:
            account = self.ledger.account(name)
            if account is None:
                raise UnknownGrantError(f"{name!r} holds nothing to release")
            held, id = account.held, account.id
            tx, now = self._take_tx(), time.time()
            released = grant_of(self.pool, name, id, held, tx, "host")
            record = TxRecord(
                tx, name, id, kind, "committed", ops=ops_for(self.pool, id, held, Holding()),
                before=grant_of(self.pool, name, id, held, account.tx),
                after=grant_of(self.pool, name, id, Holding(), tx), reason=reason,
                started=now, finished=now,
            )  # fmt: skip
            await self.store.release(record)
            self.ledger.release(name)
            if self._lock(name).statistics().tasks_waiting == 0:
                del self._locks[name]
        await self._publish(record)
        return released

    # -- the rebalancer's side ----------------------------------------------------------------

    def grant_tx(self, id: int) -> int:
        """The transaction instance `id`'s grant comes from (0: it holds none)."""
        account = self.ledger.by_id(id)
        return account.tx if account is not None else 0

    async def resize(self, change: Resize, tx: int) -> Grant | None:
        """Apply a rebalancer's decision, taken on the grant of transaction `tx` (None: that
        grant has changed meanwhile, and the decision is dropped)."""
        async with self._lock(change.instance):
            account = self.ledger.account(change.instance)
            if account is None or account.id != change.instance_id or account.tx != tx:
                return None
            request = GrantRequest(
                change.instance, change.instance_id,
                cpus=CpuSpec(count=change.cpus) if change.cpus is not None else None,
                memory=change.blocks * self.pool.block_size if change.blocks is not None else 0,
            )  # fmt: skip
            return await self._change_locked(request, "rebalance", change.reason)

    async def _publish(self, record: TxRecord) -> None:
        log.info(
            "resource transaction", tx=record.tx, instance=record.instance, kind=record.kind,
            state=record.state, reason=record.reason or None,
        )  # fmt: skip
        try:
            await self.ep.publish(f"mk.resource.{record.instance_id}.tx", record)
        except MultikernelError as error:  # the record is in the history either way
            log.warning("cannot publish a transaction", tx=record.tx, error=str(error))


def _from_host() -> None:
    """Refuse a caller that is not on the host: instances call `elastic`, nothing else."""
    caller = current_caller()
    if caller.instance != 0:
        raise AccessDeniedError(
            f"instance {caller.instance} may only call resource.elastic (for itself, through "
            "its agent); the pool and every other instance's grant are the host's"
        )


def _base(
    kind: str, request: GrantRequest, account: Account | None, after: Holding
) -> tuple[int, int]:
    """The base (CPUs, blocks) after a transaction: what the operator asks for sets it; what the
    instance asks for itself and the rebalancer keep it."""
    cpus, blocks = (account.base_cpus, account.base_blocks) if account else (0, 0)
    if kind in ("allocate", "update"):
        if request.cpus is not None or account is None:
            cpus = len(after.cpus)
        if request.memory or account is None:
            blocks = len(after.blocks)
    return cpus, blocks


def _grant(pool: Pool, account: Account) -> Grant:
    return grant_of(pool, account.name, account.id, account.held, account.tx, account.applied_by)


def _why(error: BaseException) -> str:
    if isinstance(error, anyio.get_cancelled_exc_class()):
        return "its caller gave up before it was acknowledged"
    return f"{type(error).__name__}: {error}"
