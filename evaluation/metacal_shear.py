"""Metacalibrated shear of every estimator, and its bias against the APPLIED shear.

Populations come as :class:`simulation.shear_pairs.ShearPairBatch`: each scene drawn at +g and at
-g with the same galaxies, positions and noise. For each estimator and each sign the population
shear is g_hat = (<R> + R_sel)^-1 <e> (SPEC 6), with per-object metacal responses R and, where the
estimator can fail (HSM), the selection response of that cut measured on the sheared images.
Then, per component j,

    m_j = (g_hat_j(+g) - g_hat_j(-g)) / (2 g_j) - 1,    c_j = (g_hat_j(+g) + g_hat_j(-g)) / 2,

with 1-sigma errors from a bootstrap over twin pairs (a scene and its 90-degree rotation). The
applied shear is the reference; nothing is fitted on these populations.

Estimators (all distortions in the pixel frame, measured on the label bands' sum unless said):

- ``regressor``: the stage-3 regressor's own output (no split-fitted calibration), on each
  metacal image (:meth:`deblend.core.inference.Deblender.metacal`);
- ``recon_gauss``: Gaussian-weighted moments (sigma :data:`WEIGHT_SIGMA` px, centred on the
  stamp) of the stage-2 reconstruction of each metacal image; uniform-weight moments cannot be
  metacalibrated, since metacal shears the stamp's edge too;
- ``recon_hsm``: galsim.hsm adaptive moments of the same reconstructions;
- ``blend_gauss`` / ``blend_hsm``: the same two on the metacal images of the blend itself;
- ``anacal``: AnaCal's FPFS shapes and analytic responses on the original blend (no metacal),
  summed over the label bands, each with its own PSF (:mod:`evaluation.anacal_peer`); its noise
  bias corrected with metacal's correction noise whenever metacal's is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from deblend.core.inference import Deblender
from deblend.core.metacal import DEFAULT_DELTA, METACAL_SHEARS, metacal_response
from deblend.core.shapes import (
    ellipticity_from_moments,
    gaussian_weight,
    hsm_shapes,
    second_moments,
)
from deblend.core.stamps import central
from evaluation.anacal_peer import anacal_shapes
from evaluation.estimators import label_image

WEIGHT_SIGMA = 7.5
"""Sigma (pixels) of the fixed Gaussian weight of the ``*_gauss`` estimators."""
LABEL_BANDS = ("r", "i", "z")
METACAL_ESTIMATORS: dict[str, str] = {
    "regressor": "stage-3 regressor (own output) on the metacal images",
    "recon_gauss": f"Gaussian-weighted (sigma {WEIGHT_SIGMA:g} px) moments of the reconstruction "
                   "of the metacal images",
    "recon_hsm": "galsim.hsm of the reconstruction of the metacal images",
    "blend_gauss": f"Gaussian-weighted (sigma {WEIGHT_SIGMA:g} px) moments of the metacal blend",
    "blend_hsm": "galsim.hsm of the metacal blend (no deblending)",
    "anacal": "AnaCal FPFS on the blend, analytic response (no deblending)",
}


# -- measurements -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """One estimator on n stamps: e on the noshear image (n, 2), per-object response R
    (n, 2, 2), and which stamps each metacal image's measurement kept (name -> (n,) bool)."""

    e: np.ndarray
    response: np.ndarray
    kept: dict[str, np.ndarray]


def weighted_ellipticity(images: np.ndarray, sigma: float = WEIGHT_SIGMA) -> np.ndarray:
    """(n, 2) distortion from moments of (n, H, W) images with a fixed centred Gaussian weight."""
    weight = gaussian_weight(images.shape[-1], sigma)
    return np.stack(ellipticity_from_moments(second_moments(images, weight)), axis=1)


def hsm_ellipticity(images: np.ndarray) -> np.ndarray:
    """(n, 2) galsim.hsm distortion, NaN where HSM fails."""
    shape = hsm_shapes(images)
    return np.stack([shape.e1, shape.e2], axis=1)


def metacal_measurement(per_image: Mapping[str, np.ndarray], delta: float) -> Measured:
    """:class:`Measured` from an estimator's (n, 2) outputs on the five metacal images."""
    kept = {name: np.isfinite(e).all(axis=1) for name, e in per_image.items()}
    return Measured(np.asarray(per_image["noshear"], float), metacal_response(per_image, delta),
                    kept)


def measure_metacal(model: Deblender, stamps: np.ndarray, psfs: np.ndarray, *,
                    correction_noise: np.ndarray | None, sky_variance: np.ndarray,
                    views: int = 1, estimators: Sequence[str] = tuple(METACAL_ESTIMATORS),
                    min_snr: float | None = None, batch_size: int = 256,
                    delta: float = DEFAULT_DELTA,
                    target_fwhm: float | Sequence[float] | None = None,
                    hold_sky_plane: bool | None = None) -> dict[str, Measured]:
    """Every requested estimator of :data:`METACAL_ESTIMATORS` on raw blends (n, bands, H, W),
    which may be larger than the model's stamps (a margin around the same centre: see
    :meth:`~deblend.core.inference.Deblender.metacal`); everything is measured on the central
    model-sized stamp. ``delta``: metacal's shear step (the run's ``metacal.delta``);
    ``target_fwhm``: its reconvolution target (``metacal.target_psf_fwhm``, arcsec; None: each
    band's narrowest); ``hold_sky_plane``: ``metacal.hold_sky_plane`` (None: the run's).

    ``min_snr`` applies one cut to every estimator: the Gaussian-weighted S/N
    (:func:`weighted_snr`) of the blend's label-band image, measured on each metacal image, so
    that the selection response of the cut is measured too (for AnaCal as well: its e comes from
    the original image, its cut from the metacal images)."""
    unknown = sorted(set(estimators) - set(METACAL_ESTIMATORS))
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; known: {list(METACAL_ESTIMATORS)}")
    bands = model.bands
    reconstruct = any(name.startswith("recon_") for name in estimators)
    mc = model.metacal(stamps, psfs, noise=correction_noise, delta=delta, batch_size=batch_size,
                       views=views, keep_inputs=True, reconstruct=reconstruct,
                       target_fwhm=target_fwhm, hold_sky_plane=hold_sky_plane)
    out: dict[str, Measured] = {}
    assert mc.inputs is not None
    recon = {n: label_image(p.reconstruction, bands, LABEL_BANDS)
             for n, p in mc.images.items() if p.reconstruction is not None}
    blend = {n: label_image(image, bands, LABEL_BANDS) for n, image in mc.inputs.items()}
    if "regressor" in estimators:
        out["regressor"] = metacal_measurement(
            {n: p.regressor_output for n, p in mc.images.items()}, mc.delta)
    for name, source, function in (("recon_gauss", recon, weighted_ellipticity),
                                   ("recon_hsm", recon, hsm_ellipticity),
                                   ("blend_gauss", blend, weighted_ellipticity),
                                   ("blend_hsm", blend, hsm_ellipticity)):
        if name in estimators:
            out[name] = metacal_measurement({n: function(a) for n, a in source.items()},
                                            mc.delta)
    if "anacal" in estimators:
        size = model.stamp_pixels
        out["anacal"] = anacal_measurement(
            central(stamps, size), central(psfs, size), sky_variance, bands,
            model.data.pixel_scale,
            None if correction_noise is None else central(correction_noise, size))
    if min_snr is not None:
        variance = float(sum(sky_variance[list(bands).index(b)] for b in LABEL_BANDS))
        passed = {n: weighted_snr(image, variance) >= min_snr for n, image in blend.items()}
        out = {name: Measured(m.e, m.response, {k: m.kept[k] & passed[k] for k in m.kept})
               for name, m in out.items()}
    return out


def weighted_snr(images: np.ndarray, variance: float, sigma: float = WEIGHT_SIGMA
                 ) -> np.ndarray:
    """(n,) S/N of the flux under the fixed centred Gaussian weight, sum(W I) / sqrt(sum(W^2)
    variance), with the nominal per-pixel sky ``variance`` (a cut variable, the same rule on
    every metacal image)."""
    weight = gaussian_weight(images.shape[-1], sigma)
    return (images * weight).sum(axis=(-2, -1)) / np.sqrt((weight ** 2).sum() * variance)


def anacal_measurement(stamps: np.ndarray, psfs: np.ndarray, sky_variance: np.ndarray,
                       bands: Sequence[str], pixel_scale: float,
                       correction_noise: np.ndarray | None = None) -> Measured:
    """AnaCal on each label band with its own PSF; e and R summed over those bands (each band's
    e responds to shear with its own R, so the sums stay unbiased). ``correction_noise``: pure
    sky noise like ``stamps`` (n, bands, H, W), metacal's: when given, AnaCal corrects its noise
    bias with it (its standard practice, through the PSF rotated by 90 degrees, doubling its
    noise as metacal's correction doubles metacal's)."""
    e_sum = np.zeros((stamps.shape[0], 2))
    r_sum = np.zeros((stamps.shape[0], 2, 2))
    ok = np.ones(stamps.shape[0], bool)
    for band in LABEL_BANDS:
        b = list(bands).index(band)
        noise = None if correction_noise is None else correction_noise[:, b]
        shapes = anacal_shapes(stamps[:, b].astype(np.float64), psfs[b],
                               float(sky_variance[b]), pixel_scale, noise=noise)
        e_sum += shapes.e
        r_sum += shapes.response
        ok &= shapes.ok
    e_sum[~ok] = np.nan
    return Measured(e_sum, r_sum, {name: ok for name in METACAL_SHEARS})


def measured_to_arrays(prefix: str, measured: Measured) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}.e": measured.e, f"{prefix}.response": measured.response}
    arrays.update({f"{prefix}.kept.{k}": v for k, v in measured.kept.items()})
    return arrays


def measured_from_arrays(prefix: str, arrays: Mapping[str, np.ndarray]) -> Measured:
    kept = {k: arrays[f"{prefix}.kept.{k}"] for k in METACAL_SHEARS}
    return Measured(arrays[f"{prefix}.e"], arrays[f"{prefix}.response"], kept)


# -- shear and its bias -------------------------------------------------------------------------
def selected_shear(e: np.ndarray, response: np.ndarray, kept: Mapping[str, np.ndarray],
                   weights: np.ndarray, delta: float) -> np.ndarray:
    """g_hat = (<R> + R_sel)^-1 <e> over the stamps kept on the noshear image.

    ``weights`` (n,) are bootstrap multiplicities. R_sel_ij = (<e_i>[kept on j+] -
    <e_i>[kept on j-]) / (2 delta): the response of the cut itself, with e measured on the
    noshear image and the cut made on the sheared ones.
    """
    def mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = weights * mask
        if w.sum() <= 0:  # nothing selected (a sparse bin in a bootstrap draw): no estimate
            return np.full(values.shape[1:], np.nan)
        return np.tensordot(w, values, axes=(0, 0)) / w.sum()

    finite = np.isfinite(e).all(axis=1)
    base = kept["noshear"] & finite & np.isfinite(response).all(axis=(1, 2))
    e_safe = np.where(finite[:, None], e, 0.0)
    r_mean = mean(np.where(base[:, None, None], response, 0.0), base)
    selection = np.zeros((2, 2))
    for j in (1, 2):
        plus, minus = kept[f"{j}p"] & finite, kept[f"{j}m"] & finite
        selection[:, j - 1] = (mean(e_safe, plus) - mean(e_safe, minus)) / (2.0 * delta)
    return np.linalg.solve(r_mean + selection, mean(e_safe, base))


@dataclass(frozen=True)
class ShearBias:
    """m and c per component against the applied shear, with bootstrap 1-sigma errors."""

    m: np.ndarray
    m_err: np.ndarray
    c: np.ndarray
    c_err: np.ndarray
    n_scenes: int
    kept_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {"m1": float(self.m[0]), "m2": float(self.m[1]), "m1_err": float(self.m_err[0]),
                "m2_err": float(self.m_err[1]), "c1": float(self.c[0]), "c2": float(self.c[1]),
                "c1_err": float(self.c_err[0]), "c2_err": float(self.c_err[1]),
                "n_scenes": self.n_scenes, "kept_fraction": self.kept_fraction}


T = TypeVar("T")


def pair_bootstrap(estimate: Callable[[np.ndarray], T], unit_ids: np.ndarray, n_units: int,
                   n_bootstrap: int, seed: int) -> tuple[T, list[T]]:
    """``estimate(unit_weights)`` with weight 1 on each of ``unit_ids`` (twin pairs; the other
    of the ``n_units`` weigh 0), and its ``n_bootstrap`` redraws with the pairs resampled with
    replacement from ``SeedSequence(seed)``."""
    full = np.zeros(n_units)
    full[unit_ids] = 1.0
    value = estimate(full)
    rng = np.random.default_rng(seed)
    draws = [estimate(np.bincount(rng.choice(unit_ids, len(unit_ids)), minlength=n_units)
                      .astype(float)) for _ in range(n_bootstrap)]
    return value, draws


def shear_bias(plus: Measured, minus: Measured, g: Sequence[float], *, delta: float,
               n_bootstrap: int = 200, seed: int = 0, subset: np.ndarray | None = None
               ) -> ShearBias:
    """m, c of one estimator from its measurements at +g and -g on the same scenes (consecutive
    twin pairs); ``subset`` (n,) bool restricts to some scenes (kept pair by pair)."""
    g = np.asarray(g, float)
    n = plus.e.shape[0]
    if n % 2 or minus.e.shape[0] != n:
        raise ValueError("plus and minus must hold the same even number of scenes (twin pairs)")
    if np.any(g == 0):
        raise ValueError(f"both components of g must be non-zero to measure m1 and m2, got {g}")
    units = np.arange(n) // 2
    chosen = np.ones(n, bool) if subset is None else np.asarray(subset, bool)
    unit_ids = np.unique(units[chosen])
    if len(unit_ids) < 2:
        raise ValueError("fewer than two twin pairs to measure a shear bias on")

    def estimate(unit_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        weights = np.zeros(n)
        weights[chosen] = unit_weights[units[chosen]]
        g_plus = selected_shear(plus.e, plus.response, plus.kept, weights, delta)
        g_minus = selected_shear(minus.e, minus.response, minus.kept, weights, delta)
        return (g_plus - g_minus) / (2.0 * g) - 1.0, (g_plus + g_minus) / 2.0

    (m, c), draws = pair_bootstrap(estimate, unit_ids, n // 2, n_bootstrap, seed)
    ms, cs = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
    kept = float((plus.kept["noshear"] & np.isfinite(plus.e).all(axis=1))[chosen].mean())
    return ShearBias(m, ms.std(axis=0, ddof=1), c, cs.std(axis=0, ddof=1), int(chosen.sum()),
                     kept)
