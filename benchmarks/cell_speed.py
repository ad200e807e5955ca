"""Benchmark: the whole metadetection path on cells against AnaCal with its own detection.

``python -m benchmarks.cell_speed [--fields N] [--field-pixels P] [--cell C] [--margin M]
[--views V] [--jobs J] [--device D] [--run R] [--json FILE]`` draws ``N`` P x P six-band fields
of the GalSim population at LSST density (:mod:`simulation.sheared_fields`), cuts them into
C-pixel cells with M-pixel margins, and measures, in one run and on the same cells, galaxies
per second of
- the deblender's population path (:func:`deblend.core.cell_measure.measure_cells` without the
  per-object responses: cell metacal by FFT with the noise correction, detection on the five
  images, stamps, the regressor on V views, decoded fluxes, catalogue);
- the same with the per-object stamp responses (five more stamp metacal images per object);
- AnaCal (:func:`evaluation.anacal_peer.anacal_cell_catalogue`), detection and analytic
  responses, on the same cells.
Each path runs its cells on J forked CPU processes (:func:`deblend.core.workers.run_tasks`,
``cpu_count // J`` torch threads each). Galaxies are the fields' truth galaxies (i < 25.3); the
networks have their initial weights unless ``--run`` is given (speed does not depend on them).
The metacal operators and their filters are built beforehand (once per PSF set and cell shape,
as in a survey run). ``margin_overhead`` is the pixels read over the pixels owned.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks import emit
from deblend.core.arguments import positive_int_arg
from deblend.core.metadetect import WALK_VIEWS

def _deblend(cell, per_object: bool, views: int):
    from deblend.core.cell_measure import measure_cells
    from deblend.core.workers import shared
    return measure_cells(shared(), [cell], per_object=per_object, views=views)


def _anacal(cell, pixel_scale: float, bands: tuple[str, ...]):
    from evaluation.field_shear import anacal_cell
    return anacal_cell(cell, pixel_scale, bands)


def timed(function, tasks: list[tuple], jobs: int, model=None) -> tuple[float, list]:
    """Wall seconds of ``function`` over ``tasks`` on ``jobs`` processes (``model`` shared),
    and the results."""
    from deblend.core.workers import run_tasks
    results: list = [None] * len(tasks)
    started = time.perf_counter()
    run_tasks(function, tasks, jobs, results.__setitem__, shared=model)
    return time.perf_counter() - started, results


def run(n_fields: int = 2, device: str = "cpu", run_dir: str | None = None, *,
        field_pixels: int = 300, cell: int = 100, margin: int = 40, views: int = WALK_VIEWS,
        jobs: int = 1) -> dict[str, Any]:
    from astropy.table import vstack

    from benchmarks.metacal_speed import untrained_deblender
    from deblend.core.cell_measure import measure_cells
    from deblend.core.inference import Deblender
    from deblend.core.workers import require_cpu
    from evaluation.field_shear import FieldSettings, field_cells
    from simulation.sheared_fields import draw_field_set

    require_cpu(jobs, device)
    fields = [draw_field_set("galsim", 0, i, (0.02, 0.0), field_pixels=field_pixels)["plus"]
              for i in range(n_fields)]
    settings = FieldSettings(cell=cell, margin=margin)
    cells = [c for f in fields for c in field_cells(f, settings)]
    galaxies = float(sum(np.asarray(f.truth["in_field"]).sum() for f in fields))
    model = (Deblender.from_run(run_dir, device=device) if run_dir else
             untrained_deblender(np.stack([f.images[:, :45, :45] for f in fields]), device))
    for shape in {c.shape for c in cells}:  # builds the operators and filters once
        measure_cells(model, [next(c for c in cells if c.shape == shape)], per_object=True)
    timings = {}
    timings["deblend_population"], tables = timed(
        _deblend, [(c, False, views) for c in cells], jobs, model)
    timings["deblend_with_object_response"], _ = timed(
        _deblend, [(c, True, views) for c in cells], jobs, model)
    timings["anacal"], _ = timed(
        _anacal, [(c, fields[0].pixel_scale, fields[0].bands) for c in cells], jobs)
    catalogue = vstack(tables)
    kept = float(((catalogue["mdet_step"] == "noshear") & (catalogue["flags"] == 0)).sum())
    read = sum(c.shape[0] * c.shape[1] for c in cells)
    owned = sum((c.owned_box[1] - c.owned_box[0]) * (c.owned_box[3] - c.owned_box[2])
                for c in cells)
    result: dict[str, Any] = {"galaxies": galaxies, "kept_detections": kept,
                              "cells": len(cells), "fields": n_fields,
                              "field_pixels": field_pixels, "cell": cell, "margin": margin,
                              "views": views, "jobs": jobs, "margin_overhead": read / owned}
    for name, seconds in timings.items():
        result[f"{name}_galaxies_per_s"] = galaxies / seconds
    result["deblend_over_anacal"] = timings["anacal"] / timings["deblend_population"]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['fields']} fields of {result['field_pixels']} px, {result['cells']} cells "
             f"of {result['cell']} px with {result['margin']}-px margins (pixels read / owned "
             f"{result['margin_overhead']:.2f}), {result['views']} view(s), {result['jobs']} "
             f"process(es); {result['galaxies']:.0f} galaxies (i < 25.3), "
             f"{result['kept_detections']:.0f} kept detections"]
    for key in ("deblend_population", "deblend_with_object_response", "anacal"):
        lines.append(f"{key:36s} {result[f'{key}_galaxies_per_s']:10.1f} galaxies/s")
    lines.append(f"{'deblend population / AnaCal':36s} {result['deblend_over_anacal']:10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cell_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=positive_int_arg, default=2)
    parser.add_argument("--field-pixels", type=positive_int_arg, default=300)
    parser.add_argument("--cell", type=positive_int_arg, default=100)
    parser.add_argument("--margin", type=positive_int_arg, default=40)
    parser.add_argument("--views", type=positive_int_arg, default=WALK_VIEWS)
    parser.add_argument("--jobs", type=positive_int_arg, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", help="a trained run (default: untrained networks)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = run(args.fields, args.device, args.run, field_pixels=args.field_pixels,
                 cell=args.cell, margin=args.margin, views=args.views, jobs=args.jobs)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
