"""A bus client that drops root before it runs: `python unprivileged.py UID GID SOCKET MODE ...`.

Started as root (so the interpreter, whose files only root may read here, can load), it imports
what a client needs and starts the event loop once, then drops to UID/GID with no supplementary
groups, and only then touches SOCKET, so the hub sees UID as its peer (SO_PEERCRED):

  connect                         connect(2) to the socket; print "connected" or the OSError
  request SERVICE METHOD [JSON]   one request through `connect()`; print the JSON reply, or
                                  "<ErrorClass>: <message>" and exit 1
  publish SUBJECT...              publish each SUBJECT (body None) in order, on one session

It prints one line and exits 0 on success, 1 on the error it printed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import anyio.lowlevel
import msgspec

from multikernel.endpoints import connect, runtime
from multikernel.protocol import MultikernelError


async def _nothing() -> None:
    await anyio.lowlevel.checkpoint()


async def _request(sock: Path, service: str, method: str, body: str) -> int:
    async with connect(sock, name="unprivileged", reconnect=False) as bus:
        try:
            reply = await bus.request(service, method, json.loads(body) if body else None)
        except MultikernelError as exc:  # caught in the block: reported as itself
            print(f"{type(exc).__name__}: {exc}")
            return 1
    print(msgspec.json.encode(reply).decode())
    return 0


async def _publish(sock: Path, subjects: list[str]) -> int:
    async with connect(sock, name="unprivileged", reconnect=False) as bus:
        for subject in subjects:
            await bus.publish(subject, None)
    print("published")
    return 0


def _connect(sock: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError as exc:
            print(f"{type(exc).__name__}: {exc.strerror}")
            return 1
    print("connected")
    return 0


def main() -> int:
    uid, gid, sock, mode, args = (
        int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5:]
    )  # fmt: skip
    runtime.run(_nothing)  # the loop's own modules load lazily: while we may still read them
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if mode == "connect":
        return _connect(sock)
    if mode == "request":
        service, method, *body = args
        return int(runtime.run(_request, sock, service, method, body[0] if body else ""))
    return int(runtime.run(_publish, sock, args))


if __name__ == "__main__":
    sys.exit(main())
