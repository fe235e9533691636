"""`mkctl logs NAME [-f] [--since WHEN] [--tail N]`: an instance's own output.

The host keeps each instance's output (its workload's stdout and stderr) apart from its own JSON
log, stamped with the time it arrived and rotated (`lifecycle.logs`). `-f` goes on printing new
lines until the instance's output ends (its workload exited, or it was stopped).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, cast

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import UsageError
from multikernel.endpoints.mkctl._instances import name_or_id
from multikernel.endpoints.mkctl._output import output_options, settings
from multikernel.protocol import LogLine, LogLines, ReadLogs

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> int:
    """'30s', '5m', '2h', '1d' ago, or an ISO time ('2026-11-30T05:00:00', local unless it
    says otherwise), as ns since the epoch."""
    now = time.time() if now is None else now
    if match := _DURATION.fullmatch(text.strip()):
        return int((now - float(match.group(1)) * _UNITS[match.group(2)]) * 1e9)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration (30s, 5m, 2h, 1d) nor a time "
            "(2026-11-30T05:00:00)"
        ) from None
    return max(0, min(int(when.timestamp() * 1e9), 2**64 - 1))


def _stamp(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9).astimezone().isoformat(timespec="milliseconds")


def _print(line: LogLine, timestamps: bool, as_json: bool) -> None:
    if as_json:
        text = json.dumps({"ts": _stamp(line.ts_ns), "ts_ns": line.ts_ns, "text": line.text})
    elif timestamps:
        text = f"{_stamp(line.ts_ns)} {line.text}"
    else:
        text = line.text
    sys.stdout.write(text + "\n")


@click.command()
@name_or_id
@click.option("-f", "--follow", is_flag=True, help="Go on printing new output until it ends.")
@click.option("--since", default=None, help="Only output newer than 30s, 5m, 2h, 1d or a time.")
@click.option("--tail", type=int, default=0, help="Only the last N lines.")
@click.option(
    "-t", "--timestamps", is_flag=True, help="Start each line with the time the host got it."
)
@output_options
def logs(name: str, follow: bool, since: str | None, tail: int, timestamps: bool) -> int:
    """An instance's own output (its workload's stdout and stderr); -o json: one object a line."""
    request = ReadLogs(name, parse_since(since) if since else 0, max(tail, 0), follow)
    as_json = settings().machine

    async def work(ep: Endpoint) -> int:
        stream: AsyncIterator[Any] = ep.request_stream(
            "lifecycle", "logs", request, response=LogLines
        )
        async for batch in cast(AsyncIterator[LogLines], stream):  # (Bus's T is too loose)
            for line in batch.lines:
                _print(line, timestamps, as_json)
            sys.stdout.flush()
        return 0

    return with_bus(work)
