"""`mkctl bus monitor [PATTERN...]`: the frames on the bus as they pass, decoded (privileged).

The hub copies every frame it routes, and every frame on a direct channel (endpoints mirror them
while a monitor is on), to a monitoring endpoint. Each is shown with its wall-clock and monotonic
times, path, kind, sender and receiver by name, subject and decoded body (`_frames`). Heartbeats
are hidden unless asked for; `--sender`, `--kind` and `--service` filter; `--limit` and
`--timeout` end it; `-o json` prints one object a line.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import anyio
import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._frames import Names, Shown, show
from multikernel.endpoints.mkctl._output import output_options, settings
from multikernel.protocol import MonitorRecord, subject_matches, validate_pattern

KINDS = ("publish", "request", "reply", "error", "control")


def frame_filter(
    patterns: tuple[str, ...],
    senders: tuple[str, ...],
    kinds: tuple[str, ...],
    services: tuple[str, ...],
    heartbeats: bool,
) -> Callable[[Shown], bool]:
    """Whether a frame passes the monitor's filters (shared with `bus replay`)."""
    for pattern in patterns:
        validate_pattern(pattern)

    def wanted(frame: Shown) -> bool:
        if frame.heartbeat and not heartbeats:
            return False
        if kinds and frame.kind not in kinds:
            return False
        if services and frame.service not in services:
            return False
        if senders and not any(_is(frame.source, who) for who in senders):
            return False
        subjects = [frame.subject]
        if frame.service and frame.subject:
            subjects.append(f"{frame.service}.{frame.subject}")
        return not patterns or any(
            subject and subject_matches(p, subject) for p in patterns for subject in subjects
        )

    return wanted


def _is(shown: str, who: str) -> bool:
    """`shown` is "name(id)" or "id"; `who` a name or an id."""
    name, _, rest = shown.partition("(")
    return who in (name, rest.rstrip(")"), shown)


def print_frame(frame: Shown, as_json: bool) -> None:
    text = json.dumps(frame.record(), default=str) if as_json else frame.line()
    click.echo(text)


@click.command()
@click.argument("patterns", nargs=-1)
@click.option("--sender", multiple=True, help="Only frames from this endpoint (name or id).")
@click.option("--kind", type=click.Choice(KINDS), multiple=True, help="Only frames of this kind.")
@click.option("--service", multiple=True, help="Only requests to and replies of this service.")
@click.option("--heartbeats", is_flag=True, help="Show heartbeats too (hidden by default).")
@click.option("--limit", type=int, default=0, help="Stop after this many frames.")
@click.option("--timeout", type=float, default=0.0, help="Stop after this many seconds.")
@output_options
def monitor(
    patterns: tuple[str, ...],
    sender: tuple[str, ...],
    kind: tuple[str, ...],
    service: tuple[str, ...],
    heartbeats: bool,
    limit: int,
    timeout: float,
) -> int:
    """Watch frames whose subject matches PATTERN (default: all), decoded (privileged)."""
    wanted = frame_filter(patterns, sender, kind, service, heartbeats)
    as_json = settings().machine
    hub_pattern = patterns[0] if len(patterns) == 1 else ">"

    async def work(ep: Endpoint) -> int:
        names = Names()
        names.learn(await ep.introspect())
        offset = time.time_ns() - time.monotonic_ns()
        shown = 0
        learned = 0.0
        with anyio.CancelScope() as scope:
            if timeout:
                scope.deadline = anyio.current_time() + timeout
            async with ep.monitor(hub_pattern) as records:
                click.echo(f"monitoring {' '.join(patterns) or '>'} (Ctrl-C stops)", err=True)
                record: MonitorRecord
                async for record in records:
                    if not names.knows(record) and anyio.current_time() - learned > 0.5:
                        learned = anyio.current_time()  # a newcomer: ask who it is (bounded)
                        names.learn(await ep.introspect())
                    frame = show(record, names, offset)
                    if not wanted(frame):
                        continue
                    print_frame(frame, as_json)
                    shown += 1
                    if limit and shown >= limit:
                        scope.cancel()
        return 0

    with contextlib.suppress(BrokenPipeError):
        return with_bus(work)
    return 0
