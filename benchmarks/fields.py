"""``python -m benchmarks.fields --run R [--config C] [--out DIR] [--n-fields N]
[--population btk galsim] [--field-pixels P] [--cell C] [--g G] [--no-anacal]
[--target-psf-fwhm ARCSEC ...] [--jobs J] [--shard K/N]``.

Shear bias from pixels (:mod:`evaluation.field_shear`): constant-shear fields at LSST density,
cut into cells, measured by metadetection with the deblender (population response and per-object
response), blend HSM on the same detections and AnaCal with its own detection; m1, m2, c1, c2
against the applied shear with jackknife errors. The ``fields`` section of the config (default:
the run's own) sets the sizes; options override it. Resumes from ``DIR/cache``; prints the
table and writes ``DIR/report.md``, ``DIR/metrics.json`` and ``DIR/cell.png``.

``--jobs J`` measures J field sets at once on forked CPU processes. ``--shard K/N`` measures
only the K-th of N shares of the field sets not yet cached and caches them, nothing else: N
machines (or cluster jobs) sharing ``DIR`` fill the cache, and a last run without ``--shard``
reports. An error of 0.002 on m needs of the order of 10^4-10^5 field sets per population and
component (the report says how many from the scatter it measured).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deblend.core.arguments import add_target_psf_fwhm, positive_int_arg, target_psf_fwhm
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
from deblend.core.workers import require_cpu
from evaluation.field_shear import run_field_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fields", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (stage3 done)")
    parser.add_argument("--config", help="YAML config whose fields section is used (default: "
                        "the run's own)")
    parser.add_argument("--out", help="output directory (default: RUN/../fields)")
    parser.add_argument("--n-fields", type=positive_int_arg,
                        help="field sets per population and component")
    parser.add_argument("--population", nargs="+", choices=["btk", "galsim"])
    parser.add_argument("--field-pixels", type=positive_int_arg)
    parser.add_argument("--cell", type=positive_int_arg)
    parser.add_argument("--g", type=float)
    parser.add_argument("--no-anacal", action="store_true", help="leave AnaCal out")
    add_target_psf_fwhm(parser, "overrides metacal.target_psf_fwhm: every metacal image "
                        "reconvolved to this round Gaussian (one FWHM, or one per band)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--jobs", type=positive_int_arg, default=1,
                        help="field sets measured at once on CPU processes (default 1)")
    parser.add_argument("--shard", type=shard_arg, metavar="K/N",
                        help="measure and cache only share K of N (0 <= K < N), then stop")
    return parser.parse_args(argv)


def shard_arg(text: str) -> tuple[int, int]:
    """``K/N`` with 0 <= K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"need 0 <= K < N, got {text!r}")
    return k, n


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = run_config(args.run, args.config)
    changes = {key: value for key, value in (
        ("n_fields", args.n_fields), ("populations", args.population),
        ("field_pixels", args.field_pixels), ("cell", args.cell), ("g", args.g)) if value is not None}
    if args.no_anacal:
        changes["anacal"] = False
    config = config.replace("fields", **changes)
    if args.target_psf_fwhm:
        config = config.replace("metacal", target_psf_fwhm=target_psf_fwhm(args.target_psf_fwhm))
    out = Path(args.out) if args.out else Path(args.run).parent / "fields"
    require_cpu(args.jobs, args.device)
    if run_field_report(args.run, config, out, device=args.device, jobs=args.jobs,
                        shard=args.shard) is None:
        print(f"shard {args.shard[0]}/{args.shard[1]}: its field sets are cached in "
              f"{out / 'cache'}; run without --shard to report")
        return 0
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
