"""The upgrade actor's contract, and the one between it and an upgradable workload.

An **upgrade** replaces an instance (its *predecessor*) by a *successor*: a new instance beside it,
loaded with the new image, that receives the predecessor's preserved state and its well-known
names. Its steps (``UPGRADE_STEPS``) each have a deadline; a failure before the names move rolls
the upgrade back (the predecessor thaws and keeps its names), and the names moved means it is
done. A **rollout** upgrades several instances, ``max_surge`` at a time.

The actor's service is ``upgrade`` (``UPGRADE_METHODS``); its events (``UpgradeEvent``) are
published on ``mk.upgrade.<name>.<step>`` (``upgrade_subject``), ``<name>`` being the instance
upgraded, and a rollout's final ``RolloutStatus`` on ``mk.upgrades.<rollout>``
(``rollout_subject``).

An upgradable workload serves ``instance.<id>.upgrade`` (``control_name``) with
``WORKLOAD_METHODS``: the actor freezes the predecessor and takes its state in chunks, restores
it into the successor in chunks, and asks the successor whether it is healthy.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from multikernel.protocol._fields import U32, U64, ShortStr

#: The steps of one instance's upgrade, in order, and what each does.
UPGRADE_STEPS: Final = {
    "verify": "the new image is checked and a successor instance created for it (surge grant)",
    "start": "the successor starts beside the predecessor and serves its upgrade control",
    "freeze": "new calls to the names are held; the predecessor finishes its calls and "
    "hands over its state",
    "restore": "the successor reads the state (its schema transforms run)",
    "health": "the successor answers its health check",
    "switch": "every name moves to the successor at once; held calls go to it",
    "drain": "the predecessor is stopped and deleted; its grant returns to the pool",
}
Step: TypeAlias = Literal["verify", "start", "freeze", "restore", "health", "switch", "drain"]

#: How an upgrade or a rollout ends, or where it is.
OUTCOMES: Final = ("running", "paused", "done", "rolled-back", "failed")
Outcome: TypeAlias = Literal["running", "paused", "done", "rolled-back", "failed"]

Seconds: TypeAlias = Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)]
Bytes: TypeAlias = Annotated[bytes, msgspec.Meta(max_length=1 << 19)]  # a frame holds it


class _UpgradeMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Frozen, defaults left off the wire, unknown fields skipped (evolution rules)."""


# -- the workload's control (instance.<id>.upgrade) ---------------------------------------------


class ControlInfo(_UpgradeMessage, frozen=True):
    """``describe``: what the upgrade actor needs to know of an upgradable workload."""

    names: tuple[str, ...]  # the well-known names it serves (moved by an upgrade)
    endpoint: U64  # the bus endpoint that serves them (the new owner in a switch)
    stateful: bool = True  # whether it has state to hand over
    restored: bool = False  # a successor: whether its state was restored
    frozen: bool = False


class Freeze(_UpgradeMessage, frozen=True):
    """``freeze``: run no new call, finish the running ones, then stream the state's image.

    A workload left frozen for ``thaw_after`` seconds with no ``thaw`` or ``finish`` thaws by
    itself (its upgrade actor is gone): nothing stays frozen for ever.
    """

    thaw_after: Seconds = 30.0
    chunk: Annotated[int, msgspec.Meta(ge=4096, le=1 << 19)] = 256 << 10


class StateChunk(_UpgradeMessage, frozen=True):
    """A piece of a preserved-state image: ``data`` is bytes ``offset``.. of ``total``."""

    offset: U64
    total: U64
    data: Bytes = b""


class Restored(_UpgradeMessage, frozen=True):
    """The answer to each ``restore`` chunk: ``done`` once the whole image was read."""

    received: U64
    done: bool = False
    nodes: U32 = 0


class Health(_UpgradeMessage, frozen=True):
    """``health``: whether the workload is ready to serve, and why not."""

    ok: bool
    detail: str = ""


#: The methods of instance.<id>.upgrade: name -> (request type, response type). ``freeze``
#: streams StateChunks; ``thaw`` and ``finish`` take and answer nothing.
WORKLOAD_METHODS: Final[dict[str, tuple[type | None, type | None]]] = {
    "describe": (None, ControlInfo),
    "freeze": (Freeze, StateChunk),
    "thaw": (None, None),
    "finish": (None, None),
    "restore": (StateChunk, Restored),
    "health": (None, Health),
}


def control_name(instance: int) -> str:
    """The name an upgradable workload of `instance` serves its upgrade control under."""
    return f"instance.{instance}.upgrade"


# -- the upgrade actor (service `upgrade`) ------------------------------------------------------


class Deadlines(_UpgradeMessage, frozen=True):
    """Seconds each part of an upgrade may take before it is rolled back."""

    start: Seconds = 30.0  # the successor created, loaded, started and serving its control
    freeze: Seconds = 10.0  # the predecessor's calls finished and its state handed over
    restore: Seconds = 10.0
    health: Seconds = 10.0  # the successor's health check answers ok (asked until then)
    hold: Seconds = 30.0  # the most the names may be held (the hub's hold deadline)
    drain: Seconds = 10.0  # the predecessor's negotiated stop, then it is forced


class StartRollout(_UpgradeMessage, frozen=True):
    """``rollout``: upgrade ``names`` (instances) to ``image``, ``max_surge`` at a time.

    ``max_unavailable``: how many may be upgraded in place at once (stopped, then replaced:
    downtime) when the pool has no room for a successor beside them; 0 refuses that.
    """

    names: tuple[ShortStr, ...]
    image: str
    max_surge: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    max_unavailable: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    deadlines: Deadlines = Deadlines()


class UndoRollout(_UpgradeMessage, frozen=True):
    """``undo``: upgrade ``name`` back to ``revision`` (0: the one before its current)."""

    name: ShortStr
    revision: U32 = 0
    deadlines: Deadlines = Deadlines()


class RolloutRef(_UpgradeMessage, frozen=True):
    """``pause``, ``resume``, ``status`` of one rollout (0: the newest)."""

    rollout: U64 = 0


class InstanceUpgrade(_UpgradeMessage, frozen=True):
    """One instance's upgrade within a rollout."""

    name: str  # the instance upgraded (its deployment's name at the time)
    outcome: Outcome | Literal["waiting"] = "waiting"
    step: str = ""  # the step it is at, or ended at
    successor: str = ""  # the successor instance's name, once created
    revision: U32 = 0  # the revision it goes to
    mode: Literal["", "surge", "in-place"] = ""
    error: str = ""
    held_ms: float = 0.0  # how long its names were held (freeze to switch)
    down_ms: float = 0.0  # in place: from the predecessor's stop to the successor serving
    started_ns: U64 = 0
    ended_ns: U64 = 0


class RolloutStatus(_UpgradeMessage, frozen=True):
    """A rollout as the actor knows it (the answer to ``rollout``, ``status``, ``pause``...)."""

    rollout: U64
    outcome: Outcome
    image: str
    instances: tuple[InstanceUpgrade, ...] = ()
    max_surge: U32 = 1
    max_unavailable: U32 = 0
    started_ns: U64 = 0
    ended_ns: U64 = 0
    error: str = ""


class RolloutList(_UpgradeMessage, frozen=True):
    """The answer to ``list``: the newest rollouts, newest last."""

    rollouts: tuple[RolloutStatus, ...] = ()


class ListRollouts(_UpgradeMessage, frozen=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


class Revision(_UpgradeMessage, frozen=True):
    """One revision of a deployment: the image it ran and the instance that ran it."""

    revision: U32
    instance: str
    image: str  # the kept copy the actor can load again (undo)
    digest: str = ""
    version: str = ""
    created_ns: U64 = 0
    current: bool = False


class RevisionsQuery(_UpgradeMessage, frozen=True):
    """``history``: the revisions of the deployment ``name`` belongs to."""

    name: ShortStr


class RevisionHistory(_UpgradeMessage, frozen=True):
    deployment: str
    revisions: tuple[Revision, ...] = ()


class UpgradeEvent(_UpgradeMessage, frozen=True):
    """Published on ``mk.upgrade.<name>.<step>`` as an instance's upgrade goes."""

    rollout: U64
    name: str
    step: str
    outcome: Outcome
    successor: str = ""
    revision: U32 = 0
    detail: str = ""
    time_ns: U64 = 0
    done: U32 = 0  # instances of the rollout finished so far
    total: U32 = 0


#: The ``upgrade`` service's methods: name -> (request type, response type).
UPGRADE_METHODS: Final[dict[str, tuple[type, type]]] = {
    "rollout": (StartRollout, RolloutStatus),
    "undo": (UndoRollout, RolloutStatus),
    "status": (RolloutRef, RolloutStatus),
    "list": (ListRollouts, RolloutList),
    "pause": (RolloutRef, RolloutStatus),
    "resume": (RolloutRef, RolloutStatus),
    "history": (RevisionsQuery, RevisionHistory),
}


def upgrade_subject(name: str, step: str) -> str:
    """Where the upgrade actor publishes the events of instance `name` at `step`."""
    return f"mk.upgrade.{name}.{step}"


def rollout_subject(rollout: int) -> str:
    """Where the upgrade actor publishes a rollout's final `RolloutStatus` when it ends."""
    return f"mk.upgrades.{rollout}"
