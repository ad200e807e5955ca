"""Fetch the real DES validation data (needs internet): im3shape shapes + five-band cutouts.

    python -m des_validation.fetch --out DIR [--limit N] [--size-arcsec 15]

1. Catalog: one ADQL query to NOIRLab Astro Data Lab's TAP service: the DES SV (SVA1) im3shape
   catalog joined to the Gold catalog on ``coadd_objects_id`` for positions, with the cuts of
   :mod:`des_validation.catalog` (valid e_1/e_2, snr_w > min_snr, error_flag = 0, info_flag = 0)
   applied in the query. Written to ``DIR/catalog.csv``.
2. Cutouts: for each object, one Simple Image Access query to Data Lab's DES DR1 collection at
   its position; the coadd ("Stack") image rows of bands g r i z Y give the cutout URLs, each
   downloaded to ``DIR/cutouts/<id>_<band>.fits`` (the per-band format of
   :mod:`des_validation.cutouts`).

Resumable: finished files are kept and skipped on the next run; each download goes to a
``.part`` file renamed on completion; every request is retried (``--retries``, exponential
back-off). Failures of single objects are listed in ``DIR/fetch_failures.csv`` and do not stop
the run. Offline, the first request fails at once: one clear error line, a non-zero exit, and no
file or directory left behind.

The table and column names are those of Data Lab's ``des_sva1`` schema as we know them; they
can be changed with ``--im3shape-table``, ``--gold-table``, ``--ra-column``, ``--dec-column``
if Data Lab renames them (check with its Query Interface).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblend.core.arguments import non_negative_int_arg, positive_float_arg, positive_int_arg
from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from des_validation.datalab import (
    GOLD_TABLE,
    IM3SHAPE_TABLE,
    SIA_URL,
    TAP_URL,
    NetworkError,
    build_query,
    fetch,
    tap_request,
)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m des_validation.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for catalog.csv and cutouts/")
    parser.add_argument("--limit", type=positive_int_arg, help="at most N objects")
    parser.add_argument("--config", help="YAML config whose des section sets the cuts")
    parser.add_argument("--size-arcsec", type=positive_float_arg, default=15.0,
                        help="cutout side in arcsec (default 15: 57 DES pixels, room for the "
                             "9\" model stamp and the 11.9\" unresampled crop)")
    parser.add_argument("--retries", type=non_negative_int_arg, default=3)
    parser.add_argument("--timeout", type=positive_float_arg, default=60.0,
                        help="seconds per request")
    parser.add_argument("--tap-url", default=TAP_URL)
    parser.add_argument("--sia-url", default=SIA_URL)
    parser.add_argument("--im3shape-table", default=IM3SHAPE_TABLE)
    parser.add_argument("--gold-table", default=GOLD_TABLE)
    parser.add_argument("--ra-column", default="ra")
    parser.add_argument("--dec-column", default="dec")
    parser.add_argument("--print-query", action="store_true",
                        help="print the ADQL and the TAP URL, and fetch nothing")
    args = parser.parse_args(argv)
    des = load_config(args.config).des
    options = {"im3shape_table": args.im3shape_table, "gold_table": args.gold_table,
               "ra_column": args.ra_column, "dec_column": args.dec_column}
    if args.print_query:
        query = build_query(des, args.limit, **options)
        print(query)
        print(tap_request(query, args.tap_url))
        return 0
    try:
        fetch(Path(args.out), des, args.limit, args.size_arcsec, args.retries, args.timeout,
              tap_url=args.tap_url, sia_url=args.sia_url, query_options=options)
    except NetworkError as exc:
        raise NetworkError(f"cannot fetch DES data: {exc}. des_validation.fetch needs internet "
                           f"access to NOIRLab Astro Data Lab; on an offline machine use the "
                           f"DES-like stand-in (python -m des_validation.standin)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
