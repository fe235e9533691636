"""`make test-concurrent`: the suite passes while a demo and a second run share the machine.

Starts two full test runs at once, and `make demo` over and over beside them until both runs end.
Each test run tags its /dev/shm names and puts its instances in a cgroup group of its own, each
demo host in `multikernel/<host-id>` (docs/testing.md): if anything of one were seen, counted or
removed by another, a leak check or an instance test would fail. Exits 0 only if both runs pass
and every demo passed (its own "nothing left behind" check included); each run's output is kept
in `.concurrent/`.

    python tests/run_concurrently.py [PYTEST ARGS...]     # e.g. -x, or a subset of tests
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".concurrent"


def main(pytest_args: list[str]) -> int:
    LOGS.mkdir(exist_ok=True)
    started = time.monotonic()
    runs = []
    for n in (1, 2):
        log = (LOGS / f"run{n}.log").open("wb")
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        runs.append((n, subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
    demos: list[tuple[int, float]] = []
    demo_log = (LOGS / "demos.log").open("wb")
    while any(proc.poll() is None for _, proc in runs):
        t0 = time.monotonic()
        demo = subprocess.run(
            [sys.executable, "-m", "multikernel.services.demo"],
            cwd=ROOT,
            stdout=demo_log,
            stderr=subprocess.STDOUT,
            check=False,
        )
        demos.append((demo.returncode, time.monotonic() - t0))
    failed = 0
    for n, proc in runs:
        summary = (LOGS / f"run{n}.log").read_text().strip().splitlines()[-1:]
        print(f"test run {n}: exit {proc.returncode}: {' '.join(summary)}")
        failed += proc.returncode != 0
    bad = [code for code, _ in demos if code != 0]
    print(f"demos: {len(demos)} run beside them, {len(bad)} failed (see {LOGS / 'demos.log'})")
    print(f"{time.monotonic() - started:.0f} s in all; logs in {LOGS}")
    return 1 if failed or bad or not demos else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
