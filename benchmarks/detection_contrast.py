"""``python -m benchmarks.detection_contrast [--contrast C ...] [--population P ...]
[--n-fields N] [--seed S] [--json FILE]``.

How metadetection's detections find the galaxies of simulated 1-arcmin LSST fields at each SEP
deblending contrast (:mod:`evaluation.detection_quality`): per gold galaxy the fraction found,
shredded (two or more detections), missed and merged into a neighbour's detection, and the
detections and spurious detections per image. No model is needed: detection precedes the
networks. The walk's default contrast is 0.005 (``deblend measure --deblend-contrast``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks import emit
from deblend.core.arguments import FRACTION, NON_NEGATIVE_INT, POSITIVE_INT
from deblend.core.cli import fail_cleanly
from evaluation.detection_quality import detection_quality, quality_table


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detection_contrast",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contrast", type=FRACTION.argparse_type, nargs="+",
                        default=[0.005, 1e-3, 1e-4, 1e-5], help="SEP deblending contrasts")
    parser.add_argument("--population", choices=("btk", "galsim"), nargs="+",
                        default=["btk", "galsim"])
    parser.add_argument("--n-fields", type=POSITIVE_INT.argparse_type, default=10,
                        help="field sets per population (two images each)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT.argparse_type, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = detection_quality(args.population, args.contrast, n_fields=args.n_fields,
                               seed=args.seed)
    emit(result, quality_table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
