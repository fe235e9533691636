"""`mkctl bus ...`: the bus inspector, against the running host's hub.

`list`, `introspect` and `stats` read one `BusSnapshot`; `monitor` watches frames (privileged);
`call` and `pub` send a JSON body to a service's method or a subject.
"""

from __future__ import annotations

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import parse_json
from multikernel.endpoints.mkctl._output import Verbs, emit, output_options, table
from multikernel.protocol import BusSnapshot, decode_header


@click.group(cls=Verbs, short_help="The bus inspector: list, monitor, call, ...")
def bus() -> None:
    """Inspect and use the bus: list, introspect, stats, monitor, call, pub."""


def _snapshot() -> BusSnapshot:
    async def work(ep: Endpoint) -> BusSnapshot:
        return await ep.introspect()

    return with_bus(work)


@bus.command("list")
@output_options
def list_() -> int:
    """Endpoints: names owned, instance, pid, subscriptions."""
    snap = _snapshot()

    def people(wide: bool) -> None:
        columns = ["id", "name", "instance", "pid", "names", "subs"]
        if wide:
            columns += ["uid", "in", "out", "subscriptions"]
        rows = []
        for e in snap.endpoints:
            row: list[object] = [e.endpoint_id, e.name, e.instance, e.pid]
            row += [",".join(e.names) or "-", len(e.subscriptions)]
            if wide:
                row += [e.uid, e.frames_in, e.frames_out, " ".join(e.subscriptions) or "-"]
            rows.append(row)
        table(columns, rows)

    emit(snap.endpoints, people)
    return 0


@bus.command()
@output_options
def introspect() -> int:
    """Services and their methods (schemas with -o json)."""
    snap = _snapshot()

    def people(wide: bool) -> None:
        rows = [
            (service.name, method.name) for service in snap.services for method in service.methods
        ]
        table(("service", "method"), rows)

    emit(snap.services, people)
    return 0


@bus.command()
@output_options
def stats() -> int:
    """Counters per endpoint, and the hub's."""
    snap = _snapshot()

    def people(wide: bool) -> None:
        table(
            ("name", "in", "out", "dropped", "pending", "denied"),
            [
                (e.name, e.frames_in, e.frames_out, e.dropped, e.pending, e.denied)
                for e in snap.endpoints
            ],
        )
        click.echo(" ".join(f"{k}={v}" for k, v in snap.counters.items()))

    emit({"endpoints": snap.endpoints, "hub": snap.counters}, people)
    return 0


@bus.command()
@click.argument("pattern", default=">")
def monitor(pattern: str) -> int:
    """Watch the frames whose subject matches PATTERN (privileged)."""

    async def work(ep: Endpoint) -> int:
        async with ep.monitor(pattern) as records:
            async for record in records:
                header = decode_header(record.frame)
                click.echo(
                    f"{record.ts_ns / 1e9:.6f} {record.path:6} {header.kind.name:8} "
                    f"{record.source}->{record.destination} {header.subject} "
                    f"{header.body_len}B"
                )
        return 0

    return with_bus(work)


@bus.command()
@click.argument("subject")
@click.argument("body")
def pub(subject: str, body: str) -> int:
    """Publish BODY (JSON) on SUBJECT."""
    value = parse_json(body, "BODY")

    async def work(ep: Endpoint) -> int:
        await ep.publish(subject, value)
        return 0

    return with_bus(work)


@bus.command()
@click.argument("service")
@click.argument("method")
@click.argument("body", default="")
@output_options
def call(service: str, method: str, body: str) -> int:
    """Call METHOD of SERVICE with BODY (JSON) and print the answer."""
    value = parse_json(body, "BODY") if body else None

    async def work(ep: Endpoint) -> object:
        return await ep.request(service, method, value)

    answer = with_bus(work)
    emit(answer, lambda wide: click.echo(_json(answer)))
    return 0


def _json(value: object) -> str:
    from multikernel.endpoints.mkctl._output import dump

    return dump(value, "json")
