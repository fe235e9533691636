"""`mkctl fault status | history | policy`: what the fault actor sees and decides (docs/fault.md).

Each verb is one request to the host's `fault` service; a host started with `--no-fault` has none,
and the verbs say so (exit status 3). `policy NAME POLICY` stores a restart policy through the
fault actor (which has the lifecycle store it); `mkctl update NAME --restart POLICY` does the same
through the lifecycle directly.
"""

from __future__ import annotations

import time
from typing import Any

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import EXIT_NOT_FOUND, CommandError
from multikernel.endpoints.mkctl._instances import RESTART, _complete_names, name_argument
from multikernel.endpoints.mkctl._output import Verbs, emit, output_options, table
from multikernel.protocol import (
    FaultHistory,
    FaultStatusList,
    FaultStatusRequest,
    HistoryRequest,
    NoRespondersError,
    PolicyGet,
    PolicyInfo,
    PolicySet,
    RestartPolicy,
    format_restart,
)


@click.group(cls=Verbs)
def fault() -> None:
    """The fault actor: instances it watches, what happened to them, their restart policies."""


def _fault(method: str, body: object, response: type) -> Any:
    async def work(ep: Endpoint) -> Any:
        try:
            return await ep.request("fault", method, body, response=response)
        except NoRespondersError:
            raise CommandError(
                "no fault actor on this host (was it started with --no-fault?); failed "
                "instances stay down there",
                EXIT_NOT_FOUND,
            ) from None

    return with_bus(work)


def _seconds(value: float) -> str:
    return "-" if value < 0 else f"{value:.1f}s"


@fault.command(short_help="Per instance: watching, restarting or gave up; phi; last failure.")
@click.argument("name", default="", shell_complete=_complete_names)
@output_options
def status(name: str) -> int:
    """Per instance (all, or the one named): the fault actor's state (watching, restarting,
    gave-up, idle), its policy, generation, restarts (ever, and in the current period), the
    hang suspicion (phi, against its threshold), the age of its last heartbeat, its last failure."""
    listed: FaultStatusList = _fault("status", FaultStatusRequest(name), FaultStatusList)

    def people(wide: bool) -> None:
        if not listed.instances:
            click.echo("no instances")
            return
        columns = ["name", "id", "fault", "restart", "gen", "restarts", "recent", "phi",
                   "beat", "last failure"]  # fmt: skip
        rows = []
        for s in listed.instances:
            rows.append(
                [s.name, s.id, s.state, format_restart(s.policy), s.generation or "-",
                 s.restarts, s.recent, f"{s.phi:.2f}/{s.threshold:g}",
                 _seconds(s.last_heartbeat_age), s.last_failure or "-"]
            )  # fmt: skip
        table(columns, rows)

    emit(listed, people)
    return 0


@fault.command(short_help="The fault events: failed, restarting, recovered, gave-up.")
@click.argument("name", default="", shell_complete=_complete_names)
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
    help="At most this many events (the newest).",
)  # fmt: skip
@output_options
def history(name: str, limit: int) -> int:
    """The fault actor's events, oldest first (all instances, or the one named); kept across
    restarts of the actor and of the host."""
    found: FaultHistory = _fault("history", HistoryRequest(name, limit), FaultHistory)

    def people(wide: bool) -> None:
        if not found.events:
            click.echo("no fault events")
            return
        rows = []
        for e in found.events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time_ns / 1e9))
            extra = f"attempt {e.attempt}, after {e.delay:g}s" if e.event == "restarting" else ""
            detail = "; ".join(part for part in (extra, e.detail) if part)
            rows.append([when, e.name, e.event, e.cause or "-", e.generation or "-", detail or "-"])
        table(["time", "name", "event", "cause", "gen", "detail"], rows)

    emit(found, people)
    return 0


@fault.command(short_help="Show or set an instance's restart policy.")
@name_argument
@click.argument("policy", type=RESTART, required=False)
@output_options
def policy(name: str, policy: RestartPolicy | None) -> int:
    """Show the instance's restart policy, or set it to POLICY (MODE[,KEY=VALUE...][,standby],
    e.g. permanent,intensity=3,period=30): used from its next failure on."""
    if policy is None:
        info: PolicyInfo = _fault("policy_get", PolicyGet(name), PolicyInfo)
    else:
        info = _fault("policy_set", PolicySet(name, policy), PolicyInfo)
    emit(info, lambda wide: table(["name", "restart"], [[info.name, format_restart(info.policy)]]))
    return 0
