"""Training stamps centred where the detector finds the target, not on its true position.

Metadetection cuts each stamp around the nearest pixel of a detection's windowed centroid
(:func:`deblend.core.metadetect.detect_cell`); a blended target's centroid is pulled towards its
neighbours and moved by noise. With ``simulation.stamp_centre: detection`` the scenes are drawn on
a canvas :data:`CANVAS_MARGIN` pixels wider on each side, the noisy blend is detected exactly as
metadetection detects a cell (the inverse-sky-variance weighted sum of the detection bands,
threshold and minimum area of :class:`~deblend.core.metadetect.MetadetectSettings`), and every
image set of the scene (clean target, noisy target, blend, each galaxy alone) is cut around the
same pixel: that of the detection nearest the true position, within :data:`MATCH_RADIUS`. A
target that is not detected there keeps the true centre (``detected`` = 0). The offset of the
stamp centre from the true position (pixels, x = column, y = row) is a label, so the target
sits at ``-offset`` from the stamp centre.
"""

from __future__ import annotations

import numpy as np

from deblend.core.metadetect import (
    MetadetectSettings,
    detect_cell,
    detection_weights,
    noise_sigma,
)

CANVAS_MARGIN = 4
"""Pixels drawn beyond the stamp on each side; an offset is clipped to it (|offset| <= 4 px:
0.8" on LSST, more than a blended centroid moves in 99.9% of the quick job's blends)."""
MATCH_RADIUS = 3.0
"""Pixels: the detection nearest the true position counts as the target's within this radius."""


def detection_offsets(blends: np.ndarray, sky_levels: np.ndarray, bands: tuple[str, ...],
                      settings: MetadetectSettings = MetadetectSettings(),
                      margin: int = CANVAS_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) int offsets (dx, dy) of the detected target's nearest pixel from the canvas centre,
    clipped to ``margin``, and (N,) bool ``detected``, for noisy blends (N, bands, P, P) drawn
    with the target at the centre of odd ``P``. ``sky_levels`` (bands,) is each band's noise
    variance per pixel (electrons^2); the detection image weights the detection bands by its
    inverse, as metadetection does."""
    blends = np.asarray(blends, np.float64)
    size = blends.shape[-1]
    if blends.ndim != 4 or blends.shape[-2] != size or size % 2 == 0:
        raise ValueError(f"blends must be odd square canvases (N, bands, P, P), got {blends.shape}")
    variance = np.broadcast_to(np.asarray(sky_levels, np.float64)[:, None, None],
                               blends.shape[1:])
    index, weights = detection_weights(variance, bands, settings.detection_bands)
    sigma = noise_sigma(variance[index], weights, np.ones(len(index)))  # no metacal: gain 1
    detection = np.tensordot(blends[:, index], weights, axes=([1], [0]))
    centre = (size - 1) / 2
    offsets = np.zeros((len(blends), 2), np.int64)
    detected = np.zeros(len(blends), bool)
    for k, image in enumerate(detection):
        found = detect_cell(image, sigma, settings.threshold, settings.min_area,
                            settings.deblend_contrast)
        if len(found) == 0:
            continue
        distance = np.hypot(found[:, 0] - centre, found[:, 1] - centre)
        nearest = int(np.argmin(distance))
        if distance[nearest] <= MATCH_RADIUS:
            offsets[k] = np.clip(np.rint(found[nearest] - centre), -margin, margin)
            detected[k] = True
    return offsets, detected


def crop_around(canvases: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """(N, ..., size, size) stamps of canvases (N, ..., P, P) centred ``offsets`` (N, 2) pixels
    (dx, dy) from each canvas centre; every stamp must lie inside its canvas."""
    canvases = np.asarray(canvases)
    pixels = canvases.shape[-1]
    low = (pixels - size) // 2 + np.asarray(offsets, np.int64)
    if (low < 0).any() or (low + size > pixels).any():
        raise ValueError(f"offsets move a {size}-pixel stamp out of its {pixels}-pixel canvas")
    out = np.empty((*canvases.shape[:-2], size, size), canvases.dtype)
    for k, (x0, y0) in enumerate(low):
        out[k] = canvases[k, ..., y0:y0 + size, x0:x0 + size]
    return out
