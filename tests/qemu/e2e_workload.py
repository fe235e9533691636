"""The workload of the end-to-end test, in each of two guests and one local instance.

    python e2e_workload.py NAME [CALL...]

It attaches to the bus (over its guest's ivshmem memory, or the socket a local instance hands
it), serves `svc.NAME` (`echo`, and `stall`, which says `NAME stalls` and never answers),
subscribes to `demo.news`, and says `NAME ready` on `demo.result`. When it hears `go` on
`demo.news` it publishes `from NAME` there; every other news is reported as
`NAME heard from X`. Then it calls
`svc.C.echo` for each C in CALL (waiting for the name to have an owner) and reports the
answer, and, if CALL holds `stall:C`, calls `svc.C.stall` and reports how that call failed.
Everything it reports goes on `demo.result`, where the test listens.
"""

from __future__ import annotations

import sys

import anyio

from multikernel.endpoints import connect
from multikernel.protocol import MultikernelError, NoRespondersError


async def main(name: str, calls: list[str]) -> None:
    async with connect(name=f"e2e-{name}") as ep:
        svc = ep.service(f"svc.{name}")

        @svc.method
        async def echo(data: bytes) -> bytes:
            return data + f" via {name}".encode()

        async def report(text: str) -> None:
            await ep.publish("demo.result", text.encode())

        @svc.method
        async def stall(data: bytes) -> bytes:
            await report(f"{name} stalls")  # the call is here: the test may kill us now
            await anyio.sleep_forever()
            return data

        await svc.start()

        async with await ep.subscribe("demo.news") as news, anyio.create_task_group() as tg:

            async def listen() -> None:
                async for message in news:
                    said = message.decode(bytes).decode()
                    if said == "go":
                        await ep.publish("demo.news", f"from {name}".encode())
                    elif said != f"from {name}":
                        await report(f"{name} heard {said}")

            tg.start_soon(listen)
            await report(f"{name} ready")
            for target in calls:
                if target.startswith("stall:"):
                    try:
                        await ep.request(f"svc.{target[6:]}", "stall", b"")
                    except MultikernelError as exc:
                        await report(f"{name} stall failed {type(exc).__name__}")
                    continue
                while True:
                    try:
                        answer = await ep.request(f"svc.{target}", "echo", f"{name} asks".encode())
                        break
                    except NoRespondersError:
                        await anyio.sleep(0.2)  # its workload is not serving yet
                await report(f"{name} called {target}: {answer.decode()}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2:])
