"""``python -m benchmarks.fields --run R [--config C] [--out DIR] [--n-fields N]
[--population btk galsim] [--field-pixels P] [--cell C] [--g G] [--no-anacal]``.

Shear bias from pixels (:mod:`evaluation.field_shear`): constant-shear fields at LSST density,
cut into cells, measured by metadetection with the deblender (population response and per-object
response), blend HSM on the same detections and AnaCal with its own detection; m1, m2, c1, c2
against the applied shear with jackknife errors. The ``fields`` section of the config (default:
the run's own) sets the sizes; options override it. Resumes from ``DIR/cache``; prints the
table and writes ``DIR/report.md``, ``DIR/metrics.json`` and ``DIR/cell.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deblend.core.arguments import positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.runs import run_config
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
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser.parse_args(argv)


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
    out = Path(args.out) if args.out else Path(args.run).parent / "fields"
    run_field_report(args.run, config, out, device=args.device)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
