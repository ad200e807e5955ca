"""Defects of the reconstructions themselves, measured on isolated galaxies no network saw.

Population: :class:`simulation.galsim_population.GalSimPopulation` without neighbours (GalSim
bulge+disk galaxies, in rotated-twin pairs: row 2k+1 is row 2k turned by 90 degrees), each band
noised like BTK (:func:`simulation.scenes.add_btk_noise`: Poisson on the galaxy plus Poisson sky
of the survey's mean sky level, sky-subtracted). The deblender reconstructs each noisy stamp
(``predict``, and optionally MAP deblending: :func:`map_reconstructions`); the truth is the same
galaxy drawn without noise.

Conventions: images are (N, bands, H, W) electrons per pixel; shapes are read from the sum of
``shape_bands`` (r, i, z: the labels' bands) as distortions e = (a^2 - b^2)/(a^2 + b^2) in the
pixel frame (x = axis 1, y = axis 0), from second moments (:mod:`deblend.core.shapes`) with
uniform weight over the stamp or with a fixed circular Gaussian weight of ``sigma`` pixels
centred on the stamp centre. The weight is the same for truth and reconstruction.

What is measured:

* :func:`orientation_bias`: mean of e(reconstruction) - e(truth), per component, with 1-sigma
  errors; over twin pairs the pair mean cancels every effect proportional to the galaxy's own
  ellipticity (round bias, shape noise), leaving the additive part c; the slope of the
  residual against the true e is the multiplicative part m.
* :func:`view_biases`: the same for each of the stamp's 8 symmetric views, mapped back to the
  stamp frame and also expressed in the network's frame: a bias fixed in the network's frame
  (a preferred orientation of the trained networks) is constant in the second and averages to
  zero over the views in the first; :func:`network_frame_bias` isolates it on any population.
* :func:`flux_residual_by_magnitude`: flux(reconstruction) / flux(truth) - 1 over the stamp in
  bins of the reference-band magnitude, and :func:`flux_residual_by_level`, the same per pixel
  level of the normalised truth (where the normalisation saturates, SPEC 3), and
  :func:`flux_residual_by_size`, by magnitude within bins of the true half-light radius: at a
  fixed magnitude a larger galaxy has a lower surface brightness, so a deficit that grows with
  size there comes from faint outskirts the estimator does not see (its training population's
  sizes acting as a prior), not from the brightness itself.
* :func:`residual_by_snr`: the residual image - reconstruction in units of the noise, between
  :data:`CORE_RADIUS` and :data:`GALAXY_RADIUS` pixels of the centre (the real DES frames'
  check), in bins of the galaxy's S/N: where the reconstruction stops being at the noise level.
* :func:`light_by_radius`: the light the reconstruction keeps in circular annuli about the
  stamp centre, flux(reconstruction) / flux(truth) per annulus, and
  :func:`slope_by_aperture`, the slope of the reconstruction's uniform-weight e against the
  truth's inside circular apertures of growing radius: together they show whether a shape or
  flux defect lives in the core or in the faint outskirts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deblend.core.inference import Deblender
from deblend.core.normalization import NormalizationConstants, normalize_with_truth
from deblend.core.shapes import (
    ellipticity_from_moments,
    gaussian_weight,
    second_moments,
)
from deblend.core.symmetry import (
    N_VIEWS,
    ellipticity_in_view,
    image_from_view,
    image_view,
)
from simulation.galsim_population import GalSimPopulation, PopulationSpec
from simulation.scenes import add_btk_noise

SHAPE_BANDS: tuple[str, ...] = ("r", "i", "z")
"""Bands summed for shapes and fluxes (the dataset labels' bands)."""
MAG_EDGES: tuple[float, ...] = (20.0, 21.0, 22.0, 23.0, 24.0)
"""Reference-band (i) magnitude bins of the flux residual; the GalSim targets span 20-24."""
SIZE_MAG_EDGES: tuple[float, ...] = (20.0, 22.0, 23.0, 24.0)
"""Coarser magnitude bins of :func:`flux_residual_by_size`."""
HLR_EDGES: tuple[float, ...] = (0.3, 0.45, 0.7, 1.2)
"""Half-light radius bins (arcsec) of :func:`flux_residual_by_size`; the GalSim population's
radii are log-uniform in 0.3-1.2", so each bin holds about a third of it."""
LEVEL_EDGES: tuple[float, ...] = (-1.0, 0.05, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
"""Bins of the normalised truth pixel value tanh(asinh(beta x / <max>)) (SPEC 3)."""
WEIGHTS = ("uniform", "gaussian")
RADIUS_EDGES: tuple[float, ...] = (0.0, 3.0, 6.0, 10.0, 15.0, 23.0, 32.0)
"""Annuli (pixels from the stamp centre) of :func:`light_by_radius`; 32 covers a 45-pixel
stamp's corners."""
APERTURE_RADII: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0, 23.0)
"""Aperture radii (pixels) of :func:`slope_by_aperture`; 23 holds a 45-pixel stamp's disc."""
CORE_RADIUS = 3.0
"""Pixels (model grid) about a galaxy's centre left out of its residual in noise units (the
core, where a PSF-sized peak dominates)."""
GALAXY_RADIUS = 12.0
"""Pixels (model grid) about a galaxy's centre out to which its residual in noise units is
compared with the noise (:func:`residual_by_snr`; the real DES frames' check alike)."""
SNR_EDGES: tuple[float, ...] = (0.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0,
                                 float("inf"))
"""Bins of :func:`residual_by_snr` in the galaxy's S/N (:func:`optimal_snr`)."""


@dataclass(frozen=True)
class IsolatedGalaxies:
    """Isolated GalSim galaxies, centred, in rotated-twin pairs (rows 2k, 2k+1)."""

    clean: np.ndarray
    """(N, bands, S, S) float32 noiseless electrons per pixel"""
    noisy: np.ndarray
    """(N, bands, S, S) float32 the same with BTK-like noise (sky-subtracted)"""
    ref_mag: np.ndarray
    """(N,) AB magnitude in the population's reference band (i)"""
    hlr: np.ndarray
    """(N,) half-light radius of the galaxy, arcsec (bulge and disk share it)"""
    twin: np.ndarray
    """(N,) 1 for the 90-degree-rotated twin of the previous row"""
    bands: tuple[str, ...]
    sky_levels: np.ndarray
    """(bands,) mean sky level, electrons per pixel"""

    def __len__(self) -> int:
        return int(self.clean.shape[0])


def draw_isolated_galaxies(n: int, seed: int = 0, survey: str = "LSST", stamp_pixels: int = 45,
                           spec: PopulationSpec | None = None, noise: str = "all"
                           ) -> IsolatedGalaxies:
    """``n`` (even) isolated GalSim galaxies with BTK-like noise (``noise`` as BTK's
    ``add_noise``). Reproducible from ``seed``: galaxies from ``GalSimPopulation.sample(n,
    seed, neighbours=False)``, band b's noise from ``SeedSequence([seed, 1, b])``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
        raise ValueError(f"n must be an even integer >= 2 (rotated-twin pairs), got {n!r}")
    population = GalSimPopulation(survey, stamp_pixels, 1.0, spec or PopulationSpec())
    scenes = population.sample(int(n), seed, neighbours=False)
    clean = np.empty((n, len(population.bands), stamp_pixels, stamp_pixels), np.float32)
    for i, scene in enumerate(scenes):
        clean[i] = population.draw(scene)[1]
    noisy = np.empty_like(clean)
    for b, sky in enumerate(population.sky_levels):
        state = np.random.SeedSequence([int(seed), 1, b]).generate_state(1)[0]
        band_seed = int(state % (2**31 - 2))
        noisy[:, b] = add_btk_noise(clean[:, b], float(sky), band_seed, noise)
    ref = population.bands.index(population.spec.ref_band)
    return IsolatedGalaxies(clean, noisy, np.array([s.mags[0, ref] for s in scenes]),
                            np.array([s.hlr[0] for s in scenes]),
                            np.array([s.twin for s in scenes]), population.bands,
                            population.sky_levels.copy())


# -- reconstruction --------------------------------------------------------------------------------

def view_reconstructions(deblender: Deblender, images: np.ndarray,
                         views: Sequence[int] = range(N_VIEWS), batch_size: int = 256
                         ) -> np.ndarray:
    """(len(views), N, bands, S, S) raw-flux reconstructions of each view of ``images``, each
    mapped back to the stamps' own frame: row v is view^-1(reconstruction(view(x)))."""
    out = []
    for view in views:
        seen = image_view(torch.from_numpy(np.ascontiguousarray(images, np.float32)), view).numpy()
        recon = deblender.predict(np.ascontiguousarray(seen), batch_size=batch_size,
                                  views=1, reconstruction_views=1).reconstruction
        out.append(image_from_view(torch.from_numpy(recon), view).numpy())
    return np.stack(out)


def reconstruct(deblender: Deblender, images: np.ndarray, views: int = 1,
                batch_size: int = 256) -> np.ndarray:
    """Raw-flux reconstructions (N, bands, S, S); with ``views`` = 2, 4 or 8 the average of
    the first ``views`` symmetric views' reconstructions mapped back (symmetrised decoding)."""
    return deblender.predict(images, batch_size=batch_size, views=1,
                             reconstruction_views=views).reconstruction


def map_reconstructions(deblender: Deblender, galaxies: IsolatedGalaxies, prior: str,
                        batch_size: int = 32) -> np.ndarray:
    """(N, bands, S, S) raw-flux MAP reconstructions (:meth:`Deblender.map_deblend`, defaults)
    of the isolated ``galaxies``: one source at each stamp's centre, the population's sky
    levels as the background variance."""
    centre = float(deblender.stamp_pixels // 2)
    positions = [np.array([[centre, centre]])] * len(galaxies)
    return deblender.map_deblend(galaxies.noisy, positions, galaxies.sky_levels, prior=prior,
                                 batch_size=batch_size).reconstruction


# -- shapes ----------------------------------------------------------------------------------------

def band_indices(bands: Sequence[str], chosen: Sequence[str]) -> list[int]:
    """Positions of ``chosen`` in ``bands``; ValueError naming a missing band."""
    missing = [b for b in chosen if b not in bands]
    if missing:
        raise ValueError(f"bands {missing} are not among the images' bands {list(bands)}")
    return [list(bands).index(b) for b in chosen]


def radius_map(stamp_pixels: int) -> np.ndarray:
    """(S, S) distance in pixels of each pixel centre from the stamp centre ((S-1)/2, (S-1)/2)."""
    y, x = np.mgrid[0:stamp_pixels, 0:stamp_pixels] - (stamp_pixels - 1) / 2.0
    return np.hypot(x, y)


def ellipticities(images: np.ndarray, weight: str = "uniform", sigma: float = 3.0) -> np.ndarray:
    """(N, 2) distortions (e1, e2) of single-band images (N, S, S), pixel frame; ``weight``
    "uniform" (the labels' moments) or "gaussian" (fixed weight of ``sigma`` pixels)."""
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    w = None if weight == "uniform" else gaussian_weight(images.shape[-1], sigma)
    return np.stack(ellipticity_from_moments(second_moments(images, w)), axis=-1)


def _mean_error(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def orientation_bias(e_rec: np.ndarray, e_true: np.ndarray, paired: bool = True
                     ) -> dict[str, Any]:
    """Bias of reconstructed distortions (N, 2) against the truth's (N, 2).

    Returns per component ``"e1"``, ``"e2"``: ``mean`` (mean of e_rec - e_true) and its
    ``error`` (1 sigma); ``additive`` (c: with ``paired``, the mean over rotated-twin pairs of
    the pair-averaged residual, in which terms proportional to e_true cancel; else the
    intercept of the fit below) and ``additive_error``; ``multiplicative`` (m: slope of the
    residual against e_true, so e_rec ~ (1 + m) e_true + c) and ``multiplicative_error``.
    ``n`` counts objects with finite shapes, ``n_pairs`` complete pairs. With ``paired`` the
    rows must come in pairs (2k, 2k+1) whose true shapes are opposite (90-degree twins).
    """
    e_rec, e_true = np.asarray(e_rec, np.float64), np.asarray(e_true, np.float64)
    if e_rec.shape != e_true.shape or e_rec.ndim != 2 or e_rec.shape[1] != 2:
        raise ValueError(f"e_rec and e_true must both be (N, 2), got {e_rec.shape} and "
                         f"{e_true.shape}")
    if paired and e_rec.shape[0] % 2:
        raise ValueError(f"paired needs an even number of rows (twin pairs), got {e_rec.shape[0]}")
    residual = e_rec - e_true
    finite = np.all(np.isfinite(residual), axis=1)
    result: dict[str, Any] = {"n": int(finite.sum())}
    if paired:
        pair_ok = finite[0::2] & finite[1::2]
        result["n_pairs"] = int(pair_ok.sum())
    for k, name in enumerate(("e1", "e2")):
        r, t = residual[finite, k], e_true[finite, k]
        mean, error = _mean_error(r)
        slope, intercept, slope_err, intercept_err = _line_fit(t, r)
        entry = {"mean": mean, "error": error, "multiplicative": slope,
                 "multiplicative_error": slope_err}
        if paired:
            pair_mean = 0.5 * (residual[0::2, k] + residual[1::2, k])[pair_ok]
            entry["additive"], entry["additive_error"] = _mean_error(pair_mean)
        else:
            entry["additive"], entry["additive_error"] = intercept, intercept_err
        result[name] = entry
    return result


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Least squares y = a x + b: (a, b, error of a, error of b)."""
    if x.size < 3 or np.ptp(x) == 0:
        return (float("nan"),) * 4
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = x.size - 2
    sigma2 = float(np.sum((y - design @ coef) ** 2) / dof)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return float(coef[0]), float(coef[1]), float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))


def shape_image(images: np.ndarray, bands: Sequence[str],
                shape_bands: Sequence[str] = SHAPE_BANDS) -> np.ndarray:
    """(N, S, S) sum of ``shape_bands`` of (N, bands, S, S) images."""
    return np.asarray(images)[:, band_indices(bands, shape_bands)].sum(axis=1)


def view_biases(view_recons: np.ndarray, truth: np.ndarray, bands: Sequence[str],
                shape_bands: Sequence[str] = SHAPE_BANDS, weight: str = "uniform",
                sigma: float = 3.0) -> list[dict[str, Any]]:
    """Per view v of :func:`view_reconstructions` output (V, N, bands, S, S): the mean residual
    e - e_true in the stamps' frame (``e1``, ``e2``: mean, error) and in the view's frame
    (``network_e1``, ``network_e2``: the residual as the network saw it)."""
    e_true = ellipticities(shape_image(truth, bands, shape_bands), weight, sigma)
    rows = []
    for view, recon in enumerate(view_recons):
        residual = ellipticities(shape_image(recon, bands, shape_bands), weight, sigma) - e_true
        seen = ellipticity_in_view(torch.from_numpy(residual), view).numpy()
        row: dict[str, Any] = {"view": view}
        for k, name in enumerate(("e1", "e2")):
            row[name] = dict(zip(("mean", "error"), _mean_error(residual[:, k])))
            row[f"network_{name}"] = dict(zip(("mean", "error"), _mean_error(seen[:, k])))
        rows.append(row)
    return rows


def network_frame_bias(view_recons: np.ndarray, truth: np.ndarray, bands: Sequence[str],
                       shape_bands: Sequence[str] = SHAPE_BANDS, weight: str = "uniform",
                       sigma: float = 3.0) -> dict[str, Any]:
    """The part of the residual e - e_true fixed in the network's own frame, on any population.

    Each galaxy's residual in view v, expressed in that view's frame, is averaged over the
    ``V`` views of ``view_recons`` (V, N, bands, S, S); every term that turns with the galaxy
    (m e_true, round bias) cancels in this average over the 8 symmetries, so no twin pairs are
    needed. ``e1``, ``e2``: ``mean`` and ``error`` over galaxies; ``n``.
    """
    if view_recons.shape[0] != N_VIEWS:
        raise ValueError(f"need the reconstructions of all {N_VIEWS} views, got "
                         f"{view_recons.shape[0]}")
    e_true = ellipticities(shape_image(truth, bands, shape_bands), weight, sigma)
    seen = np.zeros_like(e_true)
    for view, recon in enumerate(view_recons):
        residual = ellipticities(shape_image(recon, bands, shape_bands), weight, sigma) - e_true
        seen += ellipticity_in_view(torch.from_numpy(residual), view).numpy()
    seen /= N_VIEWS
    finite = np.all(np.isfinite(seen), axis=1)
    result: dict[str, Any] = {"n": int(finite.sum())}
    for k, name in enumerate(("e1", "e2")):
        result[name] = dict(zip(("mean", "error"), _mean_error(seen[finite, k])))
    return result


def equivariance_error(view_recons: np.ndarray) -> float:
    """rms over views of (view^-1 f(view x) - f(x)) / rms f(x): 0 for an equivariant model."""
    reference = view_recons[0]
    scale = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
    diff = view_recons[1:].astype(np.float64) - reference
    return float(np.sqrt(np.mean(diff ** 2)) / scale) if scale > 0 else float("nan")


# -- flux ------------------------------------------------------------------------------------------

def flux_residual_by_magnitude(recon: np.ndarray, truth: np.ndarray, mags: np.ndarray,
                               edges: Sequence[float] = MAG_EDGES,
                               band_index: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """flux(recon) / flux(truth) - 1 over whole stamps in bins [lo, hi) of ``mags``.

    ``recon``, ``truth``: (N, bands, S, S); fluxes are summed over ``band_index`` (all bands
    when None). Each bin: ``lo``, ``hi``, ``n``, ``mean`` and ``error`` (1 sigma), ``median``.
    """
    recon, truth, mags = np.asarray(recon), np.asarray(truth), np.asarray(mags, np.float64)
    if recon.shape != truth.shape or recon.ndim != 4 or mags.shape != (recon.shape[0],):
        raise ValueError(f"recon and truth must be (N, bands, S, S) and mags (N,), got "
                         f"{recon.shape}, {truth.shape}, {mags.shape}")
    idx = list(range(recon.shape[1])) if band_index is None else list(band_index)
    true_flux = truth[:, idx].sum(axis=(1, 2, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = recon[:, idx].sum(axis=(1, 2, 3), dtype=np.float64) / true_flux - 1.0
    residual[~(true_flux > 0)] = np.nan
    rows = []
    for lo, hi in itertools.pairwise(edges):
        values = residual[(mags >= lo) & (mags < hi)]
        values = values[np.isfinite(values)]
        mean, error = _mean_error(values)
        rows.append({"lo": float(lo), "hi": float(hi), "n": int(values.size), "mean": mean,
                     "error": error, "median": float(np.median(values)) if values.size else
                     float("nan")})
    return rows


def flux_residual_by_size(recon: np.ndarray, truth: np.ndarray, mags: np.ndarray,
                          hlr: np.ndarray, mag_edges: Sequence[float] = SIZE_MAG_EDGES,
                          hlr_edges: Sequence[float] = HLR_EDGES,
                          band_index: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """:func:`flux_residual_by_magnitude` within each bin [lo, hi] of the true half-light
    radius ``hlr`` (arcsec; the last bin includes its upper edge): one entry per size bin with
    ``hlr_lo``, ``hlr_hi`` and ``bins``, that function's rows."""
    hlr = np.asarray(hlr, np.float64)
    if hlr.shape != (np.asarray(recon).shape[0],):
        raise ValueError(f"hlr must be (N,) for {np.asarray(recon).shape[0]} galaxies, got "
                         f"{hlr.shape}")
    entries = []
    for k, (lo, hi) in enumerate(itertools.pairwise(hlr_edges)):
        inside = (hlr >= lo) & ((hlr <= hi) if k == len(hlr_edges) - 2 else (hlr < hi))
        entries.append({"hlr_lo": float(lo), "hlr_hi": float(hi), "bins":
                        flux_residual_by_magnitude(recon[inside], truth[inside], mags[inside],
                                                   mag_edges, band_index)})
    return entries


def flux_slope(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Weighted linear fit of the binned flux residual against bin-centre magnitude:
    ``slope`` (per magnitude) and its ``error``; 0 for a residual flat with brightness."""
    x = np.array([0.5 * (r["lo"] + r["hi"]) for r in rows])
    y = np.array([r["mean"] for r in rows])
    s = np.array([r["error"] for r in rows])
    ok = np.isfinite(y) & np.isfinite(s) & (s > 0)
    if ok.sum() < 2:
        return {"slope": float("nan"), "error": float("nan")}
    w = 1.0 / s[ok] ** 2
    design = np.stack([x[ok], np.ones(ok.sum())], axis=1)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    coef = cov @ (design.T @ (w * y[ok]))
    return {"slope": float(coef[0]), "error": float(np.sqrt(cov[0, 0]))}


def flux_residual_by_level(recon: np.ndarray, truth: np.ndarray,
                           normalization: NormalizationConstants,
                           band_index: Sequence[int] | None = None,
                           edges: Sequence[float] = LEVEL_EDGES) -> list[dict[str, Any]]:
    """Where the flux goes missing: pixels binned by their normalised truth value (SPEC 3).

    Per bin (lo, hi]: ``share`` of the total true flux, ``deficit`` (recon - truth flux in the
    bin / total true flux), ``relative`` (recon / truth - 1 in the bin) and
    ``normalised_error`` (mean recon - truth in normalised units, what the loss sees).
    """
    idx = list(range(truth.shape[1])) if band_index is None else list(band_index)
    t, r = truth[:, idx].astype(np.float64), recon[:, idx].astype(np.float64)
    nr, nt = (n[:, idx] for n in normalize_with_truth(recon, truth, normalization))
    total = t.sum()
    rows = []
    for lo, hi in itertools.pairwise(edges):
        pix = (nt > lo) & (nt <= hi)
        ft, fr = t[pix].sum(), r[pix].sum()
        rows.append({"lo": float(lo), "hi": float(hi), "share": float(ft / total),
                     "deficit": float((fr - ft) / total),
                     "relative": float(fr / ft - 1.0) if ft > 0 else float("nan"),
                     "normalised_error": float((nr[pix] - nt[pix]).mean()) if pix.any()
                     else float("nan")})
    return rows


# -- where in the profile ----------------------------------------------------------------------

def light_by_radius(recon: np.ndarray, truth: np.ndarray,
                    edges: Sequence[float] = RADIUS_EDGES) -> list[dict[str, Any]]:
    """Light kept per annulus [lo, hi) of single-band images (N, S, S).

    Per annulus: ``n_pixels``, ``truth_per_pixel`` (mean true electrons per pixel),
    ``kept`` = sum recon / sum truth over all galaxies (1: no defect) and its 1-sigma
    ``error`` (delta method over galaxies; galaxies are independent, pixels are not).
    """
    recon, truth = np.asarray(recon, np.float64), np.asarray(truth, np.float64)
    if recon.shape != truth.shape or recon.ndim != 3:
        raise ValueError(f"recon and truth must both be (N, S, S), got {recon.shape} and "
                         f"{truth.shape}")
    radius = radius_map(truth.shape[-1])
    rows = []
    for lo, hi in itertools.pairwise(edges):
        ring = (radius >= lo) & (radius < hi)
        t, r = truth[:, ring].sum(axis=1), recon[:, ring].sum(axis=1)
        kept = error = float("nan")
        if t.size >= 2 and t.sum() > 0:
            kept = float(r.sum() / t.sum())
            error = float(np.std(r - kept * t, ddof=1) * np.sqrt(t.size) / t.sum())
        rows.append({"lo": float(lo), "hi": float(hi), "n_pixels": int(ring.sum()),
                     "truth_per_pixel": float(truth[:, ring].mean()) if ring.any()
                     else float("nan"), "kept": kept, "error": error})
    return rows


def slope_by_aperture(recon: np.ndarray, truth: np.ndarray,
                      radii: Sequence[float] = APERTURE_RADII) -> list[dict[str, Any]]:
    """Slope of e(recon) against e(truth), per component, from uniform-weight moments inside a
    circular aperture of each radius (pixels; the same aperture for both) of single-band images
    (N, S, S); 1 at every radius for a reconstruction with the truth's shape."""
    radius = radius_map(np.asarray(truth).shape[-1])
    rows = []
    for r in radii:
        aperture = (radius < r).astype(np.float64)
        e_true = np.stack(ellipticity_from_moments(second_moments(truth, aperture)), axis=-1)
        e_rec = np.stack(ellipticity_from_moments(second_moments(recon, aperture)), axis=-1)
        ok = np.all(np.isfinite(e_true) & np.isfinite(e_rec), axis=1)
        row: dict[str, Any] = {"radius": float(r), "n": int(ok.sum())}
        for k, name in enumerate(("e1", "e2")):
            slope, _, error, _ = _line_fit(e_true[ok, k], e_rec[ok, k])
            row[name] = {"slope": slope, "error": error}
        rows.append(row)
    return rows


# -- the residual against the noise -------------------------------------------------------------

def ring_mask(shape: tuple[int, int], x: float, y: float) -> np.ndarray:
    """(H, W) True on the pixels more than :data:`CORE_RADIUS` and at most
    :data:`GALAXY_RADIUS` from (x, y) (pixel frame: x = column, pixel centres at integers)."""
    rows, columns = np.indices(shape)
    radius = np.hypot(columns - x, rows - y)
    return (radius > CORE_RADIUS) & (radius <= GALAXY_RADIUS)


def optimal_snr(clean: np.ndarray, sky_levels: np.ndarray) -> np.ndarray:
    """(N,) matched-filter S/N of noiseless galaxies (N, bands, S, S) against the sky's noise
    alone, all bands together: sqrt(sum over bands and pixels of clean^2 / sky_b)."""
    sky = np.asarray(sky_levels, np.float64).reshape(1, -1, 1, 1)
    return np.sqrt((np.asarray(clean, np.float64) ** 2 / sky).sum(axis=(1, 2, 3)))


def residual_by_snr(recon: np.ndarray, galaxies: IsolatedGalaxies,
                    edges: Sequence[float] = SNR_EDGES) -> list[dict[str, Any]]:
    """Whether the reconstruction leaves only noise away from the core, in bins of S/N.

    Per galaxy: the rms over every band's pixels of the ring about the stamp centre
    (:func:`ring_mask`) of
    (noisy - recon) / sigma, sigma^2 = sky level + clean (BTK's noise: Poisson on the sky and on
    the galaxy), and the same with the truth in place of the reconstruction (noise alone: 1 up to
    chance, the floor). Per S/N bin (:func:`optimal_snr`, [lo, hi)): ``n``, the ``median`` and
    ``p90`` of the first, ``floor`` the median of the second (NaN for an empty bin)."""
    clean = np.asarray(galaxies.clean, np.float64)
    noisy = np.asarray(galaxies.noisy, np.float64)
    sigma = np.sqrt(np.asarray(galaxies.sky_levels, np.float64).reshape(1, -1, 1, 1) + clean)
    centre = (clean.shape[-1] - 1) / 2.0
    ring = ring_mask(clean.shape[-2:], centre, centre)

    def ring_rms(model: np.ndarray) -> np.ndarray:
        chi = ((noisy - model) / sigma)[:, :, ring]
        return np.sqrt((chi ** 2).mean(axis=(1, 2)))

    rms, floor = ring_rms(np.asarray(recon, np.float64)), ring_rms(clean)
    snr = optimal_snr(clean, galaxies.sky_levels)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        chosen = (snr >= lo) & (snr < hi)
        row: dict[str, Any] = {"lo": float(lo), "hi": float(hi), "n": int(chosen.sum())}
        for name, values, q in (("median", rms, 0.5), ("p90", rms, 0.9), ("floor", floor, 0.5)):
            row[name] = float(np.quantile(values[chosen], q)) if chosen.any() else float("nan")
        rows.append(row)
    return rows


# -- everything at once ----------------------------------------------------------------------------

def measure_reconstruction(recon: np.ndarray, galaxies: IsolatedGalaxies,
                           normalization: NormalizationConstants, *,
                           weights: Sequence[str] = WEIGHTS, sigma: float = 3.0,
                           shape_bands: Sequence[str] = SHAPE_BANDS,
                           mag_edges: Sequence[float] = MAG_EDGES) -> dict[str, Any]:
    """Shape bias (summed ``shape_bands`` and per band, for each weight), flux residuals
    (by magnitude, per band, by normalised pixel level, by magnitude and size), the light and
    shape slope by radius (summed ``shape_bands``) and the residual in noise units by S/N (all
    bands) of raw-flux reconstructions of ``galaxies`` (N, bands, S, S)."""
    idx = band_indices(galaxies.bands, shape_bands)
    truth_img = shape_image(galaxies.clean, galaxies.bands, shape_bands)
    recon_img = shape_image(recon, galaxies.bands, shape_bands)
    result: dict[str, Any] = {"bias": {}, "bias_per_band": {}}
    for weight in weights:
        result["bias"][weight] = orientation_bias(ellipticities(recon_img, weight, sigma),
                                                  ellipticities(truth_img, weight, sigma))
        result["bias_per_band"][weight] = {
            band: orientation_bias(ellipticities(recon[:, b], weight, sigma),
                                   ellipticities(galaxies.clean[:, b], weight, sigma))
            for b, band in enumerate(galaxies.bands)}
    rows = flux_residual_by_magnitude(recon, galaxies.clean, galaxies.ref_mag, mag_edges, idx)
    result["flux"] = {"bins": rows, "slope": flux_slope(rows)}
    result["flux_per_band"] = {
        band: flux_residual_by_magnitude(recon, galaxies.clean, galaxies.ref_mag, mag_edges, [b])
        for b, band in enumerate(galaxies.bands)}
    result["flux_by_level"] = flux_residual_by_level(recon, galaxies.clean, normalization, idx)
    result["flux_by_size"] = flux_residual_by_size(recon, galaxies.clean, galaxies.ref_mag,
                                                   galaxies.hlr, band_index=idx)
    result["light_by_radius"] = light_by_radius(recon_img, truth_img)
    result["slope_by_aperture"] = slope_by_aperture(recon_img, truth_img)
    result["residual_by_snr"] = residual_by_snr(recon, galaxies)
    return result


def measure_defects(deblender: Deblender, galaxies: IsolatedGalaxies, *,
                    symmetrised: bool = True, weights: Sequence[str] = WEIGHTS,
                    sigma: float = 3.0, shape_bands: Sequence[str] = SHAPE_BANDS,
                    mag_edges: Sequence[float] = MAG_EDGES, batch_size: int = 256,
                    map_prior: str | None = None) -> dict[str, Any]:
    """Every measurement of this module for one deblender on one population (plain dicts).

    ``"plain"``: the deblender's reconstruction; with ``symmetrised`` (8 decodings per stamp)
    also ``"symmetrised"`` (the 8 views' reconstructions mapped back and averaged),
    ``"view_biases"`` (per view, per weight), ``"network_frame_bias"`` (per weight) and
    ``"equivariance_error"``; with ``map_prior`` ("flow" or "normal") also ``"map"``, the MAP
    reconstructions (:func:`map_reconstructions`) under that prior.
    """
    if tuple(galaxies.bands) != tuple(deblender.bands):
        raise ValueError(f"the galaxies' bands {galaxies.bands} are not the model's "
                         f"{deblender.bands}")
    options = {"weights": weights, "sigma": sigma, "shape_bands": shape_bands,
               "mag_edges": mag_edges}
    result: dict[str, Any] = {"n": len(galaxies), "shape_bands": list(shape_bands),
                              "gaussian_sigma_pixels": sigma}
    if map_prior is not None:
        result["map"] = measure_reconstruction(map_reconstructions(deblender, galaxies, map_prior),
                                               galaxies, deblender.normalization, **options)
        result["map_prior"] = map_prior
    if not symmetrised:
        recon = reconstruct(deblender, galaxies.noisy, 1, batch_size)
        result["plain"] = measure_reconstruction(recon, galaxies, deblender.normalization,
                                                 **options)
        return result
    recons = view_reconstructions(deblender, galaxies.noisy, range(N_VIEWS), batch_size)
    result["plain"] = measure_reconstruction(recons[0], galaxies, deblender.normalization,
                                             **options)
    result["symmetrised"] = measure_reconstruction(recons.mean(axis=0), galaxies,
                                                   deblender.normalization, **options)
    result["view_biases"] = {weight: view_biases(recons, galaxies.clean, galaxies.bands,
                                                 shape_bands, weight, sigma)
                             for weight in weights}
    result["network_frame_bias"] = {weight: network_frame_bias(recons, galaxies.clean,
                                                               galaxies.bands, shape_bands,
                                                               weight, sigma)
                                     for weight in weights}
    result["equivariance_error"] = equivariance_error(recons)
    return result
