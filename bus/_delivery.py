"""Who receives a publication: the one routing rule the hub and the in-memory double share.

A publication reaches every matching subscription the policy lets it reach: within one instance
both sides need the same-instance permission, across instances the publisher needs the right to
publish the subject and the subscriber the right to subscribe its pattern (deny by default). The
publisher's two decisions are cached per subject on its session; the subscriber's were taken when
it subscribed. Queue groups still deliver once whenever an allowed member matches.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Protocol, TypeVar

from multikernel.bus._policy import Identity, Policy
from multikernel.bus._router import SubjectRouter
from multikernel.protocol import AccessDeniedError, BusyError, validate_pattern

K = TypeVar("K", bound=Hashable)


class _Subscriber(Protocol):
    identity: Identity


class Receiver(Protocol):
    """What routing needs to know of a subscription."""

    @property
    def session(self) -> _Subscriber: ...

    within: bool
    across: bool


def subscribe_decisions(
    policy: Policy, who: Identity, pattern: str, held: int, limit: int
) -> tuple[bool, bool]:
    """May `who` subscribe `pattern` within its instance, and across: refused (AccessDenied,
    with the policy's reason) only if neither, since a subscription limited to its own instance
    is still useful."""
    validate_pattern(pattern)
    if held >= limit:
        raise BusyError(f"an endpoint may hold {limit} subscriptions")
    within, across = policy.subscribe_verdicts(who, pattern)
    if not within and not across:
        reason = policy.may_subscribe(who, pattern).reason
        raise AccessDeniedError(f"subscribe to {pattern!r} refused: {reason}")
    return within, across


#: Per-publisher cached publish decisions (and subjects whose denial was reported): bounded, so a
#: publisher that makes up a new subject per message cannot grow the hub (issue: 300k subjects
#: took +115 MB).
DECISION_CACHE_SIZE = 1024


def publish_decisions(
    policy: Policy, cache: dict[str, tuple[bool, bool]], who: Identity, subject: str
) -> tuple[bool, bool]:
    """May `who` publish `subject` within its instance, and across instances: the answers alone
    (the reasons are asked for again when a denial is reported, `denial_message`). When no rule
    could single the subject out (`Policy.publish_verdicts`), nothing is cached per subject, so
    endless distinct subjects cost no policy work; else cached per subject."""
    verdicts = cache.get(subject)
    if verdicts is None:
        verdicts = policy.publish_verdicts(who, subject)
        if verdicts is None:
            if len(cache) >= DECISION_CACHE_SIZE:
                cache.clear()  # a cache, not a record: a publisher of endless subjects starts over
            verdicts = cache[subject] = (
                bool(policy.may_publish(who, subject, within_instance=True)),
                bool(policy.may_publish(who, subject)),
            )
    return verdicts


def route(
    router: SubjectRouter[K],
    receivers: Mapping[K, Receiver],
    subject: str,
    instance: int,
    decisions: tuple[bool, bool],
    *,
    anyone_restricted: bool = True,
) -> tuple[list[K], int]:
    """The subscriptions a publication from `instance` reaches, and how many it was denied.

    `anyone_restricted=False` (no subscription lacks a permission) skips the per-key check when
    the publisher may publish everywhere: the common case costs one cached router lookup.
    """
    within, across = decisions
    if within and across and not anyone_restricted:
        return router.match(subject), 0
    denied = 0

    def allowed(key: K) -> bool:
        nonlocal denied
        record = receivers[key]
        if record.session.identity.instance == instance:
            ok = within and record.within
        else:
            ok = across and record.across
        denied += not ok
        return ok

    keys = router.match_filtered(subject, allowed)
    return keys, denied


def denial_message(
    policy: Policy, who: Identity, subject: str, decisions: tuple[bool, bool]
) -> str:
    """What the publisher is told (once per subject per policy) when some deliveries were denied."""
    reason = policy.may_publish(who, subject).reason if not decisions[1] else "subscribers' rules"
    return f"publication on {subject!r} not delivered to some subscribers: {reason}"
