"""Galaxy shapes from images (SPEC section 6), in the pixel frame.

Conventions, used everywhere in deblend:
- Pixel frame: x along array axis 1 (columns, to the right), y along axis 0 (rows, up when the
  image is displayed with origin="lower"). Angles are counter-clockwise from +x.
- ``e1``, ``e2`` are *distortions*: e = (a^2 - b^2)/(a^2 + b^2) for an elliptical profile of axis
  ratio b/a, the convention of the report's moments. A reduced *shear* g = (a - b)/(a + b) relates
  as e = 2g / (1 + g^2). ``galsim.hsm`` returns both; we store its distortion.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np


@dataclass(frozen=True)
class Moments:
    """Second moments about the centroid (pixels^2) and the centroid (pixels)."""

    x0: np.ndarray
    y0: np.ndarray
    qxx: np.ndarray
    qyy: np.ndarray
    qxy: np.ndarray


def second_moments(images: np.ndarray, weight: np.ndarray | None = None) -> Moments:
    """Uniform-weight (``weight=None``) second moments of images of shape (..., H, W).

    Q_ij = sum W I x_i x_j / sum W I about the first-moment centroid. Works on a batch; returns
    NaN where the total (weighted) flux is not positive.
    """
    images = np.asarray(images, dtype=np.float64)
    height, width = images.shape[-2:]
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    weighted = images if weight is None else images * weight
    flux = weighted.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        good = flux > 0
        safe = np.where(good, flux, 1.0)
        x0 = (weighted * x).sum(axis=(-2, -1)) / safe
        y0 = (weighted * y).sum(axis=(-2, -1)) / safe
        dx = x - x0[..., None, None]
        dy = y - y0[..., None, None]
        qxx = (weighted * dx * dx).sum(axis=(-2, -1)) / safe
        qyy = (weighted * dy * dy).sum(axis=(-2, -1)) / safe
        qxy = (weighted * dx * dy).sum(axis=(-2, -1)) / safe
    nan = np.where(good, 1.0, np.nan)
    return Moments(x0 * nan, y0 * nan, qxx * nan, qyy * nan, qxy * nan)


def gaussian_weight(size: int, sigma: float) -> np.ndarray:
    """A round Gaussian weight (size, size) of ``sigma`` pixels centred on the stamp's central
    pixel ((size-1)/2, (size-1)/2), for :func:`second_moments`."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma!r}")
    centre = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size] - centre
    return np.exp(-0.5 * (x ** 2 + y ** 2) / sigma ** 2)


def ellipticity_from_moments(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) = ((Qxx - Qyy), 2 Qxy) / (Qxx + Qyy)."""
    trace = moments.qxx + moments.qyy
    with np.errstate(invalid="ignore", divide="ignore"):
        e1 = (moments.qxx - moments.qyy) / trace
        e2 = 2.0 * moments.qxy / trace
    return e1, e2


def moments_ellipticity(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-weight distortion (e1, e2) of images (..., H, W); the labels' estimator."""
    return ellipticity_from_moments(second_moments(images))


def moment_size(images: np.ndarray) -> np.ndarray:
    """Uniform-weight moment size sqrt((Qxx + Qyy) / 2), in pixels."""
    moments = second_moments(images)
    return np.sqrt(0.5 * (moments.qxx + moments.qyy))


def ellipticity_modulus(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """|e| = sqrt(e1^2 + e2^2)."""
    return np.hypot(e1, e2)


def position_angle(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """theta = atan2(e2, e1) / 2, radians counter-clockwise from +x."""
    return 0.5 * np.arctan2(e2, e1)


@dataclass(frozen=True)
class HSMShape:
    """galsim.hsm adaptive moments: distortion (e1, e2), size sigma (pixels), success flag."""

    e1: np.ndarray
    e2: np.ndarray
    sigma: np.ndarray
    ok: np.ndarray


def hsm_shapes(images: np.ndarray) -> HSMShape:
    """Adaptive-moment distortions of each image of (N, H, W) with galsim.hsm.FindAdaptiveMom.

    Failures (no convergence, zero flux) give NaN and ``ok=False``; they never raise.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    n = images.shape[0]
    e1 = np.full(n, np.nan)
    e2 = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    ok = np.zeros(n, bool)
    for i in range(n):
        if not np.all(np.isfinite(images[i])) or images[i].sum() <= 0:
            continue
        result = galsim.hsm.FindAdaptiveMom(galsim.Image(images[i], scale=1.0), strict=False)
        if result.moments_status == 0:
            e1[i] = result.observed_shape.e1
            e2[i] = result.observed_shape.e2
            sigma[i] = result.moments_sigma
            ok[i] = True
    return HSMShape(e1, e2, sigma, ok)
