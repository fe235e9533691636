"""The wheel carries every module: build it, install it in a fresh virtualenv, import them all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = ["shm", "protocol", "endpoints", "bus", "services", "upgrade"]


def modules() -> list[str]:
    names = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join(["multikernel", folder, *parts]))
    return names


def build_wheel(dist: Path, env: dict[str, str] | None = None) -> Path:
    """Build from a clean copy of the tree: nothing built before (build/, a .so) leaks in."""
    source = dist.with_name(dist.name + "-src")
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.so",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            ".mutation",
            ".coverage-data",
            ".concurrent",  # tools' output: a virtualenv, logs
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        env=env,
    )
    (wheel,) = dist.glob("multikernel-*.whl")
    return wheel


def native_library(name: str) -> bool:
    return name.startswith("multikernel/shm/_native.") and name.endswith(".so")


RING_SCRIPT = """
import sys
from multikernel.shm import Region, RingReader, RingWriter, format_ring, native_available
with Region.create(4096) as region:
    format_ring(region, 0, 1024)
    with RingWriter(region, 0) as w, RingReader(region, 0) as r:
        w.try_send(b"hi")
        assert r.try_receive() == b"hi"
        print(native_available(), w.implementation)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)  # two wheel builds, a virtualenv and three pip installs: ~40 s when busy
def test_wheel_installs_and_imports_every_module(tmp_path: Path) -> None:
    """Every module, the native ring core included; and without a compiler, the Python ring."""
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        assert any(native_library(n) for n in archive.namelist())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)
    names = modules()
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [str(python), "-c", script, *names], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    typed = subprocess.run(
        [
            str(python),
            "-c",
            "import multikernel.shm, pathlib; "
            "print(pathlib.Path(multikernel.shm.__file__).with_name('py.typed').exists())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert typed.stdout.strip() == "True"
    ring = subprocess.run(
        [str(python), "-c", RING_SCRIPT], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert (ring.stdout, ring.stderr) == ("True native\n", "")
    # No compiler: the wheel still builds, without the native core, and the ring says so once.
    nocc = build_wheel(tmp_path / "nocc", {**os.environ, "CC": "false", "LDSHARED": "false"})
    with zipfile.ZipFile(nocc) as archive:
        assert not any(native_library(n) for n in archive.namelist())
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall"]
    subprocess.run([*pip, str(nocc)], check=True)
    ring = subprocess.run(
        [str(python), "-c", RING_SCRIPT], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert ring.stdout == "False python\n"
    assert ring.stderr.startswith("multikernel.shm: native ring core unavailable (")
    assert ring.stderr.endswith("using the pure-Python ring\n")
    assert ring.stderr.count("\n") == 1
