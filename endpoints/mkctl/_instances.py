"""The lifecycle verbs (`create, update, load, start, kill, delete, show`) and `exec`.

Each is one request to the `lifecycle` service (or, for `exec`, to the instance's agent); the
answer is shown as a table, or as JSON/YAML with `-o`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._output import emit, output_options, settings
from multikernel.endpoints.mkctl._show import instance_table, warn_once
from multikernel.protocol import (
    CpuSpec,
    CreateInstance,
    DeleteInstance,
    FaultStatusList,
    FaultStatusRequest,
    InstanceInfo,
    InstanceList,
    KillInstance,
    LoadImage,
    NoRespondersError,
    NotFoundError,
    RestartPolicy,
    ShowInstances,
    StartInstance,
    UpdateInstance,
    parse_cpus,
    parse_restart,
    parse_size,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Parsed(click.ParamType[T]):
    """An option value read by one of the protocol's parsers; its ValueError is the message."""

    def __init__(self, name: str, parse: Callable[[str], T]) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> T:
        if not isinstance(value, str):
            return value  # type: ignore[no-any-return]  # converted already
        try:
            return self.parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def parse_queues(text: str) -> tuple[str, ...]:
    """'net/eth0/rx-0,block/vda/mq-0' → those I/O queues; 'none' → give them all back."""
    text = text.strip()
    if text == "none":
        return ()
    names = tuple(q.strip() for q in text.split(","))
    if not all(names):
        raise ValueError(f"not a queue list: {text!r} (e.g. net/eth0/rx-0,net/eth0/tx-0)")
    return names


#: `--memory 256M|1.5G|2GiB|4096` (0 refused: say nothing to keep it); `--cpus 2|@1|@0-3,6`;
#: `--queues a,b|none`; `--restart permanent,intensity=3,...` (docs/cli.md).
SIZE = Parsed("size", lambda text: parse_size(text, minimum=1))
CPUS = Parsed("cpus", parse_cpus)
QUEUES = Parsed("queues", parse_queues)
RESTART = Parsed("policy", parse_restart)


def _split(cpus: CpuSpec | None) -> tuple[tuple[int, ...], int]:
    """A spec as the lifecycle's (ids, count) fields."""
    return ((), 0) if cpus is None else (cpus.ids, cpus.count)


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Instance names from the host, for shell completion (nothing if no host answers)."""
    import anyio

    async def names(ep: Endpoint) -> list[str]:
        with anyio.move_on_after(1):
            listed = await ep.request("lifecycle", "show", ShowInstances(), response=InstanceList)
            return [i.name for i in listed.instances if i.name.startswith(incomplete)]
        return []

    try:
        return with_bus(names)
    except Exception:  # completion must never fail the shell
        return []


def name_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("name", shell_complete=_complete_names)(command)


def name_or_id(command: Callable[..., Any]) -> Callable[..., Any]:
    """NAME, or `--id N` as kerf says it: the instance whose id is N (docs/platform.md, "mkctl
    and kerf"). With --id, a word where NAME would be is the first of the verb's COMMAND."""

    @functools.wraps(command)
    def run(*args: Any, name: str | None, instance_id: int | None, **kwargs: Any) -> Any:
        if instance_id is not None:
            if name and "command" in kwargs:
                kwargs["command"] = (name, *kwargs["command"])
            elif name:
                raise click.UsageError(
                    f"give a name or --id, not both ({name!r}, --id {instance_id})"
                )
            name = instance_named(instance_id)
        elif not name:
            raise click.UsageError("missing the instance: NAME (or --id N)")
        return command(*args, name=name, **kwargs)

    run = click.argument("name", required=False, shell_complete=_complete_names)(run)
    return click.option(
        "--id", "instance_id", type=int, default=None, help="The instance by its id (kerf's --id)."
    )(run)


def instance_named(instance_id: int) -> str:
    """The name of the instance whose id is `instance_id` (`NotFoundError` if none has it)."""
    listed: InstanceList = _lifecycle("show", ShowInstances(""), InstanceList)
    for info in listed.instances:
        if info.id == instance_id:
            return info.name
    raise NotFoundError(f"no instance has id {instance_id} (mkctl show lists them)")


def _lifecycle(method: str, body: object, response: type = InstanceInfo) -> Any:
    async def work(ep: Endpoint) -> Any:
        return await ep.request("lifecycle", method, body, response=response)

    return with_bus(work)


def _show_one(info: InstanceInfo) -> int:
    emit(info, lambda wide: instance_table([info], wide))
    warn_once([info])
    return 0


_CPUS_HELP = "CPUs: a count (2) the resource actor places, or CPU ids (@1, @0-3,6)."
_MEMORY_HELP = "Memory: bytes, or with a unit (256M, 1.5G); granted in whole memory blocks."
_QUEUES_HELP = "I/O queues (net/eth0/rx-0,block/vda/mq-0; see mkctl resources); 'none': give back."
_RESTART_HELP = (
    "What the fault actor does when it fails: permanent, transient (default) or temporary, "
    "then ,KEY=VALUE (intensity, period, backoff, backoff_max, group, strategy) and ,standby; "
    "e.g. permanent,intensity=3,period=30,standby (docs/fault.md)."
)


class Aliased(click.Option):
    """An option with kerf's names as second names (`--cpus`, `-c`, `--cpu-count`); an error
    names it by ours alone."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return f"'{self.opts[0]}'"


def grant_options(cpus_help: str) -> Callable[[F], F]:
    """--cpus, --memory, --queues, --restart and the output options (create and update)."""

    def add(command: F) -> F:
        for option in reversed((
            click.option("--cpus", "-c", "--cpu-count", cls=Aliased, type=CPUS, help=cpus_help),
            click.option("--memory", "-m", cls=Aliased, type=SIZE, help=_MEMORY_HELP),
            click.option("--queues", type=QUEUES, default=None, help=_QUEUES_HELP),
            click.option("--restart", type=RESTART, default=None, help=_RESTART_HELP),
            output_options,
        )):  # fmt: skip
            command = option(command)
        return command

    return add


@click.command()
@name_argument
@grant_options(_CPUS_HELP + " Default with --memory: 1.")
def create(
    name: str,
    cpus: CpuSpec | None,
    memory: int | None,
    queues: tuple[str, ...] | None,
    restart: RestartPolicy | None,
) -> int:
    """Create an instance: ready at once when the resource actor grants what it asks."""
    ids, count = _split(cpus)
    request = CreateInstance(name, ids, count, memory or 0, restart or RestartPolicy(), queues)
    return _show_one(_lifecycle("create", request))


@click.command()
@name_or_id
@grant_options(_CPUS_HELP)
def update(
    name: str,
    cpus: CpuSpec | None,
    memory: int | None,
    queues: tuple[str, ...] | None,
    restart: RestartPolicy | None,
) -> int:
    """Change an instance's CPUs, memory or queues (live when it is active, acknowledged), or
    its restart policy."""
    ids, count = _split(cpus)
    request = UpdateInstance(name, ids, count, memory or 0, restart, queues)
    return _show_one(_lifecycle("update", request))


@click.command()
@name_argument
@click.option(
    "--image",
    required=True,
    type=click.Path(path_type=Path),
    help="The image: a directory or a .tar/.tar.gz archive.",
)
@output_options
def load(name: str, image: Path) -> int:
    """Verify an image's signature and load it into an instance."""
    return _show_one(_lifecycle("load", LoadImage(name, str(image.resolve()))))


PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.command(context_settings=PASS_THROUGH, short_help="Start a loaded instance.")
@name_or_id
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@output_options
def start(name: str, command: tuple[str, ...]) -> int:
    """Start a loaded instance: its agent, then its workload (-- CMD... replaces the entry)."""
    return _show_one(_lifecycle("start", StartInstance(name, strip_dashes(command))))


@click.command()
@name_or_id
@click.option("--force", "-f", is_flag=True, help="Skip the negotiated shutdown: kill at once.")
@click.option(
    "--grace", type=float, default=5.0, show_default=True, help="Seconds to wait for a clean halt."
)
@output_options
def kill(name: str, force: bool, grace: float) -> int:
    """Stop an instance: negotiated shutdown, then forced."""
    return _show_one(_lifecycle("kill", KillInstance(name, force, grace)))


@click.command()
@name_or_id
@output_options
def delete(name: str) -> int:
    """Forget a stopped instance and release what it holds."""
    info = _lifecycle("delete", DeleteInstance(name))
    emit(
        {"deleted": info.name, "id": info.id},
        lambda wide: click.echo(f"deleted instance {info.name} (id {info.id})"),
    )
    return 0


@click.command(short_help="Instances: state, resources, image, pid, restart policy.")
@click.argument("name", default="", shell_complete=_complete_names)
@click.option(
    "--id", "instance_id", type=int, default=None, help="The instance by its id (kerf's --id)."
)
@output_options
def show(name: str, instance_id: int | None) -> int:
    """Instances: state, resources, image, pid, restart policy (all, or the one named); -o wide
    adds the launch generation, restarts, why the last launch ended and the fault actor's view."""
    if instance_id is not None:
        name = instance_named(instance_id)
    wide = settings().output == "wide"

    async def work(ep: Endpoint) -> tuple[InstanceList, dict[str, str]]:
        listed = await ep.request("lifecycle", "show", ShowInstances(name), response=InstanceList)
        faults: dict[str, str] = {}
        if wide:  # the fault actor's state of each; a host without one shows "-"
            try:
                status = await ep.request(
                    "fault", "status", FaultStatusRequest(name), response=FaultStatusList
                )
            except (NoRespondersError, NotFoundError):
                status = FaultStatusList()
            faults = {f.name: f.state for f in status.instances}
        return listed, faults

    listed, faults = with_bus(work)
    infos = listed.instances

    def people(wide: bool) -> None:
        if not infos:
            click.echo("no instances; create one: mkctl create NAME --cpus 1 --memory 256M")
        else:
            instance_table(infos, wide, faults)

    emit(infos, people)
    warn_once(infos)
    return 0


def strip_dashes(command: tuple[str, ...]) -> tuple[str, ...]:
    return command[1:] if command[:1] == ("--",) else command


COMMANDS = (create, load, start, show, update, kill, delete)
