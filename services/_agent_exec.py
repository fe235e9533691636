"""Commands run inside an instance for `mkctl exec`: streamed output, and terminals (`-it`).

`exec_stream` runs a command with its stdout and stderr on one pipe and streams what it writes as
`ExecOutput` items, the last one with its exit status; past the request's `timeout` it is killed
and the stream ends in `DeadlineExceededError`. A terminal session is a command on a new
pseudo-terminal (`tty_open`): its output is streamed by `tty_read` until it exits, keystrokes
and window sizes arrive by `tty_write`. A session whose reader goes away (the user's mkctl ended)
is killed, so nothing is left running in the instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import pty
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from multikernel.endpoints import Service
from multikernel.protocol import (
    DeadlineExceededError,
    ExecOutput,
    ExecRequest,
    NotFoundError,
    TtyInput,
    TtyOpen,
    TtySession,
)

_CHUNK = 65536


def _not_found(argv: tuple[str, ...]) -> NotFoundError:
    return NotFoundError(f"{argv[0]!r}: no such command in the instance")


def _deadline(argv: tuple[str, ...], timeout: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"{argv[0]!r} did not finish within {timeout:g} s and was killed; give it longer with "
        "--timeout SECONDS"
    )


async def _read(fd: int) -> bytes:
    """What is there to read on the non-blocking `fd` (b"" at its end)."""
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            continue
        except OSError:  # EIO: a terminal whose other side has closed
            return b""


async def _ended(proc: subprocess.Popen[bytes]) -> int:
    """Wait on a pidfd for `proc` to end; its status (negative: killed by that signal)."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # reaped meanwhile
        return proc.wait()
    try:
        await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def exec_stream(request: ExecRequest) -> AsyncIterator[ExecOutput]:
    """Run `request.argv`, streaming its output, then its status."""
    read, write = os.pipe()
    try:
        proc = _spawn(request.argv, write, write)
    except FileNotFoundError:
        os.close(read)
        raise _not_found(request.argv) from None
    finally:
        os.close(write)
    os.set_blocking(read, False)
    deadline = anyio.current_time() + request.timeout
    try:
        while True:
            chunk = b""
            with anyio.move_on_after(deadline - anyio.current_time()):
                chunk = await _read(read)
                if not chunk:
                    break
            if not chunk:
                raise _deadline(request.argv, request.timeout)
            yield ExecOutput(chunk)
        status: int | None = None
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
            status = await _ended(proc)
        if status is None:
            raise _deadline(request.argv, request.timeout)
        yield ExecOutput(exited=True, status=status)
    finally:
        os.close(read)
        _kill(proc)
        with anyio.CancelScope(shield=True):
            await _ended(proc)


@dataclass
class _Terminal:
    proc: subprocess.Popen[bytes]
    master: int


class Terminals:
    """The terminal sessions of one agent."""

    def __init__(self) -> None:
        self._sessions: dict[int, _Terminal] = {}
        self._ids = itertools.count(1)

    def serve(self, svc: Service) -> None:
        svc.method(self.tty_open, name="tty_open")
        svc.method(self.tty_read, name="tty_read")
        svc.method(self.tty_write, name="tty_write")

    async def tty_open(self, request: TtyOpen) -> TtySession:
        master, slave = pty.openpty()
        _resize(master, request.rows, request.cols)
        env = {**os.environ, "TERM": request.term or "xterm"}
        for name in ("MULTIKERNEL_BUS_FD", "MULTIKERNEL_WORKLOAD_ENV"):
            env.pop(name, None)
        try:
            proc = _spawn(request.argv, slave, slave, stdin=slave, env=env, terminal=True)
        except FileNotFoundError:
            os.close(master)
            raise _not_found(request.argv) from None
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        session = next(self._ids)
        self._sessions[session] = _Terminal(proc, master)
        return TtySession(session)

    async def tty_read(self, request: TtySession) -> AsyncIterator[ExecOutput]:
        """The session's output until its command exits; the session ends with this stream."""
        terminal = self._get(request.session)
        try:
            while chunk := await _read(terminal.master):
                yield ExecOutput(chunk)
            yield ExecOutput(exited=True, status=await _ended(terminal.proc))
        finally:
            del self._sessions[request.session]
            os.close(terminal.master)
            _kill(terminal.proc)
            with anyio.CancelScope(shield=True):
                await _ended(terminal.proc)

    async def tty_write(self, request: TtyInput) -> None:
        terminal = self._get(request.session)
        if request.rows and request.cols:
            _resize(terminal.master, request.rows, request.cols)
        data = request.data
        while data:
            try:
                data = data[os.write(terminal.master, data) :]
            except BlockingIOError:
                await anyio.wait_writable(terminal.master)

    def _get(self, session: int) -> _Terminal:
        terminal = self._sessions.get(session)
        if terminal is None:
            raise NotFoundError(f"no terminal session {session} in this instance")
        return terminal


def _spawn(
    argv: tuple[str, ...],
    stdout: int,
    stderr: int,
    *,
    stdin: int | None = None,
    env: dict[str, str] | None = None,
    terminal: bool = False,
) -> subprocess.Popen[bytes]:
    """Fork and exec (fast: no wait), in a session of its own (so a kill takes its children)."""
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout, stderr=stderr,
        env=env, start_new_session=True,
        preexec_fn=_controlling_terminal if terminal else None,
    )  # fmt: skip


def _resize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _controlling_terminal() -> None:
    """In the child, after setsid: its terminal (stdin) becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
