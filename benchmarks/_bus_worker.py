"""One process of the bus benchmark (see bench_bus.py): an RPC server, a client or a subscriber.

    python benchmarks/_bus_worker.py ROLE SYSTEM ADDRESS CMD_FD RESULT_FD CPU

ROLE is server, client or sub; SYSTEM is ours (ADDRESS: the hub's socket), nats (ADDRESS: the
server's URL), and for RPC only: zmq (REQ/REP over ipc://, ADDRESS the endpoint), grpc (a Unix
socket, ADDRESS `unix:PATH`) or ring (a bare shared-memory channel, the echo and its caller with
no bus on top: ADDRESS is the channel handle, its fds inherited). Commands arrive as JSON lines
on CMD_FD, results leave as JSON lines on RESULT_FD
(stdout is left to the libraries' logging). Every process runs anyio under uvloop, pins itself to
CPU (unless it is -1) and dies with the driver (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

PAYLOAD = b"x" * 64
SERVICE = "bench.echo"
NATS_SUBJECT = "bench.echo"
PHASE_CAP = 120.0  # no phase of the benchmark may run longer than this, whatever happens
#: A subscriber reports once no message came for this long (or it got them all). Throughput is
#: timed to the last arrival, so this only decides what counts as lost: on a loaded machine a
#: subscriber process may not run for a few hundred ms, and 0.3 s counted late messages of both
#: systems as lost while neither had dropped any.
SUB_IDLE = 2.0
SUB_FIRST = 15.0  # ... or when nothing at all came for this long


def die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return math.nan
    k = min(len(sorted_ns) - 1, max(0, math.ceil(q * len(sorted_ns)) - 1))
    return sorted_ns[k] / 1e3


class Pipe:
    """Commands in, results out: JSON lines on two inherited fds."""

    def __init__(self, cmd_fd: int, res_fd: int) -> None:
        self.cmd_fd = cmd_fd
        self.res_fd = res_fd
        self.buffer = b""
        os.set_blocking(cmd_fd, False)

    async def command(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            await anyio.wait_readable(self.cmd_fd)
            try:
                chunk = os.read(self.cmd_fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return {"op": "quit"}
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, **result: Any) -> None:
        data = (json.dumps(result) + "\n").encode()
        while data:
            data = data[os.write(self.res_fd, data) :]


# -- the two systems behind one small interface -------------------------------------------------


class Ours:
    def __init__(self, path: str) -> None:
        self.path = path

    async def serve(self, pipe: Pipe) -> None:
        from multikernel.endpoints import connect

        async with connect(self.path, name=f"bench-server-{os.getpid()}") as ep:
            svc = ep.service(SERVICE)

            @svc.method
            async def echo(data: bytes) -> bytes:
                return data

            await svc.start()
            pipe.send(ev="ready")
            while (await pipe.command())["op"] != "quit":
                pass

    async def client(self, pipe: Pipe) -> None:
        from multikernel.endpoints import connect

        async with connect(self.path, name=f"bench-client-{os.getpid()}") as ep:

            async def call() -> None:
                await ep.request(SERVICE, "echo", PAYLOAD)

            async def publish(subject: str) -> None:
                await ep.publish(subject, PAYLOAD)

            def counters() -> dict[str, int]:
                """The client's side of its direct channel: how its waits for replies went."""
                stats = ep.statistics()["direct"].get(SERVICE)
                if stats is None:
                    return {}
                return {
                    "replies": stats.received.frames,
                    "reply_sleeps": stats.received.waits,
                    "reply_spins": stats.received.spins,
                    "server_wakeups": stats.sent.wakeups_sent,
                }

            await run_client(pipe, call, publish, counters=counters)

    async def subscriber(self, pipe: Pipe) -> None:
        from multikernel.endpoints import connect

        async with connect(self.path, name=f"bench-sub-{os.getpid()}") as ep:
            while (cmd := await pipe.command())["op"] != "quit":
                async with await ep.subscribe(cmd["subject"], max_pending=1 << 20) as sub:
                    counter = Counter(cmd["n"])
                    pipe.send(ev="ready")

                    async def consume(sub: Any = sub, counter: Counter = counter) -> None:
                        async for _ in sub:
                            if counter.hit():
                                return

                    await counter.run(consume)
                    snap = await ep.introspect()
                    hub_dropped = sum(
                        s.dropped
                        for s in snap.subscriptions
                        if s.endpoint_id == ep.id and s.sid == sub.sid
                    )
                    pipe.send(
                        ev="result",
                        **counter.result(),
                        client_dropped=sub.statistics().dropped,
                        hub_dropped=hub_dropped,
                    )


class OursStream(Ours):
    """Our bus, publishing through a broadcast stream (`bus.stream(subject)`): no frame goes
    through the hub; subscribers subscribe as usual. Pub/sub only: its server does nothing."""

    async def serve(self, pipe: Pipe) -> None:
        pipe.send(ev="ready")
        while (await pipe.command())["op"] != "quit":
            pass

    async def client(self, pipe: Pipe) -> None:
        from multikernel.endpoints import connect

        async with connect(self.path, name=f"bench-stream-{os.getpid()}") as ep:

            @contextlib.asynccontextmanager
            async def phase(
                publish: Any, subject: str
            ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
                async with ep.stream(subject) as stream:
                    yield functools.partial(stream.publish, PAYLOAD)
                    PHASE_STATS["stalls"] = stream.statistics().stalls  # readers it gave up on

            async def unused(subject: str) -> None:
                raise AssertionError("a stream publishes within its phase")

            await run_client(pipe, None, unused, phase=phase)


class Nats:
    def __init__(self, url: str) -> None:
        self.url = url

    async def _connect(self) -> Any:
        import nats

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(repr(exc))

        nc = await nats.connect(
            self.url, error_cb=on_error, allow_reconnect=False, connect_timeout=5
        )
        nc.bench_errors = errors
        return nc

    async def serve(self, pipe: Pipe) -> None:
        nc = await self._connect()
        try:

            async def echo(msg: Any) -> None:
                await msg.respond(msg.data)

            await nc.subscribe(NATS_SUBJECT, cb=echo)
            await nc.flush()
            pipe.send(ev="ready")
            while (await pipe.command())["op"] != "quit":
                pass
        finally:
            await nc.close()

    async def client(self, pipe: Pipe) -> None:
        nc = await self._connect()
        try:

            async def call() -> None:
                await nc.request(NATS_SUBJECT, PAYLOAD, timeout=10)

            async def publish(subject: str) -> None:
                await nc.publish(subject, PAYLOAD)

            await run_client(pipe, call, publish, flush=nc.flush)
        finally:
            await nc.close()

    async def subscriber(self, pipe: Pipe) -> None:
        nc = await self._connect()
        try:
            while (cmd := await pipe.command())["op"] != "quit":
                counter = Counter(cmd["n"])
                done = anyio.Event()

                async def on_message(
                    msg: Any, counter: Counter = counter, done: Any = done
                ) -> None:
                    if counter.hit():
                        done.set()

                sub = await nc.subscribe(cmd["subject"], cb=on_message)
                await nc.flush()
                pipe.send(ev="ready")
                errors_before = len(nc.bench_errors)
                await counter.run(lambda done=done: done.wait())
                await sub.unsubscribe()
                pipe.send(
                    ev="result",
                    **counter.result(),
                    client_dropped=0,
                    hub_dropped=0,
                    errors=nc.bench_errors[errors_before:][:3],
                )
        finally:
            await nc.close()


class Zmq:
    """ZeroMQ REQ/REP over ipc:// with pyzmq's asyncio sockets: one REQ socket per requester."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def serve(self, pipe: Pipe) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.REP)
        sock.bind(self.address)
        try:
            async with anyio.create_task_group() as tg:

                async def echo() -> None:
                    while True:
                        await sock.send(await sock.recv())

                tg.start_soon(echo)
                pipe.send(ev="ready")
                while (await pipe.command())["op"] != "quit":
                    pass
                tg.cancel_scope.cancel()
        finally:
            sock.close(linger=0)
            ctx.term()

    async def client(self, pipe: Pipe) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        idle: list[Any] = []
        made: list[Any] = []

        async def call() -> None:
            if idle:
                sock = idle.pop()
            else:
                sock = ctx.socket(zmq.REQ)
                sock.connect(self.address)
                made.append(sock)
            await sock.send(PAYLOAD)
            await sock.recv()
            idle.append(sock)

        try:
            await run_client(pipe, call, None)
        finally:
            for sock in made:
                sock.close(linger=0)
            ctx.term()


class Grpc:
    """gRPC (grpc.aio) over a Unix socket: a unary method on raw bytes, no protobuf."""

    METHOD = "/bench.Echo/Echo"

    def __init__(self, address: str) -> None:
        self.address = address

    async def serve(self, pipe: Pipe) -> None:
        import grpc

        async def echo(request: bytes, context: Any) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(self.address)
        await server.start()
        try:
            pipe.send(ev="ready")
            while (await pipe.command())["op"] != "quit":
                pass
        finally:
            await server.stop(None)

    async def client(self, pipe: Pipe) -> None:
        import grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = channel.unary_unary(self.METHOD)

            async def call() -> None:
                await stub(PAYLOAD, timeout=10)

            await run_client(pipe, call, None)


class Ring:
    """The floor: a bare channel (anyio API, default WaitPolicy, like an endpoint's), echoed."""

    def __init__(self, address: str) -> None:
        self.address = address

    def _attach(self) -> Any:
        from multikernel.shm import Channel, ChannelHandle

        return Channel.attach(ChannelHandle.from_argument(self.address))

    async def serve(self, pipe: Pipe) -> None:
        async with self._attach() as channel, anyio.create_task_group() as tg:

            async def echo() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        await channel.send(await channel.receive())

            tg.start_soon(echo)
            pipe.send(ev="ready")
            while (await pipe.command())["op"] != "quit":
                pass
            tg.cancel_scope.cancel()

    async def client(self, pipe: Pipe) -> None:
        async with self._attach() as channel:
            lock = anyio.Lock()  # a bare channel has no correlation ids: one call at a time

            async def call() -> None:
                async with lock:
                    await channel.send(PAYLOAD)
                    await channel.receive()

            await run_client(pipe, call, None)


SYSTEMS: dict[str, Any] = {
    "ours": Ours, "stream": OursStream, "nats": Nats, "zmq": Zmq, "grpc": Grpc, "ring": Ring,
}  # fmt: skip


# -- the phases ---------------------------------------------------------------------------------


class Counter:
    """A subscriber's count for one phase: first and last arrival, and when to stop waiting."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = self.last = 0
        self.started = time.monotonic_ns()

    def hit(self) -> bool:
        self.last = time.monotonic_ns()
        self.count += 1
        if self.count == 1:
            self.first = self.last
        return self.count >= self.expected

    async def run(self, consume: Any) -> None:
        async with anyio.create_task_group() as tg:

            async def main() -> None:
                await consume()
                tg.cancel_scope.cancel()

            async def watchdog() -> None:
                while True:
                    await anyio.sleep(0.05)
                    now = time.monotonic_ns()
                    if self.count and now - self.last > SUB_IDLE * 1e9:
                        break
                    if not self.count and now - self.started > SUB_FIRST * 1e9:
                        break
                tg.cancel_scope.cancel()

            tg.start_soon(main)
            tg.start_soon(watchdog)

    def result(self) -> dict[str, Any]:
        return {"count": self.count, "first_ns": self.first, "last_ns": self.last}


#: What a pub/sub phase adds to its "done" report (the stream's writer: its stalls).
PHASE_STATS: dict[str, int] = {}


@contextlib.asynccontextmanager
async def per_message(publish: Any, subject: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A pub/sub phase that publishes each message on its own (`publish(subject)`)."""
    yield functools.partial(publish, subject)


async def run_client(
    pipe: Pipe,
    call: Any,
    publish: Any,
    flush: Any = None,
    counters: Any = None,
    phase: Any = per_message,
) -> None:
    pipe.send(ev="ready")
    while (cmd := await pipe.command())["op"] != "quit":
        if cmd["op"] == "rpc":
            await rpc_phase(
                pipe, call, cmd["dur"], cmd["warm"], cmd["gap"], cmd["conc"], counters or dict
            )
        elif cmd["op"] == "pub" and publish is not None:
            subject, n = cmd["subject"], cmd["n"]
            with anyio.fail_after(PHASE_CAP):
                async with phase(publish, subject) as one:
                    t0 = time.monotonic_ns()
                    for _ in range(n):
                        await one()
                    t1 = time.monotonic_ns()
                if flush is not None:
                    await flush()
            pipe.send(
                ev="done", start_ns=t0, end_ns=t1, flushed_ns=time.monotonic_ns(), **PHASE_STATS
            )
            PHASE_STATS.clear()


async def rpc_phase(
    pipe: Pipe, call: Any, dur: float, warm: float, gap: float, conc: int, counters: Any
) -> None:
    """`conc` requester tasks call back to back (or with `gap` s between calls) for `dur` s.

    Calls started in the first `warm` s are not timed; the driver is told when timing begins,
    so it can read every process's CPU time over the timed part only.
    """
    samples: list[int] = []
    state = {"timing": False, "stop": False}
    clock = time.perf_counter_ns

    async def requester() -> None:
        record = samples.append
        while not state["stop"]:
            timed = state["timing"]
            t0 = clock()
            await call()
            t1 = clock()
            if timed:
                record(t1 - t0)
            if gap:
                await anyio.sleep(gap)

    with anyio.fail_after(dur + PHASE_CAP):
        async with anyio.create_task_group() as tg:
            for _ in range(conc):
                tg.start_soon(requester)
            await anyio.sleep(warm)
            state["timing"] = True
            timed_from = clock()
            before = counters()
            pipe.send(ev="warm")
            await anyio.sleep(dur - warm)
            state["stop"] = True
    elapsed = (clock() - timed_from) / 1e9
    after = counters()
    samples.sort()
    pipe.send(
        ev="done",
        n=len(samples),
        p50_us=percentile(samples, 0.50),
        p99_us=percentile(samples, 0.99),
        mean_us=sum(samples) / len(samples) / 1e3 if samples else math.nan,
        rate=len(samples) / elapsed if elapsed > 0 else 0.0,
        counters={k: after[k] - before.get(k, 0) for k in after},
    )


async def main(role: str, system: str, address: str, pipe: Pipe) -> None:
    impl = SYSTEMS[system](address)
    if role == "server":
        await impl.serve(pipe)
    elif role == "client":
        await impl.client(pipe)
    elif role == "sub":
        await impl.subscriber(pipe)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    die_with_parent()
    role, system, address, cmd_fd, res_fd, cpu = sys.argv[1:7]
    if int(cpu) >= 0:
        os.sched_setaffinity(0, {int(cpu)})
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    pipe = Pipe(int(cmd_fd), int(res_fd))
    try:
        anyio.run(
            main, role, system, address, pipe, backend="asyncio",
            backend_options={"use_uvloop": True},
        )  # fmt: skip
    except Exception as exc:  # the driver shows it; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        pipe.send(ev="error", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
