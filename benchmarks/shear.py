"""``python -m benchmarks.shear --run R [--config C] [--out DIR] [--n-scenes N] [--force]``.

The metacalibrated shear benchmark (:mod:`evaluation.metacal_benchmark`): m and c of the
regressor, the reconstruction estimators, blend HSM and AnaCal against the applied shear, on the
BTK population (the run's own simulation settings) and the independent GalSim population, with
and without neighbours. The ``metacal`` section of the config (default: the run's own) sets the
populations and sizes; ``configs/paper.yaml`` has the benchmark's full size. Interrupted runs
resume chunk by chunk.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from deblend.core.runs import run_config
from evaluation.metacal_benchmark import run_metacal_benchmark


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (all three stages)")
    parser.add_argument("--config", help="YAML config whose metacal section is used (default: "
                        "the run's own); the simulation is always the run's own")
    parser.add_argument("--out", help="output directory (default: RUN/metacal_shear)")
    parser.add_argument("--n-scenes", type=positive_int_arg, help="overrides metacal.n_scenes")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument("--force", action="store_true", help="measure again over an existing "
                        "result (valid cached chunks are still reused)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = run_config(args.run)
    if args.config is not None:
        config = config.replace("metacal", **load_config(args.config).to_dict()["metacal"])
    if args.n_scenes is not None:
        config = config.replace("metacal", n_scenes=args.n_scenes)
    run_metacal_benchmark(args.run, config, args.out, force=args.force,
                          progress=not args.no_progress, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
