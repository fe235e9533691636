"""The import direction of DESIGN.md §3 holds; no package reaches into another's private modules.

`lint-imports` (import-linter, configured in pyproject.toml) checks the layers; these tests run it,
show that the same contract fails on a tree that breaks it, and add what import-linter does not
check: `from multikernel.<a>._private import ...` from outside package `<a>`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shm", "protocol", "endpoints", "bus", "upgrade", "services")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def private_imports(package: str, source: str) -> list[str]:
    """Imports in a module of `package` that name a private module of another package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if len(parts) < 3 or parts[0] != "multikernel" or parts[1] == package:
                continue
            if any(part.startswith("_") for part in parts[2:]):
                found.append(name)
    return found


def test_no_package_imports_another_packages_private_modules() -> None:
    offenders = {
        f"{package}/{path.name}": names
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
        if (names := private_imports(package, path.read_text()))
    }
    assert offenders == {}


def test_the_private_import_check_catches_one() -> None:
    planted = "from multikernel.endpoints._hublink import HubLink\nimport multikernel.shm._ring\n"
    assert private_imports("bus", planted) == [
        "multikernel.endpoints._hublink",
        "multikernel.endpoints._hublink.HubLink",
        "multikernel.shm._ring",
    ]
    assert private_imports("endpoints", "from multikernel.endpoints._calls import Reply") == []


def lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> str:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_layers_contract_is_kept() -> None:
    output = lint_imports(ROOT / "pyproject.toml", ROOT)
    assert output.startswith("exit 0"), output
    assert "1 kept, 0 broken" in output


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_layers_contract_fails_on_an_upward_import(tmp_path: Path) -> None:
    """Our own contract, applied to a tree of the same packages where shm imports the bus."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for package in PACKAGES:
        folder = tmp_path / "planted" / package
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    (tmp_path / "planted" / "shm" / "_ring.py").write_text("import planted.bus\n")
    rename = {"multikernel.": "planted."}

    def planted(text: str) -> str:
        for old, new in rename.items():
            text = text.replace(old, new)
        return text

    lines = ["[importlinter]", "root_packages ="]
    lines += [f"    {planted(p)}" for p in config["root_packages"]]
    for i, contract in enumerate(config["contracts"]):
        lines += [f"[importlinter:contract:{i}]", f"name = {contract['name']}"]
        lines += [f"type = {contract['type']}", "layers ="]
        lines += [f"    {planted(layer)}" for layer in contract["layers"]]
    ini = tmp_path / "planted.ini"
    ini.write_text("\n".join(lines) + "\n")
    output = lint_imports(ini, tmp_path, pythonpath=tmp_path)
    assert output.startswith("exit 1"), output
    assert "planted.shm._ring -> planted.bus" in output
