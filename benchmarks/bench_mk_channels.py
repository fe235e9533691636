"""What a direct channel costs when it crosses kernels (the multikernel platform, issue 18).

A caller here sends a 64-byte frame to an echo server and waits for it back, over three paths,
interleaved round by round (A B C A B C …):

- ``direct``: the ordinary direct channel the hub makes (a memfd ring pair with doorbells), caller
  to server: what two processes on one kernel get;
- ``shared``: the path ``services/_mk_channels.py`` builds across kernels: the caller's channel to
  the host's pump, a ring pair in a sealed region both sides map, polled without a doorbell
  (back-off up to 1 ms), the init's pump, the server's channel (two extra processes, two copies);
- ``shared50``: the same with the polls' back-off capped at 50 µs instead of 1 ms;
- ``stream``: the alternative it replaced: the caller's channel to a pump that carries frames over
  a byte stream (a Unix socketpair standing in for AF_VSOCK, as the session bridge does:
  ``_mk_session``), a pump at the other end, the server's channel.

The caller is pinned to the first CPU, every other process to the last. Prints, per path, the
round trip's p50 and p99 (median over rounds, with the p50's min-max) in µs, the ratio of its p50
to ``direct``'s in the same round, the CPU time all its processes used per round trip, and
what they use while idle (percent of one CPU over one second).
Usage: ``python benchmarks/bench_mk_channels.py [--rounds N] [--count N] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio

from multikernel.services._local_probe import online_cpus
from multikernel.services._mk_channels import CAPACITY, pump
from multikernel.services._mk_session import receive_frame, send_frame
from multikernel.shm import (
    Channel,
    ChannelHandle,
    Region,
    WaitPolicy,
    channel_size,
    create_channel_handles,
    format_channel,
)

FRAME = b"x" * 64


# -- the peers (each its own process) -------------------------------------------------------


async def _echo(fds: list[int]) -> None:
    async with Channel.attach(ChannelHandle(1, fds)) as server:
        while True:
            for frame in await server.receive_many():
                await server.send(frame)


async def _shared(fds: list[int], region_fd: int, side: int, poll_max: float) -> None:
    # side 0: the host's pump (the caller's channel's server end <-> the region, side 0);
    # side 1: the init's pump (the region, side 1 <-> the server's channel, client end).
    handle = ChannelHandle(1 - side, fds)
    region = Region.from_fd(region_fd)
    policy = WaitPolicy(poll_max=poll_max)
    async with Channel.attach(handle) as near, Channel.open_region(region, side, policy) as far:
        region.close()
        await pump(near, far)


async def _stream(fds: list[int], sock_fd: int, side: int) -> None:
    stream = socket.socket(fileno=sock_fd)
    stream.setblocking(False)
    async with (
        Channel.attach(ChannelHandle(1 - side, fds)) as near,
        anyio.create_task_group() as tg,
    ):

        async def out() -> None:
            while True:
                for frame in await near.receive_many():
                    await send_frame(stream, frame)

        async def back() -> None:
            while True:
                await near.send(await receive_frame(stream))

        tg.start_soon(out)
        tg.start_soon(back)


def _peer(role: str, args: list[str]) -> None:
    fds = [int(a) for a in args[0].split(",")]
    extra = int(args[1]) if len(args) > 1 else -1
    side = int(args[2]) if len(args) > 2 else 0
    poll_max = float(args[3]) if len(args) > 3 else 1e-3
    os.sched_setaffinity(0, {max(online_cpus())})
    run = {"echo": lambda: _echo(fds), "shared": lambda: _shared(fds, extra, side, poll_max),
           "stream": lambda: _stream(fds, extra, side)}[role]  # fmt: skip
    with contextlib.suppress(Exception):  # ended by the caller killing its processes
        anyio.run(run)


# -- the caller ------------------------------------------------------------------------------


def _spawn(role: str, fds: list[int], *extra: int | str) -> subprocess.Popen[bytes]:
    args = [",".join(map(str, fds)), *map(str, extra)]
    keep = [fd for fd in [*fds, *extra[:1]] if isinstance(fd, int) and fd >= 0]
    return subprocess.Popen(
        [sys.executable, __file__, "--peer", role, *args], pass_fds=keep, close_fds=True
    )


class Route:
    """One path: the caller's channel and the processes behind it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []
        caller, server = create_channel_handles()
        if name == "direct":
            self.procs.append(_spawn("echo", server.fds))
        else:
            inner_client, inner_server = create_channel_handles()
            if name.startswith("shared"):
                poll = "5e-05" if name == "shared50" else "0.001"
                region = Region.create(channel_size(CAPACITY))
                format_channel(region, CAPACITY)
                self.procs.append(_spawn("shared", server.fds, region.fd, 0, poll))
                self.procs.append(_spawn("shared", inner_client.fds, region.fd, 1, poll))
                region.close()
            else:
                left, right = socket.socketpair()
                self.procs.append(_spawn("stream", server.fds, left.fileno(), 0))
                self.procs.append(_spawn("stream", inner_client.fds, right.fileno(), 1))
                left.close()
                right.close()
            self.procs.append(_spawn("echo", inner_server.fds))
            inner_client.close()
            inner_server.close()
        server.close()
        self.caller = Channel.attach(caller)

    def cpu(self) -> float:
        total = 0
        for proc in self.procs:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    async def round(self, count: int) -> tuple[list[float], float]:
        for _ in range(max(1, count // 10)):  # warm up
            await self.caller.send(FRAME)
            await self.caller.receive()
        cpu, times = self.cpu(), []
        for _ in range(count):
            start = time.perf_counter_ns()
            await self.caller.send(FRAME)
            await self.caller.receive()
            times.append((time.perf_counter_ns() - start) / 1000)
        return times, (self.cpu() - cpu) / count * 1e6

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.caller.close()


async def main(rounds: int, count: int) -> None:
    os.sched_setaffinity(0, {min(online_cpus())})
    paths = [Route(name) for name in ("direct", "shared", "shared50", "stream")]
    results: dict[str, list[tuple[float, float, float, float]]] = {p.name: [] for p in paths}
    try:
        for _ in range(rounds):
            reference = 0.0
            for path in paths:
                times, cpu = await path.round(count)
                times.sort()
                p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
                reference = reference or p50
                results[path.name].append((p50, p99, p50 / reference, cpu))
        idle = {}
        for path in paths:  # what its processes cost while nothing is sent
            cpu = path.cpu()
            await anyio.sleep(1.0)
            idle[path.name] = (path.cpu() - cpu) * 100
    finally:
        for path in paths:
            path.close()
    print(f"64-byte round trips, {rounds} rounds x {count}; caller on CPU {min(online_cpus())}, "
          f"every other process on CPU {max(online_cpus())}")  # fmt: skip
    print(f"{'path':8} {'p50 µs':>9} {'(min-max)':>17} {'p99 µs':>9} {'x direct':>9} "
          f"{'peer CPU µs/rt':>15} {'idle CPU %':>10}")  # fmt: skip
    for name, rows in results.items():
        p50s = [r[0] for r in rows]
        print(
            f"{name:8} {statistics.median(p50s):9.1f} "
            f"{f'({min(p50s):.1f}-{max(p50s):.1f})':>17} "
            f"{statistics.median(r[1] for r in rows):9.1f} "
            f"{statistics.median(r[2] for r in rows):9.2f} "
            f"{statistics.median(r[3] for r in rows):15.1f} {idle[name]:10.1f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":
        _peer(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200: a smoke test")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.count = 2, 200
    anyio.run(main, options.rounds, options.count)
