"""The fault actor's policy: what to do about a failure, as an OTP supervisor would decide it.

`decide` is a pure function of the failure, the instance's restart policy, the restarts already
counted against it in the current period, and the other members of its group:

- **mode**: `temporary` instances are never restarted; `transient` ones only when the launch
  failed (crashed, hung, wrote garbage, was lost), not when it ended cleanly (`exited`, status 0);
  `permanent` ones always;
- **intensity and period**: restarts are counted per restart key (the instance, or its group, as
  one OTP supervisor counts the restarts of all its children); when `intensity` restarts were made
  within the last `period` seconds, the fault actor gives up: the instance (and for a group
  strategy, the members it would have restarted with it) is marked `failed` and reported, and
  nothing restarts it until someone starts it again (escalation: the operator is the next
  supervisor up);
- **back-off**: the first restart of a period is immediate, the next wait `backoff`, doubling up to
  `backoff_max`, times a jitter between 0.5 and 1 (so instances that failed together do not come
  back in lock-step);
- **groups**: a failed instance in a group restarts alone (`one-for-one`), with every other member
  (`one-for-all`), or with the members started after it (`rest-for-one`, in instance-id order, the
  order they were created in). The group's strategy and limits are the failed instance's policy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from multikernel.protocol import RestartPolicy


@dataclass(frozen=True)
class Member:
    """Another instance, as the policy sees it: its name, id (start order) and policy."""

    name: str
    id: int
    policy: RestartPolicy


@dataclass(frozen=True)
class Decision:
    """What to do: nothing, restart (after `delay`, with `members`), or give up."""

    action: Literal["ignore", "restart", "give-up"]
    key: str = ""
    delay: float = 0.0
    attempt: int = 0  # restarts in the current period, this one included
    members: tuple[str, ...] = ()  # the others restarted (or failed) with it, in start order
    reason: str = ""


def restart_key(name: str, policy: RestartPolicy) -> str:
    """What restarts are counted against: the group (`group:<name>`), else the instance."""
    return f"group:{policy.group}" if policy.group else name


def group_members(failed: Member, others: list[Member]) -> tuple[str, ...]:
    """The members restarted with `failed` under its group's strategy, in start order."""
    policy = failed.policy
    if not policy.group or policy.strategy == "one-for-one":
        return ()
    same = sorted(
        (m for m in others if m.policy.group == policy.group and m.name != failed.name),
        key=lambda m: m.id,
    )
    if policy.strategy == "rest-for-one":
        same = [m for m in same if m.id > failed.id]
    return tuple(m.name for m in same)


def decide(
    failed: Member, cause: str, recent: int, others: list[Member], jitter: float
) -> Decision:
    """What to do about `failed`'s launch ending with `cause` (see the module docstring)."""
    policy = failed.policy
    if not policy.restarts_after(cause):
        why = (
            "temporary: never restarted"
            if policy.mode == "temporary"
            else f"{policy.mode}: not restarted when it {cause}"
        )
        return Decision("ignore", reason=why)
    key = restart_key(failed.name, policy)
    members = group_members(failed, others)
    if recent >= policy.intensity:
        return Decision(
            "give-up",
            key=key,
            members=members,
            reason=(
                f"{recent} restarts of {key} in the last {policy.period:g} s (intensity "
                f"{policy.intensity}): given up"
            ),
        )
    attempt = recent + 1
    return Decision(
        "restart",
        key=key,
        delay=policy.delay(attempt, jitter),
        attempt=attempt,
        members=members,
        reason=f"{policy.mode}, {cause}: restart {attempt} of at most {policy.intensity}",
    )
