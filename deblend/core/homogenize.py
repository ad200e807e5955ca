"""Stamps at one round target PSF: metacal's noshear operation, each stamp under its own PSF.

Choice (a) of issue 23: every image a network sees, in training and in inference, is
deconvolved by its own PSF and reconvolved with one round Gaussian per band (the target,
``simulation.target_psf_fwhm``), which is what metacal's noshear image is when metacal
reconvolves to that target (``FourierMetacal(target_sigma=...)``). A network trained on such
stamps then never sees the survey's PSF: its PSF's size and ellipticity are gone from the pixels,
and only the noise (its level and its correlations) still tells one sky from another.

Training stamps have no margin around them: before the FFT they are extended by reflection
(``edge="reflect"``), so that the pixels near the edge keep roughly the light and noise that an
image cut from a larger one would have; metacal's own images of a stamp with a margin use zeros
(``edge="zero"``) and are cropped. The two agree away from the edge (a few target sigmas).

Measured (README, "Choice (a)"): a model trained on homogenised images did worse than the same
config trained on the survey's images and measured with metacal homogenised to the same target
(``metacal.target_psf_fwhm``), which is the form of (a) the project uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import fft as scipy_fft

from deblend.core.fourier_metacal import DEFAULT_PAD, grid_size, psf_transform
from deblend.core.metacal import per_band_targets

MAX_GAIN = 1.1
"""Largest |Gaussian / PSF| allowed at any frequency of the grid: above it the target is
narrower than the PSF allows and the noise is amplified. For BTK's LSST PSF at 1.2" the rule's
Gaussian (:func:`~deblend.core.metacal.reconvolution_sigma`) reaches 1.001 on a 96-pixel
grid, one 10% narrower 1.015, 20% narrower 1.06, 40% narrower 30 to 350."""
CHUNK = 128
"""Stamps transformed at once."""


def homogenize(images: np.ndarray, psfs: np.ndarray, target_sigma: Sequence[float], *,
               noise: np.ndarray | None = None, pad: int = DEFAULT_PAD,
               edge: Literal["reflect", "zero"] = "reflect") -> np.ndarray:
    """Raw stamps (N, bands, H, W) at the round Gaussian target of ``target_sigma`` (pixels, one
    per band), each deconvolved by its own effective PSF (N, bands, S, S) (pixel included,
    unit sum, centred at (S-1)/2: as datasets store them): float32, the input's shape.

    ``noise`` (the images' shape), an independent noise field, adds metacal's correction
    (rotated by 90 degrees, put through the same operation, rotated back), as
    :meth:`~deblend.core.fourier_metacal.FourierMetacal.apply` does. ``edge``: how the stamp is
    extended before the FFT (module docstring). A ValueError names the first stamp and band
    whose PSF is too wide for the target (:data:`MAX_GAIN`)."""
    images = np.asarray(images, np.float64)
    psfs = np.asarray(psfs, np.float64)
    if images.ndim != 4 or psfs.ndim != 4 or psfs.shape[:2] != images.shape[:2]:
        raise ValueError(f"images (N, bands, H, W) {images.shape} and PSFs (N, bands, S, S) "
                         f"{psfs.shape} must agree in N and bands")
    if not np.isfinite(images).all():
        raise ValueError("images contain non-finite pixels")
    if noise is not None and np.shape(noise) != images.shape:
        raise ValueError(f"noise must have the images' shape {images.shape}, got "
                         f"{np.shape(noise)}")
    sigma = np.asarray(per_band_targets(target_sigma, images.shape[1]), np.float64)
    grid = (grid_size(images.shape[2], pad), grid_size(images.shape[3], pad))
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), CHUNK):
        part = slice(start, start + CHUNK)
        filters = _filters(psfs[part], sigma, grid, start)
        result = _convolve(images[part], filters, grid, pad, edge)
        if noise is not None:
            rotated = _convolve(np.rot90(np.asarray(noise[part], np.float64), 1, axes=(2, 3)),
                                filters, grid, pad, edge)
            result += np.rot90(rotated, -1, axes=(2, 3))
        out[part] = result
    return out


def _filters(psfs: np.ndarray, sigma: np.ndarray, grid: tuple[int, int], first: int
             ) -> np.ndarray:
    """G(k) / P(k) of every stamp and band on the padded grid, checked against MAX_GAIN."""
    ky = 2 * np.pi * np.fft.fftfreq(grid[0])[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(grid[1])[None, :]
    gaussian = np.exp(-0.5 * sigma[:, None, None] ** 2 * (kx ** 2 + ky ** 2)[None])
    transform = psf_transform(psfs, grid)
    magnitude = np.abs(transform)
    ratio = np.where(magnitude > 0, gaussian / np.maximum(magnitude, 1e-300), np.inf)
    gain = ratio.max(axis=(-2, -1))
    if (gain > MAX_GAIN).any():
        n, b = np.argwhere(gain > MAX_GAIN)[0]
        raise ValueError(f"stamp {first + n}, band {b}: its PSF is wider than the target PSF "
                         f"allows (|target / PSF| reaches {gain[n, b]:.3g}); choose a wider "
                         f"target_psf_fwhm")
    return gaussian / transform


def _convolve(images: np.ndarray, filters: np.ndarray, grid: tuple[int, int], pad: int,
              edge: str) -> np.ndarray:
    """Images (n, bands, H, W) through the filters, on the padded grid, cropped back."""
    height, width = images.shape[2:]
    rows, cols = grid
    if edge == "reflect":
        extend = min(pad, height - 1, width - 1)
        images = np.pad(images, ((0, 0), (0, 0), (extend, extend), (extend, extend)),
                        mode="reflect")
        offset = pad - extend
    elif edge == "zero":
        offset = pad
    else:
        raise ValueError(f"edge must be 'reflect' or 'zero', got {edge!r}")
    padded = np.zeros(images.shape[:2] + (rows, cols))
    padded[..., offset:offset + images.shape[2], offset:offset + images.shape[3]] = images
    smooth = scipy_fft.irfft2(scipy_fft.rfft2(padded) * filters, s=(rows, cols))
    return smooth[..., pad:pad + height, pad:pad + width]
