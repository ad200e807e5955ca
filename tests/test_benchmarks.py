"""Every documented benchmark command runs, at its smallest size, and prints what it promises.

``python -m benchmarks`` once crashed for weeks because nothing ran it (the memory benchmark
called the data loader with arguments it no longer took). These tests run the whole suite at
``--size tiny`` and each ``python -m benchmarks.*`` command that no other test runs in its
smallest form (fields, cell_speed, shear, conditions and reconstruction_defects are run by their
own tests). They check that the figures exist and are finite, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import parser_refusal

ROOT = Path(__file__).resolve().parents[1]


def run_command(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the checkout; fails the test with its output on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"python -m {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def finite_numbers(tree) -> list[float]:
    """Every number in a JSON tree (to check that none is NaN or infinite)."""
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in finite_numbers(value)]
    if isinstance(tree, list):
        return [v for value in tree for v in finite_numbers(value)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_whole_suite_prints_every_ratio_at_tiny_size(tmp_path: Path) -> None:
    from benchmarks.__main__ import SIZES, TARGETS

    out = tmp_path / "benchmarks.json"
    done = run_command("benchmarks", "--size", "tiny", "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == set(SIZES["tiny"])
    for (group, key), (target, name) in TARGETS.items():
        value = results[group][key]
        assert math.isfinite(value) and value > 0, (group, key, value)
        assert name in done.stdout
    assert all(math.isfinite(v) for v in finite_numbers(results))
    assert results["memory"]["generate_n_samples"] == SIZES["tiny"]["memory"]["n"]
    for key in ("generate_4n_peak_mib", "stream_4n_peak_mib", "ours_2_workers"):
        group = "simulation" if key.startswith("ours") else "memory"
        assert math.isfinite(results[group][key]) and results[group][key] > 0, (group, key)


@pytest.mark.slow
def test_a_benchmark_command_in_its_smallest_form(tmp_path: Path) -> None:
    """One command on its own (parser, run, table, --json): the others' ``run`` is the whole
    suite's above, their parsers are the refusal test's below."""
    out = tmp_path / "result.json"
    run_command("benchmarks.training", "--n", "48", "--batch-size", "16", "--repeats", "1",
                "--json", str(out))
    result = json.loads(out.read_text())
    for key in ("loop_over_bare", "predict_over_networks"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])


@pytest.mark.parametrize("module, args", [
    ("benchmarks.simulation", ["--n", "0"]),
    ("benchmarks.training", ["--batch-size", "-1"]),
    ("benchmarks.memory", ["--n", "0"]),
    ("benchmarks.metacal_speed", ["--repeats", "0"]),
    ("benchmarks.cell_speed", ["--fields", "0"]),
    ("benchmarks.photometry", ["--n-fields", "0", "--run", "R"]),
    ("benchmarks.__main__", ["--size", "huge"]),
])
def test_benchmark_commands_refuse_bad_sizes_before_running(module: str, args: list[str],
                                                            capsys) -> None:
    error = parser_refusal(module, args, capsys)
    assert args[0] in error and "usage:" in error


@pytest.mark.slow
def test_map_deblending_command_in_its_smallest_form(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "map"
    done = run_command("benchmarks.map_deblending", "--run", str(trained_run), "--out", str(out),
                       "--n-blends", "2", "--n-fields", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and all(math.isfinite(v) for v in finite_numbers(metrics))
    assert (out / "report.md").read_text() in done.stdout
