"""The upgrade actor's process: arguments, its store, the bus, and the host's lifeline."""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

import anyio

from multikernel.endpoints import connect, runtime
from multikernel.endpoints.log import configure, get_logger
from multikernel.protocol import MultikernelError, RefusedError
from multikernel.upgrade._actor import UpgradeActor
from multikernel.upgrade._store import UpgradeStore

log = get_logger("multikernel.upgrade")

ENV_LIFELINE = "MULTIKERNEL_LIFELINE_FD"
STORE_NAME = "upgrade.db"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multikernel.upgrade.actor", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True, help="where upgrade.db lives")
    return p


async def run_upgrade(state_dir: Path) -> None:
    lifeline = os.environ.pop(ENV_LIFELINE, None)
    lock = await _lock(state_dir / "upgrade.lock")
    store = UpgradeStore(state_dir / STORE_NAME)
    try:
        async with connect(name="upgrade", reconnect=False) as ep, anyio.create_task_group() as tg:
            if lifeline is not None:
                tg.start_soon(runtime.until_eof, int(lifeline), tg.cancel_scope)
            await tg.start(UpgradeActor(ep, store, state_dir / "upgrade").run)
    finally:
        store.close()
        os.close(lock)


async def _lock(path: Path) -> int:
    """One upgrade actor per state dir; the actor of a host that just died may still hold it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with anyio.move_on_after(10):
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await anyio.sleep(0.05)
            else:
                return fd
    os.close(fd)
    raise RefusedError(f"another upgrade actor is using {path.parent}: stop it first")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure()
    try:
        runtime.run(run_upgrade, args.state_dir)
    except (MultikernelError, OSError) as exc:
        print(f"upgrade: {exc}", file=sys.stderr)
        sys.exit(1)
