"""How well metadetection's detections find the galaxies of a simulated field, by SEP's
deblending contrast (``MetadetectSettings.deblend_contrast``).

Each field of :func:`~simulation.sheared_fields.draw_field_set` (1 arcmin, LSST gold density) is
metacalibrated and detected as one cell exactly as the walk does it
(:func:`~deblend.core.metadetect.metacal_cell`: noise correction, r + i + z weighted detection
image, the noshear image's detections), once per contrast on the same metacal images. Every
detection is matched to the nearest true centre (after the shear) within :data:`MATCH_RADIUS`
arcsec; a detection with none is *spurious* (a knot or an arm of a large galaxy split off it,
a blend's centroid between its members, or noise). Counted on the *gold* galaxies (every galaxy
drawn, all brighter than the field's ``max_mag``, 25.3 in i by default, whose centre lies at
least :data:`EDGE_PIXELS` inside the field; detections the same): *found* (at least one
detection matched to it), *shredded* (two or more), *missed* (none; *merged* when another
galaxy's matched detection lies within :data:`MERGE_RADIUS` arcsec).

Frames: pixel frame of the field, x = column, y = row, pixel centres at integers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from deblend.core.arguments import FRACTION, NON_NEGATIVE_INT, require_positive_int
from deblend.core.metadetect import MetadetectSettings, detect_cell, metacal_cell
from evaluation.field_shear import FieldSettings, field_cells
from simulation.sheared_fields import draw_field_set

MATCH_RADIUS = 1.0
"""Arcsec: a detection belongs to the nearest true centre within this distance."""
MERGE_RADIUS = 2.0
"""Arcsec: a missed galaxy is *merged* when another galaxy's detection lies this close."""
EDGE_PIXELS = 10
"""Galaxies and detections this close to the field's edge are not counted."""
COUNTS = ("gold", "found", "shredded", "missed", "merged", "detections", "spurious")
FIELDS = ("plus", "plus_rot")
"""The images of each field set measured: the sky and its 90-degree rotated twin, with their
own noise (the -g images share the +g noise and add nothing independent)."""


def match_to_truth(positions: np.ndarray, truth_xy: np.ndarray, radius: float) -> np.ndarray:
    """For each detection (K, 2) the index of the nearest true centre of (N, 2) within
    ``radius`` pixels, else -1."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, np.float64).reshape(-1, 2)
    if not len(positions) or not len(truth_xy):
        return np.full(len(positions), -1)
    distance = np.hypot(*(positions[:, None, :] - truth_xy[None, :, :]).transpose(2, 0, 1))
    nearest = np.argmin(distance, axis=1)
    return np.where(distance[np.arange(len(positions)), nearest] <= radius, nearest, -1)


def inside(xy: np.ndarray, shape: tuple[int, int], edge: float) -> np.ndarray:
    """Whether each (x, y) lies at least ``edge`` pixels inside an image of ``shape`` (H, W)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    height, width = shape
    return ((xy[:, 0] >= edge) & (xy[:, 0] <= width - 1 - edge)
            & (xy[:, 1] >= edge) & (xy[:, 1] <= height - 1 - edge))


def field_counts(positions: np.ndarray, truth_xy: np.ndarray, gold: np.ndarray,
                 shape: tuple[int, int], match_pixels: float, merge_pixels: float,
                 edge: float = EDGE_PIXELS) -> dict[str, int]:
    """The :data:`COUNTS` of one field's detections (K, 2) against its true centres (N, 2),
    ``gold`` (N,) marking the galaxies counted (module docstring; all radii in pixels)."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    positions = positions[inside(positions, shape, edge)]
    truth_xy = np.asarray(truth_xy, np.float64).reshape(-1, 2)
    gold = np.asarray(gold, bool) & inside(truth_xy, shape, edge)
    owner = match_to_truth(positions, truth_xy, match_pixels)
    per_galaxy = np.bincount(owner[owner >= 0], minlength=len(truth_xy))
    missed = gold & (per_galaxy == 0)
    matched = positions[owner >= 0]
    merged = 0
    for x, y in truth_xy[missed]:
        merged += bool(len(matched)) and bool(np.hypot(matched[:, 0] - x,
                                                       matched[:, 1] - y).min() <= merge_pixels)
    return {"gold": int(gold.sum()), "found": int((gold & (per_galaxy >= 1)).sum()),
            "shredded": int((gold & (per_galaxy >= 2)).sum()), "missed": int(missed.sum()),
            "merged": int(merged), "detections": len(positions),
            "spurious": int((owner < 0).sum())}


def contrast_counts(field, settings: MetadetectSettings, contrasts: Sequence[float], seed: int
                    ) -> dict[float, dict[str, int]]:
    """One :class:`~simulation.sheared_fields.ShearedField`'s counts at each contrast: the field
    as one cell (:func:`~evaluation.field_shear.field_cells`), the walk's noshear detection
    image, metacalibrated once (``settings``' other choices), detected at each contrast."""
    cell, = field_cells(field, FieldSettings(cell=max(field.images.shape[1:]), margin=0))
    walk = metacal_cell(cell, field.bands, settings, seed=seed)
    noshear = walk.detection["noshear"]
    truth = field.truth
    truth_xy = np.stack([np.asarray(truth["x"]), np.asarray(truth["y"])], axis=1)
    gold = np.ones(len(truth), bool)
    match, merge = (r / field.pixel_scale for r in (MATCH_RADIUS, MERGE_RADIUS))
    return {c: field_counts(detect_cell(noshear, walk.sigma, settings.threshold,
                                        settings.min_area, c), truth_xy, gold, cell.shape,
                            match, merge)
            for c in contrasts}


def detection_quality(populations: Sequence[str], contrasts: Sequence[float], *,
                      n_fields: int, seed: int = 0, field_pixels: int = 300,
                      max_mag: float = 25.3, settings: MetadetectSettings | None = None,
                      progress: bool = True) -> dict[str, dict[float, dict[str, float]]]:
    """Summed :data:`COUNTS` per population ("btk", "galsim") and contrast over ``n_fields``
    field sets (two images each, :data:`FIELDS`; no shear), with the rates: per gold galaxy
    ``completeness`` (found), ``shredded_rate``, ``missed_rate``, ``merged_rate``; per image
    ``detections_per_image`` and ``spurious_per_image``. ``settings``: the walk's other
    choices (default :class:`MetadetectSettings`)."""
    contrasts = [FRACTION.require(c, "deblend_contrast") for c in contrasts]
    if not contrasts or not populations:
        raise ValueError("give at least one population and one deblend_contrast")
    n_fields = require_positive_int(n_fields, "n_fields")
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    settings = settings or MetadetectSettings()
    images = n_fields * len(FIELDS)
    out: dict[str, dict[float, dict[str, float]]] = {}
    for population in populations:
        totals = {c: dict.fromkeys(COUNTS, 0) for c in contrasts}
        for index in tqdm(range(n_fields), desc=f"{population} field sets", unit="set",
                          disable=not progress):
            fields = draw_field_set(population, seed, index, (0.0, 0.0),
                                    field_pixels=field_pixels, max_mag=max_mag)
            for k, key in enumerate(FIELDS):
                counts = contrast_counts(fields[key], settings, contrasts, 1000 * index + k)
                for c in contrasts:
                    for name in COUNTS:
                        totals[c][name] += counts[c][name]
        out[population] = {c: rates(t, images) for c, t in totals.items()}
    return out


def rates(totals: dict[str, int], images: int) -> dict[str, float]:
    """The counts of :func:`detection_quality` with their rates (per gold galaxy, per image)."""
    gold = max(totals["gold"], 1)
    return {**totals, "images": images, "completeness": totals["found"] / gold,
            "shredded_rate": totals["shredded"] / gold, "missed_rate": totals["missed"] / gold,
            "merged_rate": totals["merged"] / gold,
            "detections_per_image": totals["detections"] / images,
            "spurious_per_image": totals["spurious"] / images}


def quality_table(results: dict[str, dict[float, dict[str, float]]]) -> str:
    """A markdown table of :func:`detection_quality` results keyed by population."""
    lines = ["| population | deblend_contrast | gold galaxies | found | shredded | missed | "
             "merged | detections / image | spurious / image |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for population, rows in results.items():
        for c, r in rows.items():
            lines.append(f"| {population} | {c:g} | {r['gold']} | {r['completeness']:.1%} | "
                         f"{r['shredded_rate']:.1%} | {r['missed_rate']:.1%} | "
                         f"{r['merged_rate']:.1%} | {r['detections_per_image']:.1f} | "
                         f"{r['spurious_per_image']:.1f} |")
    return "\n".join(lines)
