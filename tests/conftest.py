"""Suite-wide guards: every test must leave no fds, shared-memory files or child processes, and
a hung test fails with the stack it hung at.

The shared-memory check looks at this run's files only (`tests/_run.py`): the suite tags every
named region it and its children create, so a demo or another test run on the machine is never
taken for a leak of ours.

Hangs: pytest-timeout (`timeout` in pyproject.toml) dumps every thread's stack and ends the run,
which for an async test shows only the event loop waiting. So an anyio test is first cancelled
from inside its own loop at nine tenths of that limit and fails alone, with the traceback of the
await it was stuck at; pytest-timeout stays the backstop for hangs outside the loop.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import threading
import traceback
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
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


def _limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    limit = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    return float(limit or 0)


def _failing_when_hung(
    test: Callable[..., Awaitable[None]], limit: float
) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(**kwargs: Any) -> None:
        # A scope without a deadline, cancelled from a timer thread: a deadline would be the
        # test's own effective deadline, and would travel in every request it makes.
        scope = anyio.CancelScope()
        token = anyio.lowlevel.current_token()

        def cancel() -> None:
            with contextlib.suppress(Exception):  # the test and its loop may be gone by now
                anyio.from_thread.run_sync(scope.cancel, token=token)

        timer = threading.Timer(limit, cancel)
        timer.daemon = True
        timer.start()
        where = ""
        try:
            with scope:
                try:
                    await test(**kwargs)
                except anyio.get_cancelled_exc_class() as exc:
                    if scope.cancel_called:  # ours, not the test's own: say where it waited
                        where = "".join(traceback.format_tb(exc.__traceback__))
                    raise
        finally:
            timer.cancel()
        if scope.cancelled_caught:
            pytest.fail(f"still running after {limit:g} s; it was waiting at:\n{where}")

    return run


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """An anyio test that hangs is cancelled in its loop and fails with the await it hung at."""
    test = pyfuncitem.obj
    limit = _limit(pyfuncitem) * 0.9
    wrap = (
        limit > 0
        and pyfuncitem.get_closest_marker("anyio") is not None
        and not hasattr(test, "hypothesis")  # anyio's plugin unwraps those itself
        and inspect.iscoroutinefunction(test)
    )
    if wrap:
        pyfuncitem.obj = _failing_when_hung(test, limit)
    try:
        return (yield)
    finally:
        pyfuncitem.obj = test


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
