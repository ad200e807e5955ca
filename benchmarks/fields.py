"""``python -m benchmarks.fields --run R [--out DIR] [--n-fields N] [--population btk galsim]
[--field-pixels P] [--g G] [--no-anacal]``.

Shear bias from pixels (:mod:`evaluation.field_shear`): constant-shear fields at LSST density,
cut into cells, measured by metadetection with the deblender (population response and per-object
response), blend HSM on the same detections and AnaCal with its own detection; m1, m2, c1, c2
against the applied shear with jackknife errors. Resumes from ``DIR/cache``; prints the table
and writes ``DIR/fields.md`` and ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

from deblend.core.arguments import positive_int_arg
from deblend.core.atomic import write_json_atomic, write_text_atomic
from deblend.core.cli import fail_cleanly
from deblend.core.inference import Deblender
from deblend.core.runs import RunLayout
from evaluation.field_shear import FieldSettings, report_markdown, run_field_benchmark


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fields", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory (stage3 done)")
    parser.add_argument("--out", help="output directory (default: RUN/../fields)")
    parser.add_argument("--n-fields", type=positive_int_arg, default=4,
                        help="field sets per population and component (default 4)")
    parser.add_argument("--population", nargs="+", default=["btk", "galsim"],
                        choices=["btk", "galsim"])
    parser.add_argument("--field-pixels", type=positive_int_arg, default=300)
    parser.add_argument("--cell", type=positive_int_arg, default=100)
    parser.add_argument("--g", type=float, default=0.02)
    parser.add_argument("--no-anacal", action="store_true", help="leave AnaCal out")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.g < 0.2:
        raise ValueError(f"--g must be in (0, 0.2), got {args.g}")
    model = Deblender.from_run(args.run, device="cpu")
    out = Path(args.out) if args.out else Path(args.run).parent / "fields"
    model_id = hashlib.sha256(RunLayout(Path(args.run)).best("stage3").read_bytes()).hexdigest()
    results = run_field_benchmark(
        model, model_id[:16], out, populations=args.population, n_fields=args.n_fields,
        g=args.g, field_pixels=args.field_pixels,
        settings=FieldSettings(cell=args.cell, anacal=not args.no_anacal))
    text = report_markdown(results, args.g, args.field_pixels, 0.2)
    write_json_atomic(out / "metrics.json", results)
    write_text_atomic(out / "fields.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
