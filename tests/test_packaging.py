"""The conda environment and pyproject.toml declare the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGES = {"python", "pip"}


def package_name(requirement: str) -> str:
    """Canonical package name of a requirement string ("numpy>=1.26,<2.4" -> "numpy")."""
    name = re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def environment_packages() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            names |= {package_name(r) for r in entry["pip"] if not r.startswith("-e")}
        else:
            names.add(package_name(entry))
    return names - NOT_PACKAGES


def pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["test"] + extras["peers"]
    return {package_name(r) for r in requirements}


def test_environment_and_pyproject_name_the_same_packages():
    env, pyproject = environment_packages(), pyproject_packages()
    assert env == pyproject, (f"only in environment.yml: {sorted(env - pyproject)}; "
                              f"only in pyproject.toml: {sorted(pyproject - env)}")


def test_numpy_and_astropy_pins_match_btk_constraints():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {package_name(d): d for d in deps}
    assert "<2.4" in pins["numpy"] and "<7" in pins["astropy"]
    assert ">=1.3.0" in pins["surveycodex"]
