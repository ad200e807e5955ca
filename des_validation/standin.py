"""CLI: ``python -m des_validation.standin --out DIR [--config C] [--n N] [--seed S] [--force]``.

Writes a DES-like stand-in (simulated DES cutouts + an im3shape-like catalog with the truth); the
layout and the deliberate defects are described in :mod:`des_validation.standin_cutouts`.
"""

from __future__ import annotations

import argparse
import sys

from deblend.core.arguments import non_negative_int_arg, positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from des_validation.standin_cutouts import write_standin


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m des_validation.standin",
        description="Write a DES-like stand-in (simulated cutouts + im3shape-like catalog).")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--config", help="YAML config (simulation and des sections); the "
                        "simulation is forced to the DES survey")
    parser.add_argument("--n", type=positive_int_arg, help="objects (default: des.n_standin)")
    parser.add_argument("--seed", type=non_negative_int_arg,
                        help="seed (default: des.standin_seed)")
    parser.add_argument("--stamp", type=positive_int_arg, default=45,
                        help="cutout side in DES pixels")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    write_standin(args.out, config, args.n, args.seed, args.stamp, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
