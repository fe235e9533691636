"""`make coverage`: line coverage of the package, counting what runs in child processes too.

Much of the package runs outside the pytest process: mkctl, the hub CLI, the resource actor,
the agents (in their own namespaces and cgroups, as children of a host), the workloads they start
and the demo. coverage.py's `patch = subprocess` (pyproject.toml) measures every Python child that
inherits the environment; the agents do not (the host gives them an environment of its own), so
for the length of the run a `.pth` file in the virtualenv starts coverage in any of its Python
processes while `.coverage-data/measuring` exists, writing where every other process writes. The
keeper (`python -I -S`, which reads no `.pth`) is the one process left out.

Prints the report, then the two totals: the pytest process alone, and all processes combined.

    python tests/run_coverage.py [PYTEST ARGS...]     # e.g. tests/services, to measure a part
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".coverage-data"
MARK = DATA / "measuring"
PTH = Path(sysconfig.get_paths()["purelib"]) / "multikernel_coverage.pth"
CONFIG = ROOT / "pyproject.toml"

#: One line (a `.pth` runs lines that start with `import`): start coverage in this process if
#: the run is on and nothing else starts it: not `coverage run` itself (DRIVER), not a child that
#: inherited its environment (coverage's own `.pth` starts those).
DRIVER = "MULTIKERNEL_COVERAGE_RUN"
HOOK = "import os; exec({!r}) if os.path.exists({!r}) else None\n".format(
    f"if not (os.environ.get('COVERAGE_PROCESS_CONFIG') or os.environ.get({DRIVER!r})):\n"
    f" os.environ['COVERAGE_PROCESS_START'] = {str(CONFIG)!r}\n"
    f" os.environ['COVERAGE_FILE'] = {str(DATA / 'coverage')!r}\n"
    " import coverage\n"
    " coverage.process_startup()\n",
    str(MARK),
)


def coverage(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coverage", *args], cwd=ROOT, check=check, text=True,
        stdout=subprocess.PIPE,
    )  # fmt: skip


def measure(pytest_args: list[str]) -> tuple[int, int]:
    """Run the suite and the demo under coverage; the pytest pid and the suite's exit status."""
    run = [sys.executable, "-m", "coverage", "run"]
    env = {**os.environ, DRIVER: "1"}
    suite = subprocess.Popen([*run, "-m", "pytest", *pytest_args], cwd=ROOT, env=env)
    status = suite.wait()
    demo = subprocess.run([*run, "-m", "multikernel.services.demo"], cwd=ROOT, env=env, check=False)
    if demo.returncode:
        print(f"the demo failed ({demo.returncode}): its coverage counts all the same")
    return suite.pid, status


def main(pytest_args: list[str]) -> int:
    subprocess.run(["rm", "-rf", str(DATA)], check=True)
    DATA.mkdir()
    DATA.chmod(0o1777)  # the suite runs some processes as nobody: they write their data too
    MARK.touch()
    PTH.write_text(HOOK)
    try:
        pid, status = measure(pytest_args)
    finally:
        MARK.unlink()
        PTH.unlink()
    own = [str(p) for p in DATA.glob(f"coverage.*.pid{pid}.*")]
    coverage("combine", "--keep", "--quiet", "--data-file", str(DATA / "in-process"), *own)
    in_process = coverage("report", "--data-file", str(DATA / "in-process"), "--format=total")
    files = len(list(DATA.glob("coverage.*")))
    coverage("combine", "--quiet")
    print(coverage("report", "--skip-covered", "--sort=cover", check=False).stdout)
    total = coverage("report", "--format=total")
    print(f"pytest process alone: {in_process.stdout.strip()}%")
    print(f"all {files} processes: {total.stdout.strip()}%  (data in {DATA.relative_to(ROOT)})")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
