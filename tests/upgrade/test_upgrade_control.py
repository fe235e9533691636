"""`Service.pause` and `UpgradeControl` on the in-memory bus, under asyncio, uvloop and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import msgspec
import pytest

from multikernel.bus import Policy
from multikernel.bus.testing import MemoryBus, MemoryEndpoint
from multikernel.endpoints import Service
from multikernel.protocol import (
    BusyError,
    ControlInfo,
    Freeze,
    Health,
    MultikernelError,
    RefusedError,
    Restored,
    StateChunk,
    control_name,
)
from multikernel.upgrade import (
    IncompatibleStateError,
    PreservedState,
    PreservedStateError,
    Schema,
    UpgradeControl,
)

pytestmark = pytest.mark.anyio

CONTROL = control_name(7)


class Counter(msgspec.Struct):
    value: int


@dataclass
class App:
    """A counter service with a gate: `slow` calls wait for `gate` before they count."""

    ep: MemoryEndpoint
    service: Service
    counter: Counter = field(default_factory=lambda: Counter(0))
    gate: anyio.Event = field(default_factory=anyio.Event)
    entered: anyio.Event = field(default_factory=anyio.Event)

    def install(self) -> None:
        @self.service.method
        async def add(_: None) -> int:
            self.counter.value += 1
            return self.counter.value

        @self.service.method
        async def slow(_: None) -> int:
            self.entered.set()
            await self.gate.wait()
            self.counter.value += 1
            return self.counter.value

    def save(self) -> PreservedState:
        state = PreservedState()
        state.put("counter", self.counter)
        return state

    def load(self, state: PreservedState) -> None:
        self.counter = state.get("counter", Schema(Counter, 1))


POLICY = Policy.from_toml(
    '[[rule]]\nwho = "*"\nown = ["counter"]\ncall = ["counter", "instance.7.upgrade"]\n'
)


@asynccontextmanager
async def served(
    *, health: object = None
) -> AsyncIterator[tuple[App, UpgradeControl, MemoryEndpoint]]:
    bus = MemoryBus(POLICY)
    async with (
        bus.connect("app", instance=7) as ep,
        bus.connect("actor") as actor,
        anyio.create_task_group() as tg,
    ):
        app = App(ep, ep.service("counter"))
        app.install()
        control = UpgradeControl(
            ep, [app.service], preserve=app.save, restore=app.load, health=health, instance=7
        )  # type: ignore[arg-type]
        await tg.start(control.run)
        await app.service.start()
        yield app, control, actor
        tg.cancel_scope.cancel()


async def freeze(actor: MemoryEndpoint, thaw_after: float = 30.0) -> bytes:
    image = b""
    async for chunk in actor.request_stream(
        CONTROL, "freeze", Freeze(thaw_after=thaw_after, chunk=4096), response=StateChunk
    ):
        assert chunk.offset == len(image)
        image += chunk.data
    return image


async def test_pause_waits_for_running_calls_and_holds_new_ones_until_resume() -> None:
    async with served() as (app, _, caller):
        results: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _call(caller, "slow", results))
            await app.entered.wait()
            paused = anyio.Event()

            async def pause() -> None:
                await app.service.pause()
                paused.set()

            tg.start_soon(pause)
            tg.start_soon(lambda: _call(caller, "add", results))
            await anyio.wait_all_tasks_blocked()
            assert not paused.is_set(), "a call still runs: pause has not returned"
            app.gate.set()
            await paused.wait()
            await anyio.wait_all_tasks_blocked()
            assert results == [1], "the call sent while paused waits"
            app.service.resume()
        assert results == [1, 2]


async def _call(ep: MemoryEndpoint, method: str, results: list[int]) -> None:
    results.append(await ep.request("counter", method, response=int))


async def test_refuse_waiting_answers_every_waiting_call_busy() -> None:
    async with served() as (app, _, caller):
        await app.service.pause()
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await caller.request("counter", "add")
            except BusyError as error:
                errors.append(error)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert app.service.refuse_waiting(BusyError("moved")) == 3
        assert len(errors) == 3
        assert app.counter.value == 0, "nothing refused ran"
        assert app.service.in_flight == 0


async def test_freeze_hands_over_the_whole_state_and_thaw_resumes() -> None:
    async with served() as (app, control, actor):
        for _ in range(3):
            await actor.request("counter", "add")
        info = await actor.request(CONTROL, "describe", response=ControlInfo)
        assert info.names == ("counter",)
        assert info.endpoint == app.ep.id
        assert info.stateful
        state = PreservedState.decode(await freeze(actor))
        assert state.get("counter", Schema(Counter, 1)).value == 3
        assert control.frozen
        with pytest.raises(BusyError):
            await freeze(actor)  # one freeze at a time
        await actor.request(CONTROL, "thaw")
        assert await actor.request("counter", "add", response=int) == 4


async def test_a_freeze_nobody_ends_thaws_by_itself() -> None:
    async with served() as (_, control, actor):
        await freeze(actor, thaw_after=0.05)
        with anyio.fail_after(10):
            assert await actor.request("counter", "add", response=int) == 1
        assert not control.frozen


async def test_finish_refuses_what_waited_with_moved_error() -> None:
    async with served() as (app, _, actor):
        await freeze(actor)
        outcome: list[BaseException] = []

        async def late() -> None:
            try:
                await actor.request("counter", "add")
            except BusyError as error:
                outcome.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(late)
            await anyio.wait_all_tasks_blocked()
            await actor.request(CONTROL, "finish")
        (error,) = outcome
        assert error.remote_type == "MovedError"
        assert "send the call again" in str(error)
        assert app.counter.value == 0


async def test_restore_in_chunks_and_its_refusals() -> None:
    source = PreservedState()
    source.put("counter", Counter(41))
    image = source.encode()
    async with served() as (app, control, actor):
        half = len(image) // 2
        first = StateChunk(0, len(image), image[:half])
        answer = await actor.request(CONTROL, "restore", first, response=Restored)
        assert (answer.received, answer.done) == (half, False)
        with pytest.raises(RefusedError, match="does not follow"):
            await actor.request(CONTROL, "restore", StateChunk(half + 1, len(image), b"x"))
        await actor.request(CONTROL, "restore", first)  # offset 0 starts again
        last = StateChunk(half, len(image), image[half:])
        answer = await actor.request(CONTROL, "restore", last, response=Restored)
        assert (answer.done, answer.nodes) == (True, 1)
        assert app.counter.value == 41
        assert control.restored.is_set()
        with pytest.raises(RefusedError, match="already"):
            await actor.request(CONTROL, "restore", StateChunk(0, len(image), image))


async def test_restore_refuses_damaged_or_incompatible_state() -> None:
    newer = PreservedState()
    newer.put("counter", Counter(1), version=2)
    async with served() as (_, control, actor):
        damaged = bytearray(newer.encode())
        damaged[-1] ^= 0xFF
        with pytest.raises(MultikernelError) as damage:
            await actor.request(CONTROL, "restore", StateChunk(0, len(damaged), bytes(damaged)))
        assert damage.value.remote_type == PreservedStateError.__name__
        image = newer.encode()
        with pytest.raises(RefusedError) as caught:
            await actor.request(CONTROL, "restore", StateChunk(0, len(image), image))
        assert caught.value.remote_type == IncompatibleStateError.__name__
        assert not control.restored.is_set()
        too_big = StateChunk(0, 2 << 30, b"x")
        with pytest.raises(RefusedError, match="too large"):
            await actor.request(CONTROL, "restore", too_big)


async def test_health_takes_a_bool_or_a_health() -> None:
    async with served(health=lambda: Health(False, "warming up")) as (_, _c, actor):
        assert await actor.request(CONTROL, "health", response=Health) == Health(
            False, "warming up"
        )

    async def ready() -> bool:
        return True

    async with served(health=ready) as (_, _c, actor):
        assert (await actor.request(CONTROL, "health", response=Health)).ok


def test_preserve_and_restore_come_together() -> None:
    bus = MemoryBus()
    with pytest.raises(ValueError, match="both"):
        UpgradeControl(bus, [], preserve=PreservedState)  # type: ignore[arg-type]
