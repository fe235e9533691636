"""The fault actor's process: arguments, the store, the bus, and the host's lifeline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio
import anyio.abc

from multikernel.endpoints import connect, runtime
from multikernel.endpoints.log import configure, get_logger
from multikernel.protocol import MultikernelError
from multikernel.services._fault import FaultActor
from multikernel.services._fault_store import FaultStore
from multikernel.services._fault_watch import DetectionConfig
from multikernel.services._sqlite import lock_file

log = get_logger("multikernel.fault")

ENV_LIFELINE = "MULTIKERNEL_LIFELINE_FD"
STORE_NAME = "fault.db"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multikernel.services.fault", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True, help="where fault.db lives")
    p.add_argument("--heartbeat", type=float, default=1.0, help="the agents' heartbeat period")
    p.add_argument(
        "--threshold", type=float, default=8.0, help="phi above which a hang is suspected"
    )
    p.add_argument("--probe", type=float, default=None, help="seconds a suspect has to answer")
    return p


async def run_fault(state_dir: Path, detection: DetectionConfig) -> None:
    lifeline = os.environ.pop(ENV_LIFELINE, None)
    lock = await _lock(state_dir / "fault.lock")
    store = FaultStore(state_dir / STORE_NAME)
    try:
        async with connect(name="fault", reconnect=False) as ep, anyio.create_task_group() as tg:
            if lifeline is not None:
                tg.start_soon(runtime.until_eof, int(lifeline), tg.cancel_scope)
            await tg.start(FaultActor(ep, store, detection=detection).run)
    finally:
        store.close()
        os.close(lock)


async def _lock(path: Path) -> int:
    """The state dir's fault lock: a fault actor of a host that just died may still hold it."""
    with anyio.fail_after(10):
        while True:
            try:
                return lock_file(path, "fault actor")
            except MultikernelError:
                await anyio.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure()
    detection = DetectionConfig(args.heartbeat, args.threshold, args.probe)
    try:
        runtime.run(run_fault, args.state_dir, detection)
    except (MultikernelError, OSError) as exc:
        print(f"fault: {exc}", file=sys.stderr)
        sys.exit(1)
