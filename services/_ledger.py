"""The resource actor's ledger: who holds what, and what is being granted right now.

Each instance has a committed `Holding` (what acknowledged transactions gave it) and at most one
pending one (the transaction in flight). While a transaction is pending, the instance holds
both: what it is giving back stays its own until the instance has let go of it (acknowledged), and
what it is getting is reserved for it, so no other transaction can take either. `commit` keeps
the new holding, `rollback` the old one; either way the reservation ends. The holder maps are
updated by the difference only, so a transaction on a 1,000-CPU pool costs what it changes.

Each account also keeps its **base**, the CPU count and memory blocks its operator granted
(`allocate`, `update`): what the instance asks for itself (`elastic`) and the rebalancer change
around it, but never set (docs/resources.md, "Elastic grants and the rebalancer").

`state()` is the read-only `PoolState` a placement policy sees. The ledger is memory only: the
store (`_resource_store`) makes it durable, and the actor keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from multikernel.services._placement import Holding, PoolState
from multikernel.services._pool import Pool


@dataclass
class Account:
    """One instance in the ledger."""

    name: str
    id: int
    held: Holding = field(default_factory=Holding)
    tx: int = 0  # the transaction that made `held`
    applied_by: str = ""
    pending: Holding | None = None
    pending_tx: int = 0
    base_cpus: int = 0  # what the operator granted (the elastic floor and default bound)
    base_blocks: int = 0


class Ledger:
    """Holdings of every instance, with one pending transaction per instance at most."""

    def __init__(self, pool: Pool, *, cpu_share: int = 1) -> None:
        self.pool = pool
        self.cpu_share = cpu_share
        self.accounts: dict[str, Account] = {}
        self._cpus: dict[int, set[str]] = {}
        self._blocks: dict[int, str] = {}
        self._queues: dict[str, str] = {}

    def account(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def by_id(self, id: int) -> Account | None:
        """The account of instance `id` (ids are unique among the accounts)."""
        return next((a for a in self.accounts.values() if a.id == id), None)

    def holding(self, name: str) -> Holding:
        account = self.accounts.get(name)
        return account.held if account is not None else Holding()

    def state(self) -> PoolState:
        """What a policy sees: every holder, pending reservations included (read-only views)."""
        return PoolState(
            self.pool,
            MappingProxyType({cpu: frozenset(names) for cpu, names in self._cpus.items()}),
            MappingProxyType(self._blocks),
            MappingProxyType(self._queues),
            self.cpu_share,
        )

    @property
    def pending(self) -> int:
        return sum(1 for a in self.accounts.values() if a.pending is not None)

    # -- changes --------------------------------------------------------------------------

    def load(
        self, name: str, id: int, held: Holding, tx: int, applied_by: str, base: tuple[int, int]
    ) -> None:
        """Put back a committed holding read from the store (`base`: CPUs, blocks)."""
        self.accounts[name] = Account(
            name, id, held, tx, applied_by, base_cpus=base[0], base_blocks=base[1]
        )
        self._take(name, held)

    @property
    def unheld(self) -> tuple[int, int]:
        """How many CPUs and memory blocks of the pool nobody holds (pending included)."""
        return len(self.pool.cpus.keys() - self._cpus.keys()), len(self.pool.blocks) - len(
            self._blocks
        )

    def reserve(self, tx: int, name: str, id: int, after: Holding) -> Account:
        """Start transaction `tx`: `name` holds its holding and `after` until it ends."""
        account = self.accounts.get(name)
        if account is None:
            account = self.accounts[name] = Account(name, id)
        assert account.pending is None, f"{name} already has transaction {account.pending_tx}"
        account.id = id
        account.pending, account.pending_tx = after, tx
        self._take(name, _minus(after, account.held))
        return account

    def commit(self, name: str, applied_by: str, base: tuple[int, int]) -> Account:
        """The pending transaction was acknowledged: `name` holds what it asked for."""
        account = self.accounts[name]
        assert account.pending is not None
        self._drop(name, _minus(account.held, account.pending))
        account.held, account.tx = account.pending, account.pending_tx
        account.applied_by = applied_by
        account.base_cpus, account.base_blocks = base
        account.pending, account.pending_tx = None, 0
        return account

    def rollback(self, name: str) -> Account:
        """The pending transaction failed: `name` holds what it held before."""
        account = self.accounts[name]
        assert account.pending is not None
        self._drop(name, _minus(account.pending, account.held))
        account.pending, account.pending_tx = None, 0
        if not _any(account.held) and account.tx == 0:
            del self.accounts[name]  # a first grant that never happened leaves no account
        return account

    def release(self, name: str) -> Account | None:
        """Forget `name` and everything it holds (it has no pending transaction)."""
        account = self.accounts.pop(name, None)
        if account is not None:
            assert account.pending is None
            self._drop(name, account.held)
        return account

    def _take(self, name: str, holding: Holding) -> None:
        for cpu in holding.cpus:
            self._cpus.setdefault(cpu, set()).add(name)
        self._blocks.update(dict.fromkeys(holding.blocks, name))
        self._queues.update(dict.fromkeys(holding.queues, name))

    def _drop(self, name: str, holding: Holding) -> None:
        for cpu in holding.cpus:
            holders = self._cpus.get(cpu)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del self._cpus[cpu]
        for block in holding.blocks:
            if self._blocks.get(block) == name:
                del self._blocks[block]
        for queue in holding.queues:
            if self._queues.get(queue) == name:
                del self._queues[queue]


def _minus(a: Holding, b: Holding) -> Holding:
    return Holding(a.cpus - b.cpus, a.blocks - b.blocks, a.queues - b.queues)


def _any(holding: Holding) -> bool:
    return bool(holding.cpus or holding.blocks or holding.queues)
