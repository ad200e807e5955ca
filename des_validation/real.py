"""``python -m des_validation.real --run R --data DIR --out DIR [--zeropoint BAND=ZP]
[--target-psf-fwhm ARCSEC ...] [--deblend-contrast C] [--force]``:
the trained deblender on real DECam frames (:mod:`des_validation.real_pixels`)."""

from __future__ import annotations

import argparse
import sys

from deblend.core.arguments import add_deblend_contrast, add_target_psf_fwhm, target_psf_fwhm
from deblend.core.cli import fail_cleanly
from deblend.core.metadetect import DEBLEND_CONTRAST
from deblend.core.survey_input import band_float_arg
from des_validation.real_pixels import run_real_des


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m des_validation.real", description=__doc__)
    parser.add_argument("--run", required=True, help="training run (or exported weights)")
    parser.add_argument("--data", required=True,
                        help="directory of DECam frames (image, weight, mask, PSFEx per band)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--zeropoint", action="append", type=band_float_arg, default=[],
                        metavar="BAND=ZP", help="image zero point (default: nominal DECam)")
    add_target_psf_fwhm(parser, "FWHM of the round Gaussian PSF metacal reconvolves every "
                        "band to (one, or one per model band; default: the model's own target, "
                        "else each band's narrowest)")
    add_deblend_contrast(parser, DEBLEND_CONTRAST)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = run_real_des(args.run, args.data, args.out, zeropoints=dict(args.zeropoint),
                           force=args.force, target_fwhm=target_psf_fwhm(args.target_psf_fwhm),
                           deblend_contrast=args.deblend_contrast, device=args.device)
    print(f"{metrics['noshear_detections']} noshear detections; report in {args.out}/real_des.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
