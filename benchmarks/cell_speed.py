"""Benchmark: the whole metadetection path on cells against AnaCal with its own detection.

``python -m benchmarks.cell_speed [--fields N] [--device D] [--run R] [--json FILE]`` draws
``N`` 300 x 300 six-band fields of the GalSim population at LSST density
(:mod:`simulation.sheared_fields`), cuts them into 100-pixel cells with 40-pixel margins, and
measures, in one run and on the same cells, galaxies per second of
- the deblender's population path (:func:`deblend.core.cell_measure.measure_cells` without the
  per-object responses: cell metacal by FFT with the noise correction, detection on the five
  images, stamps, the regressor on 1 view, decoded fluxes, catalogue);
- the same with the per-object stamp responses (five more stamp metacal images per object);
- AnaCal (:func:`evaluation.anacal_peer.anacal_cell_catalogue`), detection and analytic
  responses, on the same cells.
Galaxies are the field's truth galaxies (i < 25.3) owned by the cells; the networks have their
initial weights unless ``--run`` is given (speed does not depend on them). Threads: torch's
default on this machine. The metacal operators and their filters are built beforehand (once per
PSF set and cell shape, as in a survey run).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks import emit
from deblend.core.arguments import positive_int_arg


def run(n_fields: int = 2, device: str = "cpu", run_dir: str | None = None) -> dict[str, Any]:
    from benchmarks.metacal_speed import untrained_deblender
    from deblend.core.cell_measure import measure_cells
    from deblend.core.inference import Deblender
    from evaluation.field_shear import FieldSettings, anacal_cell, field_cells
    from simulation.sheared_fields import draw_field_set

    fields = [draw_field_set("galsim", 0, i, (0.02, 0.0))["plus"] for i in range(n_fields)]
    cells = [c for f in fields for c in field_cells(f, FieldSettings())]
    galaxies = float(sum(np.asarray(f.truth["in_field"]).sum() for f in fields))
    model = (Deblender.from_run(run_dir, device=device) if run_dir else
             untrained_deblender(np.stack([f.images[:, :45, :45] for f in fields]), device))
    measure_cells(model, cells[:1], per_object=True)  # builds the operators and filters once
    timings = {}
    started = time.perf_counter()
    catalogue = measure_cells(model, cells, per_object=False)
    timings["deblend_population"] = time.perf_counter() - started
    started = time.perf_counter()
    measure_cells(model, cells, per_object=True)
    timings["deblend_with_object_response"] = time.perf_counter() - started
    started = time.perf_counter()
    for cell in cells:
        anacal_cell(cell, fields[0].pixel_scale, fields[0].bands)
    timings["anacal"] = time.perf_counter() - started
    kept = float(((catalogue["mdet_step"] == "noshear") & (catalogue["flags"] == 0)).sum())
    result: dict[str, Any] = {"galaxies": galaxies, "kept_detections": kept,
                              "cells": len(cells), "fields": n_fields}
    for name, seconds in timings.items():
        result[f"{name}_galaxies_per_s"] = galaxies / seconds
    result["deblend_over_anacal"] = timings["anacal"] / timings["deblend_population"]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['fields']} fields, {result['cells']} cells, {result['galaxies']:.0f} "
             f"galaxies (i < 25.3), {result['kept_detections']:.0f} kept detections"]
    for key in ("deblend_population", "deblend_with_object_response", "anacal"):
        lines.append(f"{key:36s} {result[f'{key}_galaxies_per_s']:10.1f} galaxies/s")
    lines.append(f"{'deblend population / AnaCal':36s} {result['deblend_over_anacal']:10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cell_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=positive_int_arg, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", help="a trained run (default: untrained networks)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.fields < 1:
        parser.error("--fields must be >= 1")
    result = run(args.fields, args.device, args.run)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
