"""The package's layers, as pyproject.toml's import-linter contracts declare them: they hold, every
module lies in a layer, and an import that climbs a layer or closes a loop — also one inside a
function — fails with a message that names it."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import hanlm

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(project: Path) -> subprocess.CompletedProcess:
    """lint-imports over the `hanlm` package found first from `project` (a copy in a test, or the tree)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_the_layer_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_every_module_lies_in_a_layer():
    declared = [m.strip() for layer in contracts()["layers"]["layers"] for m in layer.replace(":", "|").split("|")]
    modules = [m.name for m in pkgutil.walk_packages(hanlm.__path__, "hanlm.")]
    outside = [m for m in modules if not any(m == d or m.startswith(d + ".") for d in declared)]
    assert not outside, f"modules in no layer of pyproject.toml's import-linter contract: {outside}"
    assert len(modules) > 80


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package and pyproject.toml copied, to plant imports in."""
    shutil.copytree(ROOT / "hanlm", tmp_path / "hanlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(copy: Path, module: str, statement: str) -> int:
    """Append a function holding `statement` to `module` of the copy; the statement's line number."""
    path = copy / Path(*module.split(".")).with_suffix(".py")
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines, "", "", "def _planted():", f"    {statement}", ""]), encoding="utf-8")
    return len(lines) + 4


def test_a_deferred_upward_import_breaks_the_layers_and_is_named(copy):
    line = plant(copy, "hanlm.data.tokenizer", "from hanlm.loading import load_tagger  # the old segmenter hook")
    result = lint(copy)
    assert result.returncode == 1
    assert "hanlm.data is not allowed to import hanlm.loading" in result.stdout
    assert f"hanlm.data.tokenizer -> hanlm.loading (l.{line})" in result.stdout


def test_a_deferred_cycle_inside_a_package_is_named(copy):
    # train.sync sits below train.diloco; importing DiLoCo back from it closes the loop issue 28 removed.
    plant(copy, "hanlm.train.sync", "from hanlm.train.diloco import DiLoCo")
    result = lint(copy)
    assert result.returncode == 1
    assert "No cycles are allowed in hanlm.train" in result.stdout
    assert ".sync -> .diloco" in result.stdout or ".diloco -> .sync" in result.stdout
