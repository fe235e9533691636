"""Ending a child process the suite started and no longer needs.

SIGTERM first, then SIGKILL if it is still there after `grace` seconds: to the code under test
the two are the same end (none of the suite's peers handles SIGTERM; a hub drains and exits), but
a process measured by `make coverage` saves its data on SIGTERM (`sigterm = true`), never on
SIGKILL. A test that means SIGKILL (a crash, a hub that dies) sends it itself.
"""

from __future__ import annotations

import subprocess
from typing import Any


def end(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop `proc` if it is still running, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=20)
