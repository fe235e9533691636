"""A hostile endpoint in its own process, for the security tests.

    python hostile.py MODE SOCKET [ARGS...]

It prints one JSON line per event on stdout ("ready" first, when its attack is armed) and then
does what its mode says; the test kills it when done. Modes:

  stall SUBJECT             subscribe, then stall its event loop (never reads again)
  corrupt SUBJECT           subscribe and stall until a line arrives on stdin; then write a bogus
                            head into its session ring and ring the hub's space doorbell
  flood-introspect N        send N Introspect requests without ever reading an answer
  no-read NAME SIZE N       send N requests of SIZE bytes to NAME's echo, never read a reply
  open-channels NAME N      ask the hub N times for a channel to NAME; report what it said
  scribble                  write one byte on its control socket after attaching
  sessions N                attach N endpoints, or as many as the hub takes; report the count
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio

from multikernel.endpoints import Endpoint, connect
from multikernel.endpoints.wire import request_frame
from multikernel.protocol import BusyError, ChannelOpen, Introspect, Kind, MultikernelError, encode
from multikernel.shm import _layout as L


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def stall() -> None:
    time.sleep(3600)  # the event loop stops: nothing is read any more


def session_ring_head(ep: Endpoint) -> memoryview:
    """The 8-byte slot of our session ring's head (our reading side), as the hub sees it."""
    session = ep._link.session
    assert session is not None
    reader = session.reader
    offset = reader._offset + L.SLOT_HEAD * 8
    return memoryview(reader._mm)[offset : offset + 8].cast("Q")


async def main(mode: str, path: str, *args: str) -> None:
    async with connect(path, name=f"hostile-{mode}", reconnect=False) as ep:
        session = ep._link.session
        assert session is not None
        if mode == "stall":
            await ep.subscribe(args[0], max_pending=1 << 20)
            say("ready", endpoint=ep.id)
            stall()
        elif mode == "corrupt":
            await ep.subscribe(args[0], max_pending=1 << 20)
            say("ready", endpoint=ep.id)
            sys.stdin.readline()  # stalls the loop until the test has built a backlog
            head = session_ring_head(ep)
            head[0] = head[0] + (1 << 40)  # consumed more than was ever published
            head.release()
            session.reader._peer_bell.ring()  # "there is room now"
            say("corrupted")
            stall()
        elif mode == "flood-introspect":
            say("ready", endpoint=ep.id)
            try:
                for correlation in range(1, int(args[0]) + 1):
                    frame = encode(Kind.CONTROL, Introspect(), correlation=1_000_000 + correlation)
                    session.send_blocking(frame, timeout=30)
            except anyio.BrokenResourceError:
                say("cut off")  # the hub closed our session before we were done
            stall()
        elif mode == "no-read":
            name, size, count = args[0], int(args[1]), int(args[2])
            direct = await ep._clients._direct_to(name)
            body = b"x" * size
            for correlation in range(1, count + 1):
                frame = request_frame("echo", body, correlation, ep.max_body)
                direct.channel.send_blocking(frame, timeout=30)
            say("ready", endpoint=ep.id)
            stall()
        elif mode == "open-channels":
            outcomes: dict[str, int] = {}
            busy = ""
            held = []  # kept open: each costs the hub and the server
            for _ in range(int(args[1])):
                try:
                    _ready, handle = await ep._link.control(ChannelOpen(args[0]))
                    held.append(handle)
                    outcome = "ok"
                except BusyError as exc:
                    outcome, busy = "BusyError", str(exc)
                except MultikernelError as exc:
                    outcome = type(exc).__name__
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            say("ready", endpoint=ep.id, outcomes=outcomes, busy=busy)
            stall()
        elif mode == "scribble":
            say("ready", endpoint=ep.id)
            await scribble(ep)
            stall()
        elif mode == "sessions":
            await sessions(path, int(args[0]))
        else:
            raise SystemExit(f"unknown mode {mode!r}")


async def scribble(ep: Endpoint) -> None:
    """The control socket is the hub's to write on after attach; we write on it anyway."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            if sock.family == socket.AF_UNIX and sock.getpeername():
                sock.send(b"!")
                say("scribbled")
                return


async def sessions(path: str, count: int) -> None:
    attached = 0
    error = ""
    async with AsyncExitStack() as stack:
        for _ in range(count):
            try:
                await stack.enter_async_context(connect(path, reconnect=False))
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            attached += 1
        say("ready", attached=attached, error=error)
        await anyio.wait_readable(sys.stdin.fileno())  # hold them until the test is done


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:], backend="asyncio")
