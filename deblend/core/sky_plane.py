"""The sky plane of each band of a stamp: what is left of the sky after its subtraction.

A survey subtracts its sky on scales of tens of arcseconds; what remains in a stamp is, to first
order, a constant and a gradient per band (a fraction of the sky noise). Metacalibration shears
everything in the stamp, that residual included, which the real shear never moved; a network
whose output depends on the residual's gradient then reads metacal's shear of it as a response
to shear (a 0.3-sigma residual biased the conditions model's metacal shear by about -0.008:
``python -m benchmarks.conditions --rows sky_0.3``). With ``metacal.hold_sky_plane``
(:func:`held_metacal`, for stamps in :meth:`deblend.core.inference.Deblender.metacal` and for
cells in :mod:`deblend.core.metadetect`) each stamp's or cell's plane is taken out before the
shear and put back unsheared: the networks see the residual as the real shear left it.

The plane of a band is the least-squares fit ``a + b x + c y`` (pixels from the stamp centre,
x along axis 1) to the pixels within ``sigma`` standard deviations of the current fit (astropy's
``sigma_clip`` of the residuals about the plane, median-centred, repeated until nothing more is
clipped, and the clipped pixels grown by a disk of :data:`DILATION` pixels), refitted
``iterations`` times from a first fit to every pixel: galaxies are left out with most of their
faint wings; what is left of the wings raises the plane slightly above the true sky under a
bright galaxy.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from astropy.stats import sigma_clip
from scipy.ndimage import binary_dilation

from deblend.core.stamps import central

CLIP_SIGMA = 3.0
"""Pixels further than this many standard deviations from the plane are left out of its fit."""
ITERATIONS = 3
"""Fits after the first (which uses every pixel); each clips afresh about the last fit."""
DILATION = 5
"""Radius (pixels) by which the clipped pixels are grown before each fit: the faint wings of a
galaxy around its clipped core (an exponential galaxy of 3e4 electrons with 0.6" half-light
radius at 10 sigma per pixel raises the plane by 0.23 sigma undilated, 0.04 sigma with 5)."""
_OFFSETS = np.arange(-DILATION, DILATION + 1)
DISK = _OFFSETS[:, None] ** 2 + _OFFSETS[None, :] ** 2 <= DILATION ** 2
"""The dilation's structuring element."""
CLIP_ITERATIONS = 10
"""Clipping rounds about each fit (astropy's ``sigma_clip`` ``maxiters``): until none is
clipped, at most this many."""


def plane_design(height: int, width: int) -> np.ndarray:
    """(H W, 3) design matrix of a plane: 1, x, y in pixels from the centre ((W-1)/2,
    (H-1)/2), x along axis 1."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([np.ones(height * width), (x - (width - 1) / 2).ravel(),
                     (y - (height - 1) / 2).ravel()], axis=1)


def sky_plane_coefficients(images: np.ndarray, sigma: float = CLIP_SIGMA,
                           iterations: int = ITERATIONS, exclude: np.ndarray | None = None
                           ) -> np.ndarray:
    """(..., bands, 3) plane coefficients (a, b, c) of each band of (..., bands, H, W) finite
    images, in the images' units per pixel (a: the level at the centre; b, c: per pixel along
    x and y). ``exclude`` (boolean, the images' shape): pixels never used (masked ones). A band
    whose kept pixels cannot fix a plane (a constant band, e.g. a missing one filled with 0, or
    one wholly excluded) gets the least-norm solution (0 when nothing is kept)."""
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"images must have shape (..., bands, H, W), got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images contain non-finite pixels: fill missing bands first")
    excluded = np.zeros(images.shape, bool) if exclude is None else np.asarray(exclude, bool)
    if excluded.shape != images.shape:
        raise ValueError(f"exclude must have the images' shape {images.shape}, got "
                         f"{excluded.shape}")
    height, width = images.shape[-2:]
    design = plane_design(height, width)
    outer = (design[:, :, None] * design[:, None, :]).reshape(-1, 9)  # (H W, 9)
    data = images.reshape(images.shape[:-2] + (height * width,)).astype(np.float64)

    def fit(weight: np.ndarray) -> np.ndarray:
        normal = (weight @ outer).reshape(weight.shape[:-1] + (3, 3))
        return np.einsum("...ij,...j->...i", np.linalg.pinv(normal), (weight * data) @ design)

    excluded = excluded.reshape(data.shape)
    coefficients = fit((~excluded).astype(np.float64))
    for _ in range(iterations):
        residual = np.ma.masked_array(data - coefficients @ design.T, excluded)
        clipped = sigma_clip(residual, sigma=sigma, maxiters=CLIP_ITERATIONS, axis=-1,
                             masked=True)
        masked = (np.ma.getmaskarray(clipped) & ~excluded).reshape(images.shape)
        masked = binary_dilation(masked, DISK[(None,) * (masked.ndim - 2)])
        coefficients = fit((~(masked.reshape(data.shape) | excluded)).astype(np.float64))
    return coefficients


def sky_plane(images: np.ndarray, sigma: float = CLIP_SIGMA, iterations: int = ITERATIONS,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """The fitted sky plane of every band of (..., bands, H, W) images, same shape and dtype
    (``exclude``: :func:`sky_plane_coefficients`')."""
    height, width = np.shape(images)[-2:]
    coefficients = sky_plane_coefficients(images, sigma, iterations, exclude)
    plane = coefficients @ plane_design(height, width).T
    return plane.reshape(np.shape(images)).astype(np.asarray(images).dtype)


class MetacalOperation(Protocol):
    """What :func:`held_metacal` needs of a metacal operator (the stamps' dense
    :class:`~deblend.core.metacal.MetacalOperator`, the cells' FFT
    :class:`~deblend.core.fourier_metacal.FourierMetacal`)."""

    def apply(self, images, noise=None) -> dict[str, torch.Tensor]: ...


def held_metacal(operator: MetacalOperation, images: np.ndarray, noise: np.ndarray | None,
                 plane: np.ndarray | None, masked: np.ndarray | None = None, *,
                 dtype: torch.dtype = torch.float64) -> dict[str, np.ndarray]:
    """The five metacal images of raw ``images`` ([N,] bands, H, W) with the correction
    ``noise`` (or None), as numpy arrays of ``dtype``; a sky ``plane`` (the images' shape, or
    None) is taken out before the shear and put back, unsheared, in each image (which makes it
    float64), cropped to the operator's output (its central pixels, where the operator crops a
    margin); ``masked`` pixels (no data, 0 in ``images``) stay 0 before the shear, not minus the
    plane."""
    if plane is None:
        return {name: image.to(dtype).cpu().numpy()
                for name, image in operator.apply(images, noise).items()}
    held = plane if masked is None else np.where(masked, 0.0, plane)
    sheared = {name: image.to(dtype).cpu().numpy()
               for name, image in operator.apply(images - held, noise).items()}
    kept = central(plane, next(iter(sheared.values())).shape[-2:])
    return {name: image + kept for name, image in sheared.items()}


__all__ = ["CLIP_ITERATIONS", "CLIP_SIGMA", "DILATION", "ITERATIONS", "MetacalOperation",
           "held_metacal", "plane_design", "sky_plane", "sky_plane_coefficients"]
