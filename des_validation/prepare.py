"""Turning DES cutouts into model inputs: bands, the missing u band, pixel scale, crop, normalisation.

Steps, per object (SPEC 3 and 7):

1. **Resample and crop.** With ``resample`` (the default) each band is turned into a
   ``galsim.InterpolatedImage`` (quintic interpolant, flux normalisation: pixel values are fluxes)
   at the cutout's pixel scale (DES: 0.263"), shifted so that the object sits at the origin, and
   drawn with ``method="no_pixel"`` (the pixel response is already in the data) on a
   ``stamp x stamp`` grid at the model's pixel scale (LSST: 0.2"), the object at the stamp centre.
   Total flux is conserved; a 45x45 model stamp covers 9", i.e. 34 DES pixels. Without
   ``resample`` the stamp is a ``stamp x stamp`` crop of DES pixels (11.9" for 45 pixels, as in
   the report) around the pixel nearest the object, moved by the object's sub-pixel offset so
   that it too sits on the central pixel's centre, as the networks' training targets do
   (:func:`~deblend.core.recentre.recentred_stamps`; a Fourier shift, flux kept; where the cutout
   ends within 8 pixels of the crop, zeros fill the margin the shift reads). A cutout that cannot
   hold the stamp around the object is skipped ("cutout too small for the crop").
2. **Band mapping.** Model bands are matched to cutout bands by name, case-insensitively (DES
   g r i z Y -> LSST g r i z y). A model band with no DES counterpart (u) is filled by the
   *u strategy*:

   - ``zeros`` (default, the report's choice): u = 0;
   - ``g_copy``: u = g;
   - ``g_extrapolate``: u = g x (u/g), the median ratio of the target's total u and g fluxes in
     the LSST training set (``flux_u / flux_g`` labels, electrons), so that u/g matches training.

3. **Normalisation** ``x = tanh(asinh(beta x_raw / <max>))`` with either

   - ``des`` (default, as the report did): ``<max>`` per band computed on the prepared DES set
     itself; for a filled band the constant is the g constant times the training set's
     ``<max>_u / <max>_g``, so a g-derived u is scaled as u is in training (and zeros stay zero);
   - ``training``: the training set's constants (stored with the model) for every band; DES
     coadd units differ from LSST electrons, so this shows the 40-75x pitfall of SPEC 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import galsim
import numpy as np

from deblend.core.normalization import NormalizationConstants
from deblend.core.resample import INTERPOLANT
from deblend.core.recentre import recentred_stamps
from deblend.core.stamps import nearest_pixel
from des_validation.cutouts import DES_BANDS, Cutout, Skip

U_STRATEGIES = ("zeros", "g_copy", "g_extrapolate")
FILL_SOURCE_BAND = "g"
DEFAULT_U_OVER_G = 0.11
"""Fallback u/g flux ratio: median flux_u/flux_g of 200 LSST targets drawn with configs/quick.yaml
on the embedded catalog model (16-84%: 0.066-0.139). Used only without training data."""


@dataclass(frozen=True)
class BandMap:
    """For each model band, the cutout band it comes from (None: filled by the u strategy)."""

    model_bands: tuple[str, ...]
    sources: tuple[str | None, ...]

    @property
    def filled(self) -> tuple[str, ...]:
        return tuple(m for m, s in zip(self.model_bands, self.sources) if s is None)

    def describe(self) -> str:
        return ", ".join(f"{m} <- {s if s is not None else 'fill'}"
                         for m, s in zip(self.model_bands, self.sources))


def map_bands(cutout_bands: Sequence[str], model_bands: Sequence[str]) -> BandMap:
    """Match model bands to cutout bands by name, case-insensitively."""
    lookup = {b.lower(): b for b in cutout_bands}
    sources = tuple(lookup.get(m.lower()) for m in model_bands)
    mapping = BandMap(tuple(model_bands), sources)
    if any(s is None for s in sources) and FILL_SOURCE_BAND not in lookup:
        raise ValueError(f"cannot fill model bands {' '.join(mapping.filled)}: the cutouts have no "
                         f"'{FILL_SOURCE_BAND}' band")
    return mapping


def fill_band(g: np.ndarray, strategy: str, u_over_g: float) -> np.ndarray:
    """The filled band from the g images, by ``strategy`` (see the module docstring)."""
    if strategy == "zeros":
        return np.zeros_like(g)
    if strategy == "g_copy":
        return g.copy()
    if strategy == "g_extrapolate":
        return g * u_over_g
    raise ValueError(f"unknown u strategy '{strategy}' (one of {', '.join(U_STRATEGIES)})")


def apply_band_map(images: np.ndarray, cutout_bands: Sequence[str], mapping: BandMap,
                   strategy: str, u_over_g: float = DEFAULT_U_OVER_G) -> np.ndarray:
    """(N, cutout bands, H, W) -> (N, model bands, H, W), filling unmatched bands."""
    if strategy not in U_STRATEGIES:
        raise ValueError(f"unknown u strategy '{strategy}' (one of {', '.join(U_STRATEGIES)})")
    index = {b: k for k, b in enumerate(cutout_bands)}
    out = np.empty((images.shape[0], len(mapping.model_bands)) + images.shape[2:], images.dtype)
    for k, source in enumerate(mapping.sources):
        if source is None:
            out[:, k] = fill_band(images[:, index[FILL_SOURCE_BAND]], strategy, u_over_g)
        else:
            out[:, k] = images[:, index[source]]
    return out


# -- geometry ------------------------------------------------------------------------------------
def crop_fits(shape: tuple[int, int], center: tuple[float, float], from_scale: float,
              to_scale: float, stamp: int, resample: bool) -> str | None:
    """None if a ``stamp`` crop around ``center`` (x, y) fits in ``shape``; else the reason."""
    height, width = shape
    x0, y0 = center
    if resample:
        half = 0.5 * stamp * to_scale / from_scale  # DES pixels from the object to the stamp edge
        ok = (x0 - half >= -0.5 - 1e-6 and x0 + half <= width - 0.5 + 1e-6
              and y0 - half >= -0.5 - 1e-6 and y0 + half <= height - 0.5 + 1e-6)
        need = f"{2 * half:.1f} x {2 * half:.1f} pixels ({stamp * to_scale:.2f}\")"
    else:
        ix, iy = nearest_pixel(x0, y0)
        lo, hi = stamp // 2, stamp - stamp // 2
        ok = ix - lo >= 0 and ix + hi <= width and iy - lo >= 0 and iy + hi <= height
        need = f"{stamp} x {stamp} pixels"
    if ok:
        return None
    return (f"cutout too small for the crop: {width} x {height} pixels cannot hold {need} "
            f"around the object at ({x0:.1f}, {y0:.1f})")


def resample_image(image: np.ndarray, from_scale: float, to_scale: float, stamp: int,
                   center: tuple[float, float] | None = None) -> np.ndarray:
    """One 2-D image resampled with GalSim onto a ``stamp x stamp`` grid of ``to_scale`` pixels.

    ``center`` is the object's 0-based pixel (x, y) in ``image`` (default: the image centre); it
    lands on the centre of the output stamp (pixel (stamp - 1) / 2). Flux is conserved.
    """
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape
    if center is None:
        center = ((width - 1) / 2.0, (height - 1) / 2.0)
    profile = galsim.InterpolatedImage(galsim.Image(image, scale=from_scale),
                                       x_interpolant=INTERPOLANT, normalization="flux",
                                       calculate_stepk=False, calculate_maxk=False)
    dx = (center[0] - (width - 1) / 2.0) * from_scale
    dy = (center[1] - (height - 1) / 2.0) * from_scale
    if dx or dy:
        profile = profile.shift(-dx, -dy)
    drawn = profile.drawImage(nx=stamp, ny=stamp, scale=to_scale, method="no_pixel")
    return drawn.array.astype(np.float64)


def stamp_from_cutout(images: np.ndarray, from_scale: float, to_scale: float, stamp: int,
                      center: tuple[float, float], resample: bool) -> np.ndarray:
    """(bands, H, W) cutout -> (bands, stamp, stamp) model-grid stamp around ``center``."""
    if resample:
        return np.stack([resample_image(plane, from_scale, to_scale, stamp, center)
                         for plane in images])
    return recentred_stamps(np.asarray(images, dtype=np.float64), np.array([center]), stamp)[0]


# -- the whole set -------------------------------------------------------------------------------
@dataclass
class PreparedSet:
    """Model-grid stamps in the *cutout* bands (before band mapping), and what was skipped."""

    ids: np.ndarray
    stamps: np.ndarray
    """(N, cutout bands, stamp, stamp) float64, raw DES units"""
    bands: tuple[str, ...]
    centers: np.ndarray
    """(N, 2) object's pixel (x, y) in its cutout"""
    skipped: list[Skip] = field(default_factory=list)


def prepare_stamps(cutouts: Sequence[Cutout], centers: Sequence[tuple[float, float]],
                   model_pixel_scale: float, stamp: int, resample: bool) -> PreparedSet:
    """Resample (or crop) every cutout around its object; too-small cutouts are skipped."""
    ids, stamps, kept_centers, skipped = [], [], [], []
    bands: tuple[str, ...] = cutouts[0].bands if cutouts else DES_BANDS
    for cutout, center in zip(cutouts, centers):
        to_scale = model_pixel_scale if resample else cutout.pixel_scale
        reason = crop_fits(cutout.shape, center, cutout.pixel_scale, to_scale, stamp, resample)
        if reason is not None:
            skipped.append(Skip(cutout.object_id, cutout.source, reason, stage="prepare"))
            continue
        try:
            result = stamp_from_cutout(cutout.images, cutout.pixel_scale, model_pixel_scale,
                                       stamp, center, resample)
        except (galsim.GalSimError, ValueError, MemoryError) as exc:
            skipped.append(Skip(cutout.object_id, cutout.source,
                                f"resampling failed: {exc}", stage="prepare"))
            continue
        if not np.all(np.isfinite(result)):
            skipped.append(Skip(cutout.object_id, cutout.source,
                                "non-finite pixels after resampling", stage="prepare"))
            continue
        ids.append(cutout.object_id)
        stamps.append(result)
        kept_centers.append(center)
    shape = (0, len(bands), stamp, stamp)
    return PreparedSet(np.array(ids, np.int64),
                       np.stack(stamps) if stamps else np.zeros(shape),
                       bands, np.array(kept_centers, np.float64).reshape(-1, 2), skipped)


def des_constants(model_images: np.ndarray, mapping: BandMap,
                  training: NormalizationConstants) -> NormalizationConstants:
    """``<max>`` constants computed on the prepared DES set (mode ``des``).

    Filled bands get ``<max>_g(DES) x <max>_band(train) / <max>_g(train)`` (see module docstring).
    """
    if model_images.shape[0] == 0:
        raise ValueError("no DES object is left to compute normalisation constants on")
    if tuple(training.bands) != mapping.model_bands:
        raise ValueError(f"model bands {mapping.model_bands} differ from the training "
                         f"constants' bands {training.bands}")
    maxima = model_images.max(axis=(2, 3)).mean(axis=0)
    values = list(maxima)
    g = mapping.model_bands.index(FILL_SOURCE_BAND)
    for k, source in enumerate(mapping.sources):
        if source is None:
            values[k] = maxima[g] * training.max_values[k] / training.max_values[g]
    bad = [b for b, v in zip(mapping.model_bands, values) if not (np.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"the DES <max> of band {bad[0]} is not positive: are the cutouts "
                         f"background-subtracted images of galaxies?")
    return NormalizationConstants(mapping.model_bands, tuple(float(v) for v in values),
                                  training.beta, training.stamp_scale)
