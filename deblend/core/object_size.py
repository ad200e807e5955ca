"""How much larger than the PSF each detection is: metadetection's size cut, on the walk's images.

A detection's size is read from the detection image it was found on (one of the five metacal
images' weighted band sums, all reconvolved to metacal's round Gaussians): galsim.hsm's
adaptive-moment size sigma = det(M)^(1/4) of its stamp (M the adaptive second-moment matrix),
against that of the detection image's PSF (the band-weighted sum of the reconvolution
Gaussians, :func:`detection_psf_sigma`). Its

    size_ratio = (sigma_obj / sigma_psf)^2 - 1

is T_galaxy / T_psf for round Gaussians (T = 2 sigma^2, T_observed = T_galaxy + T_psf), a little
less for elliptical ones (the determinant reads an ellipse of distortion e as sqrt(1 - e^2)
times its T): about 0 for a star, whatever its colour within the reconvolution Gaussians'
spread, and larger for larger galaxies (metadetection's ``T_ratio`` cut keeps T / T_psf > 0.5). NaN where the adaptive moments
fail (noise, an empty stamp). Measured on each metacal image's own detection image, so that a cut
on it is applied alike to the five images and its selection response is inside metacal's.
"""

from __future__ import annotations

import numpy as np

from deblend.core.recentre import recentred_stamps
from deblend.core.shapes import hsm_shapes


def detection_psf_sigma(sigmas: np.ndarray, weights: np.ndarray, size: int) -> float:
    """Adaptive-moment sigma (pixels) of the detection image's PSF: the round Gaussians of
    ``sigmas`` (pixels, one per detection band) summed with the detection ``weights``, drawn on
    a ``size`` square; NaN where it has none (a Gaussian of no width: no size can be read)."""
    sigmas, weights = np.asarray(sigmas, np.float64), np.asarray(weights, np.float64)
    if not (np.isfinite(sigmas).all() and (sigmas > 0).all()):
        return float("nan")
    r2 = ((np.arange(size) - size // 2)[None, :] ** 2
          + (np.arange(size) - size // 2)[:, None] ** 2)
    image = sum(w * np.exp(-0.5 * r2 / s ** 2) / (2 * np.pi * s ** 2)
                for s, w in zip(sigmas, weights))
    return float(hsm_shapes(np.asarray(image)[None]).sigma[0])


def size_ratios(detection: np.ndarray, positions: np.ndarray, psf_sigma: float, size: int
                ) -> np.ndarray:
    """(K,) size_ratio (module docstring) of the detections at ``positions`` (x, y) of a
    (H, W) ``detection`` image (NaN with a NaN ``psf_sigma``), read on stamps
    :data:`PSF_WIDTHS` PSF sigmas wide recentred on each position (neighbours stay out: on
    45-pixel stamps of the quick job's cells the moments fail for 9-11% of the detections, on
    17-21-pixel ones for none), ``size`` wide where that fails or reads narrower than
    :data:`MIN_SIGMA` PSF sigmas. Exact to 1e-3 for Gaussians up to the PSF's size (ratio 1),
    where star cuts are made; larger ones are read smaller than they are (ratio 2.25 as 2.19, 4
    as 3.52, 9 as 5.47)."""
    if len(positions) == 0:
        return np.zeros(0)
    if not np.isfinite(psf_sigma):
        return np.full(len(positions), np.nan)
    small = min(size, max(MIN_STAMP, int(np.ceil(PSF_WIDTHS * psf_sigma)) // 2 * 2 + 1))
    sigma = hsm_shapes(recentred_stamps(detection, positions, small)).sigma
    failed = ~(sigma >= MIN_SIGMA * psf_sigma)
    if failed.any() and small < size:
        sigma[failed] = hsm_shapes(recentred_stamps(detection, positions[failed], size)).sigma
    return (sigma / psf_sigma) ** 2 - 1.0


PSF_WIDTHS = 8.0
"""Width of the stamps sizes are read from, in PSF sigmas."""
MIN_STAMP = 15
"""Smallest stamp (pixels) sizes are read from."""
MIN_SIGMA = 0.8
"""Adaptive moments narrower than this many PSF sigmas (size_ratio below -0.36) are no object
the PSF could have made (a noise peak or a knot caught by the moments): read again on the
full stamp."""
