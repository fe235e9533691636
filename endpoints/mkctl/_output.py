"""How mkctl shows what it read: `-o table|wide|json|yaml` (`--json` is `-o json`).

Tables are Rich tables, coloured only when stdout is a terminal (and $NO_COLOR is unset); off a
terminal they are plain text, never wrapped, so `grep` and `awk` see one row per line. JSON and
YAML are the messages themselves (msgspec's builtins), for scripts; they do not change with the
terminal. `wide` is the table with every column.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import click
import msgspec

from multikernel.endpoints.wire import default_socket_path

FORMATS: Final = ("table", "wide", "json", "yaml")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    """The options every verb shares (given before or, for the output format, after the verb)."""

    socket: Path | None = None
    state_dir: Path | None = None
    output: str = "table"
    debug: bool = False
    warned: set[str] = field(default_factory=set)

    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else default_socket_path()

    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.socket_path().parent

    @property
    def machine(self) -> bool:
        """JSON or YAML: output for programs."""
        return self.output in ("json", "yaml")


class Verbs(click.Group):
    """A group that lists its verbs in the order they were added, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def settings() -> Settings:
    """The current command's settings."""
    return click.get_current_context().ensure_object(Settings)


def _set_output(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value in (None, False):
        return
    ctx.ensure_object(Settings).output = "json" if param.name == "as_json" else str(value)


def output_options(command: F) -> F:
    """`-o FORMAT` and `--json` on a read verb (they may also come before the verb)."""
    command = click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=False,
        callback=_set_output,
        help="Same as -o json.",
    )(command)
    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        expose_value=False,
        callback=_set_output,
        help="Output format: table (default), wide (every column), json or yaml.",
    )(command)


def to_builtins(value: object) -> Any:
    return msgspec.to_builtins(value, builtin_types=(bytes,), str_keys=True)


def _default(value: object) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def dump(value: object, fmt: str) -> str:
    """`value` (a message, or builtins) as JSON or YAML text."""
    data = to_builtins(value)
    if fmt == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).rstrip("\n")
    return json.dumps(data, indent=2, default=_default)


def color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def console(stderr: bool = False) -> Any:
    """A Rich console: colour on a terminal only, no wrapping off one."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(
        file=stream,
        no_color=not tty or bool(os.environ.get("NO_COLOR")),
        force_terminal=tty,
        highlight=False,
        width=None if tty else 1000,
        soft_wrap=not tty,
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """Print a table (headers upper-cased), one line per row."""
    from rich.table import Table

    grid = Table(
        *(c.upper() for c in columns),
        box=None,
        pad_edge=False,
        show_edge=False,
        header_style="bold" if color() else "",
        title=title or None,
        title_justify="left",
    )
    for row in rows:
        grid.add_row(*(str(cell) for cell in row))
    if sys.stdout.isatty():
        console().print(grid)
        return
    from rich.console import Console

    plain = Console(file=io.StringIO(), width=1000, no_color=True, highlight=False)
    with plain.capture() as captured:
        plain.print(grid)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def emit(
    value: object, show: Callable[[bool], None], *, machine_value: object | None = None
) -> None:
    """Print `value` in the chosen format; `show(wide)` prints it for people."""
    fmt = settings().output
    if fmt in ("json", "yaml"):
        click.echo(dump(value if machine_value is None else machine_value, fmt))
    else:
        show(fmt == "wide")


def warn(text: str) -> None:
    """A one-line warning on stderr."""
    click.echo(f"warning: {text}", err=True)
