"""This test run's own part of every machine-global name, so concurrent runs never meet.

A demo, a user's host or a second `make test` may run on the machine at the same time as this
suite. Whatever is machine-global carries this run's tag, and the leak checks look only at names
with it: named /dev/shm regions (`$MULTIKERNEL_SHM_TAG`, inherited by every process the suite
starts).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from multikernel.shm import name_prefix

#: Unique among the runs on this machine: the pid of pytest, and a random part for pid reuse.
RUN = f"t{os.getpid()}.{secrets.token_hex(2)}"
SHM_PREFIX = name_prefix(RUN)


def shm_files() -> set[str]:
    """This run's named shared-memory regions in /dev/shm."""
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}*")}
