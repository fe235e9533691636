"""The `mkctl` command: its options, its verbs (one module per group), and what it does on error.

Click parses the command line; every verb is a function in a module of its group (`_host`,
`_instances`, `_bus`, ...). `main()` runs Click without letting it exit, so every error goes
through one place: a bad command line is `error: ...` with exit status 2, any other error the one
line and the exit status of `_errors`, with the traceback only under `--debug`.
"""

from __future__ import annotations

import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

from multikernel.endpoints.mkctl import (
    _bus,
    _completion,
    _exec,
    _fault,
    _host,
    _image,
    _instances,
    _logs,
    _resources,
    _upgrade,
)
from multikernel.endpoints.mkctl._errors import EXIT_CODES, EXIT_USAGE, error_line, exit_code
from multikernel.endpoints.mkctl._kerf import KERF_VERBS
from multikernel.endpoints.mkctl._output import Settings, Verbs, output_options


def _version() -> str:
    try:
        return version("multikernel")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class TopVerbs(Verbs):
    """mkctl's verbs, and kerf's names for some of them (`_kerf`; not listed in --help)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, KERF_VERBS.get(cmd_name, cmd_name))


_EPILOG = "Exit status: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())


@click.group(
    cls=TopVerbs,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EPILOG,
)
@click.version_option(_version(), "--version", prog_name="mkctl", message="%(prog)s %(version)s")
@click.option(
    "--socket",
    type=click.Path(path_type=Path),
    default=None,
    help="The hub's control socket (default: $MULTIKERNEL_BUS, else the standard path).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The host's state directory: pid file, logs (default: the socket's directory).",
)
@click.option("--debug", is_flag=True, help="On an error, also print the traceback.")
@output_options
@click.pass_context
def cli(ctx: click.Context, socket: Path | None, state_dir: Path | None, debug: bool) -> None:
    """Drive a multikernel host: its instances, its bus, its images.

    Every verb is a request to the host over its bus (found through $MULTIKERNEL_BUS or the
    standard socket path); `mkctl host up` starts one.
    """
    options = ctx.ensure_object(Settings)
    options.socket, options.state_dir, options.debug = socket, state_dir, debug


for command in (
    _host.host,
    *_instances.COMMANDS,
    _exec.exec_,
    _logs.logs,
    _fault.fault,
    _resources.resources,
    _upgrade.upgrade,
    _bus.bus,
    _image.image,
    _completion.completion,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run mkctl with `argv` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=argv, prog_name="mkctl", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        return 0
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "mkctl"
        click.echo(f"error: {where}: {exc.format_message()}\nsee: {where} --help", err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        return 130
    except Exception as exc:
        click.echo(error_line(exc), err=True)
        if "--debug" in argv:
            traceback.print_exception(exc, file=sys.stderr)
        return exit_code(exc)
    return int(result or 0)


def run() -> None:
    """The `mkctl` console script."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
