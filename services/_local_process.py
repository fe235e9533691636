"""A local instance's processes: the keeper we spawn, the agent it reports, each behind a pidfd.

`spawn_keeper` starts the keeper (`_namespaces.py`) with fork and exec only and hands back the
read end of its ready pipe; `read_to_eof` and `agent_pid` turn what the keeper writes there into
the agent's host pid or the `LaunchError` it reports. A `LocalInstance` then holds the processes
by pidfd, never by bare pid, so a pid the kernel has recycled is never signalled: the keeper's
pidfd is opened at once (a child's pid is not reused before its parent reaps it), and the
agent's, when the keeper is its parent (with namespaces), only after `child_pidfd` has checked
that the pid is still that child; without namespaces the keeper execs into the agent. Exits are
awaited with `wait_pidfd` (readable once the process ends) and collected with `waitid(P_PIDFD)`
in `reap`, which never blocks.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from signal import SIGKILL

import anyio

from multikernel.endpoints.log import get_logger
from multikernel.services._cgroups import InstanceCgroups
from multikernel.services._namespaces import keeper_argv
from multikernel.services._platform import InstanceProcess, LaunchError, LaunchSpec, Platform

# The platform's logger (docs/platform.md), whichever of its modules logs.
log = get_logger("multikernel.services.local")


class LocalInstance(InstanceProcess):
    """An instance on the local platform: the keeper (our child) and the agent it started."""

    def __init__(
        self,
        platform: Platform,
        spec: LaunchSpec,
        keeper: subprocess.Popen[bytes] | None,
        *,
        namespaces: bool,
        cgroups: InstanceCgroups | None,
        keeper_pid: int = 0,
        keeper_fd: int | None = None,
    ) -> None:
        pid = keeper.pid if keeper is not None else keeper_pid  # None: adopted, not our child
        super().__init__(platform, spec, pid)
        self.keeper = keeper  # the agent itself without namespaces
        self.keeper_pid = pid
        self.namespaces = namespaces
        self.cgroups = cgroups
        self.keeper_fd: int | None = os.pidfd_open(pid) if keeper_fd is None else keeper_fd
        self.agent_fd: int | None = None  # with namespaces: the agent is the keeper's child

    @property
    def signal_fd(self) -> int | None:
        return self.agent_fd if self.namespaces else self.keeper_fd

    def reap(self) -> None:
        """Collect the keeper's exit status if it has ended (never blocks)."""
        if self.returncode is not None or self.keeper_fd is None:
            return
        try:
            result = os.waitid(os.P_PIDFD, self.keeper_fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it: the status is lost
            log.warning("exit status collected elsewhere", instance=self.name, pid=self.keeper_pid)
            self.returncode = -SIGKILL
            if self.keeper is not None:
                self.keeper.returncode = self.returncode
            return
        if result is None:
            return
        code = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        self.returncode = code
        if self.keeper is not None:
            self.keeper.returncode = code

    def close_fds(self) -> None:
        for fd in (self.agent_fd, self.keeper_fd):
            if fd is not None:
                os.close(fd)
        self.agent_fd = self.keeper_fd = None


def spawn_keeper(
    spec: LaunchSpec,
    groups: InstanceCgroups | None,
    *,
    namespaces: bool,
    join: list[str] | tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the keeper; returns it and the read end of its ready pipe.

    The agent writes itself into the `cgroup.procs` of `groups` and into the files in `join`
    (its resctrl group's `tasks`). If the keeper cannot be started, `groups` are removed (nothing
    has joined them yet) and the failure is a `LaunchError`.
    """
    ready, ready_w = os.pipe()
    argv = keeper_argv(
        ready_fd=ready_w,
        namespaces=namespaces,
        hostname=spec.uts_name,
        cpus=spec.resources.cpus,
        cgroup_procs=[*(groups.procs_files() if groups else []), *join],
        argv=list(spec.argv),
    )
    try:
        # Fork and exec only (vfork): returns before the keeper's Python even starts, as
        # asyncio's own subprocess_exec does.
        keeper = subprocess.Popen(
            argv,
            env=dict(spec.env),
            pass_fds=(*spec.pass_fds, ready_w),
            stdin=subprocess.DEVNULL,
            stdout=spec.stdout,
            stderr=spec.stderr,
            cwd=spec.cwd,
            start_new_session=True,
        )
    except BaseException as error:
        os.close(ready)
        if groups is not None:
            groups.remove_now()
        if isinstance(error, OSError):
            raise LaunchError(f"cannot start instance {spec.name!r}: {error}") from error
        raise
    finally:
        os.close(ready_w)
    return keeper, ready


async def read_to_eof(fd: int) -> bytes:
    """Everything written to the pipe `fd` until its last writer closes it."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def agent_pid(name: str, report: bytes) -> int:
    """The agent's host pid from the keeper's report, or the `LaunchError` it reports."""
    lines = report.decode(errors="replace").splitlines()
    failure = next((line[4:] for line in lines if line.startswith("err ")), None)
    pids = [int(line[4:]) for line in lines if line.startswith("pid ")]
    if failure is None and not pids:
        failure = "the keeper ended before it started the agent"
    if failure is not None:
        raise LaunchError(f"cannot start instance {name!r}: {failure}")
    return pids[0]


def child_pidfd(pid: int, parent: int) -> int | None:
    """A pidfd for `pid` if it is still `parent`'s child (not a recycled pid), else None."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if _parent(pid) != parent:
        os.close(fd)
        return None
    return fd


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


async def wait_pidfd(pidfd: int) -> None:
    """Wait until the process ends. On a dup, so that several tasks may wait for one process."""
    fd = os.dup(pidfd)
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
