"""The rebalancer's loop, in the resource actor's process: load reports in, transactions out.

`Rebalancing.run` subscribes to `mk.instance.*.load` and keeps each instance's latest reports
(at most `keep`). The instance is the one in the subject, which only that instance (or the host)
may publish on; a report whose body names another is ignored, as is one for an instance without
a grant, a malformed one, and one that comes sooner than `min_interval` after the last taken from
that instance (a flood costs the actor one look per interval). Reports measured under an older
grant than the instance holds are dropped. After each report taken it asks the policy
(`_rebalance`) for decisions, checks them (`checked`: a policy is a plugin, and one that steps
outside an instance's bounds or the free pool is a bug, logged and not applied), and applies each
as a transaction through the actor (kind `rebalance`), in a task of its own, one at a time per
instance (when one ends, the reports that came meanwhile are looked at again). A decision taken
on a grant that changed meanwhile is dropped; a change that fails (the instance refused it, say
memory in use) is logged, and the instance's reports are dropped, so the next try waits for a
full window of fresh ones.

`statistics()` counts what happened; `changed` is set (and replaced) after each report is handled
and each change has ended, so tests wait on it instead of sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints import Bus, Message
from multikernel.endpoints.log import get_logger
from multikernel.protocol import Grant, LoadReport, MultikernelError
from multikernel.services._elastic import ElasticBounds
from multikernel.services._ledger import Ledger
from multikernel.services._rebalance import (
    InstanceView,
    RebalancePolicy,
    RebalanceState,
    Resize,
    checked,
)

log = get_logger("multikernel.resource")


def rebalance_state(
    ledger: Ledger, bounds: ElasticBounds, reports: Mapping[int, Sequence[LoadReport]]
) -> RebalanceState:
    """What a policy sees: each instance with reports that holds a grant and is in no
    transaction, with the reports measured under that grant; what nobody holds."""
    views = []
    block_size = ledger.pool.block_size
    for id, theirs in reports.items():
        account = ledger.by_id(id)
        if account is None or account.pending is not None or not account.held.cpus:
            continue
        views.append(
            InstanceView(
                account.name, id, len(account.held.cpus), len(account.held.blocks),
                floor_cpus=account.base_cpus, floor_blocks=account.base_blocks,
                max_cpus=bounds.cpu_cap(account.base_cpus),
                max_blocks=bounds.block_cap(account.base_blocks, block_size),
                reports=tuple(r for r in theirs if r.tx == account.tx),
            )
        )  # fmt: skip
    free_cpus, free_blocks = ledger.unheld
    return RebalanceState(tuple(views), free_cpus, free_blocks, block_size)


class Resizer(Protocol):
    """What the loop needs of the resource actor: its ledger and bounds, and resizing."""

    ledger: Ledger
    elastic: ElasticBounds

    def grant_tx(self, id: int) -> int: ...

    async def resize(self, change: Resize, tx: int) -> Grant | None: ...


@dataclass(frozen=True)
class RebalanceStatistics:
    """Reports taken and ignored; decisions made, applied, dropped (stale) and failed."""

    reports: int = 0
    ignored: int = 0
    decisions: int = 0
    applied: int = 0
    dropped: int = 0
    failed: int = 0


class Rebalancing:
    """Follows load reports and applies a `RebalancePolicy`'s decisions (module docstring)."""

    def __init__(
        self,
        bus: Bus,
        actor: Resizer,
        policy: RebalancePolicy,
        *,
        keep: int = 16,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.actor = actor
        self.policy = policy
        self.keep = keep
        self.min_interval = min_interval
        self.clock = clock
        self.changed = anyio.Event()
        self._reports: dict[int, deque[LoadReport]] = {}
        self._last: dict[int, float] = {}
        self._busy: set[int] = set()
        self._stats = RebalanceStatistics()

    def statistics(self) -> RebalanceStatistics:
        return self._stats

    def _count(self, **more: int) -> None:
        self._stats = replace(
            self._stats, **{name: getattr(self._stats, name) + n for name, n in more.items()}
        )

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the reports until cancelled."""
        async with (
            await self.bus.subscribe("mk.instance.*.load", max_pending=256) as reports,
            anyio.create_task_group() as tg,
        ):
            task_status.started()
            async for message in reports:
                if self._take(message):
                    self._decide(tg)
                self._changed()

    def _take(self, message: Message) -> bool:
        """Keep the report if it is one to keep (module docstring); whether it was."""
        token = message.subject.split(".")[2]
        id = int(token) if token.isdigit() else 0
        tx = self.actor.grant_tx(id) if id else 0
        if not tx:  # no grant (any more): nothing to rebalance
            self._reports.pop(id, None)
            self._last.pop(id, None)
            self._count(ignored=1)
            return False
        now = self.clock()
        if now - self._last.get(id, now - self.min_interval) < self.min_interval:
            self._count(ignored=1)
            return False
        self._last[id] = now
        try:
            report = message.decode(LoadReport)
        except msgspec.ValidationError:
            report = None
        if report is None or report.instance != id:
            self._count(ignored=1)
            return False
        kept = self._reports.setdefault(id, deque(maxlen=self.keep))
        if kept and kept[-1].tx != tx:
            kept.clear()
        if report.tx != tx:  # measured under another grant than the one it holds now
            self._count(ignored=1)
            return False
        kept.append(report)
        self._count(reports=1)
        return True

    def _decide(self, tg: anyio.abc.TaskGroup) -> None:
        reports = {id: tuple(r) for id, r in self._reports.items() if id not in self._busy}
        state = rebalance_state(self.actor.ledger, self.actor.elastic, reports)
        decisions, problems = checked(state, self.policy.decide(state))
        for problem in problems:
            log.error("rebalance policy bug", policy=self.policy.name, problem=problem)
        for change in decisions:
            self._busy.add(change.instance_id)
            self._count(decisions=1)
            tg.start_soon(self._apply, change, self.actor.grant_tx(change.instance_id), tg)

    async def _apply(self, change: Resize, tx: int, tg: anyio.abc.TaskGroup) -> None:
        try:
            grant = await self.actor.resize(change, tx)
        except MultikernelError as error:  # the record and its reason are in the history
            self._count(failed=1)
            self._reports.pop(change.instance_id, None)
            log.warning(
                "rebalance failed", instance=change.instance, reason=change.reason,
                error=str(error),
            )  # fmt: skip
        else:
            self._count(**({"dropped": 1} if grant is None else {"applied": 1}))
        finally:
            self._busy.discard(change.instance_id)
            self._decide(tg)  # reports that came meanwhile may call for the next step
            self._changed()
