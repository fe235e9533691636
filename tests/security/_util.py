"""Running tests/security/hostile_peer.py: a peer that attacks what it shares with us.

A hub in its own process and its readiness come from the bus tests (`hub_process`, `listening`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from tests.bus.test_bus_restart import hub_process, listening

HOSTILE = Path(__file__).with_name("hostile_peer.py")
PATIENCE = 20.0  # how long a hostile peer may take to report before the test fails


class Hostile:
    """The attacker's process: its report, read without blocking the event loop."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._buffer = b""

    async def report(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with anyio.fail_after(PATIENCE):
            while b"\n" not in self._buffer:
                await anyio.wait_readable(fd)
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"the hostile peer exited with {self.proc.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    async def exit(self) -> None:
        """Let it exit (holding everything it had) and wait until it is gone (a pidfd)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            with anyio.fail_after(PATIENCE):
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.proc.wait()


@contextmanager
def hostile(attack: str, argument: str, pass_fds: list[int]) -> Iterator[Hostile]:
    """Start the attacker; always killed and reaped at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(HOSTILE), attack, argument],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=pass_fds,
    )
    try:
        yield Hostile(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=PATIENCE)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


__all__ = ["HOSTILE", "PATIENCE", "Hostile", "hostile", "hub_process", "listening"]
