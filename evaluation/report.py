"""CLI: ``python -m evaluation.report --run R --data D [--out DIR] [--config C] [--force]``.

Evaluates a trained run on the validation split of a dataset and writes, in ``DIR`` (default
``R/evaluation``):

- ``report.md``: image fidelity of t1 (stage-1 VAE) and t2 (deblender) on the noisy blends (SSIM,
  cosine, flux and size), ellipticity accuracy of every estimator against the truth labels, with
  breakdowns by number of galaxies and target magnitude, and the gallery;
- ``metrics.json``: every number of the report, machine-readable;
- the PNG figures (``fig12_gallery.png``, ``fig13_fidelity.png``, ``fig14_ellipticity_scatter.png``,
  ``fig15_delta_e.png``, ``fig16_e_distributions.png``, ``fig_flux_size.png``,
  ``fig_breakdown.png``).

The evaluation settings are the ``evaluation`` section of ``--config`` (default: the config the run
was trained with, from ``R/run.json``). An existing report directory is never overwritten without
``--force``; a shear-calibration result already in it (``python -m evaluation.shear``) is kept.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
from evaluation.validation_report import write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (all three stages)")
    parser.add_argument("--data", required=True, help="dataset directory (its validation split)")
    parser.add_argument("--out", help="report directory (default: RUN/evaluation)")
    parser.add_argument("--config", help="YAML config whose evaluation section is used "
                                         "(default: the run's own config)")
    parser.add_argument("--max-samples", type=positive_int_arg,
                        help="overrides evaluation.max_samples")
    parser.add_argument("--force", action="store_true", help="replace an existing report")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    config = run_config(run, args.config)
    if args.max_samples is not None:
        config = config.replace("evaluation", max_samples=args.max_samples)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m evaluation.report " + " ".join(shlex.quote(a) for a in argv_list)
    write_report(run, args.data, args.out, config=config, force=args.force,
                 progress=not args.no_progress, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
