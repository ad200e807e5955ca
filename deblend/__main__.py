"""``python -m deblend run --config configs/quick.yaml --out RUN``: the whole pipeline.

See :mod:`deblend.pipeline` for the steps and the layout of RUN.
"""

from __future__ import annotations

import argparse
import sys

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deblend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="simulate, train, evaluate, calibrate, validate")
    run.add_argument("--config", help="YAML config (default: the embedded defaults)")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--jobs", type=positive_int_arg, default=2, help="simulation worker processes")
    run.add_argument("--force", action="store_true",
                     help="start again in an --out that was started with another config")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    from deblend.pipeline import run_pipeline

    args = parse_args(argv)
    run_pipeline(args.config, args.out, jobs=args.jobs, force=args.force,
                 progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
