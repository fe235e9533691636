"""`mkctl resources`: the host's pool, who holds what, what is free, and every transaction.

Each verb is one request to the `resource` service (docs/resources.md); `-o json`/`-o yaml` print
its answer as it came (`PoolInfo`, `GrantList`, `History`), tables are for people.
"""

from __future__ import annotations

import datetime
from typing import Any

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._output import Verbs, emit, output_options, table
from multikernel.protocol import (
    Grant,
    GrantList,
    GrantsQuery,
    History,
    HistoryQuery,
    PoolInfo,
    PoolQuery,
    TxRecord,
    format_cpu_list,
    format_size,
)


def _resource(method: str, body: object, response: type) -> Any:
    async def work(ep: Endpoint) -> Any:
        return await ep.request("resource", method, body, response=response)

    return with_bus(work)


def _cpus(ids: tuple[int, ...]) -> str:
    return format_cpu_list(ids) or "-"


def _summary(pool: PoolInfo) -> list[tuple[str, str, str, str]]:
    """(what, total, held, free) for CPUs, memory and queues."""
    reserved = sum(1 for c in pool.cpus if c.reserved)
    pooled = len(pool.cpus) - reserved
    held_queues = sum(1 for q in pool.queues if q.holder)
    held_memory = pool.memory_total - pool.memory_free
    return [
        ("cpus", str(pooled), str(pooled - len(pool.free_cpus)), _cpus(pool.free_cpus)),
        (
            "memory",
            format_size(pool.memory_total),
            format_size(held_memory),
            format_size(pool.memory_free),
        ),
        ("queues", str(len(pool.queues)), str(held_queues), str(len(pool.queues) - held_queues)),
    ]


@click.group(cls=Verbs, invoke_without_command=True, short_help="The pool, grants, history.")
@output_options
@click.pass_context
def resources(ctx: click.Context) -> int | None:
    """The host's pool of CPUs, memory and I/O queues: what is free and who holds what.

    Without a verb: what is free, then every grant (`mkctl resources free`, `grants`).
    """
    if ctx.invoked_subcommand is not None:
        return None
    pool = _resource("pool", PoolQuery(), PoolInfo)
    grants = _resource("grants", GrantsQuery(), GrantList).grants

    def people(wide: bool) -> None:
        table(("", "total", "held", "free"), _summary(pool))
        click.echo()
        _grant_table(grants, wide)

    emit(pool, people, machine_value={"pool": pool, "grants": grants})
    return 0


@resources.command()
@output_options
def pool() -> int:
    """Every CPU (NUMA node, core, siblings, holder), memory and I/O queue of the pool."""
    info: PoolInfo = _resource("pool", PoolQuery(), PoolInfo)

    def people(wide: bool) -> None:
        rows = [
            (
                c.id,
                c.node,
                c.core,
                _cpus(c.siblings),
                "host (reserved)" if c.reserved else ",".join(c.holders) or "free",
            )
            for c in info.cpus
        ]
        table(("cpu", "node", "core", "siblings", "holder"), rows)
        kept = info.memory_reserved
        click.echo(
            f"\nmemory: {format_size(info.memory_total)} in "
            f"{format_size(info.memory_block)} blocks, {format_size(info.memory_free)} free"
            + (f", {format_size(kept)} kept for the host" if kept else "")
        )
        click.echo(
            f"policy: {info.policy}; instances per CPU: {info.cpu_share}; "
            f"transactions pending: {info.pending}"
        )
        if info.queues:
            click.echo()
            queues = [(q.name, q.kind, q.device or "-", q.node, q.holder or "free")
                      for q in info.queues]  # fmt: skip
            table(("queue", "kind", "device", "node", "holder"), queues)

    emit(info, people)
    return 0


@resources.command()
@output_options
def free() -> int:
    """What is free: CPUs, memory and queues no instance holds."""
    info: PoolInfo = _resource("pool", PoolQuery(), PoolInfo)
    queues = tuple(q.name for q in info.queues if not q.holder)
    free_view = {"cpus": info.free_cpus, "memory": info.memory_free, "queues": queues}

    def people(wide: bool) -> None:
        click.echo(f"cpus: {_cpus(info.free_cpus)}")
        click.echo(f"memory: {format_size(info.memory_free)}")
        click.echo(f"queues: {', '.join(queues) or '-'}")

    emit(free_view, people)
    return 0


def _grant_table(grants: tuple[Grant, ...], wide: bool) -> None:
    if not grants:
        click.echo("no grants; mkctl create NAME --cpus 1 --memory 256M asks for one")
        return
    columns: tuple[str, ...] = ("instance", "id", "cpus", "memory", "queues", "nodes", "tx")
    if wide:
        columns += ("blocks", "applied by")
    rows = []
    for g in grants:
        row: list[object] = [
            g.instance,
            g.instance_id,
            _cpus(g.cpus),
            format_size(g.memory),
            ",".join(g.queues) or "-",
            _cpus(g.numa_nodes),
            g.tx,
        ]
        if wide:
            row += [len(g.memory_blocks), g.applied_by or "-"]
        rows.append(row)
    table(columns, rows)


@resources.command()
@click.argument("instance", default="")
@output_options
def grants(instance: str) -> int:
    """What each instance holds (all, or the one named), as of its last transaction."""
    found: GrantList = _resource("grants", GrantsQuery(instance), GrantList)
    emit(found.grants, lambda wide: _grant_table(found.grants, wide))
    return 0


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]


def _change(record: TxRecord) -> str:
    """'CPUs 1 -> 1-2, 128 MiB -> 256 MiB' (what moved)."""
    before, after = record.before, record.after
    parts = []
    old_cpus = _cpus(before.cpus) if before else "-"
    new_cpus = _cpus(after.cpus) if after else "-"
    if old_cpus != new_cpus:
        parts.append(f"CPUs {old_cpus} -> {new_cpus}")
    old_mem = format_size(before.memory) if before else "-"
    new_mem = format_size(after.memory) if after else "-"
    if old_mem != new_mem:
        parts.append(f"{old_mem} -> {new_mem}")
    old_q = ",".join(before.queues) if before else ""
    new_q = ",".join(after.queues) if after else ""
    if old_q != new_q:
        parts.append(f"queues {old_q or '-'} -> {new_q or '-'}")
    return ", ".join(parts) or "no change"


@resources.command()
@click.argument("instance", default="")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="At most this many.",
)
@click.option("--before", type=click.IntRange(0), default=0, help="Older than this tx id.")
@output_options
def history(instance: str, limit: int, before: int) -> int:
    """Transactions, newest first: each grant, revoke and release, its acks and its outcome."""
    found: History = _resource("history", HistoryQuery(instance, limit, before), History)

    def people(wide: bool) -> None:
        if not found.transactions:
            click.echo("no transactions")
            return
        columns: tuple[str, ...] = ("tx", "instance", "kind", "state", "change", "acks", "started")
        if wide:
            columns += ("ms", "reason")
        rows = []
        for r in found.transactions:
            acks = ",".join(str(a.result) for a in r.acks) or "-"
            row: list[object] = [r.tx, r.instance, r.kind, r.state, _change(r), acks]
            row.append(_when(r.started))
            if wide:
                took = (r.finished - r.started) * 1000 if r.finished else 0.0
                row += [f"{took:.1f}", r.reason or "-"]
            elif r.reason and r.state != "committed":
                row[3] = f"{r.state}: {r.reason}"
            rows.append(row)
        table(columns, rows)
        if found.next_before:
            click.echo(f"older: mkctl resources history {instance} --before {found.next_before}")

    emit(found, people)
    return 0
