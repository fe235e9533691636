"""`mkctl bus capture FILE` and `mkctl bus replay FILE`: the monitor's frames, kept and re-read.

`capture` writes what the monitor sees as pcapng (`_pcapng`), which Wireshark and tshark open
(with docs/wireshark/multikernel.lua for our envelope); `replay` reads a capture back and shows
it exactly as `bus monitor` shows frames live (the same filters, `-o json`), so a capture taken
on a host can be examined anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl import _pcapng
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._frames import Names, show
from multikernel.endpoints.mkctl._monitor import KINDS, frame_filter, print_frame
from multikernel.endpoints.mkctl._output import output_options, settings
from multikernel.protocol import MonitorRecord, subject_matches, validate_pattern


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("patterns", nargs=-1)
@click.option("--limit", type=int, default=0, help="Stop after this many frames.")
@click.option("--timeout", type=float, default=0.0, help="Stop after this many seconds.")
def capture(file: Path, patterns: tuple[str, ...], limit: int, timeout: float) -> int:
    """Write the frames whose subject matches PATTERN (default: all) to FILE as pcapng."""
    for pattern in patterns:
        validate_pattern(pattern)
    hub_pattern = patterns[0] if len(patterns) == 1 else ">"

    async def work(ep: Endpoint) -> int:
        names = Names()
        names.learn(await ep.introspect())
        offset = time.time_ns() - time.monotonic_ns()
        with file.open("wb") as out:
            writer = _pcapng.Writer(out, names.context())
            with anyio.CancelScope() as scope:
                if timeout:
                    scope.deadline = anyio.current_time() + timeout
                async with ep.monitor(hub_pattern) as records:
                    click.echo(f"capturing to {file} (Ctrl-C stops)", err=True)
                    record: MonitorRecord
                    async for record in records:
                        if patterns and not _matches(record, patterns):
                            continue
                        writer.write(record, record.ts_ns + offset)
                        if limit and writer.count >= limit:
                            scope.cancel()
        click.echo(f"captured {writer.count} frames to {file}", err=True)
        return 0

    return with_bus(work)


def _matches(record: MonitorRecord, patterns: tuple[str, ...]) -> bool:
    try:
        from multikernel.protocol import decode_header

        subject = decode_header(record.frame).subject
    except Exception:
        return False
    subjects = [subject, f"{record.service}.{subject}"] if record.service else [subject]
    return any(s and subject_matches(p, s) for p in patterns for s in subjects)


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("patterns", nargs=-1)
@click.option("--sender", multiple=True, help="Only frames from this endpoint (name or id).")
@click.option("--kind", type=click.Choice(KINDS), multiple=True, help="Only frames of this kind.")
@click.option("--service", multiple=True, help="Only requests to and replies of this service.")
@click.option("--heartbeats", is_flag=True, help="Show heartbeats too (hidden by default).")
@click.option("--limit", type=int, default=0, help="Stop after this many frames.")
@output_options
def replay(
    file: Path,
    patterns: tuple[str, ...],
    sender: tuple[str, ...],
    kind: tuple[str, ...],
    service: tuple[str, ...],
    heartbeats: bool,
    limit: int,
) -> int:
    """Show a capture's frames as `bus monitor` shows them live (no hub needed)."""
    wanted = frame_filter(patterns, sender, kind, service, heartbeats)
    with file.open("rb") as source:
        context, records = _pcapng.read(source)
    names = Names.from_context(context)
    shown = 0
    for wall_ns, record in records:
        frame = show(record, names, wall_ns - record.ts_ns)
        if wanted(frame):
            print_frame(frame, settings().machine)
            shown += 1
            if limit and shown >= limit:
                break
    return 0
