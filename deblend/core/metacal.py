"""Metacalibration images of multi-band stamps (Huff & Mandelbaum 2017; Sheldon & Huff 2017).

For each band of each stamp: the image is interpolated (GalSim ``InterpolatedImage``, Lanczos-15),
its PSF (convolved with the pixel) is deconvolved, the result is sheared by ``+-delta`` on each
component, and reconvolved with the same PSF dilated by ``1 + 2 delta``, so that the sheared
images keep a known, slightly wider PSF. An estimator ``e`` measured on the five images gives the
per-object response ``R_ij = (e_i(+delta_j) - e_i(-delta_j)) / (2 delta)``; the population shear is
``<R>^-1 <e(noshear)>`` (SPEC 6). Shears are reduced shears g, images are raw flux in the pixel
frame (x = array axis 1). This is the GalSim reference implementation: exact and slow (a few
hundredths of a second per band and stamp). The noise correction (a metacalibrated,
90-degree-rotated noise field) and a batched implementation are not here yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import galsim
import numpy as np

from deblend.core.arguments import POSITIVE_FLOAT

METACAL_SHEARS: dict[str, tuple[float, float]] = {
    "noshear": (0.0, 0.0), "1p": (1.0, 0.0), "1m": (-1.0, 0.0), "2p": (0.0, 1.0),
    "2m": (0.0, -1.0)}
"""The five metacal images and the shear each applies, in units of ``delta``."""
DEFAULT_DELTA = 0.01
INTERPOLANT = "lanczos15"


def metacal_images(stamps: np.ndarray, psfs: Sequence[galsim.GSObject], pixel_scale: float,
                   delta: float = DEFAULT_DELTA, noise: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """The five metacal images of (N, bands, H, W) raw-flux ``stamps``, each (N, bands, H, W).

    ``psfs`` holds each band's PSF as a GalSim profile in arcsec, without the pixel (the pixel
    response is added here, as the stamps were drawn with it); ``pixel_scale`` is in arcsec.

    ``noise``, an independent realisation of the stamps' noise (same shape), corrects the
    sheared noise (Sheldon & Huff 2017): it is rotated by 90 degrees, put through the same
    operations, rotated back and added to every image. Its anisotropic correlations then cancel
    those of the stamps' own sheared noise, at the price of twice the noise variance.
    """
    images = _metacal(stamps, psfs, pixel_scale, delta)
    if noise is None:
        return images
    noise = np.asarray(noise, dtype=np.float64)
    if noise.shape != np.shape(stamps):
        raise ValueError(f"noise must have the stamps' shape {np.shape(stamps)}, got "
                         f"{noise.shape}")
    rotated = _metacal(np.rot90(noise, 1, axes=(2, 3)), psfs, pixel_scale, delta)
    return {name: image + np.rot90(rotated[name], -1, axes=(2, 3))
            for name, image in images.items()}


def _metacal(stamps: np.ndarray, psfs: Sequence[galsim.GSObject], pixel_scale: float,
             delta: float) -> dict[str, np.ndarray]:
    """:func:`metacal_images` without the noise correction."""
    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 4:
        raise ValueError(f"stamps must have shape (N, bands, H, W), got {stamps.shape}")
    if len(psfs) != stamps.shape[1]:
        raise ValueError(f"{len(psfs)} PSFs for {stamps.shape[1]} bands: one PSF per band")
    if not np.isfinite(stamps).all():
        raise ValueError("stamps contain non-finite pixels")
    POSITIVE_FLOAT.require(pixel_scale, "pixel_scale")
    if not 0 < delta < 0.1:
        raise ValueError(f"delta must be in (0, 0.1), got {delta!r}")
    height, width = stamps.shape[2:]
    pixel = galsim.Pixel(pixel_scale)
    out = {name: np.empty_like(stamps) for name in METACAL_SHEARS}
    for band, psf in enumerate(psfs):
        effective = galsim.Convolve(psf, pixel)
        inverse, reconvolved = galsim.Deconvolve(effective), effective.dilate(1.0 + 2.0 * delta)
        for n in range(stamps.shape[0]):
            image = galsim.InterpolatedImage(galsim.Image(stamps[n, band], scale=pixel_scale),
                                             x_interpolant=INTERPOLANT)
            intrinsic = galsim.Convolve(image, inverse)
            for name, (s1, s2) in METACAL_SHEARS.items():
                sheared = intrinsic.shear(g1=s1 * delta, g2=s2 * delta)
                out[name][n, band] = galsim.Convolve(sheared, reconvolved).drawImage(
                    nx=width, ny=height, scale=pixel_scale, method="no_pixel").array
    return out


def metacal_response(e: dict[str, np.ndarray], delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Per-object 2x2 responses (N, 2, 2) from an estimator's (N, 2) outputs on the images."""
    columns = [(e[f"{j}p"] - e[f"{j}m"]) / (2.0 * delta) for j in (1, 2)]
    return np.stack(columns, axis=-1)


def population_shear(e_noshear: np.ndarray, response: np.ndarray) -> np.ndarray:
    """The shear of a population: g_hat = <R>^-1 <e>, from (N, 2) estimates on the noshear
    images and (N, 2, 2) per-object responses (objects with a NaN are left out)."""
    e_noshear, response = np.asarray(e_noshear, float), np.asarray(response, float)
    good = np.isfinite(e_noshear).all(axis=1) & np.isfinite(response).all(axis=(1, 2))
    if not good.any():
        raise ValueError("no object has a finite estimate and response")
    return np.linalg.solve(response[good].mean(axis=0), e_noshear[good].mean(axis=0))
