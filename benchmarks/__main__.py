"""``python -m benchmarks [--json FILE]``: every benchmark, one table.

Runs, one after the other on this machine:
- ``benchmarks.simulation``: our generator vs a bare BTK loop (1 and 2 workers);
- ``benchmarks.training``: the real stage-1 loop (data loading included) vs the bare
  forward+backward step, and ``Deblender.predict`` vs the bare encoder forward;
- ``benchmarks.memory``: peak anonymous memory of generating and of streaming a dataset for
  training, at N, 2N and 4N samples, carried to 200,000 samples (rules in its docstring);
- ``benchmarks.metacal_speed``: galaxies/s of metacal + regressor (e and R per galaxy) against
  bare ``predict`` and against AnaCal on the same stamps (2 processes = 2 cores);
- ``benchmarks.cell_speed``: galaxies/s of the whole metadetection path on 300-pixel fields cut
  into cells (cell metacal, five detections, stamps, regressor, catalogue) against AnaCal with
  its own detection on the same cells.
Every ratio compares two measurements of the same run; the table says which target each meets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

TARGETS = {
    ("simulation", "ours_vs_bare_1_worker"): (0.9, "ours / bare BTK, 1 worker"),
    ("simulation", "ours_vs_bare_per_worker_2_workers"): (0.9, "ours / bare BTK per worker, 2 workers"),
    ("simulation", "ours_speedup_1_to_2_workers"): (1.7, "our speed-up 1 -> 2 workers"),
    ("training", "loop_over_bare"): (0.9, "stage loop / bare step"),
    ("training", "predict_over_encoder"): (None, "predict / bare encoder"),
    ("training", "predict_over_networks"): (0.8, "predict / bare networks it runs (8 views)"),
    ("metacal_speed", "metacal_over_anacal_2_cores"): (1.0, "metacal+regressor / AnaCal, 2 cores"),
    ("metacal_speed", "metacal_over_predict"): (None, "metacal+regressor / predict (1 view)"),
    ("cell_speed", "deblend_over_anacal"): (1.0, "cell metadetection / AnaCal with detection"),
}


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"simulation": {"n": 1000}, "training": {"n": 1280},
             "memory": {"n": 1000}, "metacal_speed": {"n": 1024},
             "cell_speed": {"n_fields": 4}},
    "quick": {"simulation": {"n": 200}, "training": {"n": 640},
              "memory": {"n": 250, "jobs": 2}, "metacal_speed": {"n": 256},
              "cell_speed": {"n_fields": 1}},
    # a smoke run (tests/test_benchmarks.py): every path, figures too small to mean anything
    "tiny": {"simulation": {"n": 16, "catalog_rows": 2000},
             "training": {"n": 64, "batch_size": 16, "repeats": 1},
             "memory": {"n": 16, "shard_size": 8, "jobs": 3},  # all three sizes at once
             "metacal_speed": {"n": 16, "repeats": 1},
             "cell_speed": {"n_fields": 1}},
}
"""The keyword arguments of each benchmark's ``run`` at each ``--size``."""


def run_all(size: str = "full") -> dict[str, Any]:
    """Run the five benchmarks, one after the other, at ``size`` (a key of :data:`SIZES`)."""
    from benchmarks import cell_speed, memory, metacal_speed, simulation, training

    modules = {"simulation": simulation, "training": training, "memory": memory,
               "metacal_speed": metacal_speed, "cell_speed": cell_speed}
    results = {}
    for name, module in modules.items():
        started = time.perf_counter()
        results[name] = module.run(**SIZES[size][name])
        results[name]["wall_s"] = time.perf_counter() - started
    return results


def format_table(results: dict[str, Any]) -> str:
    """One table: the measured figures, then the ratios against their targets."""
    sim, train, mem = results["simulation"], results["training"], results["memory"]
    speed, cells = results["metacal_speed"], results["cell_speed"]
    rows = [
        ("bare BTK, 1 worker", sim["bare_btk_1_worker"], "scenes/s"),
        ("our generator, 1 worker", sim["ours_1_worker"], "scenes/s"),
        ("bare BTK, 2 workers", sim["bare_btk_2_workers"], "scenes/s"),
        ("our generator, 2 workers", sim["ours_2_workers"], "scenes/s"),
        ("stage1 loop (data loading included)", train["loop_samples_per_s"], "samples/s"),
        ("bare forward+backward step", train["bare_step_samples_per_s"], "samples/s"),
        ("Deblender.predict", train["predict_galaxies_per_s"], "galaxies/s"),
        ("bare encoder forward", train["encoder_galaxies_per_s"], "galaxies/s"),
        ("metacal + regressor, 1 view (e and R)", speed["metacal_regressor_1_view"],
         "galaxies/s"),
        ("AnaCal r+i+z, 2 processes", speed["anacal_2_processes"], "galaxies/s"),
        ("cell metadetection, deblender (1 view)", cells["deblend_population_galaxies_per_s"],
         "galaxies/s"),
        ("  with per-object responses", cells["deblend_with_object_response_galaxies_per_s"],
         "galaxies/s"),
        ("AnaCal with detection, same cells", cells["anacal_galaxies_per_s"], "galaxies/s"),
        ("peak memory generating N / 2N / 4N", "/".join(
            f"{mem[f'generate_{k}_peak_mib']:.0f}" for k in ("n", "2n", "4n")), "MiB"),
        ("peak memory streaming N / 2N / 4N", "/".join(
            f"{mem[f'stream_{k}_peak_mib']:.0f}" for k in ("n", "2n", "4n")), "MiB"),
        (f"generating 200k ({mem['generate_extrapolation_rule']})",
         mem["generate_extrapolated_200k_peak_mib"], "MiB"),
        (f"streaming 200k ({mem['stream_extrapolation_rule']})",
         mem["stream_extrapolated_200k_peak_mib"], "MiB"),
    ]
    lines = [f"{'measure':42s} {'value':>14s}  unit", "-" * 66]
    for name, value, unit in rows:
        text = value if isinstance(value, str) else f"{value:14.1f}"
        lines.append(f"{name:42s} {text:>14s}  {unit}")
    lines += ["", f"{'ratio':42s} {'value':>14s}  target", "-" * 66]
    for (group, key), (target, name) in TARGETS.items():
        value = results[group][key]
        verdict = "-" if target is None else f">= {target} {'met' if value >= target else 'MISSED'}"
        lines.append(f"{name:42s} {value:14.2f}  {verdict}")
    lines.append("wall time of each benchmark: " + ", ".join(
        f"{name} {results[name]['wall_s']:.0f} s" for name in results))
    lines.append(f"(memory: N = {mem['generate_n_samples']:.0f} samples, each measured in a fresh "
                 f"process; 200k: 'flat' = the largest peak when N -> 4N grew < 10%, 'linear' = "
                 f"the N -> 4N growth extrapolated)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks.json", help="where to write the results")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="full (the figures the README gives), quick (smaller), or tiny "
                             "(a smoke run of every path, as the tests do)")
    args = parser.parse_args(argv)
    results = run_all(args.size)
    print(format_table(results))
    Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
