"""Source detection on raw scenes with BTK's SEP detection (``btk.deblend.SepSingleBand``).

BTK's detector reads a ``BlendBatch``; :func:`detect_sources` wraps plain arrays in one (the
survey from BTK, the isolated images a broadcast zero that costs no memory) so that scenes
from anywhere (BTK stamps, dense fields, cutouts) are detected exactly as BTK detects them:
SEP's background rms, a threshold of ``threshold`` times it, ``min_area`` pixels, on one band.
Positions are SEP's centroids in pixels, x = column, y = row (BTK's ``x_peak``/``y_peak``).
"""

from __future__ import annotations

import btk
import numpy as np
from astropy.table import Table
from btk.blend_batch import BlendBatch

from deblend.core.arguments import POSITIVE_FLOAT, require_positive_int
from deblend.core.stamps import check_centre


def detect_sources(scenes: np.ndarray, survey: str, bands: tuple[str, ...],
                   detection_band: str = "i", threshold: float = 1.5, min_area: int = 5,
                   max_sources: int = 20) -> list[np.ndarray]:
    """One (K_i, 2) float array of (x, y) detections per scene (N, bands, H, W), electrons.

    ``survey`` is BTK's survey name (its pixel scale makes BTK's WCS); ``bands`` the scenes'
    band order, ``detection_band`` one of them. Scenes must be square (BTK's convention).
    A scene with more than ``max_sources`` detections is a ValueError (raise the limit or the
    threshold). ``threshold``, ``min_area`` and ``max_sources`` obey the rules of
    ``map.detection_threshold`` and ``map.max_sources`` (> 0, >= 1, >= 1). No scene gives an
    empty list."""
    threshold = POSITIVE_FLOAT.require(threshold, "threshold")
    min_area = require_positive_int(min_area, "min_area")
    max_sources = require_positive_int(max_sources, "max_sources")
    scenes = np.asarray(scenes)
    if scenes.ndim != 4 or scenes.shape[1] != len(bands) or scenes.shape[2] != scenes.shape[3]:
        raise ValueError(f"scenes must be square (N, {len(bands)}, H, H) arrays, got shape "
                         f"{scenes.shape}")
    if detection_band not in bands:
        raise ValueError(f"detection band '{detection_band}' is not one of {' '.join(bands)}")
    btk_survey = btk.survey.get_surveys(survey)
    if tuple(btk_survey.available_filters) != tuple(bands):
        raise ValueError(f"BTK's {survey} has bands {' '.join(btk_survey.available_filters)}, "
                         f"the scenes {' '.join(bands)}")
    n, n_bands, size = scenes.shape[:3]
    batch = BlendBatch(n, max_sources, size * btk_survey.pixel_scale.to_value("arcsec"),
                       btk_survey, np.ascontiguousarray(scenes, np.float64),
                       np.broadcast_to(np.float64(0), (n, max_sources, n_bands, size, size)),
                       [Table() for _ in range(n)], [])
    detector = btk.deblend.SepSingleBand(max_sources, thresh=threshold, min_area=min_area,
                                         use_band=bands.index(detection_band))
    found = []
    for ii in range(n):
        catalog = detector.deblend(ii, batch).catalog
        found.append(np.stack([np.asarray(catalog["x_peak"], np.float64),
                               np.asarray(catalog["y_peak"], np.float64)], axis=1)
                     if len(catalog) else np.zeros((0, 2)))
    return found


def with_target(detections: np.ndarray, target: tuple[float, float], radius: float = 2.0
                ) -> np.ndarray:
    """(K, 2) positions with the known ``target`` (x, y) first, in place of every detection
    within ``radius`` pixels of it (SEP's centroid of a blended target is pulled towards its
    neighbours)."""
    detections = np.asarray(detections, np.float64).reshape(-1, 2)
    far = np.hypot(*(detections - np.asarray(target)).T) > radius
    return np.concatenate([np.asarray(target, np.float64)[None], detections[far]])


def detect_around_target(scenes: np.ndarray, survey: str, bands: tuple[str, ...],
                         target: tuple[float, float], detection_band: str = "i",
                         threshold: float = 1.5, max_sources: int = 20) -> list[np.ndarray]:
    """Per scene, the known ``target`` (x, y) first and then SEP's other detections
    (:func:`detect_sources`, then :func:`with_target`): the positions MAP fits a stamp with.
    A ``target`` outside the scenes is refused (ValueError naming it and the scenes' size)."""
    check_centre(*target, np.shape(scenes), "target")
    return [with_target(found, target) for found in detect_sources(
        scenes, survey, bands, detection_band, threshold, max_sources=max_sources)]
