"""Workloads through mkctl: a start that waits for the workload, its logs, exec and exec -it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from multikernel.services._agent import WORKLOAD_GRACE

from .conftest import fails, mkctl

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def _up(host: Path, name: str, image: str = "image") -> tuple[int, str, str]:
    assert (await mkctl(host, "create", name, "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "load", name, "--image", str(host / image)))[0] == 0
    return await mkctl(host, "start", name)


async def _read_until(stream: anyio.abc.ByteReceiveStream, marker: bytes) -> bytes:
    seen = b""
    with anyio.fail_after(30):
        while marker not in seen:
            seen += await stream.receive()
    return seen


async def test_a_workload_that_fails_at_start_fails_the_start_with_its_reason(host: Path) -> None:
    code, _, err = await _up(host, "bad", image="crasher")
    assert (code, err.splitlines()[0]) == (
        1,
        "error: 'bad' did not start: its workload ended (exit status 1) before its first "
        "heartbeat: no config file: /etc/app.toml; see mkctl logs bad",
    )
    _, out, _ = await mkctl(host, "show", "bad", "-o", "json")
    assert '"state": "loaded"' in out
    assert '"last_exit": "exit status 1"' in out
    code, out, _ = await mkctl(host, "logs", "bad")
    assert (code, out) == (0, "starting\nno config file: /etc/app.toml\n")


async def test_a_workload_that_runs_to_completion_has_started(host: Path) -> None:
    code, _, err = await _up(host, "job", image="oneshot")
    assert (code, err) == (0, "")
    code, out, _ = await mkctl(host, "logs", "job")
    assert (code, out) == (0, "hello\nworld\n")
    code, out, _ = await mkctl(host, "logs", "job", "--tail", "1")
    assert out == "world\n"
    code, out, _ = await mkctl(host, "logs", "job", "--since", "1h", "-t")
    stamps = [line.split(" ", 1) for line in out.splitlines()]
    assert [text for _, text in stamps] == ["hello", "world"]
    assert all(stamp[:2] == "20" and "T" in stamp for stamp, _ in stamps)
    code, out, _ = await mkctl(host, "logs", "job", "--since", "2099-01-01T00:00:00")
    assert (code, out) == (0, "")
    assert await fails(host, "logs", "job", "--since", "yesterday") == (
        2,
        "error: --since 'yesterday' is neither a duration (30s, 5m, 2h, 1d) nor a time "
        "(2026-11-30T05:00:00)",
    )
    assert await fails(host, "logs", "nope") == (
        3,
        "error: no instance named 'nope' (known: job); mkctl create nope",
    )


async def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace(host: Path) -> None:
    """The agent sends SIGTERM, waits WORKLOAD_GRACE (3 s), then SIGKILLs (docs/lifecycle.md)."""
    code, out, _ = await _up(host, "stubborn", image="stubborn")
    assert code == 0, out
    asked = time.monotonic()
    assert (await mkctl(host, "kill", "stubborn"))[0] == 0
    assert time.monotonic() - asked >= WORKLOAD_GRACE  # SIGTERM alone did not end it
    _, out, _ = await mkctl(host, "show", "stubborn", "-o", "json")
    assert '"state": "loaded"' in out
    code, out, _ = await mkctl(host, "logs", "stubborn")
    assert (code, out) == (0, "up\nignoring SIGTERM\n")
    assert (await mkctl(host, "start", "stubborn"))[0] == 0  # nothing of it is left in the way
    assert (await mkctl(host, "kill", "stubborn", "--force"))[0] == 0


async def test_logs_follow_prints_new_output_until_it_ends(host: Path) -> None:
    assert (await _up(host, "web"))[0] == 0
    env = {**os.environ, "MULTIKERNEL_BUS": str(host / "bus.sock")}
    argv = [sys.executable, "-m", "multikernel.endpoints.mkctl", "logs", "-f", "web"]
    async with await anyio.open_process(argv, env=env) as follower:
        try:
            assert follower.stdout is not None
            await _read_until(follower.stdout, b"up\n")
            assert (await mkctl(host, "kill", "web"))[0] == 0
            rest = await _read_until(follower.stdout, b"stopping on SIGTERM\n")
            with anyio.fail_after(30):
                assert await follower.wait() == 0  # the output ended, so does -f
        finally:
            if follower.returncode is None:
                follower.kill()
    assert rest.endswith(b"stopping on SIGTERM\n")


async def test_exec_streams_output_and_exits_with_the_commands_status(host: Path) -> None:
    assert (await _up(host, "web"))[0] == 0
    code, out, _ = await mkctl(
        host, "exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    assert (code, out) == (3, "out\nerr\n")
    code, _, _ = await mkctl(host, "exec", "web", "--", "sh", "-c", "kill -9 $$")
    assert code == 137
    env = {**os.environ, "MULTIKERNEL_BUS": str(host / "bus.sock")}
    argv = [sys.executable, "-m", "multikernel.endpoints.mkctl", "exec", "web", "--", "sh", "-c",
            "echo first; exec sleep 60"]  # fmt: skip
    async with await anyio.open_process(argv, env=env) as streaming:
        assert streaming.stdout is not None
        await _read_until(streaming.stdout, b"first\n")  # before the command has ended
        streaming.kill()
        await streaming.wait()
    assert (await mkctl(host, "kill", "web"))[0] == 0


async def test_exec_usage_errors(host: Path) -> None:
    assert (await _up(host, "web"))[0] == 0
    assert await fails(host, "exec", "-i", "web") == (
        2,
        "error: -i and -t go together: mkctl exec -it NAME [-- CMD...]",
    )
    assert await fails(host, "exec", "-it", "web") == (
        2,
        "error: -it needs a terminal on stdin; leave -it off to run a command",
    )


async def test_exec_it_gives_an_interactive_shell_through_a_pty(host: Path) -> None:
    assert (await _up(host, "web"))[0] == 0
    env = {**os.environ, "MULTIKERNEL_BUS": str(host / "bus.sock")}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        argv = [sys.executable, "-m", "multikernel.endpoints.mkctl", "exec", "-it", "web"]
        async with await anyio.open_process(
            argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        ) as session:
            os.close(slave)
            slave = -1
            seen = b""

            async def until(marker: bytes) -> None:
                nonlocal seen
                with anyio.fail_after(30):
                    while marker not in seen:
                        await anyio.wait_readable(master)
                        seen += os.read(master, 4096)

            try:
                os.write(master, b"echo hi-$((6*7)); tty; stty size\n")
                await until(b"hi-42")
                await until(b"/dev/pts/")  # the command runs on a terminal in the instance
                await until(b"30 100")  # of this terminal's size
                os.write(master, b"exit 7\n")
                with anyio.fail_after(30):
                    assert await session.wait() == 7
            finally:
                if session.returncode is None:
                    session.kill()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert (await mkctl(host, "kill", "web"))[0] == 0
