"""`mkctl bus ...`: the bus inspector, against the running host's hub (found without flags).

`list`, `tree`, `introspect` and `stats` read one `BusSnapshot`; `monitor` (`_monitor`) watches
the frames, `top` (`_top`) the counters live; `bench` (`_bench`) measures; `call` and `pub` send
a JSON body to a service's method or a subject.
"""

from __future__ import annotations

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl import _bench, _capture, _monitor, _top
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import EXIT_NOT_FOUND, CommandError, parse_json
from multikernel.endpoints.mkctl._output import Verbs, console, dump, emit, output_options, table
from multikernel.endpoints.mkctl._signatures import schemas, signature
from multikernel.protocol import BusSnapshot, EndpointInfo


@click.group(cls=Verbs, short_help="The bus inspector: list, monitor, call, ...")
def bus() -> None:
    """Inspect and use the bus: list, tree, introspect, stats, monitor, capture, replay, top,
    bench, call, pub."""


def snapshot() -> BusSnapshot:
    async def work(ep: Endpoint) -> BusSnapshot:
        return await ep.introspect()

    return with_bus(work)


def rate(e: EndpointInfo) -> float:
    """Frames a second in and out, on average since it attached."""
    return (e.frames_in + e.frames_out) / e.age_s if e.age_s > 0 else 0.0


@bus.command("list")
@output_options
def list_() -> int:
    """Endpoints: names owned, instance, pid, subscriptions, rates."""
    snap = snapshot()

    def people(wide: bool) -> None:
        columns = ["id", "name", "instance", "pid", "names", "subs", "msgs/s"]
        if wide:
            columns += ["uid", "in", "out", "age", "subscriptions"]
        rows = []
        for e in snap.endpoints:
            row: list[object] = [e.endpoint_id, e.name, e.instance, e.pid]
            row += [",".join(e.names) or "-", len(e.subscriptions), f"{rate(e):.1f}"]
            if wide:
                row += [e.uid, e.frames_in, e.frames_out, f"{e.age_s:.0f}s"]
                row += [" ".join(e.subscriptions) or "-"]
            rows.append(row)
        table(columns, rows)

    emit(snap.endpoints, people)
    return 0


@bus.command()
@output_options
def tree() -> int:
    """Instances, their endpoints, the names and methods they serve, what they subscribe to."""
    from rich.tree import Tree

    snap = snapshot()
    services = {s.name: s for s in snap.services}
    instances: dict[int, list[EndpointInfo]] = {}
    for e in snap.endpoints:
        instances.setdefault(e.instance, []).append(e)

    def people(wide: bool) -> None:
        root = Tree(f"hub pid {snap.hub_pid}, up {snap.uptime_s:.0f} s")
        for instance in sorted(instances):
            branch = root.add(f"instance {instance}" + (" (host)" if instance == 0 else ""))
            for e in instances[instance]:
                node = branch.add(f"{e.name} (id {e.endpoint_id}, pid {e.pid})")
                for name in e.names:
                    service = services.get(name)
                    methods = service.methods if service else ()
                    owned = node.add(f"name {name}" + ("" if methods else " (no methods)"))
                    for method in methods:
                        owned.add(signature(method) if wide else method.name)
                for pattern in e.subscriptions:
                    node.add(f"sub {pattern}")
        console().print(root)

    emit(snap, people)
    return 0


@bus.command()
@click.argument("service", required=False)
@output_options
def introspect(service: str | None) -> int:
    """Services and their methods as signatures (their JSON schemas with -o json)."""
    snap = snapshot()
    found = [s for s in snap.services if service is None or s.name == service]
    if service is not None and not found:
        known = ", ".join(sorted(s.name for s in snap.services)) or "none"
        raise CommandError(f"no service {service!r} on the bus (known: {known})", EXIT_NOT_FOUND)
    owners = {name: line[0] for name, line in snap.names.items() if line}
    value = [
        {
            "name": s.name,
            "owner": owners.get(s.name, 0),
            "concurrency": s.concurrency,
            "methods": [schemas(m) for m in s.methods],
        }
        for s in found
    ]

    def people(wide: bool) -> None:
        for s in found:
            click.echo(f"{s.name} (owner {owners.get(s.name, '-')}, concurrency {s.concurrency})")
            for method in s.methods:
                click.echo(f"  {signature(method)}")

    emit(value, people)
    return 0


@bus.command()
@output_options
def stats() -> int:
    """Counters per endpoint (frames, bytes, drops, ring depth, wake-ups) and the hub's."""
    snap = snapshot()

    def people(wide: bool) -> None:
        columns = ["name", "in", "out", "bytes in", "bytes out", "dropped", "pending",
                   "ring", "ring full", "wakeups", "denied"]  # fmt: skip
        table(
            columns,
            [
                (
                    e.name,
                    e.frames_in,
                    e.frames_out,
                    e.bytes_in,
                    e.bytes_out,
                    e.dropped,
                    e.pending,
                    e.ring_depth,
                    e.ring_full,
                    e.wakeups,
                    e.denied,
                )
                for e in snap.endpoints
            ],
        )
        click.echo("hub: " + " ".join(f"{k}={v}" for k, v in snap.counters.items()))

    emit({"endpoints": snap.endpoints, "hub": snap.counters}, people)
    return 0


bus.add_command(_monitor.monitor)
bus.add_command(_capture.capture)
bus.add_command(_capture.replay)
bus.add_command(_top.top)
bus.add_command(_bench.bench)


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
    emit(answer, lambda wide: click.echo(dump(answer, "json")))
    return 0
