"""Benchmark: our dataset generator against a bare BTK loop drawing the same scenes.

``python -m benchmarks.simulation [--n N] [--json FILE]`` prints samples per second of
- bare BTK: ``next(CatsimGenerator)`` over the same sampling function, catalog and survey, with
  nothing else (no isolated-target noise, no labels, no writing), on 1 worker and on 2 workers
  (two independent processes, each drawing half);
- ours: ``simulation.builder.build_dataset`` (BTK + noisy isolated target + labels incl.
  galsim.hsm + HDF5 shards + normalisation constants) with ``jobs=1`` and ``jobs=2``;
and the ratios: ours / bare per worker (target >= 0.9) and our 2-worker speed-up (target >= 1.7).
Both sides are measured in the same run, on the same machine, interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from deblend.core.arguments import positive_int_arg
from deblend.core.config import SimulationConfig, config_from_dict
from simulation.builder import SceneSource, build_dataset, shard_seed


def _bare_btk(sim: SimulationConfig, n: int, seed: int) -> float:
    """Seconds for a bare BTK loop to draw ``n`` scenes (catalog built beforehand)."""
    source = SceneSource(sim)
    drawer = source.drawer(seed)
    generator = drawer.generator
    start = time.perf_counter()
    drawn = 0
    while drawn < n:
        next(generator)
        drawn += generator.batch_size
    return time.perf_counter() - start


def _bare_worker(args: tuple[SimulationConfig, int, int]) -> float:
    return _bare_btk(*args)


def bare_btk_rate(sim: SimulationConfig, n: int, workers: int) -> float:
    """Scenes per second of bare BTK on ``workers`` processes (each draws n / workers)."""
    if workers == 1:
        return n / _bare_btk(sim, n, shard_seed(sim.seed, 0))
    context = multiprocessing.get_context("fork")
    args = [(sim, n // workers, shard_seed(sim.seed, k)) for k in range(workers)]
    start = time.perf_counter()
    with context.Pool(workers) as pool:
        pool.map(_bare_worker, args)
    return n / (time.perf_counter() - start)


def ours_rate(sim: SimulationConfig, workers: int) -> float:
    """Scenes per second of the full generator (catalog creation included, as users see it)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_dataset(sim, Path(tmp) / "data", jobs=workers, progress=False, log=lambda s: None)
        return sim.n_samples / (time.perf_counter() - start)


def run(n: int = 1000, catalog_rows: int = 50_000) -> dict[str, float]:
    """Measure all four rates and the two ratios."""
    sim = config_from_dict({"simulation": {"n_samples": n, "shard_size": max(n // 4, 1),
                                           "catalog_rows": catalog_rows}}).simulation
    ours_rate(dataclasses.replace(sim, n_samples=50, shard_size=50), 1)  # warm-up
    results = {
        "bare_btk_1_worker": bare_btk_rate(sim, n, 1),
        "ours_1_worker": ours_rate(sim, 1),
        "bare_btk_2_workers": bare_btk_rate(sim, n, 2),
        "ours_2_workers": ours_rate(sim, 2),
    }
    results["ours_vs_bare_1_worker"] = results["ours_1_worker"] / results["bare_btk_1_worker"]
    results["ours_vs_bare_per_worker_2_workers"] = (results["ours_2_workers"]
                                                    / results["bare_btk_2_workers"])
    results["ours_speedup_1_to_2_workers"] = results["ours_2_workers"] / results["ours_1_worker"]
    return results


def print_table(results: dict[str, float]) -> None:
    """Human-readable table of :func:`run`'s results."""
    print(f"{'measure':38s} {'value':>10s}")
    for key, value in results.items():
        unit = "scenes/s" if "worker" in key and "vs" not in key and "speedup" not in key else "x"
        print(f"{key:38s} {value:10.2f} {unit}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int_arg, default=1000, help="scenes per measurement")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args.n)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
