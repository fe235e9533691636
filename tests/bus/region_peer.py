"""An endpoint in its own process attached to the hub over a region, as a guest's agent is.

    python region_peer.py FD SIZE ROLE

FD is a memfd (inherited) holding a session channel at offset 0, standing in for a guest's
ivshmem memory; the process opens side 1 of it and `connect(channel=...)`: no socket, no path.
It prints one JSON line per event and exits when its stdin closes.

  honest     attach as "liar" (a name says nothing of who it is), print its endpoint id, serve
             requests from stdin lines: "publish SUBJECT", "call NAME", "own NAME", and
             "forge TOKEN" (a request for a relayed channel it was never given)
  garbage    write one frame of garbage on the session channel after attaching
  early      write garbage where the hub waits for Hello (never attaches)
  counters   attach, then write a bogus tail counter into its ring, far past its size
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from multikernel.endpoints import connect
from multikernel.endpoints._relayed import stamped
from multikernel.protocol import Kind, MultikernelError, encode
from multikernel.shm import Channel, Region, WaitPolicy
from multikernel.shm import _layout as L

#: Both sides poll a region (no doorbells); a short sleep keeps the test fast.
POLLING = WaitPolicy(spin=0.0, poll_min=50e-6, poll_max=2e-3)
GARBAGE = b"\xde\xad\xbe\xef" * 16


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main(fd: int, size: int, role: str) -> None:
    with Region.from_fd(fd, size) as region:
        channel = Channel.open_region(region, 1, POLLING)
    if role == "early":  # garbage where the hub waits for Hello
        with channel:
            await channel.send(GARBAGE)
            say("ready", endpoint=0)
            await anyio.wrap_file(sys.stdin).read()
        return
    async with connect(channel=channel, name="liar") as ep:
        say("ready", endpoint=ep.id)
        if role == "garbage":
            await channel.send(GARBAGE)
        elif role == "counters":  # published more than the ring could ever hold
            writer = channel.writer
            offset = writer._offset + L.SLOT_TAIL * 8
            tail = memoryview(writer._mm)[offset : offset + 8].cast("Q")
            tail[0] = tail[0] + (1 << 40)
            tail.release()
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            verb, arg = line.split()
            try:
                if verb == "publish":
                    await ep.publish(arg, b"from the region")
                    say("published", subject=arg)
                elif verb == "own":
                    svc = ep.service(arg)
                    await svc.start()
                    say("owned", name=arg)
                elif verb == "forge":  # a request for a relayed channel it was never given
                    frame = encode(Kind.REQUEST, b"", subject="echo", correlation=1)
                    await ep._link.to_hub(stamped(frame, int(arg)))
                    say("forged", token=int(arg))
                elif verb == "call":
                    say("answer", value=(await ep.request(arg, "echo", b"hi")).decode())
            except MultikernelError as exc:
                say("error", type=type(exc).__name__, message=str(exc))


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
