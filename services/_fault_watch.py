"""The fault actor's detection: what counts as an instance failing, and when it is seen.

Detection knows nothing of policies; it turns what the bus says into `Failure`s:

- **death**, at once: the lifecycle watches every launch through a pidfd and announces its end on
  `mk.instance.<id>.state` (`active` → `loaded`) with a cause; `crashed`, `exited` and `lost` are
  failures (a `requested` end is not: someone stopped it);
- **hangs**, through the agents' heartbeats on `mk.instance.<id>.system`: one phi-accrual detector
  per launch (`_phi`), from the moment it becomes active (or, for a launch found running when the
  actor starts, its first heartbeat), checked several times per heartbeat period; when phi passes
  the threshold the instance is only suspected, and its agent is asked for its `status` (`probe`
  seconds, with retries while its name has no owner). No answer makes it a failure with cause
  `hang`; an answer (the heartbeats were lost or late, not the instance) clears the suspicion;
- **garbage**: the hub cuts off an endpoint that wrote garbage on its session ring and announces
  it on `mk.bus.cutoff.<instance>` (`EndpointCutOff.garbage`): a fault of the writer's instance,
  cause `garbage`.

Every failure names the launch (`generation`) it is about, so the actor handles each end once
however many ways it is seen (a hang that is then killed is also a death).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from multikernel.endpoints import Bus, retrying
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    EndpointCutOff,
    InstanceInfo,
    InstanceStateChanged,
    MultikernelError,
    RestartPolicy,
)
from multikernel.services._phi import PhiAccrual, PhiConfig

log = get_logger("multikernel.fault")

#: Ends of a launch that are failures (a `requested` one is not).
FAILURE_CAUSES = frozenset({"crashed", "exited", "lost"})


@dataclass(frozen=True)
class Failure:
    """An instance's launch failed: `cause` is how (crashed, exited, lost, hang, garbage)."""

    name: str
    id: int
    generation: int
    cause: str
    detail: str = ""


@dataclass
class Watched:
    """What detection knows of one instance."""

    name: str
    id: int
    state: str
    generation: int
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    detector: PhiAccrual | None = None  # from the first heartbeat of the current launch
    suspected: bool = False


@dataclass(frozen=True)
class DetectionConfig:
    """Heartbeat period the agents use, and the detector's and probe's settings."""

    period: float = 1.0
    threshold: float = 8.0
    probe: float | None = None  # seconds to wait for a suspect's status; default max(T/2, 0.25)

    @property
    def phi(self) -> PhiConfig:
        return PhiConfig.for_period(self.period, self.threshold)

    @property
    def probe_timeout(self) -> float:
        return self.probe if self.probe is not None else max(self.period / 2, 0.25)


class Detection:
    """Turns state changes, heartbeats and cut-offs into `Failure`s for `report`."""

    def __init__(
        self,
        endpoint: Bus,
        config: DetectionConfig,
        report: Callable[[Failure], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ep = endpoint
        self.config = config
        self.report = report
        self.clock = clock
        self.by_id: dict[int, Watched] = {}
        self.by_name: dict[str, Watched] = {}

    def learn(self, info: InstanceInfo) -> Watched:
        """What the lifecycle says of an instance (at start, and after each change)."""
        w = self.by_name.get(info.name)
        if w is None or w.id != info.id:
            w = Watched(info.name, info.id, info.state, info.generation, info.restart)
            self.by_name[info.name] = self.by_id[info.id] = w
        else:
            if info.generation != w.generation:
                w.detector, w.suspected = None, False
            w.state, w.generation, w.policy = info.state, info.generation, info.restart
        return w

    def on_state(self, change: InstanceStateChanged) -> None:
        if change.new == "deleted":
            w = self.by_name.pop(change.name, None)
            if w is not None:
                self.by_id.pop(w.id, None)
            return
        w = self.by_id.get(change.id)
        if w is None:
            w = Watched(change.name, change.id, change.new, change.generation)
            self.by_name[change.name] = self.by_id[change.id] = w
        if change.generation != w.generation:
            w.detector, w.suspected = None, False  # a new launch: a new rhythm
        w.state, w.generation = change.new, change.generation
        if change.new == "active" and change.old != "active":
            # Its agent just said hello: silence from now on counts, even before a first beat.
            w.detector = PhiAccrual(self.config.phi, self.clock())
        if change.old == "active" and change.new != "active":
            w.detector, w.suspected = None, False
            if change.cause in FAILURE_CAUSES:
                self.report(Failure(w.name, w.id, change.generation, change.cause, change.reason))

    def on_heartbeat(self, instance: int) -> None:
        w = self.by_id.get(instance)
        if w is None or w.state != "active":
            return
        now = self.clock()
        if w.detector is None:
            w.detector = PhiAccrual(self.config.phi, now)
        else:
            w.detector.heartbeat(now)

    def on_cutoff(self, event: EndpointCutOff) -> None:
        w = self.by_id.get(event.instance)
        if not event.garbage or w is None or w.state != "active":
            return
        detail = f"endpoint {event.endpoint} ({event.name}, pid {event.pid}): {event.reason}"
        self.report(Failure(w.name, w.id, w.generation, "garbage", detail))

    def phi(self, w: Watched) -> float:
        return w.detector.phi(self.clock()) if w.detector is not None else 0.0

    async def watch_hangs(self, tg: anyio.abc.TaskGroup) -> None:
        """Check every detector several times a period; probe the instances it suspects."""
        tick = max(self.config.period / 4, 0.025)
        while True:
            await anyio.sleep(tick)
            now = self.clock()
            for w in list(self.by_id.values()):
                if w.state != "active" or w.detector is None or w.suspected:
                    continue
                phi = w.detector.phi(now)
                if phi >= self.config.threshold:
                    w.suspected = True
                    log.info("instance suspected", instance=w.name, phi=round(phi, 1))
                    tg.start_soon(self._probe, w, w.generation, phi)

    async def _probe(self, w: Watched, generation: int, phi: float) -> None:
        """Ask the suspect's agent for its status: no answer in time makes it a hang."""
        timeout = self.config.probe_timeout
        caller = retrying(self.ep, within=timeout)
        try:
            await caller.request(f"instance.{w.id}.agent", "status", None)
        except (MultikernelError, anyio.BrokenResourceError) as exc:
            answered, why = False, f"{type(exc).__name__}"
        else:
            answered, why = True, ""
        if w.generation != generation or w.state != "active":
            return  # it ended meanwhile: its death is reported on its own
        if answered:
            log.info("suspect answered", instance=w.name, phi=round(phi, 1))
            w.suspected = False
            if w.detector is not None:
                w.detector.heartbeat(self.clock())  # alive now: start counting from here
            return
        detail = (
            f"no heartbeat for {self.clock() - w.detector.last:.2f} s (phi {phi:.1f} >= "
            f"{self.config.threshold:g}) and no status within {timeout:g} s ({why})"
            if w.detector is not None
            else why
        )
        self.report(Failure(w.name, w.id, generation, "hang", detail))
