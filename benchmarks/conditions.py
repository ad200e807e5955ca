"""``python -m benchmarks.conditions --run R [--n-scenes N] [--rows NAME ...] [--out DIR]
[--json FILE] [--cosmos FILE] [--seed S] [--target-psf-fwhm ARCSEC ...] [--hold-sky-plane]
[--device D] [--force] [--no-progress]``.

A grid of observing conditions of a run's survey (LSST or DES): PSF FWHM, PSF
ellipticity, depth (1 and 3 years against the survey's full depth), each missing band, real COSMOS galaxies, sky-subtraction residuals
(:mod:`evaluation.conditions`). Prints m, c (and the PSF leakage alpha) of the metacalibrated
regressor against the applied shear, its e RMSE, flux residual and mean response per row, and
writes ``report.md``, ``metrics.json`` and a figure to ``--out`` (default ``RUN/conditions``).
Sizes and settings come from the run's ``metacal`` section; interrupted runs resume chunk by
chunk from ``OUT/cache``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import emit
from deblend.core.arguments import (
    add_target_psf_fwhm, non_negative_int_arg, positive_int_arg, target_psf_fwhm)
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
from evaluation.conditions import (
    MIN_SCENES,
    ROW_NAMES,
    conditions_table,
    response_table,
    run_conditions,
)

DEFAULT_COSMOS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "cosmos"
                  / "real_galaxy_catalog_26_extension_example.fits")
"""The COSMOS real-galaxy catalogue next to the project (``../shared/data/cosmos``)."""


def scenes_arg(text: str) -> int:
    """An even integer >= :data:`MIN_SCENES` (scenes come in rotated-twin pairs), for argparse."""
    value = positive_int_arg(text)
    if value % 2 or value < MIN_SCENES:
        raise argparse.ArgumentTypeError(f"must be an even integer >= {MIN_SCENES} (twin "
                                         f"pairs), got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conditions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run (stage3 with its regressor)")
    parser.add_argument("--n-scenes", type=scenes_arg, help="scenes per row (even, >= 4; default: "
                        "the run's metacal.n_scenes)")
    parser.add_argument("--rows", nargs="+", metavar="NAME",
                        help="rows to measure (default all; nominal always): "
                        + " ".join(ROW_NAMES) + " (LSST's; no_<band> for each band of the "
                        "run's survey)")
    parser.add_argument("--out", help="output directory (default: RUN/conditions)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--cosmos", default=str(DEFAULT_COSMOS),
                        help="GalSim real-galaxy catalogue of the cosmos row "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int_arg, help="overrides metacal.seed")
    add_target_psf_fwhm(parser, "overrides metacal.target_psf_fwhm: every metacal image "
                        "reconvolved to this round Gaussian (one FWHM, or one per band)")
    parser.add_argument("--hold-sky-plane", action="store_true", help="sets metacal.hold_sky_plane: "
                        "metacal shears each stamp less its fitted sky plane and puts the plane "
                        "back unsheared")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument("--force", action="store_true", help="measure again over an existing "
                        "result (valid cached chunks are still reused)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = run_config(args.run)
    changes = {k: v for k, v in (("n_scenes", args.n_scenes), ("seed", args.seed),
                                 ("target_psf_fwhm", target_psf_fwhm(args.target_psf_fwhm)),
                                 ("hold_sky_plane", args.hold_sky_plane or None))
               if v is not None}
    if changes:
        config = config.replace("metacal", **changes)
    result = run_conditions(args.run, config, args.out, rows=args.rows, cosmos=args.cosmos,
                            force=args.force, progress=not args.no_progress, device=args.device)
    emit(result, conditions_table(result) + "\n" + response_table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
