"""`mkctl image ...`: the image tool (keygen, sign, verify, pack), run by module name."""

from __future__ import annotations

import subprocess
import sys

import click


@click.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def image(args: tuple[str, ...]) -> int:
    """Keygen, sign, verify and pack images (mkctl image --help)."""
    return subprocess.call([sys.executable, "-m", "multikernel.services.images", *args])
