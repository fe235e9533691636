"""`mkctl bus top`: the bus's counters, live, like top(1): refreshed every interval, `q` quits.

Each refresh reads a `BusSnapshot` and shows, per endpoint, the rates since the previous one
(frames and bytes a second) beside the totals that matter (drops, ring depth, ring-full events,
doorbell wake-ups). It is Rich's Live display on the terminal's alternate screen, so it works
over ssh like any terminal program; keys are read in cbreak mode and the terminal is restored
however it ends. Off a terminal (or with `--iterations`) it prints one table per refresh.
"""

from __future__ import annotations

import os
import sys
import termios
import tty
from typing import Any

import anyio
import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._output import console, dump, output_options, settings
from multikernel.protocol import BusSnapshot, EndpointInfo

COLUMNS = ("endpoint", "inst", "msgs/s in", "msgs/s out", "KiB/s in", "KiB/s out", "dropped",
           "pending", "ring", "ring full", "wakeups/s")  # fmt: skip


def render(snap: BusSnapshot, before: BusSnapshot | None, dt: float) -> Any:
    from rich.table import Table

    grid = Table(
        *COLUMNS,
        title=f"bus top: hub pid {snap.hub_pid}, up {snap.uptime_s:.0f} s, "
        f"{len(snap.endpoints)} endpoints; q quits",
        title_justify="left",
        box=None,
    )
    old = {e.endpoint_id: e for e in before.endpoints} if before else {}
    for e in sorted(snap.endpoints, key=lambda e: (e.instance, e.endpoint_id)):
        p = old.get(e.endpoint_id)

        def per_s(field: str, e: EndpointInfo = e, p: EndpointInfo | None = p) -> float:
            if p is None or dt <= 0:
                return 0.0
            return float(getattr(e, field) - getattr(p, field)) / dt

        grid.add_row(
            f"{e.name} ({e.endpoint_id})", str(e.instance),
            f"{per_s('frames_in'):.0f}", f"{per_s('frames_out'):.0f}",
            f"{per_s('bytes_in') / 1024:.1f}", f"{per_s('bytes_out') / 1024:.1f}",
            str(e.dropped), str(e.pending), str(e.ring_depth), str(e.ring_full),
            f"{per_s('wakeups'):.0f}",
        )  # fmt: skip
    return grid


@click.command()
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds per refresh.")
@click.option("--iterations", type=int, default=0, help="Stop after this many refreshes.")
@output_options
def top(interval: float, iterations: int) -> int:
    """The bus's counters, live (q quits)."""
    live = sys.stdout.isatty() and os.isatty(0) and not settings().machine and not iterations
    return with_bus(lambda ep: _run(ep, max(interval, 0.1), iterations, live))


async def _run(ep: Endpoint, interval: float, iterations: int, live: bool) -> int:
    if not live:
        before: BusSnapshot | None = None
        for _ in range(iterations or 1_000_000_000):
            snap = await ep.introspect()
            if settings().machine:
                click.echo(dump({"endpoints": snap.endpoints, "hub": snap.counters}, "json"))
            else:
                console().print(render(snap, before, interval))
            before = snap
            await anyio.sleep(interval)
        return 0
    from rich.live import Live

    saved = termios.tcgetattr(0)
    tty.setcbreak(0, termios.TCSANOW)
    try:
        snap = await ep.introspect()
        with Live(render(snap, None, interval), console=console(), screen=True) as display:
            async with anyio.create_task_group() as tg:

                async def keys() -> None:
                    while True:
                        await anyio.wait_readable(0)
                        if os.read(0, 32).lower().startswith(b"q") or not os.isatty(0):
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(keys)
                while True:
                    await anyio.sleep(interval)
                    before, snap = snap, await ep.introspect()
                    display.update(render(snap, before, interval))
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return 0
