"""CLI: ``python -m evaluation.shear --run R --config C [--out DIR] [--force]``.

Shear calibration of every ellipticity estimator of a trained run (SPEC 6): see
:mod:`evaluation.shear_calibration` for the populations, the fit and the outputs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from evaluation.shear_calibration import measure_shear


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (all three stages)")
    parser.add_argument("--config", required=True,
                        help="YAML config: its simulation and shear sections are used")
    parser.add_argument("--out", help="report directory to merge into (default: RUN/evaluation)")
    parser.add_argument("--n-scenes", type=positive_int_arg, help="overrides shear.n_scenes")
    parser.add_argument("--force", action="store_true", help="replace an existing shear result "
                        "(valid cached populations are still reused)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    if args.n_scenes is not None:
        config = config.replace("shear", n_scenes=args.n_scenes)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m evaluation.shear " + " ".join(shlex.quote(a) for a in argv_list)
    measure_shear(args.run, config, args.out, force=args.force, progress=not args.no_progress,
                  command=command, config_path=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
