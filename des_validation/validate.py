"""CLI: the DES validation of a trained run (SPEC 7); see :mod:`des_validation.validation`.

    python -m des_validation.validate --run R --catalog CAT --cutouts DIR_OR_NPZ [--out DIR]
        [--config YAML] [--u-strategy zeros|g_copy|g_extrapolate] [--no-resample]
        [--normalization des|training] [--training-data DIR] [--real-frames DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from deblend.core.arguments import positive_float_arg
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
from des_validation.validation import validate_des


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m des_validation.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="trained run directory")
    parser.add_argument("--catalog", required=True, help="im3shape catalog (FITS or CSV)")
    parser.add_argument("--cutouts", required=True,
                        help="directory of <id>.fits / <id>_<band>.fits files, or a .npz")
    parser.add_argument("--out", help="output directory (default: RUN/des_validation)")
    parser.add_argument("--config", help="YAML config whose des section and "
                                         "metacal.target_psf_fwhm are used (default: the run's)")
    parser.add_argument("--u-strategy", choices=["zeros", "g_copy", "g_extrapolate"])
    parser.add_argument("--u-over-g", type=positive_float_arg,
                        help="u/g flux ratio for g_extrapolate")
    resample = parser.add_mutually_exclusive_group()
    resample.add_argument("--resample", dest="resample", action="store_true", default=None,
                          help="resample to the model's pixel scale (default)")
    resample.add_argument("--no-resample", dest="resample", action="store_false",
                          help="crop DES pixels as they are (the report's choice)")
    parser.add_argument("--normalization", choices=["des", "training"])
    parser.add_argument("--catalog-ellipticity", choices=["shear", "distortion"])
    parser.add_argument("--min-snr", type=float)
    parser.add_argument("--training-data", help="the run's training dataset (default: the path "
                                                "recorded in the run)")
    parser.add_argument("--pixel-scale", type=positive_float_arg,
                        help="arcsec per pixel of cutouts without a WCS (default: none)")
    parser.add_argument("--real-frames",
                        help="directory of real DECam frames also measured (des.real_frames)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    config = run_config(run, args.config)
    des = config.des
    overrides = {"u_strategy": args.u_strategy, "u_over_g": args.u_over_g,
                 "resample": args.resample, "normalization": args.normalization,
                 "catalog_ellipticity": args.catalog_ellipticity, "min_snr": args.min_snr,
                 "real_frames": args.real_frames}
    des = replace(des, **{k: v for k, v in overrides.items() if v is not None})
    command = "python -m des_validation.validate " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    metrics = validate_des(run, args.catalog, args.cutouts, args.out, des,
                       training_data=args.training_data, pixel_scale=args.pixel_scale,
                       force=args.force, device=args.device, command=command,
                       target_psf_fwhm=config.metacal.target_psf_fwhm)
    return 0 if metrics.counts["validated"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
