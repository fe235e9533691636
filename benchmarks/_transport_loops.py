"""The measuring loops of `bench_transport.py`: one driver side and one peer side per phase.

Both processes run the same list of phases in order over one transport. Control messages are
1 byte long (payloads are never shorter than 8): MARK ends the warm-up (the first 10% of a phase's
time) and starts the timed part, END ends the phase, ACK answers END so the two sides stay in
lockstep. Each side measures its own CPU time (`time.process_time`, all threads) over the timed
part; the driver also measures latency per iteration and throughput from MARK to ACK.

Phases (dicts, so they travel as JSON to the peer):
    {"kind": "rtt", "name": ..., "size": 64, "gap": 0.0 | seconds, "dur": seconds}
    {"kind": "stream", "name": ..., "size": 64 | 4096, "batch": 1 | n, "dur": seconds}
    {"kind": "idle", "name": "idle", "dur": seconds}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from _transport_kinds import SAMPLE_ID0, Sample, sample_body

MARK, END, ACK = b"M", b"E", b"A"
CHUNK = 64  # per-message sends between two looks at the clock
WARMUP = 0.1

_now = time.perf_counter_ns
_cpu = time.process_time


class Codec:
    """Variant (b): a msgspec Struct encoded on one side and decoded (typed) on the other."""

    def __init__(self, size: int) -> None:
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode: Callable[[bytes], Sample] = msgspec.msgpack.Decoder(Sample).decode
        self.body = sample_body(size)

    def make(self, i: int) -> bytes:
        return self.encode(Sample(SAMPLE_ID0 + i, 0.5, self.body))


def percentile(sorted_ns: list[int], q: float) -> float:
    """The q-quantile (nearest rank) of sorted nanosecond samples, in microseconds."""
    if not sorted_ns:
        return float("nan")
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1e3


def _rtt_result(samples: list[int], cpu: float) -> dict[str, Any]:
    samples.sort()
    n = len(samples)
    return {
        "n": n,
        "p50": percentile(samples, 0.50),
        "p99": percentile(samples, 0.99),
        "cpu_us": cpu / n * 1e6 if n else float("nan"),
    }


def _stream_result(n: int, ns: int, cpu: float, size: int) -> dict[str, Any]:
    secs = ns / 1e9
    return {
        "n": n,
        "msgs": n / secs,
        "mbs": n * size / secs / 1e6,
        "cpu_us": cpu / n * 1e6 if n else float("nan"),
    }


def _expect(got: bytes, want: bytes) -> None:
    if got != want:
        raise RuntimeError(f"protocol out of step: expected {want!r}, got {got[:16]!r}")


# -- synchronous transports ------------------------------------------------------------------


def driver_phase(t: Any, ph: dict[str, Any], typed: bool) -> dict[str, Any]:
    kind = ph["kind"]
    if kind == "rtt":
        return _rtt_driver(t, ph, Codec(ph["size"]) if typed else None)
    if kind == "stream":
        return _stream_driver(t, ph, Codec(ph["size"]) if typed else None)
    time.sleep(ph["dur"])  # idle: the peer waits in receive meanwhile
    t.send(END)
    _expect(t.recv(), ACK)
    return {}


def peer_phase(t: Any, ph: dict[str, Any], typed: bool) -> dict[str, Any]:
    kind = ph["kind"]
    if kind == "rtt":
        return _rtt_peer(t, Codec(ph["size"]) if typed else None)
    if kind == "stream":
        return _stream_peer(t, ph, Codec(ph["size"]) if typed else None)
    c0, w0 = _cpu(), _now()
    _expect(t.recv(), END)
    c1, w1 = _cpu(), _now()
    t.send(ACK)
    return {"cpu_pct": (c1 - c0) / ((w1 - w0) / 1e9) * 100}


def _rtt_driver(t: Any, ph: dict[str, Any], codec: Codec | None) -> dict[str, Any]:
    send, recv = t.send, t.recv
    gap, dur = ph["gap"], int(ph["dur"] * 1e9)
    sleep = time.sleep
    msg = b"x" * ph["size"]
    i = 0
    warm_end = _now() + int(dur * WARMUP)
    while _now() < warm_end:
        if gap:
            sleep(gap)
        if codec is None:
            send(msg)
            recv()
        else:
            send(codec.make(i))
            codec.decode(recv())
        i += 1
    send(MARK)
    _expect(recv(), MARK)
    samples: list[int] = []
    append = samples.append
    c0 = _cpu()
    end = _now() + dur
    if codec is None:
        while True:
            if gap:
                sleep(gap)
            t0 = _now()
            if t0 >= end:
                break
            send(msg)
            recv()
            append(_now() - t0)
    else:
        make, decode = codec.make, codec.decode
        while True:
            if gap:
                sleep(gap)
            t0 = _now()
            if t0 >= end:
                break
            send(make(i))
            decode(recv())
            append(_now() - t0)
            i += 1
    c1 = _cpu()
    send(END)
    _expect(recv(), END)
    return _rtt_result(samples, c1 - c0)


def _rtt_peer(t: Any, codec: Codec | None) -> dict[str, Any]:
    send, recv = t.send, t.recv
    n = 0
    c0 = _cpu()
    while True:
        m = recv()
        if len(m) == 1:
            if m == MARK:
                c0, n = _cpu(), 0
            elif m == END:
                c1 = _cpu()
                send(m)
                break
            send(m)
            continue
        if codec is not None:
            m = codec.encode(codec.decode(m))
        send(m)
        n += 1
    return {"n": n, "cpu_us": (c1 - c0) / n * 1e6 if n else float("nan")}


def _stream_driver(t: Any, ph: dict[str, Any], codec: Codec | None) -> dict[str, Any]:
    send = t.send
    batch, dur, size = ph["batch"], int(ph["dur"] * 1e9), ph["size"]
    msg = b"x" * size

    def pump(until: int, i: int) -> int:
        if batch == 1 and codec is None:
            while _now() < until:
                for _ in range(CHUNK):
                    send(msg)
                i += CHUNK
        elif batch == 1 and codec is not None:
            make = codec.make
            while _now() < until:
                for j in range(i, i + CHUNK):
                    send(make(j))
                i += CHUNK
        elif codec is None:
            frames = [msg] * batch
            send_batch = t.send_batch
            while _now() < until:
                send_batch(frames)
                i += batch
        else:
            make = codec.make
            send_batch = t.send_batch
            while _now() < until:
                send_batch([make(j) for j in range(i, i + batch)])
                i += batch
        return i

    warm = pump(_now() + int(dur * WARMUP), 0)
    send(MARK)
    c0, t0 = _cpu(), _now()
    n = pump(t0 + dur, warm) - warm
    send(END)
    _expect(t.recv(), ACK)
    t1, c1 = _now(), _cpu()
    return _stream_result(n, t1 - t0, c1 - c0, size)


def _stream_peer(t: Any, ph: dict[str, Any], codec: Codec | None) -> dict[str, Any]:
    n = n0 = 0
    c0 = _cpu()
    decode = codec.decode if codec is not None else None
    if ph["batch"] == 1:
        recv = t.recv
        while True:
            m = recv()
            if len(m) == 1:
                if m == MARK:
                    c0, n0 = _cpu(), n
                    continue
                break
            if decode is not None:
                decode(m)
            n += 1
    else:
        recv_batch = t.recv_batch
        done = False
        while not done:
            for m in recv_batch():
                if len(m) == 1:
                    if m == MARK:
                        c0, n0 = _cpu(), n
                        continue
                    done = True
                    break
                if decode is not None:
                    decode(m)
                n += 1
    c1 = _cpu()
    t.send(ACK)
    n -= n0
    return {"n": n, "cpu_us": (c1 - c0) / n * 1e6 if n else float("nan")}


# -- asynchronous transports (anyio, run under uvloop) ------------------------------------------


async def driver_phase_async(t: Any, ph: dict[str, Any]) -> dict[str, Any]:
    import anyio

    kind = ph["kind"]
    if kind == "rtt":
        return await _rtt_driver_async(t, ph)
    if kind == "stream":
        return await _stream_driver_async(t, ph)
    await anyio.sleep(ph["dur"])
    await t.send(END)
    _expect(await t.recv(), ACK)
    return {}


async def peer_phase_async(t: Any, ph: dict[str, Any]) -> dict[str, Any]:
    kind = ph["kind"]
    if kind == "rtt":
        return await _rtt_peer_async(t)
    if kind == "stream":
        return await _stream_peer_async(t, ph)
    c0, w0 = _cpu(), _now()
    _expect(await t.recv(), END)
    c1, w1 = _cpu(), _now()
    await t.send(ACK)
    return {"cpu_pct": (c1 - c0) / ((w1 - w0) / 1e9) * 100}


async def _rtt_driver_async(t: Any, ph: dict[str, Any]) -> dict[str, Any]:
    import anyio

    send, recv = t.send, t.recv
    gap, dur = ph["gap"], int(ph["dur"] * 1e9)
    msg = b"x" * ph["size"]
    warm_end = _now() + int(dur * WARMUP)
    while _now() < warm_end:
        if gap:
            await anyio.sleep(gap)
        await send(msg)
        await recv()
    await send(MARK)
    _expect(await recv(), MARK)
    samples: list[int] = []
    append = samples.append
    c0 = _cpu()
    end = _now() + dur
    while True:
        if gap:
            await anyio.sleep(gap)
        t0 = _now()
        if t0 >= end:
            break
        await send(msg)
        await recv()
        append(_now() - t0)
    c1 = _cpu()
    await send(END)
    _expect(await recv(), END)
    return _rtt_result(samples, c1 - c0)


async def _rtt_peer_async(t: Any) -> dict[str, Any]:
    send, recv = t.send, t.recv
    n = 0
    c0 = _cpu()
    while True:
        m = await recv()
        if len(m) == 1:
            if m == MARK:
                c0, n = _cpu(), 0
            elif m == END:
                c1 = _cpu()
                await send(m)
                break
            await send(m)
            continue
        await send(m)
        n += 1
    return {"n": n, "cpu_us": (c1 - c0) / n * 1e6 if n else float("nan")}


async def _stream_driver_async(t: Any, ph: dict[str, Any]) -> dict[str, Any]:
    send = t.send
    batch, dur, size = ph["batch"], int(ph["dur"] * 1e9), ph["size"]
    msg = b"x" * size

    async def pump(until: int, i: int) -> int:
        if batch == 1:
            while _now() < until:
                for _ in range(CHUNK):
                    await send(msg)
                i += CHUNK
        else:
            frames = [msg] * batch
            send_batch = t.send_batch
            while _now() < until:
                await send_batch(frames)
                i += batch
        return i

    warm = await pump(_now() + int(dur * WARMUP), 0)
    await send(MARK)
    c0, t0 = _cpu(), _now()
    n = await pump(t0 + dur, warm) - warm
    await send(END)
    _expect(await t.recv(), ACK)
    t1, c1 = _now(), _cpu()
    return _stream_result(n, t1 - t0, c1 - c0, size)


async def _stream_peer_async(t: Any, ph: dict[str, Any]) -> dict[str, Any]:
    n = n0 = 0
    c0 = _cpu()
    if ph["batch"] == 1:
        recv = t.recv
        while True:
            m = await recv()
            if len(m) == 1:
                if m == MARK:
                    c0, n0 = _cpu(), n
                    continue
                break
            n += 1
    else:
        recv_batch = t.recv_batch
        done = False
        while not done:
            for m in await recv_batch():
                if len(m) == 1:
                    if m == MARK:
                        c0, n0 = _cpu(), n
                        continue
                    done = True
                    break
                n += 1
    c1 = _cpu()
    await t.send(ACK)
    n -= n0
    return {"n": n, "cpu_us": (c1 - c0) / n * 1e6 if n else float("nan")}
