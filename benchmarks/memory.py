"""Benchmark: peak memory of generating a dataset and of streaming it for training.

``python -m benchmarks.memory [--n N] [--json FILE]`` generates datasets of N, 2N and 4N samples
and streams each through the stage-1 training DataLoader for one epoch (each measurement in a
fresh process), sampling the process's
anonymous resident memory (``RssAnon`` in /proc: the arrays we allocate, not the reclaimable page
cache of memory-mapped shards) every 20 ms. The peak is then carried to the 200,000-sample
datasets of configs/paper.yaml by one of two rules, named in the results: "flat" when the peak
grew by less than FLAT_TOLERANCE from N to 4N (the run-to-run scatter of these peaks is ~5%: a
difference of 2N -> 4N alone once extrapolated to 3 GiB, while 16,000 samples measured 383 MiB),
the largest peak measured; otherwise "linear", the N -> 4N growth extrapolated linearly (an upper
bound when the growth is flattening). The script prints every measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from deblend.core.arguments import positive_int_arg
from deblend.core.config import config_from_dict
from simulation.builder import build_dataset

PAPER_SAMPLES = 200_000
FLAT_TOLERANCE = 0.10
"""Relative N -> 4N growth of the peak below which memory is taken as not growing with N."""


def anonymous_rss_mib() -> float:
    """This process's anonymous resident memory (MiB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("/proc/self/status has no RssAnon (Linux only)")


def peak_memory(work: Callable[[], object], interval: float = 0.02) -> float:
    """Run ``work`` and return the peak anonymous RSS (MiB) seen while it ran."""
    peak = anonymous_rss_mib()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anonymous_rss_mib())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return max(peak, anonymous_rss_mib())


def stream_one_epoch(data_dir: Path, batch_size: int = 64) -> int:
    """Read every training batch of a dataset the way stage 1 does (noisy -> clean)."""
    from training.data import make_loader
    from training.stages import STAGES

    stage = STAGES["stage1"]
    loader = make_loader(data_dir, input_set=stage.input_set, target=stage.target,
                         split="train", batch_size=batch_size, epoch=0, seed=0)
    return sum(1 for _ in loader)


def _measure(what: str, root: Path, n: int, shard_size: int) -> float:
    """Peak anonymous memory (MiB) of one measurement in this process."""
    if what == "generate":
        sim = config_from_dict({"simulation": {"n_samples": n, "shard_size": shard_size,
                                               "catalog_rows": 50_000}}).simulation
        return peak_memory(lambda: build_dataset(sim, root, progress=False, log=lambda s: None))
    return peak_memory(lambda: stream_one_epoch(root))


def _in_child(what: str, root: Path, n: int, shard_size: int) -> float:
    """Run :func:`_measure` in a fresh Python process, so earlier work cannot inflate its peak."""
    command = [sys.executable, "-m", "benchmarks.memory", "--child", what, str(root), str(n),
               str(shard_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _generate_and_stream(root: Path, count: int, shard_size: int) -> tuple[float, float]:
    """Peaks (MiB) of generating ``count`` samples into ``root``, then of streaming them."""
    generate = _in_child("generate", root, count, shard_size)
    return generate, _in_child("stream", root, count, shard_size)


def run(n: int = 1000, shard_size: int = 500, jobs: int = 1) -> dict[str, float]:
    """Peak anonymous memory of generating and streaming N, 2N, 4N samples (fresh processes,
    ``jobs`` sizes at a time: each process's own peak does not depend on the others)."""
    results: dict[str, float] = {}
    sizes = {"n": n, "2n": 2 * n, "4n": 4 * n}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        peaks = {label: pool.submit(_generate_and_stream, Path(tmp) / label, count, shard_size)
                 for label, count in sizes.items()}
        for label, count in sizes.items():
            results[f"generate_{label}_samples"] = count
            (results[f"generate_{label}_peak_mib"],
             results[f"stream_{label}_peak_mib"]) = peaks[label].result()
    for what in ("generate", "stream"):
        peaks = [results[f"{what}_{label}_peak_mib"] for label in ("n", "2n", "4n")]
        growth = peaks[2] - peaks[0]
        results[f"{what}_growth_mib_per_1000_samples"] = growth / (3 * n) * 1000
        if growth < FLAT_TOLERANCE * peaks[0]:
            results[f"{what}_extrapolation_rule"] = "flat"
            results[f"{what}_extrapolated_200k_peak_mib"] = max(peaks)
        else:
            results[f"{what}_extrapolation_rule"] = "linear"
            results[f"{what}_extrapolated_200k_peak_mib"] = (
                peaks[2] + growth / (3 * n) * (PAPER_SAMPLES - 4 * n))
    return results


def print_table(results: dict[str, float]) -> None:
    """Human-readable table of :func:`run`'s results."""
    for key, value in results.items():
        print(f"{key:44s} {value:>10}" if isinstance(value, str) else f"{key:44s} {value:10.1f}")
    print(f"(200k: 'flat' = the largest peak, when N -> 4N grew by < {FLAT_TOLERANCE:.0%}; "
          f"'linear' = the N -> 4N growth extrapolated)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int_arg, default=1000,
                        help="samples of the smallest dataset")
    parser.add_argument("--jobs", type=positive_int_arg, default=1,
                        help="dataset sizes measured at a time, each in its own processes")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--child", nargs=4, metavar=("WHAT", "ROOT", "N", "SHARD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, root, n, shard = args.child
        print(_measure(what, Path(root), int(n), int(shard)))
        return 0
    results = run(args.n, jobs=args.jobs)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
