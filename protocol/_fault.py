"""The fault actor's contract: restart policies, its API, and the events it publishes.

An instance's **restart policy** (``RestartPolicy``) says, like an OTP child spec, whether it is
restarted when it fails (``permanent``: always; ``transient``: when it failed, not when it ended
cleanly; ``temporary``: never), how many restarts are allowed in a period before the fault actor
gives up on it (``intensity`` in ``period`` seconds: then it is marked ``failed`` and reported, not
restarted forever), how long it waits between restarts (the first at once, then ``backoff``
doubling up to ``backoff_max``, with jitter), and, for instances in a ``group``, which members are
restarted with it (``strategy``: ``one-for-one``, ``one-for-all``, ``rest-for-one``). ``standby``
keeps a pre-started agent ready to take the instance over. The policy is part of the instance's
definition: ``CreateInstance.restart`` (default ``RestartPolicy()``), ``UpdateInstance.restart``,
``InstanceInfo.restart``; ``parse_restart`` reads the ``--restart`` text form
(``permanent,intensity=3,period=30,standby``) and ``format_restart`` writes it.

The service is ``fault``; ``FAULT_METHODS`` maps each method to its request and response types.
Its events (``FaultEvent``, ``event`` one of ``FAULT_EVENTS``) are published on
``mk.instance.<id>.fault``.
"""

from __future__ import annotations

import math
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from multikernel.protocol._fields import U32, U64, ShortStr

RestartMode: TypeAlias = Literal["permanent", "transient", "temporary"]
Strategy: TypeAlias = Literal["one-for-one", "one-for-all", "rest-for-one"]
Seconds: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=86400.0)]
GroupName: TypeAlias = Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9-]{0,30})?$")]

#: What each ``FaultEvent.event`` means, in the order they usually happen.
FAULT_EVENTS: Final = {
    "failed": "the instance failed: `cause` says how (crashed, exited, hang, garbage, lost)",
    "restarting": "a restart is decided: after `delay` seconds, attempt `attempt` in the period",
    "recovered": "the restarted instance is active again (`generation` is the new launch)",
    "gave-up": "too many restarts (`intensity` in `period`): marked failed, not restarted",
}

#: Why an instance's launch ended (``InstanceStateChanged.cause``, ``InstanceInfo.cause``).
CAUSES: Final = ("requested", "exited", "crashed", "lost", "hang", "garbage")


class _FaultMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Frozen, defaults left off the wire, unknown fields skipped (evolution rules)."""


class RestartPolicy(_FaultMessage, frozen=True):
    """How the fault actor treats an instance that fails (see the module docstring)."""

    mode: RestartMode = "transient"
    intensity: U32 = 5
    period: Annotated[float, msgspec.Meta(gt=0.0, le=86400.0)] = 60.0
    backoff: Seconds = 0.1
    backoff_max: Seconds = 10.0
    group: GroupName = ""
    strategy: Strategy = "one-for-one"
    standby: bool = False

    def __post_init__(self) -> None:
        if self.backoff_max < self.backoff:
            raise ValueError(f"backoff_max ({self.backoff_max}) is below backoff ({self.backoff})")

    def restarts_after(self, cause: str) -> bool:
        """Whether a launch that ended with `cause` is restarted under this policy."""
        if cause in ("", "requested") or self.mode == "temporary":
            return False
        return self.mode == "permanent" or cause != "exited"

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait before restart number `attempt` (1-based) of the current period.

        The first restart is immediate; then `backoff`, doubling, capped at `backoff_max`,
        times `jitter` (0.5 to 1: "equal jitter", so restarts of many instances spread out).
        """
        if attempt <= 1:
            return 0.0
        base = min(self.backoff_max, self.backoff * 2.0 ** min(attempt - 2, 60))
        return base * min(1.0, max(0.5, jitter))


_RESTART_KEYS: Final = {
    "intensity": int,
    "period": float,
    "backoff": float,
    "backoff_max": float,
    "group": str,
    "strategy": str,
}
_MODES: Final = ("permanent", "transient", "temporary")


def parse_restart(text: str) -> RestartPolicy:
    """A policy from its text form: ``MODE[,KEY=VALUE...][,standby]`` (ValueError if bad).

    ``permanent``, ``transient,intensity=3,period=30``,
    ``permanent,group=web,strategy=one-for-all,standby``; keys: intensity, period, backoff,
    backoff_max, group, strategy.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or parts[0] not in _MODES:
        raise ValueError(f"restart policy {text!r}: start with one of {', '.join(_MODES)}")
    fields: dict[str, object] = {"mode": parts[0]}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if key == "standby" and not eq:
            fields["standby"] = True
            continue
        kind = _RESTART_KEYS.get(key)
        if kind is None or not eq:
            raise ValueError(
                f"restart policy {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(_RESTART_KEYS)}, or 'standby'"
            )
        try:
            fields[key] = kind(value)
        except ValueError:
            raise ValueError(
                f"restart policy {text!r}: {key} needs a number, not {value!r}"
            ) from None
        if isinstance(fields[key], float) and not math.isfinite(fields[key]):  # type: ignore[arg-type]
            raise ValueError(f"restart policy {text!r}: {key} must be finite")
    try:
        return msgspec.convert(fields, RestartPolicy)
    except msgspec.ValidationError as exc:
        raise ValueError(f"restart policy {text!r}: {exc}") from None


def format_restart(policy: RestartPolicy) -> str:
    """The text form of `policy`, naming only what differs from the defaults."""
    default = RestartPolicy()
    parts: list[str] = [policy.mode]
    for key in _RESTART_KEYS:
        value = getattr(policy, key)
        if value != getattr(default, key):
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    if policy.standby:
        parts.append("standby")
    return ",".join(parts)


# -- the lifecycle's methods the fault actor calls ---------------------------------------------


class RestartInstance(_FaultMessage, frozen=True):
    """Restart an instance (``lifecycle.restart``): end its launch if one runs (forced), then
    start it again; a warm standby takes over when there is one.

    ``generation`` makes it idempotent: when given (non-zero), the restart happens only if the
    instance's current launch is still that generation; otherwise the answer is the instance as
    it is, unchanged (someone restarted it already). ``cause`` is recorded as why the old launch
    ended.
    """

    name: ShortStr
    generation: U32 = 0
    cause: str = "requested"
    reason: str = ""


class FailInstance(_FaultMessage, frozen=True):
    """Mark an instance ``failed`` (``lifecycle.fail``), ending its launch if one runs: the
    escalation of a restart policy that gave up. ``mkctl kill NAME`` resets it."""

    name: ShortStr
    reason: str = ""


# -- the fault service --------------------------------------------------------------------------


class FaultStatusRequest(_FaultMessage, frozen=True):
    """``fault.status``: one instance (``name``) or every instance the actor knows."""

    name: ShortStr = ""


class FaultStatus(_FaultMessage, frozen=True):
    """What the fault actor knows of one instance."""

    name: str
    id: U32
    state: str  # "watching", "restarting", "gave-up", "idle" (not active), "unwatched"
    policy: RestartPolicy = RestartPolicy()
    generation: U32 = 0
    restarts: U32 = 0  # restarts the fault actor made, ever
    recent: U32 = 0  # restarts counted against intensity (in the current period)
    phi: float = 0.0  # suspicion of a hang now (phi-accrual); above `threshold` it is a hang
    threshold: float = 0.0
    last_heartbeat_age: float = -1.0  # seconds since the last heartbeat, -1 if none yet
    last_failure: str = ""


class FaultStatusList(_FaultMessage, frozen=True):
    """The answer to ``status``."""

    instances: tuple[FaultStatus, ...] = ()
    pid: U32 = 0  # the fault actor's process


class PolicyGet(_FaultMessage, frozen=True):
    """``fault.policy_get``: an instance's restart policy (as the lifecycle stores it)."""

    name: ShortStr


class PolicySet(_FaultMessage, frozen=True):
    """``fault.policy_set``: change an instance's restart policy (stored by the lifecycle)."""

    name: ShortStr
    policy: RestartPolicy


class PolicyInfo(_FaultMessage, frozen=True):
    """The answer to ``policy_get`` and ``policy_set``."""

    name: str
    policy: RestartPolicy


class HistoryRequest(_FaultMessage, frozen=True):
    """``fault.history``: the most recent events, newest last, of one instance or all."""

    name: ShortStr = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class FaultEvent(_FaultMessage, frozen=True):
    """Published on ``mk.instance.<id>.fault`` and kept in the actor's history."""

    name: str
    id: U32
    event: Literal["failed", "restarting", "recovered", "gave-up"]
    cause: str = ""
    detail: str = ""
    generation: U32 = 0  # the launch the event is about (the new one for "recovered")
    attempt: U32 = 0  # restarts in the current period, this one included ("restarting")
    delay: float = 0.0  # seconds before the restart ("restarting")
    time_ns: U64 = 0  # wall clock (CLOCK_REALTIME)


class FaultHistory(_FaultMessage, frozen=True):
    """The answer to ``history``."""

    events: tuple[FaultEvent, ...] = ()


#: The ``fault`` service's methods: name -> (request type, response type).
FAULT_METHODS: Final[dict[str, tuple[type, type]]] = {
    "status": (FaultStatusRequest, FaultStatusList),
    "policy_get": (PolicyGet, PolicyInfo),
    "policy_set": (PolicySet, PolicyInfo),
    "history": (HistoryRequest, FaultHistory),
}


def fault_subject(instance: int) -> str:
    """Where the fault actor publishes the events of `instance`."""
    return f"mk.instance.{instance}.fault"
