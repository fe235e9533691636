"""Cost of routing one subject with SubjectRouter, against a loop over all subscriptions.

For 10, 1 000 and 10 000 subscriptions of the shapes the hub sees (``mk.instance.<n>.state``
per instance, a few ``mk.instance.*.state`` watchers, one ``mk.>`` monitor, ``svc.<name>.<method>``
served by two queue-group members each, a ``svc.<name>.*`` tap per service), three variants
route subjects drawn from a fixed pool of 256 (``mk.instance.<n>.state`` and
``svc.<name>.<method>``):

- ``naive loop``: every subscription's pattern through ``subject_matches``, then one member per
  queue group in rotation (what a hub without an index does); the reference row;
- ``router hit``: ``SubjectRouter.match`` with its cache warm (the pool fits), the steady state;
- ``router miss``: ``SubjectRouter(cache_size=0)``, so every call validates the subject and walks
  the trie: the cost of a subject seen for the first time.

Variants run interleaved (A B C A B C ...) for several rounds, each round timing a batch after a
10% warm-up; the batch size is calibrated per variant so a batch takes about the same time.
The table gives ns per routed subject as the median over rounds with min-max, the CPU time per
call, and the ratio of medians to the naive loop of the same size. Rounds in which other processes
used a large share of the CPUs (from /proc/stat) are flagged. Before timing, the script checks that
the three variants choose the same plain keys and one member per group for every subject.
Usage: ``python benchmarks/bench_router.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from multikernel.bus._router import SubjectRouter
from multikernel.protocol import subject_matches

Sub = tuple[int, str, str | None]
POOL = 256


def _subscriptions(count: int) -> tuple[list[Sub], int, int]:
    """``count`` subscriptions of realistic shapes; also the numbers of instances and services."""
    instances = max(1, count * 2 // 5)
    services = max(1, count // 40)
    shapes: list[tuple[str, str | None]] = [("mk.>", None)]
    shapes += [("mk.instance.*.state", None)] * max(1, count // 100)
    shapes += [(f"mk.instance.{n}.state", None) for n in range(instances)]
    for s in range(services):
        shapes.append((f"svc.s{s}.*", None))
        for method in ("get", "put", "list", "watch"):
            shapes += [(f"svc.s{s}.{method}", f"svc-s{s}")] * 2
    while len(shapes) < count:  # pad with more instances' state subscriptions
        shapes.append((f"mk.instance.{instances}.state", None))
        instances += 1
    return [(key, p, g) for key, (p, g) in enumerate(shapes[:count])], instances, services


def _subjects(instances: int, services: int) -> list[str]:
    rng = random.Random(1)
    subjects = []
    for index in range(POOL):
        if index % 2:
            subjects.append(f"mk.instance.{rng.randrange(instances)}.state")
        else:
            method = rng.choice(("get", "put", "list", "watch"))
            subjects.append(f"svc.s{rng.randrange(services)}.{method}")
    return subjects


def _naive(subscriptions: list[Sub]) -> Callable[[str], list[int]]:
    turns: dict[str, int] = {}

    def match(subject: str) -> list[int]:
        found: list[int] = []
        groups: dict[str, list[int]] = {}
        for key, pattern, group in subscriptions:
            if subject_matches(pattern, subject):
                if group is None:
                    found.append(key)
                else:
                    groups.setdefault(group, []).append(key)
        for group, members in groups.items():
            turn = turns.get(group, 0)
            turns[group] = turn + 1
            found.append(members[turn % len(members)])
        return found

    return match


def _router(subscriptions: list[Sub], cache_size: int) -> Callable[[str], list[int]]:
    router: SubjectRouter[int] = SubjectRouter(cache_size=cache_size)
    for key, pattern, group in subscriptions:
        router.subscribe(key, pattern, group)
    return router.match


@dataclass
class Variant:
    name: str
    match: Callable[[str], list[int]]
    iterations: int = 0
    ns_per_op: list[float] = field(default_factory=list)
    cpu_per_op: list[float] = field(default_factory=list)


def _check(variants: list[Variant], subscriptions: list[Sub], subjects: list[str]) -> None:
    """Every variant returns the same plain keys and one member of the same groups."""
    groups = {key: group for key, _, group in subscriptions}

    def shape(found: list[int]) -> tuple[frozenset[int], list[str]]:
        plain = frozenset(k for k in found if groups[k] is None)
        return plain, sorted(g for k in found if (g := groups[k]) is not None)

    for subject in subjects:
        expected = shape(variants[0].match(subject))
        for variant in variants[1:]:
            assert shape(variant.match(subject)) == expected, (variant.name, subject)


def _batch(variant: Variant, subjects: list[str], iterations: int) -> tuple[int, int]:
    match, count = variant.match, len(subjects)
    cpu0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    for index in range(iterations):
        match(subjects[index % count])
    return time.perf_counter_ns() - t0, time.process_time_ns() - cpu0


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat; (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _run(variants: list[Variant], subjects: list[str], rounds: int, batch_ns: int) -> list[int]:
    """Calibrate, then interleave the variants for ``rounds`` rounds; return noisy rounds."""
    for variant in variants:
        elapsed, _ = _batch(variant, subjects, len(subjects))
        per_op = max(1.0, elapsed / len(subjects))
        variant.iterations = max(20, min(500_000, int(batch_ns / per_op)))
    noisy = []
    ncpu = os.cpu_count() or 1
    for index in range(rounds):
        busy0, total0 = _cpu_busy()
        own0, wall0 = time.process_time(), time.monotonic()
        for variant in variants:
            _batch(variant, subjects, max(1, variant.iterations // 10))  # warm-up, 10%
            elapsed, cpu = _batch(variant, subjects, variant.iterations)
            variant.ns_per_op.append(elapsed / variant.iterations)
            variant.cpu_per_op.append(cpu / variant.iterations)
        busy1, total1 = _cpu_busy()
        own, wall = time.process_time() - own0, time.monotonic() - wall0
        if total1 > total0 and wall > 0:
            others = (busy1 - busy0) / (total1 - total0) - own / (wall * ncpu)
            if others > 0.25:
                noisy.append(index)
    return noisy


def _print(title: str, variants: list[Variant], noisy: list[int], rounds: int) -> None:
    reference = statistics.median(variants[0].ns_per_op)
    print(f"\n{title}  ({rounds} rounds, noisy rounds: {noisy or 'none'})")
    print(
        f"{'variant':<14}{'calls':>9}{'median ns':>12}{'min-max ns':>21}{'cpu ns':>11}{'ratio':>9}"
    )
    for variant in variants:
        median = statistics.median(variant.ns_per_op)
        span = f"{min(variant.ns_per_op):.0f}-{max(variant.ns_per_op):.0f}"
        cpu = statistics.median(variant.cpu_per_op)
        print(
            f"{variant.name:<14}{variant.iterations:>9}{median:>12.0f}{span:>21}{cpu:>11.0f}"
            f"{median / reference:>8.4f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 9)
    batch_ns = 15_000_000 if args.quick else 150_000_000

    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        where = f"pinned to CPU {cpus[-1]}"
    else:
        where = "not pinned"
    print(
        f"bench_router: Python {sys.version.split()[0]}, one process {where}, "
        f"{POOL} subjects in rotation, ~{batch_ns // 1_000_000} ms per batch; "
        "ratio = median / naive loop's median"
    )
    for count in (10, 1_000, 10_000):
        subscriptions, instances, services = _subscriptions(count)
        subjects = _subjects(instances, services)
        variants = [
            Variant("naive loop", _naive(subscriptions)),
            Variant("router hit", _router(subscriptions, cache_size=4096)),
            Variant("router miss", _router(subscriptions, cache_size=0)),
        ]
        _check(variants, subscriptions, subjects)
        noisy = _run(variants, subjects, rounds, batch_ns)
        _print(f"{count} subscriptions, ns per routed subject", variants, noisy, rounds)


if __name__ == "__main__":
    main()
