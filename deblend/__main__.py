"""``python -m deblend run --config configs/quick.yaml --out RUN``: the whole pipeline.
``python -m deblend measure --run RUN --image IMAGES.fits --weight WEIGHTS.fits --psf PSFS.fits
--zeropoint-model i=30 ... --out CATALOGUE.fits``: a metadetection shape catalogue of survey
images.

See :mod:`deblend.pipeline` for the steps and the layout of RUN, and
:mod:`deblend.core.survey_measure` for the catalogue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblend.core.arguments import (
    FINITE_FLOAT, add_deblend_contrast, add_target_psf_fwhm, non_negative_int_arg,
    positive_int_arg, target_psf_fwhm)
from deblend.core.cli import fail_cleanly
from deblend.core.metadetect import DEBLEND_CONTRAST, WALK_VIEWS
from deblend.core.survey_input import PSF_AT, band_float_arg, band_path_arg

PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "quick"
"""The run ``measure`` uses without ``--run``: the quick job's networks, exported with
``python -m deblend export`` (:mod:`deblend.core.export`)."""


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
    add_measure(commands)
    export = commands.add_parser("export", help="a run's weights alone, for inference "
                                 "(Deblender.from_run and measure take the copy)")
    export.add_argument("--run", required=True, help="training run directory")
    export.add_argument("--out", required=True, help="new directory for the copy")
    return parser.parse_args(argv)


def add_measure(commands: argparse._SubParsersAction) -> None:
    """The ``measure`` subcommand's arguments."""
    packaged = PACKAGED_WEIGHTS if PACKAGED_WEIGHTS.is_dir() else None
    measure = commands.add_parser(
        "measure", help="metadetection shape catalogue of survey FITS images",
        description="Each of --image, --weight, --mask, --psf, --sky is one multi-extension "
                    "FITS file (EXTNAME = band) or BAND=FILE repeated for every band.")
    measure.add_argument("--run", default=packaged, required=packaged is None,
                         help="training run directory" + (" (default: the packaged weights)"
                                                          if packaged else ""))
    files = (("--image", True, "images, sky-subtracted, header MAGZERO and WCS"),
             ("--weight", True, "inverse-variance planes (0 = no data)"),
             ("--mask", False, "mask planes (nonzero = bad)"),
             ("--psf", True, "PSF images (odd squares, pixel included) or PSFEx files"),
             ("--sky", False, "the survey's sky model of every band, subtracted: sky images "
                              "(image units) or legacypipe SplineSky tables (*-splinesky.fits)"))
    for option, required, text in files:
        measure.add_argument(option, action="append", type=band_path_arg, required=required,
                             metavar="[BAND=]FITS", help=text)
    measure.add_argument("--zeropoint", action="append", type=band_float_arg, default=[],
                         metavar="BAND=ZP", help="image zero point (overrides MAGZERO)")
    measure.add_argument("--zeropoint-model", action="append", type=band_float_arg, default=[],
                         metavar="BAND=ZP", help="AB magnitude of one model unit (electron)")
    measure.add_argument("--missing-band", action="append", default=[], metavar="BAND",
                         help="a model band the images lack: zeros, infinite variance")
    measure.add_argument("--resample", action="store_true",
                         help="resample every band onto the model's pixel scale over the first "
                              "band's image (other pixel scales, exposures or CCDs)")
    measure.add_argument("--subtract-sky", action="store_true",
                         help="subtract each band's sigma-clipped median (frames not "
                              "sky-subtracted and without --sky)")
    measure.add_argument("--psf-at", choices=PSF_AT, default="cell",
                         help="where PSFEx models are drawn (default: each cell's centre)")
    add_target_psf_fwhm(measure, "FWHM of the round Gaussian PSF metacal reconvolves every "
                        "band to (one, or one per model band; default: the model's own target, "
                        "else each band's narrowest)")
    measure.add_argument("--hold-sky-plane", action=argparse.BooleanOptionalAction,
                         help="hold each cell's fitted sky plane out of metacal's shear "
                              "(default: as the run's metacal.hold_sky_plane)")
    add_deblend_contrast(measure, DEBLEND_CONTRAST)
    measure.add_argument("--recentre", action=argparse.BooleanOptionalAction, default=True,
                         help="move each detection's stamp by its sub-pixel offset so the "
                              "detection lies on the central pixel's centre, as the networks' "
                              "training targets do (default: on)")
    measure.add_argument("--min-size-ratio", type=FINITE_FLOAT.argparse_type, default=None,
                         metavar="R", help="flag SMALL the detections whose size_ratio "
                         "((sigma / sigma_psf)^2 - 1 on the detection image; stars ~0) is below "
                         "R, on each metacal image alike (metadetection's cut: 0.5; default: "
                         "no cut)")
    measure.add_argument("--out", required=True, help="output FITS catalogue")
    measure.add_argument("--cell", type=positive_int_arg, default=200, help="cell size, pixels")
    measure.add_argument("--margin", type=non_negative_int_arg, default=40,
                         help="pixels read around each cell")
    measure.add_argument("--jobs", type=positive_int_arg, default=1, help="worker processes")
    measure.add_argument("--seed", type=non_negative_int_arg, default=0)
    measure.add_argument("--views", type=int, choices=(1, 2, 4, 8), default=WALK_VIEWS,
                         help=f"symmetric views the regressor is averaged over (default "
                              f"{WALK_VIEWS}: with 1, its preferred orientation is an additive "
                              f"shear bias of a few percent)")
    measure.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    measure.add_argument("--force", action="store_true", help="replace an existing --out")
    measure.add_argument("--no-resume", action="store_true",
                         help="measure every cell again, ignoring cached ones")
    measure.add_argument("--no-object-response", action="store_true",
                         help="leave out the per-object response columns r11 r12 r21 r22 "
                              "(five more metacal images and networks per object)")
    measure.add_argument("--no-progress", action="store_true", help="hide progress bars")


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        from deblend.core.export import export_inference

        stages = export_inference(args.run, args.out)
        print(f"exported {' '.join(stages)} of {args.run} to {args.out}")
        return 0
    if args.command == "measure":
        from deblend.core.survey_input import SurveyInputs
        from deblend.core.survey_measure import measure_survey

        inputs = SurveyInputs(args.image, args.weight, args.psf, args.mask, args.zeropoint,
                              args.zeropoint_model, tuple(args.missing_band), args.psf_at,
                              args.resample, args.subtract_sky, args.sky)
        measure_survey(args.run, inputs, args.out, cell=args.cell, margin=args.margin,
                       jobs=args.jobs, progress=not args.no_progress,
                       resume=not args.no_resume, seed=args.seed, views=args.views,
                       force=args.force, per_object=not args.no_object_response,
                       target_fwhm=target_psf_fwhm(args.target_psf_fwhm),
                       hold_sky_plane=args.hold_sky_plane,
                       deblend_contrast=args.deblend_contrast, recentre=args.recentre,
                       min_size_ratio=args.min_size_ratio,
                       device=args.device)
        return 0
    from deblend.pipeline import run_pipeline

    run_pipeline(args.config, args.out, jobs=args.jobs, force=args.force,
                 progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
