"""The layers import one way (core -> simulation -> training -> evaluation -> des_validation ->
entry points) and nothing imports an entry point: the import-linter contracts of pyproject.toml."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deblend", "simulation", "training", "evaluation", "des_validation", "benchmarks")


def test_import_contracts_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, capsys.readouterr().out


def test_a_core_module_importing_training_breaks_the_contract(tmp_path, monkeypatch, capsys):
    """The contract can fail: a copy of the tree whose core imports training is refused."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shapes = tmp_path / "deblend" / "core" / "shapes.py"
    shapes.write_text(shapes.read_text() + "\nimport training.stages  # a layer upside down\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        monkeypatch.delitem(sys.modules, name)  # the copy, not the installed tree, is analysed
    code = lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 1
    assert "deblend.core.shapes -> training.stages" in out
