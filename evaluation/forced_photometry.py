"""How well the catalogue's fluxes find the true fluxes of simulated galaxies from pixels.

Each image of :data:`~evaluation.detection_quality.FIELDS` of ``n_fields`` field sets
(:func:`~simulation.sheared_fields.draw_field_set`, no shear, the independent ``galsim``
population by default, the run's survey) is measured as the walk measures a survey
(:func:`~evaluation.field_shear.field_cells`, :func:`~deblend.core.cell_measure.measure_cells`:
metacal, detection, stamps, networks, forced photometry). Each kept noshear detection is matched
to the nearest true centre within :data:`~evaluation.detection_quality.MATCH_RADIUS`; galaxies
found by exactly one detection at least :data:`~evaluation.detection_quality.EDGE_PIXELS` inside
the image are compared, per band, by the relative flux error ``flux / truth - 1`` of the
reconstruction's own flux (``flux_<band>``) and of the forced flux (``forced_flux_<band>``,
:mod:`deblend.core.photometry`). Truth is the flux drawn on each galaxy's own stamp (electrons, the
model's units). Galaxies are *blended* when another galaxy's centre lies within
:data:`BLEND_RADIUS` arcsec. Summaries are medians (the bias) and normalised median absolute
deviations (the scatter) with the bootstrap-free error of a median, 1.2533 NMAD / sqrt(n).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deblend.core.arguments import NON_NEGATIVE_INT, require_positive_int
from deblend.core.atomic import write_json_atomic, write_text_atomic
from deblend.core.cell_measure import FLUX_KINDS, measure_cells
from deblend.core.chunk_cache import chunk_key, join_chunks, read_chunk, write_chunk
from deblend.core.inference import Deblender
from deblend.core.metadetect import MetadetectSettings
from deblend.core.runs import RunLayout, lineage_identity
from evaluation.detection_quality import EDGE_PIXELS, FIELDS, MATCH_RADIUS, inside, match_to_truth
from evaluation.field_shear import FieldSettings, field_cells, field_walk
from evaluation.metrics import relative_residual, robust_summary
from simulation.sheared_fields import draw_field_set

BLEND_RADIUS = 2.0
"""Arcsec: a galaxy with another galaxy's centre this close is blended."""
MAG_EDGES = (18.0, 22.0, 23.0, 24.0, 25.3)
"""Reference-band magnitude bins of the summary."""
CACHE_VERSION = 1


def field_photometry(model: Deblender, field, walk: MetadetectSettings, seed: int
                     ) -> dict[str, np.ndarray]:
    """The matched galaxies of one :class:`~simulation.sheared_fields.ShearedField` (module
    docstring): ``truth``, ``flux``, ``forced_flux`` (N, bands), ``mag``, ``neighbour``
    (arcsec to the nearest other galaxy) (N,)."""
    catalogue = measure_cells(model, field_cells(field, FieldSettings()), walk, seed=seed,
                              per_object=False)
    rows = catalogue[(catalogue["mdet_step"] == "noshear") & (catalogue["flags"] == 0)]
    positions = np.stack([np.asarray(rows["x"], np.float64),
                          np.asarray(rows["y"], np.float64)], axis=1).reshape(-1, 2)
    shape = field.images.shape[1:]
    positions_inside = inside(positions, shape, EDGE_PIXELS)
    rows, positions = rows[positions_inside], positions[positions_inside]
    truth = field.truth
    truth_xy = np.stack([np.asarray(truth["x"], np.float64),
                         np.asarray(truth["y"], np.float64)], axis=1).reshape(-1, 2)
    owner = match_to_truth(positions, truth_xy, MATCH_RADIUS / field.pixel_scale)
    matched = owner >= 0
    count = np.bincount(owner[matched], minlength=len(truth_xy))
    single = matched.copy()
    single[matched] = (count[owner[matched]] == 1) & inside(truth_xy[owner[matched]], shape,
                                                            EDGE_PIXELS)
    galaxies = owner[single]
    distance = np.hypot(*(truth_xy[:, None] - truth_xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)  # a galaxy alone in its field: no neighbour (inf)
    bands = model.bands
    out = {"truth": np.asarray(truth["flux"], np.float64)[galaxies].reshape(-1, len(bands)),
           "mag": np.asarray(truth["mag"], np.float64)[galaxies],
           "neighbour": (distance.min(axis=1) * field.pixel_scale)[galaxies]}
    for kind in FLUX_KINDS:
        out[kind] = np.stack([np.asarray(rows[f"{kind}_{b}"], np.float64)[single]
                              for b in bands], axis=1).reshape(-1, len(bands))
    return out


def measure_photometry(model: Deblender, model_id: str, walk: MetadetectSettings, sim, *,
                       population: str = "galsim", n_fields: int = 10, seed: int = 0,
                       field_pixels: int = 300, cache: Path | None = None,
                       progress: bool = True) -> dict[str, np.ndarray]:
    """:func:`field_photometry` of every image of ``n_fields`` field sets of ``population``
    drawn with ``sim`` (the run's :class:`~deblend.core.config.SimulationConfig`), joined; one
    cached chunk per field set in ``cache`` (resumable)."""
    n_fields = require_positive_int(n_fields, "n_fields")
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    parts = []
    for index in tqdm(range(n_fields), desc=f"{population} field sets", unit="set",
                      disable=not progress):
        key = chunk_key({"model": model_id, "population": population, "seed": seed,
                         "index": index, "field_pixels": field_pixels, "walk": repr(walk),
                         "version": CACHE_VERSION})
        path = None if cache is None else Path(cache) / f"{population}_set{index:04d}.npz"
        arrays = None if path is None else read_chunk(path, key)
        if arrays is None:
            fields = draw_field_set(population, seed, index, (0.0, 0.0),
                                    field_pixels=field_pixels, sim=sim)
            arrays = join_chunks([field_photometry(model, fields[name], walk,
                                                   1000 * index + k)
                                  for k, name in enumerate(FIELDS)])
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_chunk(path, key, arrays)
        parts.append(arrays)
    return join_chunks(parts)


def robust(values: np.ndarray) -> dict[str, float]:
    """Median, its error (1.2533 NMAD / sqrt(n)), NMAD and n of finite ``values``
    (:func:`~evaluation.metrics.robust_summary`)."""
    summary = robust_summary(values)
    n = summary["n"]
    error = 1.2533 * summary["nmad"] / np.sqrt(n) if n else float("nan")
    return {"median": summary["median"], "error": error, "nmad": summary["nmad"], "n": n}


def photometry_summary(arrays: dict[str, np.ndarray], bands: Sequence[str],
                       mag_edges: Sequence[float] = MAG_EDGES) -> dict:
    """Per kind (``flux``: the reconstruction's, ``forced_flux``) and band: :func:`robust`
    relative flux errors of all matched galaxies, by magnitude bin, and of isolated and blended
    ones."""
    blended = arrays["neighbour"] < BLEND_RADIUS
    out: dict = {"n_galaxies": int(len(arrays["truth"])), "blended": int(blended.sum()),
                 "blend_radius_arcsec": BLEND_RADIUS, "mag_edges": list(mag_edges)}
    for kind in FLUX_KINDS:
        error = relative_residual(arrays[kind], arrays["truth"])
        per_band = {}
        for b, band in enumerate(bands):
            e = error[:, b]
            per_band[band] = {
                "all": robust(e), "isolated": robust(e[~blended]), "blended": robust(e[blended]),
                "by_mag": [robust(e[(arrays["mag"] >= lo) & (arrays["mag"] < hi)])
                           for lo, hi in zip(mag_edges[:-1], mag_edges[1:])]}
        out[kind] = per_band
    return out


def photometry_table(summary: dict, bands: Sequence[str]) -> str:
    """Markdown: per band the median relative flux error +- its error (NMAD) of the
    reconstruction's and the forced fluxes, for all, isolated and blended galaxies and by magnitude."""
    edges = summary["mag_edges"]
    bins = [f"i {lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    head = ["band", "flux", "all", "isolated", "blended", *bins]

    def cell(r: dict) -> str:
        if not r["n"]:
            return "-"
        return f"{r['median']:+.3f} +- {r['error']:.3f} ({r['nmad']:.3f})"

    lines = [f"{summary['n_galaxies']} galaxies matched ({summary['blended']} blended: another "
             f"centre within {summary['blend_radius_arcsec']:g}\"); median relative flux error "
             f"+- its error (NMAD)", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join([":---", ":---"] + ["---:"] * (len(head) - 2)) + " |"]
    for band in bands:
        for kind, label in zip(FLUX_KINDS, ("reconstruction", "forced")):
            r = summary[kind][band]
            lines.append("| " + " | ".join([band, label, cell(r["all"]), cell(r["isolated"]),
                                            cell(r["blended"]), *map(cell, r["by_mag"])]) + " |")
    return "\n".join(lines) + "\n"


def run_photometry(run: str | Path, config, out: str | Path, *, population: str = "galsim",
                   n_fields: int = 10, seed: int = 0, field_pixels: int = 300,
                   device: str = "cpu", progress: bool = True) -> dict:
    """The benchmark of a trained run (module docstring) with its ``config`` (the survey the
    fields are drawn in, and the walk's metacal settings as the field benchmark's,
    :func:`~evaluation.field_shear.field_walk`): ``out/metrics.json``, ``out/report.md``;
    resumes from ``out/cache``. Returns the summary."""
    model = Deblender.from_run(run, device=device)
    out = Path(out)
    arrays = measure_photometry(
        model, lineage_identity(RunLayout(Path(run)), "stage3"), field_walk(model, config),
        config.simulation, population=population, n_fields=n_fields, seed=seed,
        field_pixels=field_pixels, cache=out / "cache", progress=progress)
    summary = {"population": population, "n_fields": n_fields, "images": n_fields * len(FIELDS),
               "seed": seed, "field_pixels": field_pixels, "survey": model.data.survey,
               **photometry_summary(arrays, model.bands)}
    write_json_atomic(out / "metrics.json", {"forced_photometry": summary})
    write_text_atomic(out / "report.md", "# Forced photometry on simulated fields\n\n"
                      f"{n_fields} field sets of the {population} population "
                      f"({summary['images']} images of {field_pixels} pixels, seed {seed}; "
                      f"{model.data.survey}), measured as `deblend measure` does "
                      "(`python -m benchmarks.photometry`; `evaluation.forced_photometry`).\n\n"
                      + photometry_table(summary, model.bands))
    return summary


__all__ = ["BLEND_RADIUS", "MAG_EDGES", "field_photometry", "measure_photometry",
           "photometry_summary", "photometry_table", "robust", "run_photometry"]
