"""Services: typed methods served under a well-known name, with a concurrency limit.

    svc = endpoint.service("resource", concurrency=32)

    @svc.method
    async def grant(request: GrantRequest) -> Grant: ...

    @svc.method
    async def watch(request: WatchRequest) -> AsyncIterator[Event]:   # many replies
        yield ...

    await svc.start()          # own the name (queueing behind a current owner, D-Bus style)

Request and response types come from the annotations (msgspec types); they are published to the
hub as JSON schemas for introspection. A request's deadline (from the caller's cancel scope) bounds
its handler; `current_caller()` tells the handler who called, as the hub bound it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import types
import typing
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from multikernel.endpoints._contracts import ReplyChannel, ServiceHost
from multikernel.endpoints._direct import _caller
from multikernel.protocol import (
    BusyError,
    DeadlineExceededError,
    Flag,
    Header,
    Kind,
    MethodInfo,
    NoRespondersError,
    RequestNameResult,
    ServiceInfo,
    decode_body,
    encode,
    error_to_body,
    seconds_left,
)

if TYPE_CHECKING:
    from multikernel.endpoints._direct import DirectChannel

Handler = Callable[[Any], Awaitable[Any]] | Callable[[Any], AsyncIterator[Any]]
#: A handler's coroutine that ran until its first suspension, what it yielded there, and the
#: cancel scope it runs in (entered before it started, so the handler's own scopes nest in it).
Started = tuple[Coroutine[Any, Any, Any], Any, anyio.CancelScope]


class _Entered:
    """A cancel scope that `answer_now` entered already, exited by a `with` statement."""

    __slots__ = ("scope",)

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope

    def __enter__(self) -> anyio.CancelScope:
        return self.scope

    def __exit__(self, *exc_info: Any) -> bool:
        return bool(self.scope.__exit__(*exc_info))


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Await a coroutine that already ran up to its first suspension, where it yielded `yielded`.

    What it yields goes up to the event loop as if this task had awaited it from the start, and
    what comes back (a value, or an exception such as a cancellation) goes down to it.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    decoder: msgspec.msgpack.Decoder[Any]
    streaming: bool
    info: MethodInfo


def _schema(kind: object) -> str:
    try:
        return json.dumps(msgspec.json.schema(kind), separators=(",", ":"))
    except (TypeError, ValueError):
        return ""


def describe(handler: Handler, name: str) -> Method:
    """A method from a handler's annotations: one argument in, a value (or values) out."""
    hints = typing.get_type_hints(handler)
    params = [p for p in inspect.signature(handler).parameters.values() if p.name != "self"]
    if len(params) > 1:
        raise TypeError(f"method {name!r} must take one argument (the request), not {len(params)}")
    request_type: Any = hints.get(params[0].name, Any) if params else type(None)
    returns: Any = hints.get("return", Any)
    streaming = inspect.isasyncgenfunction(handler)
    if not streaming and not inspect.iscoroutinefunction(handler):
        raise TypeError(f"method {name!r} must be an async function or async generator")
    if streaming and typing.get_origin(returns) is not None:
        returns = typing.get_args(returns)[0] if typing.get_args(returns) else Any
    info = MethodInfo(name, _schema(request_type), _schema(returns))
    return Method(name, handler, msgspec.msgpack.Decoder(request_type), streaming, info)


class Service:
    """Methods served under one well-known name by one endpoint."""

    def __init__(
        self,
        endpoint: ServiceHost,
        name: str,
        *,
        concurrency: int,
        flags: int,
        max_queue: int = 1024,
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.flags = flags
        self.concurrency = concurrency
        self.methods: dict[str, Method] = {}
        self.max_queue = max_queue
        self._queue: deque[tuple[ReplyChannel, Header, bytes]] = deque()
        self._workers = self._parked = 0
        self._wake = anyio.Event()
        self.started = False
        self.draining = False
        self.primary = False
        self.in_flight = 0
        self.served = self.failed = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._paused = False
        self._settled = anyio.Event()  # while paused: set as each running request ends

    def method(self, handler: Handler | None = None, *, name: str | None = None) -> Any:
        """Register an async function (or async generator, for many replies) as a method."""

        def register(fn: Handler) -> Handler:
            method_name = name or fn.__name__
            if method_name in self.methods:
                raise ValueError(f"{self.name!r} already has a method {method_name!r}")
            self.methods[method_name] = describe(fn, method_name)
            return fn

        return register(handler) if handler is not None else register

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            self.name, tuple(m.info for m in self.methods.values()), self.concurrency
        )

    async def start(self) -> RequestNameResult:
        """Own the name (or queue for it) and start serving; returns the hub's answer."""
        self.started = True
        return await self.endpoint._start_service(self)

    async def drain(self) -> None:
        """Lame duck: give the name to the next owner in line, finish the requests in flight."""
        self.draining = True
        if self.started:
            await self.endpoint._release_service(self)
        await self._idle.wait()

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Start no request (new ones wait in the queue); return once the running ones ended.

        An upgrade freezes a service this way before it takes its state: what ran is in the
        state, what waits runs after `resume` (a rollback) or is refused by `refuse_waiting`.
        """
        self._paused = True
        while self.in_flight > len(self._queue):
            self._settled = anyio.Event()
            await self._settled.wait()

    def resume(self) -> None:
        """Run the requests that waited while paused, and new ones, again."""
        if self._paused:
            self._paused = False
            self._wake.set()

    def refuse_waiting(self, error: Exception) -> int:
        """Answer every request waiting in the queue with `error`; how many there were."""
        refused = 0
        while self._queue:
            direct, header, _ = self._queue.popleft()
            direct.send_nowait(
                encode(Kind.ERROR, error_to_body(error), correlation=header.correlation)
            )
            self._ended()
            refused += 1
        return refused

    def _ended(self) -> None:
        """One request of the `in_flight` ones is over."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        if self._paused:
            self._settled.set()

    def submit(self, direct: ReplyChannel, header: Header, frame: bytes) -> None:
        """Queue a request for a worker (called by the channel's reader, without waiting).

        Up to `concurrency` worker tasks, started on demand and kept, run the requests: spawning
        a task per request costs ~25 µs under anyio, waking a parked worker a few. Beyond
        `max_queue` waiting requests the caller gets BusyError at once.
        """
        if len(self._queue) >= self.max_queue:
            error = BusyError(f"{self.name!r} has {len(self._queue)} requests waiting; retry later")
            direct.send_nowait(
                encode(Kind.ERROR, error_to_body(error), correlation=header.correlation)
            )
            return
        self._queue.append((direct, header, frame))
        if self.in_flight == 0:
            self._idle = anyio.Event()
        self.in_flight += 1
        if self._parked:
            self._wake.set()
        elif self._workers < self.concurrency:
            self._workers += 1
            self.endpoint._spawn(self._work)

    def has_capacity(self) -> bool:
        """Whether a request may start now (under the concurrency limit, none waiting)."""
        return self.in_flight < self.concurrency and not self._queue and not self._paused

    def answer_now(
        self, direct: DirectChannel, header: Header, frame: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Run a request in the calling task as far as it goes without waiting; None if answered.

        A handler that answers without suspending (most do: a lookup, a computation) is run to
        the end here and its reply sent, with no task switch, cancel scope, event or coroutine
        of ours: nothing could cancel it, and its deadline was checked before it started (the
        idea of asyncio's eager tasks, Python 3.12). Anything else (a handler that suspends, a
        streaming one, an error, a deadline already passed, a full ring) returns what is left to
        do as a coroutine that the caller awaits, with the same semantics as a worker's request.
        """
        correlation = header.correlation
        if direct.closed or correlation in direct.abandoned:
            direct.abandoned.discard(correlation)
            return None
        method = self.methods.get(header.subject)
        if (
            method is None
            or method.streaming
            or (header.deadline_ns and header.deadline_ns <= time.monotonic_ns())
        ):
            return self.run_inline(direct, header, frame)
        try:
            argument = decode_body(header, frame, method.decoder)
        except Exception:
            return self.run_inline(direct, header, frame)  # answers with the decoding error
        # The scope the request runs in, should it wait: entered before the handler starts, so
        # that scopes the handler enters nest inside it. Nothing can cancel it before it waits.
        left = seconds_left(header.deadline_ns) if header.deadline_ns else None
        scope = anyio.CancelScope(deadline=anyio.current_time() + left if left else math.inf)
        scope.__enter__()
        token = _caller.set(direct.peer)
        try:
            coro = typing.cast(Coroutine[Any, Any, Any], method.handler(argument))
            try:
                yielded = coro.send(None)
            except StopIteration as done:
                result = done.value
            except Exception as exc:  # the handler's failure is the caller's answer
                scope.__exit__(None, None, None)
                self.failed += 1
                return self._send_error(direct, correlation, exc)
            except BaseException as exc:
                if not scope.__exit__(type(exc), exc, exc.__traceback__):
                    raise
                return None
            else:
                return self.run_inline(direct, header, frame, (coro, yielded, scope))
        finally:
            _caller.reset(token)
        scope.__exit__(None, None, None)
        try:
            reply = self.endpoint._encode_reply(result, correlation, 0)
            if not direct.send_now(reply):
                return self._reply_later(direct, reply)
        except Exception as exc:
            self.failed += 1
            return self._send_error(direct, correlation, exc)
        direct.nudge()
        self.served += 1
        return None

    async def _reply_later(self, direct: DirectChannel, reply: bytes) -> None:
        """The ring was full when an answer was ready: wait for room like a worker would."""
        try:
            await direct.send(reply)
        except Exception:
            self.failed += 1
            return
        direct.nudge()
        self.served += 1

    async def run_inline(
        self,
        direct: ReplyChannel,
        header: Header,
        frame: bytes,
        started: Started | None = None,
    ) -> None:
        """Run a request in the calling task (a channel's crew member), counted like a worker's.

        `started`: its handler already ran to its first suspension (`answer_now`).
        """
        if self.in_flight == 0:
            self._idle = anyio.Event()
        self.in_flight += 1
        try:
            await self._handle(direct, header, frame, started)
        finally:
            self._ended()

    async def _work(self) -> None:
        try:
            while True:
                while self._queue and not self._paused:
                    direct, header, frame = self._queue.popleft()
                    try:
                        await self._handle(direct, header, frame)
                    finally:
                        self._ended()
                wake = self._wake
                self._parked += 1
                try:
                    await wake.wait()
                finally:
                    self._parked -= 1
                if self._wake is wake:
                    self._wake = anyio.Event()
        finally:
            self._workers -= 1

    async def _handle(
        self, direct: ReplyChannel, header: Header, frame: bytes, started: Started | None = None
    ) -> None:
        """Run one request to completion and send its reply (or error), unless abandoned."""
        correlation = header.correlation
        if direct.closed or correlation in direct.abandoned:
            direct.abandoned.discard(correlation)
            if started is not None:
                started[0].close()  # it was running: stop it where it waits
                started[2].__exit__(None, None, None)
            return  # its caller went away, or gave up on it, while it waited
        cm: anyio.CancelScope | _Entered
        if started is None:
            left = seconds_left(header.deadline_ns) if header.deadline_ns else None
            cm = anyio.CancelScope(
                deadline=anyio.current_time() + left if left is not None else math.inf
            )
        else:
            cm = _Entered(started[2])
        with cm as scope:
            deadline = scope.deadline
            direct.handlers[correlation] = scope
            try:
                method = self._method(header.subject)
                argument = None if started else decode_body(header, frame, method.decoder)
                token = _caller.set(direct.peer)
                try:
                    await self._run(direct, method, argument, correlation, started)
                finally:
                    _caller.reset(token)
                self.served += 1
            except Exception as exc:  # the handler's failure is the caller's answer
                self.failed += 1
                await self._send_error(direct, correlation, exc)
            finally:
                direct.handlers.pop(correlation, None)
        if scope.cancelled_caught:
            self.failed += 1
            if anyio.current_time() >= deadline:
                error = DeadlineExceededError(f"{self.name}.{header.subject} ran past its deadline")
                await self._send_error(direct, correlation, error)

    def _method(self, name: str) -> Method:
        method = self.methods.get(name)
        if method is None:
            raise NoRespondersError(f"{self.name!r} has no method {name!r}")
        return method

    async def _run(
        self,
        direct: ReplyChannel,
        method: Method,
        argument: Any,
        correlation: int,
        started: Started | None = None,
    ) -> None:
        encode_reply = self.endpoint._encode_reply
        if started is not None:
            result = await _go_on(started[0], started[1])
            await direct.send(encode_reply(result, correlation, 0))
        elif method.streaming:
            stream = typing.cast(AsyncGenerator[Any, None], method.handler(argument))
            async with contextlib.aclosing(stream):  # its `finally` runs here, in this task
                async for item in stream:
                    await direct.send(encode_reply(item, correlation, Flag.MORE))
            await direct.send(encode_reply(None, correlation, 0))
        else:
            result = await typing.cast(Awaitable[Any], method.handler(argument))
            await direct.send(encode_reply(result, correlation, 0))
        direct.nudge()

    async def _send_error(self, direct: ReplyChannel, correlation: int, exc: BaseException) -> None:
        frame = encode(Kind.ERROR, error_to_body(exc), correlation=correlation)
        # If the caller is gone, nobody is waiting for this error.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await direct.send(frame)
