"""Running tests/security/hostile_peer.py: a peer that attacks what it shares with us.

A hub in its own process and its readiness come from the bus tests (`hub_process`, `listening`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests._children import end
from tests.bus.conftest import Peer
from tests.bus.test_bus_restart import hub_process, listening

HOSTILE = Path(__file__).with_name("hostile_peer.py")
PATIENCE = 20.0  # how long a hostile peer may take to report before the test fails


class Hostile(Peer):
    """The attacker's process, read like any bus peer's (tests/bus/conftest.py)."""

    async def report(self) -> dict[str, Any]:
        """Its next JSON line."""
        return await self.event()

    async def exit(self) -> None:
        """Let it exit (holding everything it had) and wait until it is gone (a pidfd)."""
        await self.stop()


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
        end(proc)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


__all__ = ["HOSTILE", "PATIENCE", "Hostile", "hostile", "hub_process", "listening"]
