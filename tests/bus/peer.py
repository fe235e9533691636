"""A bus endpoint in its own process, for the cross-process bus tests.

    python peer.py ROLE SOCKET [ARGS...]     (SOCKET "-" means: use $MULTIKERNEL_BUS_FD)

Every role prints one JSON line per event on stdout ("ready" first) and exits when its stdin
closes (the test's way of saying "stop gracefully") or when it is killed.

  serve NAME [FLAGS]        serve NAME: echo, whoami, sleep, count, fail; report cancellations
                            and how long a sleeping handler had before its deadline
  subscribe PATTERN [GROUP] print every message received
  publish SUBJECT COUNT     publish COUNT numbered messages, then print "done"
  stream SUBJECT COUNT [SLOW]  the same through a broadcast stream (`Endpoint.stream`), kept
                            open until stdin closes
  call NAME METHOD ARG      one request; print its result or its error type and message
  calls NAME [OWN]          requests in a loop until stdin closes; print each outcome
  garbage [NAME]            attach (owning NAME), then write garbage into the session channel
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from multikernel.endpoints import Endpoint, connect, current_caller


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def until_stdin_closes() -> None:
    await anyio.wait_readable(sys.stdin.fileno())
    while os.read(sys.stdin.fileno(), 4096):
        await anyio.wait_readable(sys.stdin.fileno())


async def serve(ep: Endpoint, name: str, flags: str = "0") -> None:
    svc = ep.service(name, flags=int(flags))

    @svc.method
    async def echo(data: bytes) -> bytes:
        return data

    @svc.method
    async def whoami(_: None) -> dict[str, int]:
        caller = current_caller()
        return {"server": ep.id, "caller": caller.endpoint_id, "instance": caller.instance}

    @svc.method
    async def sleep(seconds: float) -> str:
        left = anyio.current_effective_deadline() - anyio.current_time()  # inf: no deadline
        say("sleeping", seconds=seconds, left=min(left, 1e9))
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            say("cancelled", seconds=seconds)
            raise
        return "slept"

    @svc.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @svc.method
    async def fail(message: str) -> None:
        raise ValueError(message)

    result = await svc.start()
    say("ready", id=ep.id, result=int(result))
    await until_stdin_closes()


async def subscribe(ep: Endpoint, pattern: str, group: str | None = None) -> None:
    async with await ep.subscribe(pattern, queue_group=group) as sub:
        say("ready", id=ep.id)
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                await until_stdin_closes()
                tg.cancel_scope.cancel()

            tg.start_soon(stop)
            async for message in sub:
                say(
                    "message", subject=message.subject, source=message.source, value=message.value()
                )


async def publish(ep: Endpoint, subject: str, count: str) -> None:
    say("ready", id=ep.id)
    for i in range(int(count)):
        await ep.publish(subject, i)
    say("done")
    await until_stdin_closes()


async def stream(ep: Endpoint, subject: str, count: str, slow: str = "block") -> None:
    async with ep.stream(subject, slow="drop" if slow == "drop" else "block") as writer:
        say("ready", id=ep.id)
        for i in range(int(count)):
            await writer.publish(i)
        say("done", readers=writer.statistics().readers)
        await until_stdin_closes()


async def call(ep: Endpoint, name: str, method: str, argument: str) -> None:
    say("ready", id=ep.id)
    try:
        result = await ep.request(name, method, json.loads(argument))
        say("result", value=result)
    except Exception as exc:
        say("error", type=type(exc).__name__, message=str(exc))


async def calls(ep: Endpoint, name: str, own: str | None = None) -> None:
    if own is not None:  # a name of its own: the hub announces when it (re-)attaches
        await ep.service(own).start()
    say("ready", id=ep.id)
    async with anyio.create_task_group() as tg:

        async def stop() -> None:
            await until_stdin_closes()
            tg.cancel_scope.cancel()

        tg.start_soon(stop)
        i = 0
        while True:
            try:
                value = await ep.request(name, "echo", i.to_bytes(4, "little"))
                say("result", value=int.from_bytes(value, "little"), t=time.monotonic())
            except Exception as exc:
                say("error", type=type(exc).__name__, message=str(exc))
                await anyio.sleep(0.01)
            i += 1
            await anyio.sleep(0.002)


async def garbage(ep: Endpoint, name: str | None = None) -> None:
    if name is not None:  # owned first, so that the hub announces when it cuts us off
        await ep.service(name).start()
    say("ready", id=ep.id)
    session = ep._link.session
    assert session is not None
    session.try_send(b"\xff" * 64)  # not an envelope: the hub must cut us off, no one else
    await until_stdin_closes()


ROLES = {"serve": serve, "subscribe": subscribe, "publish": publish, "stream": stream,
         "call": call, "calls": calls, "garbage": garbage}  # fmt: skip


async def main() -> None:
    role, socket_path, *args = sys.argv[1:]
    path = None if socket_path == "-" else socket_path
    async with connect(path, name=f"{role}-{os.getpid()}") as ep:
        await ROLES[role](ep, *args)


if __name__ == "__main__":
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
