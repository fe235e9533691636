"""Actors attached by an instance-0 socket and a lifeline (the fault actor): started, restarted.

DESIGN §7: every actor runs in its own process. The host hands one what the kernel hands an
instance: a bus socket the hub bound to instance 0 (its identity is the host's by construction, not
by anything it says) and a lifeline, the read end of a pipe only the host writes to (EOF when the
host is gone, however it went, so an actor never outlives its host). When an actor's process dies
the host starts it again after a back-off (100 ms, doubling up to 5 s, back to 100 ms after a
minute up); the actor's state is in the state dir, so the new process carries on where the old one
stopped. Stopping closes the lifeline, waits a few seconds for the actor to leave, then kills it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import ENV_FD
from multikernel.services._local_process import wait_pidfd

log = get_logger("multikernel.host")

ENV_LIFELINE = "MULTIKERNEL_LIFELINE_FD"
STOP_GRACE = 5.0


class ChildActor:
    """One actor's process, kept running by the host while `run` runs."""

    def __init__(
        self, name: str, argv: Sequence[str], open_socket: Callable[[], socket.socket]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.open_socket = open_socket
        self.pid = 0
        self.restarts = 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the actor, start it again whenever it dies; stop it when cancelled."""
        backoff, started = 0.1, False
        while True:
            process, lifeline = self._spawn()
            if not started:
                started = True
                task_status.started()
            since = time.monotonic()
            try:
                status = await _wait(process)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._stop(process, lifeline)
                raise
            os.close(lifeline)
            if time.monotonic() - since > 60:
                backoff = 0.1
            self.restarts += 1
            log.warning(
                "actor process ended; starting it again", actor=self.name, pid=process.pid,
                status=status, after=backoff,
            )  # fmt: skip
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        # subprocess.Popen, not anyio.open_process: under uvloop the latter leaks every
        # inheritable fd of the host into the child (a host's ready pipe, the lifeline's write
        # end), which would then never see EOF.
        sock = self.open_socket()
        read, write = os.pipe()
        env = {**os.environ, ENV_FD: str(sock.fileno()), ENV_LIFELINE: str(read)}
        try:
            process = subprocess.Popen(
                self.argv, env=env, pass_fds=(sock.fileno(), read), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            os.close(write)
            raise
        finally:
            sock.close()
            os.close(read)
        self.pid = process.pid
        log.info("actor process started", actor=self.name, pid=process.pid)
        return process, write

    async def _stop(self, process: subprocess.Popen[bytes], lifeline: int) -> None:
        os.close(lifeline)  # EOF: the actor leaves on its own
        with anyio.move_on_after(STOP_GRACE):
            await _wait(process)
            return
        log.warning("actor process did not stop; killing it", actor=self.name, pid=process.pid)
        process.send_signal(signal.SIGKILL)
        await _wait(process)


async def _wait(process: subprocess.Popen[bytes]) -> int:
    """The process's exit status, awaited on its pidfd; it is reaped."""
    if process.poll() is not None:
        return process.returncode
    fd = os.pidfd_open(process.pid)
    try:
        await wait_pidfd(fd)
    finally:
        os.close(fd)
    return process.wait()
