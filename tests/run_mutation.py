"""`make mutation`: mutation testing (cosmic-ray) of the modules whose logic everything rests on.

For each target, cosmic-ray changes one thing in the module on disk (a comparison, an operator,
a constant, a condition, a loop), runs the target's own tests, and puts the module back; a mutant
the tests do not notice *survives*, which names a behaviour no test pins down. Targets:

    router  bus/_router.py   subjects, wildcards, queue groups, the match cache
    names   bus/_names.py    well-known names: D-Bus's request and release rules
    ring    shm/_pycore.py   the ring's hot path: the pure-Python core, which the shm tests run
                             beside the native one (`-k python` picks it); the C core is the same
                             algorithm, checked against it by tests/shm/test_shm_native.py

Binary operators are replaced by their nearest kin only (+ by -, * by /, << by >>, ...), not by
all eleven, and `--sample N` tests N mutants per target picked with a fixed seed (a full run of a
target takes from ten minutes to an hour on a 2-CPU machine). Survivors are written, with their
diffs, to `.mutation/<target>-survivors.txt`; after writing tests for them, `--survivors` tests
only the last run's survivors again.

Runs with cosmic-ray's own virtualenv (`make mutation` creates it in `.mutation/venv`); the tests
run with the project's `.venv`. It changes the working tree while it runs: run it on a clean one.

    .mutation/venv/bin/python tests/run_mutation.py [--sample N | --survivors] [TARGET...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".mutation"
PYTEST = ".venv/bin/python -m pytest -x -q -p no:cacheprovider"

TARGETS = {
    "router": ("bus/_router.py", "", ["tests/bus/test_bus_router.py"], ""),
    "names": (
        "bus/_names.py",
        "",
        ["tests/bus/test_bus_name_registry.py", "tests/bus/test_bus_memory.py",
         "tests/bus/test_bus_names.py", "tests/bus/test_bus_promises.py"],
        "name or Name or owner",
    ),
    "ring": (
        "shm/_pycore.py",
        "",
        ["tests/shm/test_shm_ring.py", "tests/shm/test_shm_corruption.py",
         "tests/shm/test_shm_native.py", "tests/shm/test_shm_channel.py"],
        "python and not trio and not uvloop",
    ),
}  # fmt: skip

#: The one replacement kept for each binary operator (cosmic-ray makes all eleven).
KIN = {
    "Add": "Sub", "Sub": "Add", "Mul": "Div", "Div": "Mul", "FloorDiv": "Mul", "Mod": "FloorDiv",
    "Pow": "Mul", "LShift": "RShift", "RShift": "LShift", "BitOr": "BitAnd", "BitAnd": "BitOr",
    "BitXor": "BitOr",
}  # fmt: skip


def config(name: str) -> Path:
    module, env, paths, select = TARGETS[name]
    tests = " ".join(p for p in paths if (ROOT / p).exists())  # a missing one fails every run
    if select:
        tests += f" -k '{select}'"
    command = f"{env + ' ' if env else ''}{PYTEST} {tests}"
    path = OUT / f"{name}.toml"
    path.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        "timeout = 120.0\n"
        "excluded-modules = []\n"
        f'test-command = "env {command}"\n'
        '\n[cosmic-ray.distributor]\nname = "local"\n'
    )
    return path


def kept(operator: str) -> bool:
    parts = operator.split("/")[-1].split("_")
    return parts[0] != "ReplaceBinaryOperator" or KIN.get(parts[1]) == parts[2]


Mutant = tuple[str, str, int]  # module, operator, occurrence: the same mutant in another session


def survivors_of(session: Path) -> set[Mutant]:
    """The mutants that survived in an earlier session (to test them again after new tests)."""
    found = set()
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.test_outcome == TestOutcome.SURVIVED:
                (m,) = item.mutations
                found.add((str(m.module_path), m.operator_name, m.occurrence))
    return found


def prune(db: WorkDB, sample: int | None, only: set[Mutant] | None = None) -> None:
    """Skip the far-fetched operator replacements, then all but a sample of the rest (or all
    but the mutants in `only`)."""
    skip: list[tuple[str, str]] = []
    items = list(db.pending_work_items)
    wanted = [i for i in items if all(kept(m.operator_name) for m in i.mutations)]
    skip += [(i.job_id, "a far-fetched replacement") for i in items if i not in wanted]
    if only is not None:
        chosen = [
            i for i in wanted
            if {(str(m.module_path), m.operator_name, m.occurrence) for m in i.mutations} <= only
        ]  # fmt: skip
        skip += [(i.job_id, "survived no earlier run") for i in wanted if i not in chosen]
        wanted = chosen
    if sample is not None and sample < len(wanted):
        picked = {i.job_id for i in random.Random(13).sample(wanted, sample)}
        skip += [(i.job_id, "not in the sample") for i in wanted if i.job_id not in picked]
    for job_id, why in skip:
        db.set_result(job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why))


def run(name: str, sample: int | None, again: bool) -> dict[str, int]:
    session = OUT / f"{name}.sqlite"
    only = None
    if again:
        previous = session.rename(OUT / f"{name}-previous.sqlite")
        only = survivors_of(previous)
    session.unlink(missing_ok=True)
    cfg = config(name)
    cosmic = [str(Path(sys.executable).with_name("cosmic-ray"))]
    subprocess.run([*cosmic, "init", str(cfg), str(session)], cwd=ROOT, check=True)
    with use_db(str(session)) as db:
        prune(db, sample, only)
    subprocess.run([*cosmic, "exec", str(cfg), str(session)], cwd=ROOT, check=True)
    counts = {"tested": 0, "killed": 0, "survived": 0, "incompetent": 0}
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            counts["tested"] += 1
            outcome = result.test_outcome or TestOutcome.INCOMPETENT
            counts[outcome.value] += 1
            if outcome == TestOutcome.SURVIVED:
                (mutation,) = item.mutations
                where = f"{mutation.module_path}:{mutation.start_pos[0]}"
                survivors.append(f"== {where} {mutation.operator_name}\n{result.diff}")
    (OUT / f"{name}-survivors.txt").write_text("\n".join(survivors))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, help="mutants to test per target")
    parser.add_argument(
        "--survivors", action="store_true", help="test again only the last run's survivors"
    )
    parser.add_argument("targets", nargs="*", help=f"of {', '.join(TARGETS)} (all by default)")
    args = parser.parse_args()
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    args.targets = args.targets or list(TARGETS)
    OUT.mkdir(exist_ok=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    if dirty.stdout.strip():
        print("the working tree has changes; commit or stash them first (mutants go on disk)")
        return 2
    report = {name: run(name, args.sample, args.survivors) for name in args.targets}
    print(json.dumps(report, indent=2))
    for name, counts in report.items():
        print(f"{name}: {counts['killed']} of {counts['tested']} mutants killed, "
              f"{counts['survived']} survived (.mutation/{name}-survivors.txt)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
