"""Holds: new calls to names being moved wait, while an upgrade switches them to a new owner.

An upgrade actor holds names (`HoldNames`), switches them atomically (`SwitchNames`, in the hub)
or releases them (`ReleaseNames`); a hold also ends at its deadline or when its holder goes away,
and the old owner then keeps the name. Calls reach an owner two ways, so a hold covers both:

- a `ChannelOpen` to a held name waits here, in a queue of at most `Limits.max_held_requests`
  per name (`BusyError` beyond), and is served when the hold ends, against whoever owns the
  name then, unless the caller's own deadline passed meanwhile (`DeadlineExceededError`);
- callers that already hold a direct channel to the name are told (`NameHeld`) and make their
  new calls wait until `NameHoldEnded`; calls they sent before finish on the old owner, and
  nothing is sent twice.

Every hold of one `HoldNames` shares one timer (a task in the hub's task group, cancelled when
the last of them ends). `NameHeld` and `NameHoldEnded` are also published on
`mk.bus.holds.<name>`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc

from multikernel.bus._names import NameRegistry, validate_name
from multikernel.bus._policy import Identity, Policy
from multikernel.bus._session import Limits, Session
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    AccessDeniedError,
    BusyError,
    DeadlineExceededError,
    Feature,
    Kind,
    MultikernelError,
    NameHeld,
    NameHoldEnded,
    NameMove,
    NotFoundError,
    RefusedError,
    encode,
)

log = get_logger("multikernel.bus")

HOLDS_SUBJECT = "mk.bus.holds"


def check_may_hold(
    policy: Policy,
    names: NameRegistry,
    who: Identity,
    name: str,
    holder: int | None,
    released: bool = False,
) -> None:
    """Holding, moving or releasing a name is for its owner and for those the policy lets own
    it; a name someone else holds is theirs to switch or release. Raises if `who` may not."""
    validate_name(name)
    if holder is not None and holder != who.endpoint_id:
        raise BusyError(f"{name!r} is held by endpoint {holder}; only its holder may end it")
    if released and holder is None:
        return  # nothing to end: releasing is idempotent
    if names.owner(name) == who.endpoint_id:
        return
    decision = policy.may_own(who, name)
    if not decision:
        raise AccessDeniedError(f"holding or moving {name!r} refused: {decision.reason}")


def check_hold(
    names: tuple[str, ...],
    deadline_ns: int,
    holder_of: Callable[[str], int | None],
    holding: int,
    limits: Limits,
) -> float:
    """Check a HoldNames (beyond who may hold each name) from one that `holding` names already;
    returns the seconds it lasts."""
    left = (deadline_ns - time.monotonic_ns()) / 1e9
    if not 0 < left <= limits.max_hold:
        raise RefusedError(
            f"a hold must end between now and {limits.max_hold:g} s from now "
            f"(Limits.max_hold); this one ends in {left:.3f} s"
        )
    if len(set(names)) != len(names):
        raise RefusedError(f"a name appears twice in {list(names)}")
    for name in names:
        other = holder_of(name)
        if other is not None:
            raise BusyError(
                f"{name!r} is already held by endpoint {other}; wait for its switch or its deadline"
            )
    if holding + len(names) > limits.max_names:
        raise BusyError(
            f"an endpoint may hold at most {limits.max_names} names at once (Limits.max_names)"
        )
    return left


def check_switch(
    policy: Policy,
    names: NameRegistry,
    who: Identity,
    moves: tuple[NameMove, ...],
    holder_of: Callable[[str], int | None],
    identity_of: Callable[[int], Identity | None],
    max_names: int,
) -> None:
    """Check every move of a SwitchNames before any is made: raise if one may not be."""
    moved = [move.name for move in moves]
    if len(set(moved)) != len(moved):
        raise RefusedError(f"a name appears twice in the switch {moved}; nothing moved")
    gaining: dict[int, int] = {}
    for move in moves:
        check_may_hold(policy, names, who, move.name, holder_of(move.name))
        new = identity_of(move.new_owner)
        if new is None:
            raise NotFoundError(
                f"endpoint {move.new_owner}, the new owner of {move.name!r}, is not attached; "
                "nothing moved"
            )
        if move.new_owner == names.owner(move.name):
            continue
        if move.new_owner not in names.queue(move.name):
            decision = policy.may_own(new, move.name)
            if not decision:
                raise AccessDeniedError(
                    f"endpoint {move.new_owner} may not own {move.name!r}: {decision.reason}; "
                    "nothing moved"
                )
        gaining[move.new_owner] = gaining.get(move.new_owner, 0) + 1
    for endpoint, count in gaining.items():
        if len(names.names_of(endpoint)) + count > max_names:
            raise BusyError(
                f"endpoint {endpoint} would own more than {max_names} names; nothing moved"
            )


@dataclass
class _Waiting:
    """A ChannelOpen waiting for a hold to end."""

    session: Session
    correlation: int
    deadline_ns: int


@dataclass
class Hold:
    """One held name: who holds it, until when, and what waits for it."""

    name: str
    holder: int
    deadline_ns: int
    timer: anyio.CancelScope
    waiting: deque[_Waiting] = field(default_factory=deque)
    told: set[int] = field(default_factory=set)


class Holds:
    """The held names of one hub (see the module docstring). The hub checks who may hold."""

    def __init__(
        self,
        sessions: Mapping[int, Session],
        limits: Limits,
        counters: dict[str, int],
        clients_of: Callable[[str], list[int]],
        serve: Callable[[Session, str, int], None],
        fail: Callable[[Session, int, MultikernelError], None],
        publish: Callable[[str, object], None],
    ) -> None:
        self._sessions = sessions
        self._limits = limits
        self._counters = counters
        self._clients_of = clients_of
        self._serve = serve
        self._fail = fail
        self._publish = publish
        self.held: dict[str, Hold] = {}

    def hold(
        self, tg: anyio.abc.TaskGroup, holder: Session, names: tuple[str, ...], deadline_ns: int
    ) -> None:
        """Hold every name of `names` for `holder` until `deadline_ns`, or refuse them all."""
        mine = sum(h.holder == holder.id for h in self.held.values())
        left = check_hold(names, deadline_ns, self.holder_of, mine, self._limits)
        timer = anyio.CancelScope()
        for name in names:
            hold = self.held[name] = Hold(name, holder.id, deadline_ns, timer)
            notice = NameHeld(name, deadline_ns, holder.id)
            hold.told = self._tell(name, notice)
            self._publish(f"{HOLDS_SUBJECT}.{name}", notice)
            log.info("name held", name=name, holder=holder.id, seconds=round(left, 3))
        self._counters["holds"] += len(names)
        tg.start_soon(self._expire, names, timer, left)

    def wait(self, session: Session, target: str, correlation: int, deadline_ns: int) -> bool:
        """Queue a ChannelOpen to `target` if it is held (True), else False: open it now."""
        hold = self.held.get(target)
        if hold is None:
            return False
        if len(hold.waiting) >= self._limits.max_held_requests:
            raise BusyError(
                f"{target!r} is held for a switch and {len(hold.waiting)} callers already wait "
                "for it (Limits.max_held_requests); retry after the switch"
            )
        hold.waiting.append(_Waiting(session, correlation, deadline_ns))
        self._counters["held"] += 1
        return True

    def holder_of(self, name: str) -> int | None:
        hold = self.held.get(name)
        return None if hold is None else hold.holder

    def end(self, name: str, reason: str) -> None:
        """End the hold on `name` (if any): tell who was told, then serve what waited."""
        hold = self.held.pop(name, None)
        if hold is None:
            return
        if not any(h.timer is hold.timer for h in self.held.values()):
            hold.timer.cancel()  # the last hold of its HoldNames: no timer needed any more
        notice = NameHoldEnded(name, reason)
        self._tell(name, notice, also=hold.told)
        self._publish(f"{HOLDS_SUBJECT}.{name}", notice)
        log.info("name hold ended", name=name, reason=reason, waited=len(hold.waiting))
        now = time.monotonic_ns()
        for waiting in hold.waiting:
            if waiting.session.closed:
                continue
            if waiting.deadline_ns and waiting.deadline_ns <= now:
                error = DeadlineExceededError(f"the call to {name!r} expired while it was held")
                self._fail(waiting.session, waiting.correlation, error)
            else:
                self._serve(waiting.session, name, waiting.correlation)

    def holder_left(self, holder: int) -> None:
        """The holder went away: its holds end, and the names stay where they are."""
        for name in [n for n, h in self.held.items() if h.holder == holder]:
            self.end(name, "holder left")

    def _tell(self, name: str, notice: object, also: Iterable[int] = ()) -> set[int]:
        """Send `notice` to the callers of `name` that understand holds; returns who got it."""
        frame = encode(Kind.CONTROL, notice)
        told = set()
        for endpoint in {*self._clients_of(name), *also}:
            session = self._sessions.get(endpoint)
            if session is not None and session.features & Feature.NAME_HOLDS:
                session.deliver(frame, droppable=False)
                told.add(endpoint)
        return told

    async def _expire(self, names: tuple[str, ...], timer: anyio.CancelScope, left: float) -> None:
        with timer:
            await anyio.sleep(left)
            for name in names:
                hold = self.held.get(name)
                if hold is not None and hold.timer is timer:
                    self.end(name, "deadline")
