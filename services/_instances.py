"""The lifecycle actor's records: one `Instance` per name, its state machine and its resources.

`Instance.require` is the transition rule (which states a verb needs, and the command that gets
the instance there); `StateChanges` makes each move, stores the instance (`lifecycle.db`, so a
restarted host remembers it) and announces it on `mk.instance.<id>.state`, so the request handlers
and the `Supervisor` of the agents change state the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from multikernel.endpoints import Bus
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    Grant,
    InstanceInfo,
    InstanceState,
    InstanceStateChanged,
    MultikernelError,
    NotFoundError,
    RefusedError,
    RestartPolicy,
)
from multikernel.services._image import LoadedImage
from multikernel.services._output import InstanceLog
from multikernel.services._platform import InstanceProcess, Resources

if TYPE_CHECKING:
    from multikernel.services._instance_store import InstanceStore
    from multikernel.services._standby import Standby

log = get_logger("multikernel.lifecycle")


class InstanceError(MultikernelError):
    """A lifecycle request that cannot be done in the instance's state or with its arguments.

    The message says what state the instance is in and which command gets it where it needs to
    be (e.g. "load an image first: mkctl load NAME --image PATH"). A request refused as asked
    is an `InstanceRefusedError`, one naming an unknown instance an `UnknownInstanceError`; they
    travel with the protocol's REFUSED and NOT_FOUND codes, so mkctl can tell them apart.
    """


class InstanceRefusedError(InstanceError, RefusedError):
    """Refused as asked: the instance is in the wrong state, the name is taken, the resources
    or the image do not fit. Nothing was changed."""


class UnknownInstanceError(InstanceError, NotFoundError):
    """No instance has that name."""


EMPTY = "empty"
READY = "ready"
LOADED = "loaded"
ACTIVE = "active"
FAILED = "failed"

#: The kernel's state numbers (protocol InstanceState), by our names.
STATE_CODES = {
    EMPTY: InstanceState.MK_STATE_EMPTY,
    READY: InstanceState.MK_STATE_READY,
    LOADED: InstanceState.MK_STATE_LOADED,
    ACTIVE: InstanceState.MK_STATE_ACTIVE,
    FAILED: InstanceState.MK_STATE_FAILED,
}

#: What each verb needs, and the hint when the instance is elsewhere.
NEXT_STEP = {
    EMPTY: "give it resources: mkctl update {name} --cpus N --memory SIZE",
    READY: "load an image: mkctl load {name} --image PATH",
    LOADED: "start it: mkctl start {name}",
    ACTIVE: "stop it first: mkctl kill {name}",
    FAILED: "kill it to reclaim what it holds (mkctl kill {name}), then start it again",
}


@dataclass
class Instance:
    """Everything the lifecycle actor knows about one instance."""

    name: str
    id: int
    state: str = "none"  # until created
    resources: Resources | None = None
    queues: tuple[str, ...] = ()  # I/O queues granted (the resource actor's names)
    resource_tx: int = 0  # the resource transaction `resources` and `queues` come from
    image: LoadedImage | None = None
    image_dir: Path | None = None
    proc: InstanceProcess | None = None
    agent: int = 0
    hello: anyio.Event = field(default_factory=anyio.Event)
    beat: anyio.Event = field(default_factory=anyio.Event)  # the first heartbeat of this start
    output: InstanceLog | None = None
    stopping: bool = False
    exited: anyio.Event = field(default_factory=anyio.Event)
    started_ns: int = 0
    restarts: int = 0
    last_exit: str = ""
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    created: float = field(default_factory=time.monotonic)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    command: tuple[str, ...] = ()  # the last start's command (a restart runs it again)
    generation: int = 0  # launches so far
    cause: str = ""  # why the last launch ended
    stop_cause: str = "requested"  # why the launch being stopped now ends
    proc_record: str = ""  # the platform's record of `proc`, for a restarted host
    #: The agent's fd holding the read end of its output pipe (see `Supervisor`), for a
    #: restarted host to collect the output again; 0 if none.
    output_fd: int = 0
    launching: set[str] = field(default_factory=set)  # units being launched, not yet recorded
    standby: Standby | None = None  # a warm agent ready to take the instance over

    def grant(self, grant: Grant) -> None:
        """What the resource actor granted: the instance's CPUs, memory and queues from now on."""
        self.resources = Resources.granted(frozenset(grant.cpus), grant.memory, grant.queues)
        self.queues, self.resource_tx = tuple(grant.queues), grant.tx

    def require(self, *states: str, verb: str) -> None:
        """Raise InstanceError unless the instance is in one of `states`, saying what to do."""
        if self.state not in states:
            hint = NEXT_STEP[self.state].format(name=self.name)
            raise InstanceRefusedError(
                f"cannot {verb} {self.name!r}: it is {self.state}, and {verb} needs "
                f"{' or '.join(states)}; {hint}"
            )

    def info(self, isolation: tuple[str, ...] = (), warnings: tuple[str, ...] = ()) -> InstanceInfo:
        image, signer = self.image, ""
        if image is not None and image.signer is not None:
            signer = image.signer.subject
        return InstanceInfo(
            name=self.name,
            id=self.id,
            state=self.state,
            cpus=tuple(sorted(self.resources.cpus)) if self.resources else (),
            memory=self.resources.memory if self.resources else 0,
            image=image.manifest.name if image else "",
            image_version=image.manifest.version if image else "",
            signer=signer or ("unsigned" if image else ""),
            pid=self.proc.pid if self.proc is not None and self.state == ACTIVE else 0,
            agent=self.agent,
            started_ns=self.started_ns,
            restarts=self.restarts,
            last_exit=self.last_exit,
            isolation=isolation,
            warnings=warnings,
            restart=self.restart,
            generation=self.generation,
            cause=self.cause,
            standby=self.standby.proc.pid if self.standby is not None and self.standby.ready else 0,
            queues=self.queues,
            image_source=str(image.source) if image else "",
            image_digest=image.digest if image else "",
        )


class StateChanges:
    """Moves instances between states, each move stored, logged and published for subscribers."""

    def __init__(self, endpoint: Bus, store: InstanceStore | None = None) -> None:
        self.ep = endpoint
        self.store = store

    def save(self, inst: Instance) -> None:
        """Store the instance as it is now (one transaction)."""
        if self.store is not None:
            self.store.save_instance(inst)

    async def move(self, inst: Instance, new: str, reason: str, cause: str = "") -> None:
        old, inst.state = inst.state, new
        self.save(inst)
        await self.announce(inst, old, new, reason, cause)

    async def announce(
        self, inst: Instance, old: str, new: str, reason: str, cause: str = ""
    ) -> None:
        """Log and publish a change (also one that is no state, such as "deleted")."""
        facts: dict[str, object] = {"generation": inst.generation} if inst.generation else {}
        if cause:
            facts["cause"] = cause
        log.info(
            "instance state", instance=inst.name, id=inst.id, old=old, new=new, reason=reason,
            **facts,
        )  # fmt: skip
        change = InstanceStateChanged(inst.name, inst.id, old, new, reason, inst.generation, cause)
        await self.ep.publish(f"mk.instance.{inst.id}.state", change)
