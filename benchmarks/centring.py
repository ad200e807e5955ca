"""``python -m benchmarks.centring --run NAME=RUN [--run ...] --data NAME=DATA [--data ...]
[--views V] [--device D] [--json FILE]``.

Does it matter where training stamps are centred (:mod:`evaluation.centring`)? The regressor's
RMSE of each run on the validation blends of each dataset, over all scenes and over those whose
detection-centred stamp moved. Train one run on a dataset with ``simulation.stamp_centre: truth``
and one on ``detection`` from the same config and seed; give both datasets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks import emit
from deblend.core.arguments import VIEWS
from deblend.core.cli import fail_cleanly
from evaluation.centring import centring_comparison, centring_table


def named_path(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH), for argparse."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"must be NAME=PATH, got {text}")
    return name, path


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.centring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=named_path, action="append", required=True,
                        help="NAME=RUN: a training run (stage3 done); repeat for each model")
    parser.add_argument("--data", type=named_path, action="append", required=True,
                        help="NAME=DATA: a dataset; repeat (one must be detection-centred)")
    parser.add_argument("--views", type=VIEWS.argparse_type, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = centring_comparison(dict(args.run), dict(args.data), device=args.device,
                                 views=args.views)
    emit(result, centring_table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
