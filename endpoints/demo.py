"""`make demo`: a host and three instance processes talking over shared-memory channels.

The host creates one channel per instance, starts each instance with its channel's fds inherited
(the way a real kernel instance gets its IPI buffers at boot), sends requests to all of them and
prints live round-trip figures, then closes the channels and checks that every instance exited.
"""

from __future__ import annotations

import os
import sys
import time

import anyio
import anyio.abc

from multikernel.shm import Channel, ChannelHandle, create_channel

INSTANCES = 3
SECONDS = 3.0


def instance(argument: str, index: int) -> None:
    """An instance's endpoint: answer each request with its instance number and a checksum."""

    async def serve() -> None:
        async with Channel.attach(ChannelHandle.from_argument(argument)) as channel:
            async for request in channel:
                await channel.send(bytes([index]) + sum(request).to_bytes(4, "little"))

    anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": True})


async def host() -> None:
    channels: list[Channel] = []
    procs: list[anyio.abc.Process] = []
    try:
        for index in range(1, INSTANCES + 1):
            channel, handle = create_channel(1 << 16)
            channels.append(channel)
            try:
                procs.append(
                    await anyio.open_process(
                        [
                            sys.executable,
                            "-m",
                            "multikernel.endpoints.demo",
                            handle.to_argument(),
                            str(index),
                        ],
                        pass_fds=[fd for fd in handle.fds if fd >= 0],
                        stdin=None,
                        stdout=None,
                        stderr=None,
                    )
                )
            finally:
                handle.close()
            print(f"host: started instance {index} (pid {procs[-1].pid}) on its own channel")
        await exchange(channels)
    finally:
        with anyio.CancelScope(shield=True):
            for channel in channels:
                await channel.aclose()  # each instance sees end of stream and exits
            for proc in procs:
                with anyio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    codes = [proc.returncode for proc in procs]
    print(f"host: all instances stopped (exit codes {codes}); no shared memory left behind")


async def exchange(channels: list[Channel]) -> None:
    print(f"host: sending 64-byte requests to every instance for {SECONDS:.0f} s")
    print(f"{'second':>6} {'instance':>8} {'requests':>9} {'p50 us':>8} {'p99 us':>8}")
    start = time.monotonic()
    for second in range(1, int(SECONDS) + 1):
        latencies: list[list[int]] = [[] for _ in channels]
        while time.monotonic() - start < second:
            for i, channel in enumerate(channels):
                payload = os.urandom(64)
                t0 = time.perf_counter_ns()
                await channel.send(payload)
                reply = await channel.receive()
                latencies[i].append(time.perf_counter_ns() - t0)
                if reply != bytes([i + 1]) + sum(payload).to_bytes(4, "little"):
                    raise RuntimeError(f"instance {i + 1} answered {reply!r}")
        for i, lat in enumerate(latencies):
            lat.sort()
            p50, p99 = lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000
            print(f"{second:>6} {i + 1:>8} {len(lat):>9} {p50:>8.1f} {p99:>8.1f}")


def main() -> None:
    if len(sys.argv) == 3:
        instance(sys.argv[1], int(sys.argv[2]))
    else:
        anyio.run(host, backend="asyncio", backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
