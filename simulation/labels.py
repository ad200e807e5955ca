"""Per-sample truth and labels saved next to the images.

Shape labels are measured on the *label image*: the clean (noiseless, isolated) target summed
over ``label_bands`` in electrons. ``e1``/``e2`` are uniform-weight second-moment distortions
(SPEC 6, the report's estimator); ``hsm_e1``/``hsm_e2`` the galsim.hsm adaptive-moment distortions
of the same image (NaN and ``hsm_ok=False`` where HSM fails). Pixel frame throughout.
"""

from __future__ import annotations

import numpy as np

from deblend.core.shapes import hsm_shapes, moment_size, moments_ellipticity
from simulation.conditions import CONDITION_DESCRIPTIONS
from simulation.morphology import (
    COSMOS_COLUMN,
    MORPHOLOGY_COLUMNS,
    MORPHOLOGY_DESCRIPTIONS,
    REAL_COLUMN,
)
from simulation.scenes import SceneBatch
from simulation.surveys import SurveyGeometry

CATALOG_SHAPE_COLUMNS = ("a_b", "b_b", "a_d", "b_d", "pa_bulge", "pa_disk",
                         "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn")

LABEL_DESCRIPTIONS = {
    "e1": "uniform-weight moment distortion e1 of the clean target summed over label_bands",
    "e2": "uniform-weight moment distortion e2 (pixel frame)",
    "e": "sqrt(e1^2 + e2^2)",
    "moment_size": "uniform-weight moment size sqrt((Qxx+Qyy)/2) of the label image, pixels",
    "hsm_e1": "galsim.hsm adaptive-moment distortion e1 of the label image (NaN if failed)",
    "hsm_e2": "galsim.hsm adaptive-moment distortion e2",
    "hsm_sigma": "galsim.hsm adaptive moment size sigma, pixels",
    "hsm_ok": "1 where galsim.hsm converged",
    "redshift": "target redshift",
    "mag_<band>": "target AB magnitude per survey band",
    "<catalog column>": "target's CatSim shape parameters (arcsec, deg) after rotation",
    "n_galaxies": "galaxies in the blend (target included)",
    "neighbour_dx, neighbour_dy": "neighbour offsets from the target, arcsec (NaN padded)",
    "neighbour_mag": "neighbour ref-band magnitudes (NaN padded)",
    "g1, g2": "constant reduced shear applied to every galaxy",
    "twin": "1 for the 90-degree-rotated twin of the previous sample",
    "flux_<band>": "total flux of the clean target per band, electrons",
    "centre_dx, centre_dy": "with simulation.stamp_centre: detection, pixels from the target's "
                            "true position to the stamp centre (the target sits at -offset)",
    "detected": "with simulation.stamp_centre: detection, 1 where the target was detected",
    **CONDITION_DESCRIPTIONS,
    **MORPHOLOGY_DESCRIPTIONS,
}


def scene_labels(batch: SceneBatch, geometry: SurveyGeometry, label_bands: tuple[str, ...],
                 ref_band: str, max_neighbours: int) -> dict[str, np.ndarray]:
    """Label columns (each of length N, or (N, max_neighbours)) for a batch of scenes."""
    band_index = [geometry.bands.index(b) for b in label_bands]
    label_images = batch.clean[:, band_index].astype(np.float64).sum(axis=1)
    e1, e2 = moments_ellipticity(label_images)
    hsm = hsm_shapes(label_images)
    n = len(batch.tables)
    labels: dict[str, np.ndarray] = {
        "e1": e1.astype(np.float32),
        "e2": e2.astype(np.float32),
        "e": np.hypot(e1, e2).astype(np.float32),
        "moment_size": moment_size(label_images).astype(np.float32),
        "hsm_e1": hsm.e1.astype(np.float32),
        "hsm_e2": hsm.e2.astype(np.float32),
        "hsm_sigma": hsm.sigma.astype(np.float32),
        "hsm_ok": hsm.ok.astype(np.uint8),
    }
    targets = [table[0] for table in batch.tables]
    labels["redshift"] = np.array([t["redshift"] for t in targets], np.float32)
    for band in geometry.bands:
        labels[f"mag_{band}"] = np.array([t[f"{band}_ab"] for t in targets], np.float32)
    for column in CATALOG_SHAPE_COLUMNS:
        labels[column] = np.array([t[column] for t in targets], np.float32)
    labels["n_galaxies"] = np.array([len(t) for t in batch.tables], np.uint8)
    dx = np.full((n, max_neighbours), np.nan, np.float32)
    dy = np.full((n, max_neighbours), np.nan, np.float32)
    mags = np.full((n, max_neighbours), np.nan, np.float32)
    for i, table in enumerate(batch.tables):
        k = len(table) - 1
        if k:
            dx[i, :k] = np.asarray(table["ra"][1:]) - table["ra"][0]
            dy[i, :k] = np.asarray(table["dec"][1:]) - table["dec"][0]
            mags[i, :k] = np.asarray(table[f"{ref_band}_ab"][1:])
    labels["neighbour_dx"], labels["neighbour_dy"], labels["neighbour_mag"] = dx, dy, mags
    labels["g1"] = np.array([t["g1"] for t in targets], np.float32)
    labels["g2"] = np.array([t["g2"] for t in targets], np.float32)
    labels["twin"] = np.array([t["twin"] for t in targets], np.uint8)
    flux = batch.clean.astype(np.float64).sum(axis=(2, 3))
    for b, band in enumerate(geometry.bands):
        labels[f"flux_{band}"] = flux[:, b].astype(np.float32)
    if batch.offsets is not None:
        labels["centre_dx"] = batch.offsets[:, 0].astype(np.int8)
        labels["centre_dy"] = batch.offsets[:, 1].astype(np.int8)
        labels["detected"] = batch.detected.astype(np.uint8)
    if batch.conditions is not None:
        labels.update(batch.conditions)
    if "knot_seed" in batch.tables[0].colnames:
        for column in MORPHOLOGY_COLUMNS:
            labels[column] = np.array([t[column] for t in targets],
                                      np.int64 if column in ("n_knots", "knot_seed") else np.float64)
    for column in (COSMOS_COLUMN, REAL_COLUMN):
        if column in batch.tables[0].colnames:
            labels[column] = np.array([t[column] for t in targets], np.int64)
    return labels
