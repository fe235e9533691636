"""Cost of the protocol's encoding, against pickle and json, in one interleaved run.

Two experiments, single process (codec cost, no transport):

1. **encode+decode** of one typical request: a ``MemAdd`` resource request with subject,
   source, correlation and deadline. ``envelope`` is ``encode`` + ``decode`` (header and typed
   body); ``pickle`` and ``json`` encode and decode the equivalent dict (routing fields and body).
2. **routing decode**: what a hub must do to learn where a frame goes. ``envelope header`` is
   ``decode_header`` (one struct unpack + checks + subject); ``struct only`` is the bare
   ``unpack_from`` floor; pickle and json have no header, so the hub must load the whole message.

Variants run interleaved (A B C A B C …) for several rounds; each round times a batch and reports
ns per message. The table gives the median over rounds with min-max and the ratio of medians to
the reference row of the experiment. Rounds during which other processes used a large share of
the CPUs (from /proc/stat) are flagged. Usage: ``python benchmarks/bench_protocol.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from multikernel.protocol import (
    KERNEL_DECODER,
    Kind,
    MemAdd,
    ResourceOp,
    decode,
    decode_header,
    encode,
)
from multikernel.protocol._envelope import _HEADER

SUBJECT = "mk.resource.grant"
MESSAGE = MemAdd(instance=3, start_pfn=0x10_0000, nr_pages=32768, numa_node=1)
ROUTING = {"source": 7, "destination": 0, "correlation": 123_456, "deadline_ns": 987_654_321_000}
AS_DICT = {
    "kind": "request",
    "subject": SUBJECT,
    **ROUTING,
    "body": {
        "op": int(ResourceOp.MK_RES_MEM_ADD),
        "instance": 3,
        "start_pfn": 0x10_0000,
        "nr_pages": 32768,
        "numa_node": 1,
        "mem_type": 1,
    },
}


def _envelope_round_trip() -> object:
    frame = encode(Kind.REQUEST, MESSAGE, subject=SUBJECT, **ROUTING)
    return decode(frame, KERNEL_DECODER)


def _pickle_round_trip() -> object:
    return pickle.loads(pickle.dumps(AS_DICT, protocol=pickle.HIGHEST_PROTOCOL))


def _json_round_trip() -> object:
    return json.loads(json.dumps(AS_DICT, separators=(",", ":")).encode())


FRAME = encode(Kind.REQUEST, MESSAGE, subject=SUBJECT, **ROUTING)
PICKLED = pickle.dumps(AS_DICT, protocol=pickle.HIGHEST_PROTOCOL)
JSONED = json.dumps(AS_DICT, separators=(",", ":")).encode()
_unpack_from = _HEADER.unpack_from


def _route_envelope() -> object:
    return decode_header(FRAME)


def _route_struct_only() -> object:
    return _unpack_from(FRAME)


def _route_pickle() -> object:
    return pickle.loads(PICKLED)["subject"]


def _route_json() -> object:
    return json.loads(JSONED)["subject"]


@dataclass
class Variant:
    name: str
    run: Callable[[], object]
    size: int
    ns_per_op: list[float] = field(default_factory=list)
    cpu_per_op: list[float] = field(default_factory=list)


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat; (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _time_batch(variant: Variant, iterations: int) -> None:
    run = variant.run
    for _ in range(max(1, iterations // 10)):  # warm-up, 10%
        run()
    cpu0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    for _ in range(iterations):
        run()
    t1 = time.perf_counter_ns()
    cpu1 = time.process_time_ns()
    variant.ns_per_op.append((t1 - t0) / iterations)
    variant.cpu_per_op.append((cpu1 - cpu0) / iterations)


def _run(experiment: list[Variant], rounds: int, iterations: int) -> list[int]:
    """Interleave the variants for ``rounds`` rounds; return the indices of noisy rounds."""
    noisy = []
    ncpu = os.cpu_count() or 1
    for index in range(rounds):
        busy0, total0 = _cpu_busy()
        own0 = time.process_time()
        wall0 = time.monotonic()
        for variant in experiment:
            _time_batch(variant, iterations)
        busy1, total1 = _cpu_busy()
        own = time.process_time() - own0
        wall = time.monotonic() - wall0
        if total1 > total0 and wall > 0:
            others = (busy1 - busy0) / (total1 - total0) - own / (wall * ncpu)
            if others > 0.25:
                noisy.append(index)
    return noisy


def _print(title: str, experiment: list[Variant], noisy: list[int], rounds: int) -> None:
    reference = statistics.median(experiment[0].ns_per_op)
    print(f"\n{title}  ({rounds} rounds, noisy rounds: {noisy or 'none'})")
    print(
        f"{'variant':<18}{'bytes':>7}{'median ns':>11}{'min-max ns':>17}{'cpu ns':>9}{'ratio':>8}"
    )
    for variant in experiment:
        median = statistics.median(variant.ns_per_op)
        span = f"{min(variant.ns_per_op):.0f}-{max(variant.ns_per_op):.0f}"
        cpu = statistics.median(variant.cpu_per_op)
        ratio = median / reference
        print(
            f"{variant.name:<18}{variant.size:>7}{median:>11.0f}{span:>17}{cpu:>9.0f}{ratio:>7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 9)
    iterations = args.iterations or (3_000 if args.quick else 50_000)

    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        where = f"pinned to CPU {cpus[-1]}"
    else:
        where = "not pinned"
    print(
        f"bench_protocol: Python {sys.version.split()[0]}, one process {where}, "
        f"{iterations} messages per batch; ratio = median / first row's median"
    )

    round_trip = [
        Variant("envelope", _envelope_round_trip, len(FRAME)),
        Variant("pickle dict", _pickle_round_trip, len(PICKLED)),
        Variant("json dict", _json_round_trip, len(JSONED)),
    ]
    routing = [
        Variant("envelope header", _route_envelope, len(FRAME)),
        Variant("struct only", _route_struct_only, len(FRAME)),
        Variant("pickle full", _route_pickle, len(PICKLED)),
        Variant("json full", _route_json, len(JSONED)),
    ]
    noisy = _run(round_trip, rounds, iterations)
    _print("encode + decode of one MemAdd request", round_trip, noisy, rounds)
    noisy = _run(routing, rounds, iterations * 2)
    _print("routing decode (what the hub reads to route)", routing, noisy, rounds)


if __name__ == "__main__":
    main()
