"""Requests and replies between processes, over direct channels the hub sets up."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

from multikernel.bus import Hub
from multikernel.endpoints import connect
from multikernel.protocol import DeadlineExceededError, NoRespondersError, RemoteError

from .conftest import PATIENCE, spawn

pytestmark = pytest.mark.anyio


async def test_request_reaches_a_service_in_another_process(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path, name="client") as ep:
            assert await ep.request("demo", "echo", b"ping") == b"ping"
            who = await ep.request("demo", "whoami", None)
            assert who["caller"] == ep.id  # the server learned who called from the hub
        assert await server.stop() == 0


async def test_typed_response_is_decoded_into_the_requested_type(
    hub: Hub, socket_path: Path
) -> None:
    class Who(msgspec.Struct):
        server: int
        caller: int
        instance: int

    with spawn("serve", socket_path, "demo") as server:
        ready = await server.expect("ready")
        async with connect(socket_path) as ep:
            who = await ep.request("demo", "whoami", None, response=Who)
            assert who == Who(server=ready["id"], caller=ep.id, instance=0)


async def test_a_stream_of_replies_arrives_in_order(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            got = [i async for i in ep.request_stream("demo", "count", 500, response=int)]
        assert got == list(range(500))


async def test_no_responders_is_immediate(hub: Hub, socket_path: Path) -> None:
    async with connect(socket_path) as ep:
        with anyio.fail_after(2), pytest.raises(NoRespondersError, match="nobody owns"):
            await ep.request("absent", "anything", None)


async def test_unknown_method_is_no_responders(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            with pytest.raises(NoRespondersError, match="no method 'nope'"):
                await ep.request("demo", "nope", None)


async def test_remote_exception_keeps_its_type_name_and_message(
    hub: Hub, socket_path: Path
) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            with pytest.raises(RemoteError, match="bad input") as caught:
                await ep.request("demo", "fail", "bad input")
            assert caught.value.remote_type == "ValueError"


async def test_caller_giving_up_cancels_the_handler(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ep.request, "demo", "sleep", 30.0)
                await server.expect("sleeping")  # the handler runs...
                tg.cancel_scope.cancel()  # ...and the caller gives up
            cancelled = await server.expect("cancelled")
            assert cancelled["seconds"] == 30.0
            assert await ep.request("demo", "echo", b"still fine") == b"still fine"


async def test_caller_deadline_is_a_timeout_error(hub: Hub, socket_path: Path) -> None:
    """The caller's deadline passing while the handler runs is the caller's own TimeoutError (not
    an error the server sent), and the handler is cancelled."""
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            scopes: list[anyio.CancelScope] = []
            raised: list[type[BaseException]] = []

            async def call() -> None:
                try:
                    with anyio.fail_after(PATIENCE) as scope:
                        scopes.append(scope)
                        await ep.request("demo", "sleep", 30.0)
                except TimeoutError as exc:
                    raised.append(type(exc))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await server.expect("sleeping")  # the handler runs: now the deadline passes
                scopes[0].deadline = anyio.current_time()
            assert raised == [TimeoutError]
            await server.expect("cancelled")


async def test_deadline_travels_in_the_envelope(hub: Hub, socket_path: Path) -> None:
    """A handler that overruns the caller's deadline is stopped by the server itself.

    The deadline must pass while the handler runs; on a loaded machine a short one can pass
    before the server even reads the request (it then cancels the handler at its first wait, a
    different path). The handler says how long it had left, and a deadline that was already gone
    is tried again, twice as long.
    """
    from multikernel.protocol import Kind, deadline_after, encode

    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            direct = await ep._clients._direct_to("demo")
            seconds = 0.1
            while True:
                correlation, reply = direct.calls.open()
                frame = encode(
                    Kind.REQUEST, 30.0, subject="sleep", correlation=correlation,
                    deadline_ns=deadline_after(seconds),
                )  # fmt: skip
                await direct.send(frame)
                with anyio.fail_after(PATIENCE), pytest.raises(DeadlineExceededError):
                    await direct.next_reply(reply)
                sleeping = await server.expect("sleeping")
                await server.expect("cancelled")
                if sleeping["left"] > 0:
                    break  # it ran, and the server stopped it when the deadline passed
                seconds *= 2
                assert seconds < PATIENCE, "no request reached the server before its deadline"


async def test_killed_server_fails_the_pending_request_instead_of_hanging(
    hub: Hub, socket_path: Path
) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            assert await ep.request("demo", "echo", b"warm") == b"warm"
            async with anyio.create_task_group() as tg:

                async def kill_when_waiting() -> None:
                    await anyio.wait_all_tasks_blocked()
                    server.proc.send_signal(signal.SIGKILL)

                tg.start_soon(kill_when_waiting)
                with anyio.fail_after(20), pytest.raises(NoRespondersError, match="went away"):
                    await ep.request("demo", "sleep", 30.0)
            assert await server.exited() == -signal.SIGKILL
            with pytest.raises(NoRespondersError):  # the hub released its name
                await ep.request("demo", "echo", b"x")


async def test_requester_process_dying_cancels_its_handler(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        with spawn("call", socket_path, "demo", "sleep", "30") as caller:
            await caller.expect("ready")
            await server.expect("sleeping")  # the handler runs
            caller.proc.send_signal(signal.SIGKILL)
            await server.expect("cancelled")


async def test_concurrent_requests_share_one_channel(hub: Hub, socket_path: Path) -> None:
    with spawn("serve", socket_path, "demo") as server:
        await server.expect("ready")
        async with connect(socket_path) as ep:
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await ep.request("demo", "echo", i.to_bytes(2, "little"))

            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(one, i)
            assert results == {i: i.to_bytes(2, "little") for i in range(64)}
            assert len((await ep.introspect()).channels) == 1


async def test_a_caller_writing_garbage_loses_its_channel_not_the_server(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path, name="server") as server, connect(socket_path) as vandal:
        svc = server.service("svc")

        @svc.method
        async def ping(_: None) -> str:
            return "pong"

        await svc.start()
        assert await vandal.request("svc", "ping", None) == "pong"
        spoiled = vandal._clients.by_target["svc"]
        spoiled.channel.try_send(b"not an envelope")
        async with connect(socket_path) as honest:
            assert await honest.request("svc", "ping", None) == "pong"  # the server lives on
        # The spoiled channel was cut off; the vandal's next call goes on a fresh one.
        assert await vandal.request("svc", "ping", None) == "pong"
        assert vandal._clients.by_target["svc"].token != spoiled.token


async def test_a_service_at_its_concurrency_limit_still_sees_a_caller_give_up(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path, name="server") as server, connect(socket_path) as client:
        svc = server.service("slow", concurrency=1)
        started, cancelled = anyio.Event(), anyio.Event()

        @svc.method
        async def wait(seconds: float) -> str:
            started.set()
            try:
                await anyio.sleep(seconds)
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
            return "done"

        await svc.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.request, "slow", "wait", 30.0)
            await started.wait()
            tg.cancel_scope.cancel()  # no deadline in the request: only the abandon frame tells
        with anyio.fail_after(10):
            await cancelled.wait()


async def test_when_the_caller_reading_for_everyone_gives_up_the_others_still_get_replies(
    hub: Hub, socket_path: Path
) -> None:
    async with connect(socket_path, name="server") as server, connect(socket_path) as client:
        svc = server.service("svc")
        release, all_in, first_gone = anyio.Event(), anyio.Event(), anyio.Event()
        arrived = 0

        @svc.method
        async def hold(i: int) -> int:
            nonlocal arrived
            arrived += 1
            if arrived == 8:
                all_in.set()
            await release.wait()
            return i

        await svc.start()
        results: dict[int, int] = {}
        first = anyio.CancelScope()

        async def call(i: int) -> None:
            try:
                with first if i == 0 else anyio.CancelScope():
                    results[i] = await client.request("svc", "hold", i)
            finally:
                if i == 0:
                    first_gone.set()

        with anyio.fail_after(20):  # the others hang if nobody takes over the reading
            async with anyio.create_task_group() as tg:
                for i in range(8):  # the first caller reads the channel for all of them
                    tg.start_soon(call, i)
                await all_in.wait()
                first.cancel()  # the reader gives up...
                await first_gone.wait()
                release.set()  # ...and the others' replies must still be read
        assert results == {i: i for i in range(1, 8)}


async def test_a_handler_that_answers_at_once_runs_in_the_reading_task(
    hub: Hub, socket_path: Path
) -> None:
    """No task switch for a handler that never waits; one that waits still gets its caller."""
    from multikernel.endpoints import current_caller

    tasks: list[int] = []
    callers: list[str] = []
    async with connect(socket_path, name="server") as server, connect(socket_path) as client:
        svc = server.service("eager")

        @svc.method
        async def now(x: int) -> int:
            tasks.append(anyio.get_current_task().id)
            return x + 1

        @svc.method
        async def later(x: int) -> int:
            with anyio.fail_after(5):  # its own scope, entered before it first waits
                await anyio.lowlevel.checkpoint()
            callers.append(current_caller().name)
            return x * 2

        await svc.start()
        before = len(anyio.get_running_tasks())
        assert [await client.request("eager", "now", i) for i in range(20)] == list(range(1, 21))
        assert len(set(tasks)) == 1
        # ...and no second task was started to read while a handler ran (a waiting one does).
        assert len(anyio.get_running_tasks()) == before
        assert [await client.request("eager", "later", i) for i in range(3)] == [0, 2, 4]
        assert callers == [client.name] * 3
        assert await client.request("eager", "now", 41) == 42
