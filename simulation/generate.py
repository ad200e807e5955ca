"""CLI: ``python -m simulation.generate --config configs/<name>.yaml [--n N] [--out DIR] [--seed S]``.

Writes a dataset in the format of :mod:`simulation.dataset`. Resumable: run the same command
again after an interruption and finished shards are kept. ``--shard K --num-shards N`` runs one
piece of the shards (for a cluster array job); the piece that finds all shards done finalises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblend.core.arguments import non_negative_int_arg, positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from simulation.builder import build_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulation.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: embedded defaults)")
    parser.add_argument("--n", type=positive_int_arg,
                        help="number of samples (overrides simulation.n_samples)")
    parser.add_argument("--out", help="dataset directory (default: data/<config name>)")
    parser.add_argument("--seed", type=non_negative_int_arg, help="overrides simulation.seed")
    parser.add_argument("--jobs", type=positive_int_arg, default=1,
                        help="parallel worker processes")
    parser.add_argument("--shard", type=non_negative_int_arg, default=0,
                        help="this piece's index K")
    parser.add_argument("--num-shards", type=positive_int_arg, default=1, help="number of pieces N")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    changes = {}
    if args.n is not None:
        changes["n_samples"] = args.n
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes:
        config = config.replace("simulation", **changes)
    out = Path(args.out) if args.out else Path("data") / config.name
    data = build_dataset(config.simulation, out, jobs=args.jobs, shard=args.shard,
                         num_shards=args.num_shards, force=args.force,
                         progress=not args.no_progress)
    if data is not None:
        print(f"dataset complete: {out} ({data.n_samples} samples, {data.survey} "
              f"{' '.join(data.bands)}, {data.pixel_scale}\"/pixel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
