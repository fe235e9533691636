"""`mkctl host up | down | status`: the host process (hub + actors), started by module name.

`up` runs `python -m multikernel.services.host`, in the background (its log in the state dir)
unless `--foreground`; either way the host writes its pid file itself, so `down` stops a
foreground host as well as a background one: SIGTERM (the host stops its instances and drains
the bus), then SIGKILL if it has not ended within 30 s.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import (
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    CommandError,
    UsageError,
)
from multikernel.endpoints.mkctl._output import Verbs, emit, output_options, settings, warn
from multikernel.endpoints.mkctl._show import instance_table
from multikernel.protocol import InstanceList, ShowInstances, parse_cpus, parse_size


@click.group(cls=Verbs)
def host() -> None:
    """Start, stop or inspect the host (the bus hub and the actors)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _checked(parse: Callable[[str], object]) -> Callable[..., str | None]:
    """A click callback that refuses what `parse` refuses (with its message), keeping the text."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                parse(value)
            except ValueError as error:
                raise click.BadParameter(str(error), ctx, param) from None
        return value

    return check


@host.command()
@click.option("--foreground", is_flag=True, help="Run the host in this terminal (Ctrl-C stops it).")
@click.option(
    "--policy", type=click.Path(exists=True, dir_okay=False), help="Access policy (TOML)."
)
@click.option(
    "--trusted-keys",
    multiple=True,
    type=click.Path(exists=True),
    help="A certificate (or a directory of them) trusted to sign images; repeat for more.",
)
@click.option("--allow-unsigned", is_flag=True, help="Accept unsigned images (for development).")
@click.option(
    "--metrics",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT for Prometheus metrics (port 0: a free one; 'off': none).",
)
@click.option(
    "--no-isolation",
    is_flag=True,
    help="Instances get CPU affinity only: no namespaces, no cgroups.",
)
@click.option(
    "--socket-mode",
    default=None,
    help="Control socket mode, octal (default 0600: your user and root; docs/security.md).",
)
@click.option("--socket-group", default=None, help="Control socket group (a name or a gid).")
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0.01, max=3600),
    default=None,
    help="Seconds between the agents' heartbeats (default 1); a hang is found in about 3-4.",
)
@click.option(
    "--no-fault",
    is_flag=True,
    help="Run no fault actor: failed instances stay down (docs/fault.md).",
)
@click.option(
    "--no-upgrade",
    is_flag=True,
    help="Run no upgrade actor: mkctl upgrade is refused (docs/upgrade.md).",
)
@click.option(
    "--reserve-cpus",
    default=None,
    callback=_checked(lambda text: parse_cpus(text if text.startswith("@") else "@" + text)),
    help="CPUs the host keeps and never grants (@0, @0-1).",
)
@click.option(
    "--reserve-memory",
    default=None,
    callback=_checked(parse_size),
    help="Memory the host keeps and never grants (1G).",
)
@click.option(
    "--placement",
    default=None,
    help="Where grants go: pack (default: fill NUMA nodes in turn), spread, or module:attr.",
)
@click.option(
    "--cpu-share",
    type=click.IntRange(1, 64),
    default=None,
    help="Instances that may share one CPU (default 1: none share).",
)
@click.option(
    "--memory-bandwidth",
    type=click.IntRange(1, 100),
    default=None,
    metavar="PERCENT",
    help="Limit each instance's memory bandwidth (resctrl, where the machine has it).",
)
@click.option(
    "--elastic-max-cpus",
    type=click.IntRange(0),
    default=None,
    help="CPUs an instance may grow to by asking (default 0: what its operator granted).",
)
@click.option(
    "--elastic-max-memory",
    default=None,
    callback=_checked(parse_size),
    help="Memory an instance may grow to by asking (default 0: what its operator granted).",
)
@click.option(
    "--rebalance",
    is_flag=False,
    flag_value="pressure",
    default=None,
    metavar="[POLICY]",
    help="Resize grants by the instances' load: pressure (alone: the default) or module:attr.",
)
@click.option(
    "--platform",
    type=click.Choice(["local", "multikernel"]),
    default="local",
    show_default=True,
    help="What runs instances: process trees here, or kernels of their own (docs/platform.md).",
)
@click.option(
    "--kernfs",
    type=click.Path(),
    default=None,
    help="The multikernel file system (default /sys/fs/multikernel).",
)
@click.option(
    "--kernel",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The kernel instances boot, on the multikernel platform (vmlinux or bzImage).",
)
@click.option(
    "--initrd",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Their initrd, with multikernel's init (multikernel platform).",
)
@click.option("--cmdline", default=None, help="Their kernel command line (multikernel platform).")
def up(
    foreground: bool,
    policy: str | None,
    trusted_keys: tuple[str, ...],
    allow_unsigned: bool,
    metrics: str,
    no_isolation: bool,
    socket_mode: str | None,
    socket_group: str | None,
    heartbeat: float | None,
    no_fault: bool,
    no_upgrade: bool,
    reserve_cpus: str | None,
    reserve_memory: str | None,
    placement: str | None,
    cpu_share: int | None,
    memory_bandwidth: int | None,
    elastic_max_cpus: int | None,
    elastic_max_memory: str | None,
    rebalance: str | None,
    platform: str,
    kernfs: str | None,
    kernel: str | None,
    initrd: str | None,
    cmdline: str | None,
) -> int:
    """Start the host (in the background unless --foreground)."""
    if platform == "multikernel" and kernel is None:
        raise UsageError("--platform multikernel boots a kernel: give it with --kernel PATH")
    if platform == "local" and (kernfs or kernel or initrd or cmdline):
        raise UsageError(
            "--kernfs, --kernel, --initrd and --cmdline are for --platform multikernel"
        )
    options = settings()
    state, socket = options.state_path(), options.socket_path()
    pidfile = state / "host.pid"
    if (pid := _running(pidfile)) is not None:
        raise CommandError(
            f"a host is already running (pid {pid}); mkctl host down first", EXIT_REFUSED
        )
    command = [sys.executable, "-m", "multikernel.services.host", "--socket", str(socket)]
    command += ["--state-dir", str(state), "--pid-file", str(pidfile), "--metrics", metrics]
    if policy:
        command += ["--policy", policy]
    for key in trusted_keys:
        command += ["--trusted-keys", key]
    if allow_unsigned:
        command.append("--allow-unsigned")
    if no_isolation:
        command.append("--no-isolation")
    for flag, value in (
        ("--socket-mode", socket_mode),
        ("--socket-group", socket_group),
        ("--reserve-cpus", reserve_cpus),
        ("--reserve-memory", reserve_memory),
        ("--placement", placement),
        ("--cpu-share", None if cpu_share is None else str(cpu_share)),
        ("--memory-bandwidth", None if memory_bandwidth is None else str(memory_bandwidth)),
        ("--elastic-max-cpus", None if elastic_max_cpus is None else str(elastic_max_cpus)),
        ("--elastic-max-memory", elastic_max_memory),
        ("--rebalance", rebalance),
        ("--platform", platform if platform != "local" else None),
        ("--kernfs", kernfs),
        ("--kernel", kernel),
        ("--initrd", initrd),
        ("--cmdline", cmdline),
    ):
        if value is not None:
            command += [flag, value]
    if heartbeat is not None:
        command += ["--heartbeat", f"{heartbeat:g}"]
    if no_fault:
        command.append("--no-fault")
    if no_upgrade:
        command.append("--no-upgrade")
    if foreground:
        os.execv(sys.executable, command)  # the host takes over this process (and its pid)
    state.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    with (state / "host.log").open("ab") as log:
        proc = subprocess.Popen(
            [*command, "--ready-fd", str(write)],
            pass_fds=(write,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    os.close(write)
    with os.fdopen(read) as ready:
        line = ready.readline()  # EOF if the host died before it was ready
    if not line.startswith("ready"):
        proc.wait()
        raise CommandError(
            f"the host did not start (exit status {proc.returncode}); see {state / 'host.log'}"
        )
    click.echo(f"host up: pid {proc.pid}, socket {socket}, log {state / 'host.log'}")
    return 0


@host.command()
def down() -> int:
    """Stop the host: its instances are shut down, the bus drained."""
    pidfile = settings().state_path() / "host.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        raise CommandError(
            f"no host pid file at {pidfile}: is a host running? (mkctl host status)",
            EXIT_NOT_FOUND,
        ) from None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        click.echo(f"the host (pid {pid}) had already stopped")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)  # it stops its instances and drains the bus
        if not select.select([pidfd], [], [], 30)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)
    pidfile.unlink(missing_ok=True)
    click.echo(f"host down (pid {pid})")
    return 0


@host.command()
@output_options
def status() -> int:
    """Is a host up, and what does it run."""

    async def work(ep: Endpoint) -> int:
        snap = await ep.introspect()
        listed = await ep.request("lifecycle", "show", ShowInstances(), response=InstanceList)
        infos = listed.instances
        warnings = sorted({w for i in infos for w in i.warnings})
        metrics = _metrics_url(settings().state_path())
        summary = {
            "hub_pid": snap.hub_pid,
            "uptime_s": round(snap.uptime_s, 3),
            "socket": str(settings().socket_path()),
            "metrics": metrics,
            "endpoints": len(snap.endpoints),
            "instances": infos,
            "warnings": warnings,
        }

        def show(wide: bool) -> None:
            click.echo(
                f"host up {snap.uptime_s:.0f} s (pid {snap.hub_pid}), {len(snap.endpoints)} "
                f"endpoints, {len(infos)} instances, socket {settings().socket_path()}"
            )
            if metrics:
                click.echo(f"metrics {metrics}")
            if infos:
                instance_table(infos, wide)
            for warning in warnings:
                warn(warning)

        emit(summary, show)
        return 0

    return with_bus(work)


def _metrics_url(state: Path) -> str:
    """Where the host serves its metrics (it writes the address in its state dir), if it does."""
    try:
        return (state / "metrics").read_text().strip()
    except OSError:
        return ""
