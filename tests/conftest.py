"""Suite-wide guards: every test must leave no fds, shared-memory files or child processes.

The shared-memory check looks at this run's files only (`tests/_run.py`): the suite tags every
named region it and its children create, so a demo or another test run on the machine is never
taken for a leak of ours.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from multikernel.shm import ENV_TAG
from tests._run import RUN, shm_files

os.environ[ENV_TAG] = RUN  # before any test runs: every process we start inherits it


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            text = Path(f"/proc/self/task/{task}/children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return pids


@pytest.fixture(scope="session", autouse=True)
def _process_wide_allocations() -> None:
    """Make one-time, process-wide allocations before the first leak check sees them.

    uvloop opens a pipe the first time a loop runs, and keeps it for the process's life.
    """
    import anyio

    async def nothing() -> None:
        pass

    anyio.run(nothing, backend="asyncio", backend_options={"use_uvloop": True})
    anyio.run(nothing, backend="trio")


@pytest.fixture(autouse=True)
def no_leaks(_process_wide_allocations: None) -> Iterator[None]:
    """Fail a test that leaks an fd, a /dev/shm region or a child process."""
    fds, shm, children = _open_fds(), shm_files(), _children()
    yield
    gc.collect()
    leaked_fds = {fd: target for fd, target in _open_fds().items() if fd not in fds}
    leaked_shm = shm_files() - shm
    leaked_children = _children() - children
    problems = []
    if leaked_fds:
        problems.append(f"fds {leaked_fds}")
    if leaked_shm:
        problems.append(f"shared-memory files {sorted(leaked_shm)}")
    if leaked_children:
        problems.append(f"child processes {sorted(leaked_children)}")
    if problems:
        pytest.fail("test leaked " + "; ".join(problems))


#: APIs that promise trio support run under asyncio, uvloop and trio (anyio's plugin).
ALL_BACKENDS = [
    pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=ALL_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """APIs that promise trio support run under asyncio, uvloop and trio (anyio's plugin)."""
    return request.param  # type: ignore[no-any-return]
