"""`mkctl upgrade NAME... --image PATH` and its verbs: the upgrade actor's rollouts.

`mkctl upgrade web api --image ./v2` asks the host's `upgrade` service for a rollout and follows
it: a progress bar on a terminal, one JSON event per line otherwise (`UpgradeEvent`, then the
rollout's final `RolloutStatus`). It exits 0 when every instance was upgraded, 1 when one rolled
back (the error says at which step and why). Interrupting mkctl does not stop the rollout: it goes
on in the actor (`mkctl upgrade status`, `pause`). The other verbs: `status [ROLLOUT]`, `list`,
`history NAME`, `undo NAME [--to-revision N]`, `pause [ROLLOUT]`, `resume [ROLLOUT]`.
docs/upgrade.md.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import EXIT_FAILED, EXIT_NOT_FOUND, CommandError
from multikernel.endpoints.mkctl._instances import _complete_names
from multikernel.endpoints.mkctl._output import (
    Verbs,
    emit,
    output_options,
    settings,
    table,
    to_builtins,
)
from multikernel.protocol import (
    Deadlines,
    ListRollouts,
    NoRespondersError,
    RevisionHistory,
    RevisionsQuery,
    RolloutList,
    RolloutRef,
    RolloutStatus,
    StartRollout,
    UndoRollout,
    UpgradeEvent,
)

ENDED = ("done", "rolled-back", "failed")


class _Upgrade(Verbs):
    """`mkctl upgrade NAME...` runs a rollout; a known verb as the first word runs that verb."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["rollout", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Upgrade)
def upgrade() -> None:
    """Zero-downtime upgrades: mkctl upgrade NAME... --image PATH, and the verbs below."""


def _call(method: str, body: object, response: type) -> Any:
    return with_bus(lambda ep: _request(ep, method, body, response))


async def _request(ep: Endpoint, method: str, body: object, response: type) -> Any:
    try:
        return await ep.request("upgrade", method, body, response=response)
    except NoRespondersError:
        raise CommandError(
            "no upgrade actor on this host (was it started with --no-upgrade?)", EXIT_NOT_FOUND
        ) from None


def _deadline_options(command: Any) -> Any:
    for name, default, what in (
        ("start", 30.0, "create, load and start the successor"),
        ("freeze", 10.0, "the predecessor's calls to finish and its state to arrive"),
        ("restore", 10.0, "the successor to read the state"),
        ("health", 10.0, "the successor's health check to say ok"),
        ("hold", 30.0, "the names to be held, at most"),
        ("drain", 10.0, "the predecessor to stop before it is forced"),
    ):
        command = click.option(
            f"--{name}-timeout", name.replace("-", "_") + "_timeout",
            type=click.FloatRange(0.001, 3600), default=default, show_default=True,
            help=f"Seconds for {what}; past it the upgrade rolls back.",
        )(command)  # fmt: skip
    return command


def _deadlines(options: dict[str, float]) -> Deadlines:
    return Deadlines(**{key.removesuffix("_timeout"): value for key, value in options.items()})


@upgrade.command(short_help="Upgrade instances to an image (the default verb).")
@click.argument("names", nargs=-1, required=True, shell_complete=_complete_names)
@click.option("--image", required=True, help="The new image (a directory or an archive).")
@click.option(
    "--max-surge", type=click.IntRange(1, 64), default=1, show_default=True,
    help="Upgrade this many instances at once, each with a successor beside it.",
)  # fmt: skip
@click.option(
    "--max-unavailable", type=click.IntRange(0, 64), default=0, show_default=True,
    help="Upgrade this many in place at once (stopped first: downtime) when there is no room "
    "for a successor; 0 refuses that.",
)  # fmt: skip
@click.option("--detach", is_flag=True, help="Return once the rollout has started.")
@_deadline_options
@output_options
def rollout(
    names: tuple[str, ...], image: str, max_surge: int, max_unavailable: int, detach: bool,
    **deadlines: float,
) -> int:  # fmt: skip
    """Upgrade the instances NAMES to the image at PATH, MAX_SURGE at a time: a successor is
    started beside each, receives its state and its names at once, and the old one stops. A
    successor that does not start, restore or pass its health check in time is removed and the
    old one goes on, having lost nothing; the rollout stops there."""
    request = StartRollout(
        names, str(image), max_surge=max_surge, max_unavailable=max_unavailable,
        deadlines=_deadlines(deadlines),
    )  # fmt: skip
    return _follow("rollout", request, detach)


@upgrade.command(short_help="Upgrade an instance back to an earlier revision.")
@click.argument("name", shell_complete=_complete_names)
@click.option("--to-revision", type=click.IntRange(1), default=None, help="Default: the previous.")
@click.option("--detach", is_flag=True, help="Return once the rollout has started.")
@_deadline_options
@output_options
def undo(name: str, to_revision: int | None, detach: bool, **deadlines: float) -> int:
    """Upgrade NAME (any instance of its deployment) back to the image of an earlier revision
    (kept by the upgrade actor): a new revision, like any upgrade."""
    request = UndoRollout(name, to_revision or 0, deadlines=_deadlines(deadlines))
    return _follow("undo", request, detach)


def _follow(method: str, request: object, detach: bool) -> int:
    machine = settings().output in ("json", "yaml") or not sys.stdout.isatty()

    async def work(ep: Endpoint) -> RolloutStatus:
        async with (
            await ep.subscribe("mk.upgrade.>") as events,
            await ep.subscribe("mk.upgrades.*") as ends,
        ):
            status: RolloutStatus = await _request(ep, method, request, RolloutStatus)
            if detach:
                return status
            click.echo(f"rollout {status.rollout}: {', '.join(i.name for i in status.instances)}")
            return await _progress(events, ends, status, machine)

    status = with_bus(work)
    if detach:
        emit(status, lambda wide: click.echo(f"rollout {status.rollout} started"))
        return 0
    if not machine:
        _show_status(status)
    if status.outcome != "done":
        raise CommandError(
            f"rollout {status.rollout} {status.outcome}: {status.error}", EXIT_FAILED
        )
    return 0


async def _progress(events: Any, ends: Any, status: RolloutStatus, machine: bool) -> RolloutStatus:
    total = len(status.instances)
    final: list[RolloutStatus] = []

    async def wait_end(scope: anyio.CancelScope) -> None:
        async for message in ends:
            ended = message.decode(RolloutStatus)
            if ended.rollout == status.rollout:
                final.append(ended)
                scope.cancel()
                return

    bar = None if machine else _Bar(total)
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_end, tg.cancel_scope)
        async for message in events:
            event = message.decode(UpgradeEvent)
            if event.rollout != status.rollout:
                continue
            if bar is None:
                click.echo(json.dumps(to_builtins(event)))
            else:
                bar.update(event)
    if bar is not None:
        bar.close()
    if machine:
        click.echo(json.dumps(to_builtins(final[0])))
    return final[0]


class _Bar:
    """A progress bar on the terminal: instances done of all, and the step each is at."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=False
        )
        self.task = self.progress.add_task("upgrading", total=total)
        self.progress.start()

    def update(self, event: UpgradeEvent) -> None:
        text = f"{event.name}: {event.step} ({event.outcome})"
        if event.detail:
            text += f": {event.detail}"
        self.progress.update(self.task, completed=event.done, description=text)

    def close(self) -> None:
        self.progress.stop()


@upgrade.command(short_help="A rollout's instances: step, outcome, successor, time held.")
@click.argument("rollout", type=click.IntRange(0), default=0)
@output_options
def status(rollout: int) -> int:
    """A rollout (default: the newest): each instance's outcome, the step it is at or ended at,
    its successor and revision, how long its names were held, and its error."""
    found: RolloutStatus = _call("status", RolloutRef(rollout), RolloutStatus)
    emit(found, lambda wide: _show_status(found))
    return 0


def _show_status(status: RolloutStatus) -> None:
    click.echo(f"rollout {status.rollout}: {status.outcome}, image {status.image}")
    rows = [
        [i.name, i.outcome, i.step or "-", i.successor or "-", i.revision or "-", i.mode or "-",
         f"{i.held_ms:.1f}ms" if i.held_ms else "-", i.error or "-"]
        for i in status.instances
    ]  # fmt: skip
    table(["name", "outcome", "step", "successor", "rev", "mode", "held", "error"], rows)


@upgrade.command(name="list", short_help="The newest rollouts.")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
    help="At most this many rollouts (the newest).",
)  # fmt: skip
@output_options
def list_(limit: int) -> int:
    """The newest rollouts, oldest first: when, outcome, instances and image."""
    found: RolloutList = _call("list", ListRollouts(limit), RolloutList)

    def people(wide: bool) -> None:
        rows = [
            [r.rollout, _when(r.started_ns), r.outcome, ", ".join(i.name for i in r.instances),
             r.image]
            for r in found.rollouts
        ]  # fmt: skip
        table(["rollout", "started", "outcome", "instances", "image"], rows)

    emit(found, people)
    return 0


@upgrade.command(short_help="The revisions of an instance's deployment.")
@click.argument("name", shell_complete=_complete_names)
@output_options
def history(name: str) -> int:
    """The revisions of the deployment NAME belongs to (the line of instances that replaced one
    another by upgrades): each one's image version, digest, the instance that ran it, and the
    kept image `undo` loads."""
    found: RevisionHistory = _call("history", RevisionsQuery(name), RevisionHistory)

    def people(wide: bool) -> None:
        click.echo(f"deployment {found.deployment}")
        rows = [
            ["*" if r.current else "", r.revision, _when(r.created_ns), r.instance, r.version,
             r.digest[:19], r.image if wide else ""]
            for r in found.revisions
        ]  # fmt: skip
        table(["", "rev", "created", "instance", "version", "digest", "image"], rows)

    emit(found, people)
    return 0


@upgrade.command(short_help="Start no other upgrade of a rollout until resumed.")
@click.argument("rollout", type=click.IntRange(0), default=0)
@output_options
def pause(rollout: int) -> int:
    """Pause a rollout (default: the newest under way): upgrades under way finish, no other
    starts until `mkctl upgrade resume`."""
    found: RolloutStatus = _call("pause", RolloutRef(rollout), RolloutStatus)
    emit(found, lambda wide: click.echo(f"rollout {found.rollout}: {found.outcome}"))
    return 0


@upgrade.command(short_help="Go on with a paused rollout.")
@click.argument("rollout", type=click.IntRange(0), default=0)
@output_options
def resume(rollout: int) -> int:
    """Resume a paused rollout (default: the newest under way)."""
    found: RolloutStatus = _call("resume", RolloutRef(rollout), RolloutStatus)
    emit(found, lambda wide: click.echo(f"rollout {found.rollout}: {found.outcome}"))
    return 0


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "-"
