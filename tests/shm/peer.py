"""A peer process for the cross-process shm tests: `python peer.py ROLE HANDLE [ARGS...]`.

Roles:
  echo             send back every frame until end of stream
  produce N        send N frames numbered 0..N-1 (8-byte little-endian index + filler), then close
  produce-trio N   the same, with the async API under trio, in batches
  produce-forever  send numbered frames until killed
  idle SECONDS     wait in receive for SECONDS, then print this process's CPU seconds and exit
  stall            attach, print "ready", never read; wait to be killed
  orphan           create a named /dev/shm region, print its path, then wait to be killed
"""

from __future__ import annotations

import sys
import time

import anyio
import anyio.lowlevel

from multikernel.shm import Channel, ChannelHandle, Region


def frame(i: int) -> bytes:
    size = 8 + (i * 7919) % 300
    return i.to_bytes(8, "little") + bytes([i & 0xFF]) * (size - 8)


def main() -> None:
    role = sys.argv[1]
    if role == "orphan":
        region = Region.create(4096, backing="shm")
        print(region.path, flush=True)
        time.sleep(60)
        return
    channel = Channel.attach(ChannelHandle.from_argument(sys.argv[2]))
    try:
        if role == "echo":
            try:
                while True:
                    channel.send_blocking(channel.receive_blocking())
            except anyio.EndOfStream:
                pass
        elif role == "produce":
            for i in range(int(sys.argv[3])):
                channel.send_blocking(frame(i))
        elif role == "produce-trio":
            count = int(sys.argv[3])

            async def produce() -> None:
                for start in range(0, count, 100):
                    await channel.send_many(
                        [frame(i) for i in range(start, min(count, start + 100))]
                    )

            anyio.run(produce, backend="trio")
        elif role == "produce-forever":
            i = 0
            while True:
                channel.send_blocking(frame(i))
                i += 1
        elif role == "stall":
            print("ready", flush=True)
            time.sleep(60)
        elif role == "idle":
            seconds = float(sys.argv[3])

            async def idle() -> None:
                await anyio.lowlevel.checkpoint()  # the event loop is up: measure from here
                print(time.process_time(), flush=True)
                with anyio.move_on_after(seconds):
                    await channel.receive()
                print(time.process_time(), flush=True)

            anyio.run(idle)
        else:
            raise SystemExit(f"unknown role {role}")
    finally:
        channel.close()


if __name__ == "__main__":
    main()
