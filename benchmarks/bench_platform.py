"""How long the local platform takes to start an instance and to take it down again (issue 5).

For each configuration, 20 runs (``--runs``) of: ``launch`` an instance whose agent is a minimal
Python program (``python -I -S -c`` that writes one line to stdout and sleeps), time until that
line arrives (launch → first output), then ``kill`` + ``reclaim`` and time until both returned
(kill → reclaimed: every process gone, every cgroup removed, every fd closed). Also shown: how long
``launch`` itself took (it returns once the agent has been exec'd).

Configurations: ``isolated`` (as root: PID/UTS/mount namespaces, cpuset and memory cgroups,
affinity), ``cgroups only`` (namespaces=False), ``affinity only`` (isolate=False, the non-root
path). Prints p50 / p90 / min / max in milliseconds; asserts nothing.
Usage: ``python benchmarks/bench_platform.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import anyio

from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import online_cpus
from multikernel.services._platform import LaunchSpec, Resources

AGENT = "import os, time; os.write(1, b'up\\n'); time.sleep(600)"
MEMORY = 64 * 2**20


async def one_run(platform: LocalPlatform, name: str) -> tuple[float, float, float]:
    read_fd, write_fd = os.pipe()
    try:
        spec = LaunchSpec(
            name=name,
            instance_id=1,
            argv=[sys.executable, "-I", "-S", "-c", AGENT],
            env={},
            pass_fds=(),
            resources=Resources(frozenset({max(online_cpus())}), MEMORY),
            stdout=write_fd,
        )
        with anyio.fail_after(10):
            started = time.perf_counter()
            instance = await platform.launch(spec)
            launched = time.perf_counter()
            os.close(write_fd)
            write_fd = -1
            await anyio.wait_readable(read_fd)
            assert os.read(read_fd, 16) == b"up\n"
            first_output = time.perf_counter()
            await platform.kill(instance)
            await platform.reclaim(instance)
            reclaimed = time.perf_counter()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return launched - started, first_output - started, reclaimed - first_output


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"p50 {statistics.median(ms):7.1f}  p90 {p90:7.1f}  min {ms[0]:7.1f}  max {ms[-1]:7.1f}"


async def main(runs: int) -> None:
    configurations = [
        ("isolated", LocalPlatform()),
        ("cgroups only", LocalPlatform(namespaces=False)),
        ("affinity only", LocalPlatform(isolate=False)),
    ]
    print(f"local platform, {runs} runs each, milliseconds; agent: python -I -S -c (one line)")
    for label, platform in configurations:
        caps = platform.capabilities()
        applied = [
            kind
            for kind, on in (
                ("namespaces", caps.namespaces),
                ("cpuset", caps.cpuset),
                ("memory", caps.memory_limit),
                ("affinity", caps.affinity),
            )
            if on
        ]
        results = [await one_run(platform, f"bench-{os.getpid()}-{i}") for i in range(runs)]
        print(f"\n{label} ({', '.join(applied)})")
        print(f"  launch returned       {summary([r[0] for r in results])}")
        print(f"  launch → first output {summary([r[1] for r in results])}")
        print(f"  kill → reclaimed      {summary([r[2] for r in results])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    anyio.run(main, parser.parse_args().runs)
