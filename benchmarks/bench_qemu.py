"""Round trips over one of our rings: host <-> a real guest kernel under QEMU (ivshmem), next to
the same ring between two local processes, in the same run (issue 17).

Both set-ups use the same channel (two SPSC rings, `--capacity` bytes each) with no doorbell:
each side polls, spinning for `WaitPolicy.spin` then sleeping from `poll_min` doubling up to
`poll_max`. The guest is the `qemu` image (`mkctl image build`, cached per user), booted with
`-accel tcg -smp 1 -m 512` and an `ivshmem-doorbell` device served by our ivshmem server; its
program echoes every frame (`multikernel.services.qemu_guest`, mk.mode=echo). The local peer is
a Python process doing the same over a /dev/shm file. The host side sends a `--size`-byte frame
and waits for it to come back, `--runs` times after `--warmup`, with the blocking API (`sync`)
and with the async one under asyncio (`async`). Then one more guest rings the host's eventfd
(through its doorbell register, BAR0+12) after every reply, and the host sleeps on that eventfd
instead of polling (the guest still polls): the "host on its doorbell" row
(`--no-doorbell` skips it).

Prints: the guest's boot time (QEMU started -> the guest's end of the ring open), then p50 / p99
/ min / max of the round trip in microseconds per set-up. Asserts nothing.
Usage: ``python benchmarks/bench_qemu.py [--quick] [--runs N] [--size B] [--boots N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import anyio

from multikernel.services._qemu_image import build_image
from multikernel.services._qemu_link import open_guest
from multikernel.shm import Channel, Region, WaitPolicy, channel_size, format_channel

LOCAL_ECHO = """\
import sys
import anyio
from multikernel.shm import Channel, WaitPolicy
spin, poll_min, poll_max = map(float, sys.argv[2:5])  # after the region's path
policy = WaitPolicy(spin, poll_min=poll_min, poll_max=poll_max)
with Channel.open_path(sys.argv[1], 1, policy) as channel:
    print("ready", flush=True)
    while True:
        try:
            frame = channel.receive_blocking()
        except anyio.EndOfStream:
            break
        channel.send_blocking(frame)
"""


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return (
        f"p50 {p50 * 1e6:8.1f}  p99 {p99 * 1e6:8.1f}  "
        f"min {samples[0] * 1e6:7.1f}  max {samples[-1] * 1e6:9.1f}  (n={len(samples)})"
    )


def sync_round_trips(channel: Channel, frame: bytes, runs: int, warmup: int) -> list[float]:
    samples = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        channel.send_blocking(frame)
        channel.receive_blocking()
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return samples


async def async_round_trips(channel: Channel, frame: bytes, runs: int, warmup: int) -> list[float]:
    samples = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        await channel.send(frame)
        await channel.receive()
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return samples


def doorbell_round_trips(
    channel: Channel, bell: int, frame: bytes, runs: int, warmup: int
) -> list[float]:
    """The host sleeps on its eventfd (rung by the guest after each reply) instead of polling."""
    poller = select.poll()
    poller.register(bell, select.POLLIN)
    samples = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        channel.send_blocking(frame)
        while channel.try_receive() is None:
            poller.poll()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(bell)
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return samples


async def run_guest(args: argparse.Namespace, report: Callable[[str, str], None]) -> None:
    started = time.perf_counter()
    image = build_image()
    report("image (cached after the first build)", f"{time.perf_counter() - started:.2f} s")
    policy = WaitPolicy(args.spin, poll_min=args.poll_min, poll_max=args.poll_max)
    frame = b"x" * args.size
    for boot in range(args.boots):
        async with open_guest(image, capacity=args.capacity, policy=policy) as link:
            report(
                f"guest boot {boot + 1}: QEMU start -> ring ready",
                f"{link.ready_after:.2f} s ({link.guest_says})",
            )
            if boot == 0:
                samples = sync_round_trips(link.channel, frame, args.runs, args.warmup)
                report("host <-> guest, sync", percentiles(samples))
                samples = await async_round_trips(link.channel, frame, args.runs, args.warmup)
                report("host <-> guest, async", percentiles(samples))
        echoed = [line for line in link.vm.console if "echoed" in line]  # its count, as a check
        report(f"guest {boot + 1} says (after powering off)", echoed[-1] if echoed else "nothing")
    if args.doorbell:
        async with open_guest(image, capacity=args.capacity, policy=policy, ring_each=True) as link:
            bell = link.server.host.vectors[0]
            samples = doorbell_round_trips(link.channel, bell, frame, args.runs, args.warmup)
            report("host <-> guest, host on its doorbell", percentiles(samples))


async def run_local(args: argparse.Namespace, report: Callable[[str, str], None]) -> None:
    policy = WaitPolicy(args.spin, poll_min=args.poll_min, poll_max=args.poll_max)
    frame = b"x" * args.size
    with Region.create(channel_size(args.capacity), backing="shm") as region:
        format_channel(region, args.capacity)
        assert region.path is not None
        child = subprocess.Popen(  # noqa: ASYNC220 (the echo peer, started before timing)
            [
                sys.executable,
                "-c",
                LOCAL_ECHO,
                str(region.path),
                str(args.spin),
                str(args.poll_min),
                str(args.poll_max),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            with Channel.open_region(region, 0, policy) as channel:
                samples = sync_round_trips(channel, frame, args.runs, args.warmup)
                report("local <-> local process, sync", percentiles(samples))
                samples = await async_round_trips(channel, frame, args.runs, args.warmup)
                report("local <-> local process, async", percentiles(samples))
            child.wait(timeout=10)
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 round trips")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="bytes per frame")
    parser.add_argument("--capacity", type=int, default=64 << 10)
    parser.add_argument("--boots", type=int, default=1, help="guests to boot (timed)")
    parser.add_argument(
        "--no-doorbell",
        dest="doorbell",
        action="store_false",
        help="skip the guest that rings the host after every reply (one more boot)",
    )
    parser.add_argument("--spin", type=float, default=WaitPolicy().spin, help="both sides")
    parser.add_argument("--poll-min", type=float, default=WaitPolicy().poll_min)
    parser.add_argument("--poll-max", type=float, default=WaitPolicy().poll_max)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup = 300, 50
    print(
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.size}-byte frames, "
        f"polling (no doorbell), spin {args.spin * 1e6:g} us, "
        f"poll {args.poll_min * 1e6:g}..{args.poll_max * 1e6:g} us; "
        "round trips in us"
    )

    def report(what: str, figures: str) -> None:
        print(f"{what:<44} {figures}", flush=True)

    async def both() -> None:
        await run_guest(args, report)
        await run_local(args, report)

    anyio.run(both)


if __name__ == "__main__":
    main()
