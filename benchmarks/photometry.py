"""``python -m benchmarks.photometry --run R [--config C] [--out DIR] [--n-fields N]
[--population galsim|btk] [--seed S] [--field-pixels P] [--device D] [--no-progress]``.

The catalogue's fluxes against the true fluxes of simulated galaxies
(:mod:`evaluation.forced_photometry`): unsheared fields of the run's survey measured as
``deblend measure`` measures a survey, each detection matched to its galaxy; per band the median
relative error and scatter of the reconstruction's flux (``flux_<band>``) and of the forced flux
(``forced_flux_<band>``: the reconstructions fitted to the pixels), for all, isolated and
blended galaxies and by magnitude. Resumes from ``DIR/cache``; prints the table and writes
``DIR/report.md`` and ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deblend.core.arguments import NON_NEGATIVE_INT, positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
from evaluation.forced_photometry import photometry_table, run_photometry


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photometry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (stage3 done)")
    parser.add_argument("--config", help="YAML config (default: the run's own)")
    parser.add_argument("--out", help="output directory (default: RUN/../photometry)")
    parser.add_argument("--n-fields", type=positive_int_arg, default=10,
                        help="field sets (two images each; default 10)")
    parser.add_argument("--population", choices=["galsim", "btk"], default="galsim")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT.argparse_type, default=0)
    parser.add_argument("--field-pixels", type=positive_int_arg, default=300)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run).resolve().parent / "photometry"
    summary = run_photometry(args.run, run_config(args.run, args.config), out,
                             population=args.population, n_fields=args.n_fields,
                             seed=args.seed, field_pixels=args.field_pixels,
                             device=args.device, progress=not args.no_progress)
    print(photometry_table(summary, list(summary["flux"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
