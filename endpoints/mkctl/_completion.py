"""`mkctl completion bash|zsh|fish`: the shell's completion script (Click's), to source.

eval "$(mkctl completion bash)"            # ~/.bashrc
mkctl completion fish > ~/.config/fish/completions/mkctl.fish
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the completion script for SHELL (bash, zsh or fish)."""
    cls = get_completion_class(shell)
    assert cls is not None  # the choice allows only shells Click completes
    root = click.get_current_context().find_root().command
    click.echo(cls(root, {}, "mkctl", "_MKCTL_COMPLETE").source())
    return 0
