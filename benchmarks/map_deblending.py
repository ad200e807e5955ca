"""``python -m benchmarks.map_deblending --run R [--config C] [--out DIR] [--n-blends N]
[--n-fields N] [--shear-scenes N] [--scarlet2-blends N]``.

The MAP deblending comparison (:mod:`evaluation.map_report`): encoder alone vs MAP with the
N(0, I) prior vs MAP with the flow prior (and scarlet2 when installed) on the run's validation
blends and on dense fields, with MAP's shear bias against the applied shear. The ``map`` and
``dense_fields`` sections of the config (default: the run's own) set the sizes; the dataset is
the run's own. Prints the report's tables.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from deblend.core.runs import RunLayout, run_config
from evaluation.map_report import REPORT_FILE, run_map_comparison
from simulation.dataset import open_dataset


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.map_deblending",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (stages 1-3, and "
                        "the flow stage for the flow prior)")
    parser.add_argument("--config", help="YAML config whose map and dense_fields sections are "
                        "used (default: the run's own)")
    parser.add_argument("--out", help="output directory (default: RUN/map_deblending)")
    parser.add_argument("--n-blends", type=positive_int_arg, help="overrides map.n_blends")
    parser.add_argument("--n-fields", type=non_negative_int,
                        help="overrides dense_fields.n_fields (0: no fields)")
    parser.add_argument("--shear-scenes", type=non_negative_int, default=0,
                        help="GalSim scenes (even) for MAP's shear bias (default 0: none)")
    parser.add_argument("--scarlet2-blends", type=non_negative_int, default=0,
                        help="blends also deblended by scarlet2 when installed (default 0)")
    parser.add_argument("--device", help="torch device (overrides training.device)")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = run_config(args.run)
    if args.config is not None:
        given = load_config(args.config).to_dict()
        config = config.replace("map", **given["map"]).replace("dense_fields",
                                                               **given["dense_fields"])
    if args.device is not None:
        config = config.replace("training", device=args.device)
    if args.shear_scenes % 2:
        raise ValueError("--shear-scenes must be even (rotated twin pairs)")
    out = Path(args.out) if args.out else Path(args.run) / "map_deblending"
    data = open_dataset(RunLayout(Path(args.run)).read_run().data_path(Path(args.run)))
    run_map_comparison(args.run, config, out, data=data, n_blends=args.n_blends,
                       n_fields=args.n_fields, shear_scenes=args.shear_scenes,
                       scarlet2_blends=args.scarlet2_blends)
    print((out / REPORT_FILE).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
