"""`mkctl exec NAME [-- CMD...]`: run a command inside an active instance.

The command's output is streamed as it is written (the agent's `exec_stream`), and mkctl exits
with its status. `-it` runs it on a pseudo-terminal in the instance (default `/bin/sh`): this
terminal goes raw, keystrokes and window sizes are sent as they come (`tty_write`), the output
is written as it arrives (`tty_read`), and the terminal is restored however the session ends.
Without a command (and without `-it`), the agent's status is shown.
"""

from __future__ import annotations

import os
import signal
import sys
import termios
import tty
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import click

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.mkctl._client import with_bus
from multikernel.endpoints.mkctl._errors import UsageError
from multikernel.endpoints.mkctl._instances import PASS_THROUGH, name_or_id, strip_dashes
from multikernel.endpoints.mkctl._output import emit, output_options, table
from multikernel.protocol import (
    AgentStatus,
    ExecOutput,
    ExecRequest,
    InstanceList,
    RefusedError,
    ShowInstances,
    TtyInput,
    TtyOpen,
    TtySession,
)


async def _agent_of(ep: Endpoint, name: str) -> str:
    listed = await ep.request("lifecycle", "show", ShowInstances(name), response=InstanceList)
    (info,) = listed.instances
    if info.state != "active":
        raise RefusedError(
            f"cannot exec in {name!r}: it is {info.state}; start it first: mkctl start {name}"
        )
    return f"instance.{info.id}.agent"


def _exit_status(status: int) -> int:
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as shells do


@click.command("exec", context_settings=PASS_THROUGH, short_help="Run a command in an instance.")
@click.option("-i", "--interactive", is_flag=True, help="Send this terminal's input (use -it).")
@click.option("-t", "--tty", "want_tty", is_flag=True, help="Run on a pseudo-terminal (use -it).")
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds the command may run before it is killed (not with -it).",
)
@name_or_id
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@output_options
def exec_(
    interactive: bool, want_tty: bool, timeout: float, name: str, command: tuple[str, ...]
) -> int:
    """Run a command inside an active instance, its output streamed; mkctl exits with its status.

    -it gives an interactive shell (or the command) on a terminal in the instance. With no
    command and no -it: the agent's status.
    """
    argv = strip_dashes(command)
    if interactive or want_tty:
        if not (interactive and want_tty):
            raise UsageError("-i and -t go together: mkctl exec -it NAME [-- CMD...]")
        if not os.isatty(0):
            raise UsageError("-it needs a terminal on stdin; leave -it off to run a command")
        return _exit_status(with_bus(lambda ep: _interactive(ep, name, argv or ("/bin/sh",))))

    async def work(ep: Endpoint) -> int:
        target = await _agent_of(ep, name)
        if not argv:
            agent = await ep.request(target, "status", None, response=AgentStatus)
            emit(agent, lambda wide: _status_table(agent))
            return 0
        request = ExecRequest(argv, timeout=timeout)
        status = 1  # unless the stream ends with one (else the agent went away)
        stream: AsyncIterator[Any] = ep.request_stream(
            target, "exec_stream", request, response=ExecOutput
        )
        async for out in cast(AsyncIterator[ExecOutput], stream):  # (Bus's T is too loose)
            if out.exited:
                status = _exit_status(out.status)  # the last item: the stream ends after it
            else:
                sys.stdout.buffer.write(out.data)
                sys.stdout.flush()
        return status

    return with_bus(work)


async def _interactive(ep: Endpoint, name: str, argv: tuple[str, ...]) -> int:
    target = await _agent_of(ep, name)
    cols, rows = os.get_terminal_size(0)
    term = os.environ.get("TERM", "xterm")
    opened = TtyOpen(argv, rows, cols, term)
    session = (await ep.request(target, "tty_open", opened, response=TtySession)).session
    saved = termios.tcgetattr(0)
    tty.setraw(0, termios.TCSANOW)  # keep what was typed ahead
    try:
        async with anyio.create_task_group() as tg:

            async def keystrokes() -> None:
                while True:
                    await anyio.wait_readable(0)
                    data = os.read(0, 4096)
                    if not data:
                        return
                    await ep.request(target, "tty_write", TtyInput(session, data))

            async def window_sizes() -> None:
                with anyio.open_signal_receiver(signal.SIGWINCH) as changes:
                    async for _ in changes:
                        cols, rows = os.get_terminal_size(0)
                        await ep.request(target, "tty_write", TtyInput(session, b"", rows, cols))

            tg.start_soon(keystrokes)
            tg.start_soon(window_sizes)
            status = 1
            read: AsyncIterator[Any] = ep.request_stream(
                target, "tty_read", TtySession(session), response=ExecOutput
            )
            async for out in cast(AsyncIterator[ExecOutput], read):
                if out.exited:
                    status = out.status  # the last item: the stream ends after it
                else:
                    os.write(1, out.data)
            tg.cancel_scope.cancel()
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return status


def _status_table(status: AgentStatus) -> None:
    table(
        ("instance", "pid", "hostname", "cpus", "workload", "uptime"),
        [
            (
                status.instance,
                status.pid,
                status.hostname,
                ",".join(map(str, status.cpus)),
                f"{status.workload_pid} ({'running' if status.workload_running else 'ended'})",
                f"{status.uptime:.0f} s",
            )
        ],
    )
