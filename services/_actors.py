"""Host actors in processes of their own: started, watched, restarted and stopped by the host.

`ActorProcess.run` starts the actor's process with a ready pipe and returns (`task_status`) once
the actor says "ready" (`ActorStartError` if it ends first, or is not ready in `start_timeout`
seconds), so the host composes actors in order. It then watches the process: an
actor that exits while the host is not stopping it is restarted, like an OTP `permanent` child,
after a back-off (0.1 s doubling to 5 s), at most `intensity` times in `period` seconds; beyond
that the host logs that it gave up, and callers get `NoRespondersError` from the bus. Cancelling
`run` stops the actor: SIGTERM, up to `grace` seconds to finish, then SIGKILL; the process is
always reaped. The actor's own process also dies with the host (PR_SET_PDEATHSIG), so a host that
is SIGKILLed leaves no orphan.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Callable

import anyio
import anyio.abc

from multikernel.endpoints.log import get_logger
from multikernel.protocol import MultikernelError
from multikernel.services._local_process import read_to_eof, wait_pidfd

log = get_logger("multikernel.host")


class ActorStartError(MultikernelError):
    """An actor's process ended before it said it was ready; the host log says why."""


class ActorProcess:
    """One actor's process (see the module docstring). `argv(ready_fd)` is its command line."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        *,
        grace: float = 5.0,
        start_timeout: float = 30.0,
        intensity: int = 5,
        period: float = 60.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.grace = grace
        self.start_timeout = start_timeout
        self.intensity = intensity
        self.period = period
        self.process: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        exits: deque[float] = deque(maxlen=self.intensity)
        delay = 0.1
        try:
            await self._start()
            task_status.started()
            while True:
                status = await self._wait()
                log.warning("actor exited", actor=self.name, status=status)
                exits.append(time.monotonic())
                if len(exits) == self.intensity and exits[-1] - exits[0] < self.period:
                    log.error(
                        "actor keeps exiting: not restarted", actor=self.name,
                        exits=self.intensity, seconds=self.period,
                    )  # fmt: skip
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    await self._start()
                except ActorStartError as error:
                    log.warning("actor restart failed", actor=self.name, error=str(error))
                    continue
                self.restarts += 1
                log.info("actor restarted", actor=self.name, pid=self.pid)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()

    async def _wait(self) -> int:
        """The process's exit status, awaited on its pidfd; it is reaped."""
        assert self.process is not None
        assert self._pidfd is not None
        await wait_pidfd(self._pidfd)
        return self.process.wait()  # it has exited: this does not block

    async def _start(self) -> None:
        # subprocess.Popen, not anyio.open_process: under uvloop the latter leaks every
        # inheritable fd of the host into the child (uvloop ignores close_fds).
        self._forget()
        process, ready = self._spawn()
        said = b""
        try:
            with anyio.move_on_after(self.start_timeout):
                said = await read_to_eof(ready)
        finally:
            os.close(ready)
        if not said.startswith(b"ready"):
            if process.poll() is None:  # still starting after start_timeout
                process.kill()
            status = await self._wait()
            raise ActorStartError(
                f"the {self.name} actor did not start (exit status {status}); see the host log"
            )
        log.info("actor up", actor=self.name, pid=process.pid)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        """Start the process (fork and exec only); it and the read end of its ready pipe."""
        ready, ready_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                self.argv(ready_w), stdin=subprocess.DEVNULL, pass_fds=(ready_w,),
                start_new_session=True,
            )  # fmt: skip
            self._pidfd = os.pidfd_open(self.process.pid)
        except BaseException:
            os.close(ready)
            raise
        finally:
            os.close(ready_w)
        return self.process, ready

    async def _stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.process.terminate()
                with anyio.move_on_after(self.grace):
                    await self._wait()
                if self.process.poll() is None:
                    log.warning("actor did not stop in time: killed", actor=self.name)
                    self.process.kill()
                    await self._wait()
        finally:
            self._forget()

    def _forget(self) -> None:
        """Drop the (ended) process and close its pidfd."""
        if self._pidfd is not None:
            os.close(self._pidfd)
        self.process, self._pidfd = None, None
