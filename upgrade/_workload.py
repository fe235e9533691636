"""The workload's side of an upgrade: `UpgradeControl` serves ``instance.<id>.upgrade``.

A workload that keeps state across upgrades makes one, beside its services, before it starts
them::

    control = UpgradeControl(ep, [kv], preserve=save, restore=load)
    await tg.start(control.run)   # serve instance.<id>.upgrade first: the actor looks for it
    await kv.start()              # own "kv", or (a successor) wait in its queue

The predecessor is asked to ``freeze``: its services start no new call (those that come wait),
the running ones finish, then `preserve()` is taken and streamed to the actor as one checked
image (`PreservedState.encode`). ``thaw`` undoes that (a rollback: what waited runs now);
``finish`` answers what waited with `MovedError` (a `BusyError`, so a `retrying` caller sends it
again and reaches the successor, which owns the names by then). A predecessor left frozen for
``thaw_after`` seconds with neither thaws by itself: an upgrade actor that died mid-way leaves
nothing frozen.

The successor is sent the image in ``restore`` chunks; once whole, it is decoded (every byte
checked) and given to `restore(state)`, whose `IncompatibleStateError` (or any error) is the
actor's answer, so the upgrade rolls back. ``health`` asks `health()` (by default: restored, or
nothing to restore). A workload with nothing to keep passes neither function.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import anyio
import anyio.abc

from multikernel.endpoints import Bus, Service
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    BusyError,
    ControlInfo,
    Freeze,
    Health,
    RefusedError,
    Restored,
    StateChunk,
    control_name,
)
from multikernel.upgrade._preserved import MAX_IMAGE, PreservedState

log = get_logger("multikernel.upgrade")

Preserve = Callable[[], PreservedState | Awaitable[PreservedState]]
Restore = Callable[[PreservedState], Awaitable[None] | None]
HealthCheck = Callable[[], bool | Health | Awaitable[bool | Health]]


class MovedError(BusyError):
    """The service moved to its successor while this call waited: send it again."""


class UpgradeControl:
    """Serves an upgradable workload's ``instance.<id>.upgrade`` (see the module docstring)."""

    def __init__(
        self,
        endpoint: Bus,
        services: Sequence[Service],
        *,
        preserve: Preserve | None = None,
        restore: Restore | None = None,
        health: HealthCheck | None = None,
        instance: int | None = None,
    ) -> None:
        if (preserve is None) != (restore is None):
            raise ValueError("give both preserve and restore, or neither (no state to keep)")
        self.endpoint = endpoint
        self.services = list(services)
        self._preserve = preserve
        self._restore = restore
        self._health = health
        if instance is None:
            instance = int(os.environ.get("MULTIKERNEL_INSTANCE", "0"))
        self.instance = instance
        self.restored = anyio.Event()  # set once a predecessor's state was restored
        self.frozen = False
        self._freeze_ended = anyio.Event()
        self._froze = anyio.Event()  # a freeze began: `run` times it
        self._thaw_after = 30.0
        self._incoming = bytearray()
        self._total = 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the control name (start it before the workload's services), and thaw a freeze
        nobody ended in time; until cancelled."""
        control = self.endpoint.service(control_name(self.instance), concurrency=4)
        for method in (
            self.describe, self.freeze, self.thaw, self.finish, self.restore, self.health
        ):  # fmt: skip
            control.method(method)
        await control.start()
        task_status.started()
        while True:
            await self._froze.wait()
            self._froze = anyio.Event()
            ended = self._freeze_ended
            with anyio.move_on_after(self._thaw_after):
                await ended.wait()
            if not ended.is_set():
                self._thaw(f"nobody finished the upgrade in {self._thaw_after:g} s")

    # -- the control's methods -----------------------------------------------------------------

    async def describe(self, _: None) -> ControlInfo:
        return ControlInfo(
            names=tuple(s.name for s in self.services),
            endpoint=self.endpoint.id,
            stateful=self._preserve is not None,
            restored=self.restored.is_set(),
            frozen=self.frozen,
        )

    async def freeze(self, request: Freeze) -> AsyncIterator[StateChunk]:
        if self.frozen:
            raise BusyError("already frozen: thaw or finish first")
        self.frozen = True
        self._freeze_ended = anyio.Event()
        try:
            for service in self.services:
                await service.pause()
            image = b""
            if self._preserve is not None:
                state = self._preserve()
                if inspect.isawaitable(state):
                    state = await state
                image = state.encode()
        except BaseException:
            self._thaw("the freeze failed")
            raise
        self._thaw_after = request.thaw_after
        self._froze.set()
        log.info("frozen", names=[s.name for s in self.services], image=len(image))
        for offset in range(0, max(len(image), 1), request.chunk):
            yield StateChunk(offset, len(image), image[offset : offset + request.chunk])

    async def thaw(self, _: None) -> None:
        self._thaw("asked")

    async def finish(self, _: None) -> None:
        """The names moved: refuse what waited (its callers send it again to the successor)."""
        self._freeze_ended.set()
        refused = 0
        for service in self.services:
            refused += service.refuse_waiting(
                MovedError(f"{service.name!r} moved to its successor; send the call again")
            )
        log.info("finished: the successor serves", refused=refused)

    async def restore(self, chunk: StateChunk) -> Restored:
        if self._restore is None:
            raise RefusedError("this workload keeps no state: nothing to restore")
        if self.restored.is_set():
            raise RefusedError("state was restored already")
        if chunk.offset == 0:
            self._incoming, self._total = bytearray(), chunk.total
        if chunk.total != self._total or chunk.offset != len(self._incoming):
            raise RefusedError(
                f"chunk at {chunk.offset} of {chunk.total} does not follow "
                f"{len(self._incoming)} of {self._total}: start again at 0"
            )
        if chunk.total > MAX_IMAGE or len(self._incoming) + len(chunk.data) > chunk.total:
            raise RefusedError(f"an image of {chunk.total} bytes is too large or overrun")
        self._incoming += chunk.data
        if len(self._incoming) < self._total:
            return Restored(len(self._incoming))
        image, self._incoming = bytes(self._incoming), bytearray()
        state = PreservedState.decode(image) if image else PreservedState()
        applied = self._restore(state)
        if inspect.isawaitable(applied):
            await applied
        self.restored.set()
        log.info("restored", nodes=len(state), image=len(image))
        return Restored(len(image), done=True, nodes=len(state))

    async def health(self, _: None) -> Health:
        if self._health is None:
            return Health(True)
        answer = self._health()
        if inspect.isawaitable(answer):
            answer = await answer
        return answer if isinstance(answer, Health) else Health(bool(answer))

    # -- inside --------------------------------------------------------------------------------

    def _thaw(self, why: str) -> None:
        self._freeze_ended.set()
        if self.frozen:
            self.frozen = False
            for service in self.services:
                service.resume()
            log.info("thawed", why=why)
