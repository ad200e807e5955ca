"""Encoder alone vs MAP deblending (N(0, I) or flow prior) vs scarlet2, on the same scenes.

Two kinds of scene, nothing fitted on either:

- the validation blends of the training dataset (targets at the stamp centre, neighbours
  detected by BTK's SEP; the target's position is the known centre);
- dense fields (:mod:`simulation.dense_fields`, 41" with 8-15 galaxies), detected by SEP and
  deblended whole; each detection is matched to the nearest true galaxy within
  :data:`MATCH_RADIUS` pixels, one to one.

For every method and every measured galaxy: the reconstruction (electrons, the model-sized
stamp on the true galaxy's pixel grid) against the noiseless isolated truth, giving

- ``flux``: sum over the label bands, reconstruction / truth - 1 (median, NMAD; and its median
  per magnitude bin: a residual flat with brightness is the target);
- ``ssim``: SSIM of the normalised images (SPEC 3), mean over bands;
- ``recon_moments``: the uniform-weight moment distortion of the reconstruction's label image
  against the truth's (the labels' convention): slope and intercept (the additive bias) of
  the line fitted per component, and the mean offset;
- ``regressor``: the stage3 regressor's (e1, e2) against the same truth: slope and RMSE (the
  encoder's on the 8 views of the stamp; MAP's on its MAP latent), response-calibrated;
- ``seconds_per_galaxy`` of the method on this machine;
- ``coverage``: for MAP with a posterior, the fraction of galaxies whose true e lies in the
  68% / 95% Laplace intervals of the regressor's raw output (a check of the intervals' width;
  the regressor's own bias also moves it).

And the shear bias of MAP's regressor against the applied shear, through the metacal machinery
(:func:`map_shear_bias`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from deblend.core.config import Config, MapConfig
from deblend.core.detection import detect_around_target, detect_sources
from deblend.core.inference import Deblender
from deblend.core.map_deblend import MapPrediction, first_sources
from deblend.core.normalization import normalize_with_truth
from deblend.core.posterior import EllipticityPosterior
from deblend.core.stamps import cut_stamp, nearest_pixel, paste_stamp
from evaluation.ellipticity import component_stats, fit_line
from evaluation.estimators import label_image, moments_estimator
from evaluation.metacal_benchmark import drawing_simulation
from evaluation.metacal_shear import (
    LABEL_BANDS,
    metacal_measurement,
    shear_bias,
    weighted_ellipticity,
)
from evaluation.metrics import robust_summary, ssim_per_band

MATCH_RADIUS = 3.0
"""Pixels between a detection and the true galaxy it is matched to (dense fields)."""
FLUX_MAG_EDGES = (20.0, 22.0, 23.0, 24.0)
"""Magnitude (ref band) bin edges of the flux residual's trend with brightness."""


@dataclass(frozen=True)
class Truth:
    """The galaxies a comparison measures: noiseless isolated stamps (n, bands, S, S) on the
    galaxy's own pixel grid, label e (n, 2), ref-band magnitude (n,)."""

    stamps: np.ndarray
    e: np.ndarray
    mag: np.ndarray


@dataclass(frozen=True)
class MethodResult:
    """What a method gave for the measured galaxies."""

    reconstruction: np.ndarray
    """(n, bands, S, S) electrons, aligned with :attr:`Truth.stamps`."""
    ellipticity: np.ndarray | None
    """(n, 2) regressor (e1, e2), calibrated by the run's response; None: no regressor."""
    seconds: float
    """Wall-clock seconds of the whole method (detection excluded) over ``n_galaxies``."""
    n_galaxies: int
    """Galaxies the method deblended (all sources, not only the measured ones)."""
    posterior: Any = None
    """:class:`deblend.core.posterior.EllipticityPosterior` of the measured galaxies, or None."""
    ellipticity_raw: np.ndarray | None = None
    ellipticity_deblended: np.ndarray | None = None
    """(n, 2) MAP only: the regressor on each galaxy's MAP-deblended stamp (calibrated)."""


def summarize(result: MethodResult, truth: Truth, model: Deblender,
              label_bands: Sequence[str] = LABEL_BANDS) -> dict[str, Any]:
    """The metrics of the module docstring for one method."""
    bands = model.bands
    flux = (label_image(result.reconstruction, bands, label_bands).sum(axis=(1, 2))
            / label_image(truth.stamps, bands, label_bands).sum(axis=(1, 2)) - 1.0)
    ssim = ssim_per_band(*normalize_with_truth(result.reconstruction, truth.stamps,
                                               model.normalization)).mean(axis=1)
    e_recon = np.stack(moments_estimator(result.reconstruction, bands, label_bands), axis=1)
    bins = np.digitize(truth.mag, FLUX_MAG_EDGES)
    by_mag = {}
    for b in range(len(FLUX_MAG_EDGES) + 1):
        low = "" if b == 0 else f"{FLUX_MAG_EDGES[b - 1]:g}"
        high = "" if b == len(FLUX_MAG_EDGES) else f"{FLUX_MAG_EDGES[b]:g}"
        by_mag[f"{low}-{high}"] = robust_summary(flux[bins == b])
    out: dict[str, Any] = {
        "n": len(flux),
        "flux": robust_summary(flux), "flux_by_mag": by_mag,
        "ssim": robust_summary(ssim),
        "recon_moments": {c: {**fit_line(truth.e[:, j], e_recon[:, j]),
                              "mean_offset": float(np.nanmean(e_recon[:, j] - truth.e[:, j]))}
                          for j, c in enumerate(("e1", "e2"))},
        "seconds_per_galaxy": result.seconds / max(result.n_galaxies, 1),
    }
    if result.ellipticity is not None:
        out["regressor"] = {c: component_stats(truth.e[:, j], result.ellipticity[:, j])
                            for j, c in enumerate(("e1", "e2"))}
    if result.ellipticity_deblended is not None:
        out["regressor_deblended"] = {
            c: component_stats(truth.e[:, j], result.ellipticity_deblended[:, j])
            for j, c in enumerate(("e1", "e2"))}
    if result.posterior is not None:
        out["coverage"] = {f"{level:g}": [float(v) for v in fraction] for level, fraction in
                           result.posterior.coverage(truth.e).items()}
    return out


# -- the methods ----------------------------------------------------------------------------------
def encoder_on_stamps(model: Deblender, scenes: np.ndarray, positions: list[np.ndarray],
                      measured: list[np.ndarray]) -> MethodResult:
    """The deblender's encoder (amortize's or stage2's) + decoder on the model-sized stamp cut
    around every source; ``measured[i]`` indexes the sources of scene i that are compared with
    truth."""
    started = time.perf_counter()
    stamps, owners = [], []
    for i, (scene, pos) in enumerate(zip(scenes, positions)):
        for k, (x, y) in enumerate(pos):
            stamps.append(cut_stamp(scene, x, y, model.stamp_pixels))
            owners.append((i, k))
    prediction = model.predict(np.stack(stamps))
    seconds = time.perf_counter() - started
    index = {owner: j for j, owner in enumerate(owners)}
    rows = [index[(i, k)] for i, ks in enumerate(measured) for k in ks]
    return MethodResult(prediction.reconstruction[rows], prediction.ellipticity[rows]
                        if prediction.ellipticity is not None else None, seconds, len(stamps))


def map_on_scenes(model: Deblender, scenes: np.ndarray, positions: list[np.ndarray],
                  measured: list[np.ndarray], sky_levels: np.ndarray, prior: str,
                  settings: MapConfig) -> tuple[MethodResult, MapPrediction]:
    """MAP deblending of whole scenes (:meth:`Deblender.map_deblend`)."""
    started = time.perf_counter()
    out = model.map_deblend(scenes, positions, sky_levels, prior=prior, steps=settings.steps,
                            learning_rate=settings.learning_rate,
                            batch_size=settings.batch_size,
                            posterior_samples=settings.posterior_samples, seed=settings.seed)
    seconds = time.perf_counter() - started
    first = first_sources(positions)
    rows = np.array([first[i] + k for i, ks in enumerate(measured) for k in ks], int)
    posterior = None
    if out.posterior is not None:
        posterior = EllipticityPosterior(out.posterior.mean[rows], out.posterior.std[rows],
                                         {level: b[rows] for level, b in
                                          out.posterior.intervals.items()})
    e = None if out.ellipticity is None else out.ellipticity[rows]
    e_deblended = (None if out.ellipticity_deblended is None
                   else out.ellipticity_deblended[rows])
    return MethodResult(out.reconstruction[rows], e, seconds, len(out.latent), posterior,
                        ellipticity_deblended=e_deblended), out


# -- validation blends ----------------------------------------------------------------------------
def blend_scenes(model: Deblender, dataset: Any, n: int, settings: MapConfig,
                 true_positions: bool = False) -> tuple[np.ndarray, list[np.ndarray], Truth]:
    """The first ``n`` validation blends, their source positions (the target first, at the
    stamp centre; the neighbours detected by SEP, or with ``true_positions`` where the
    simulation put them, however faint) and the targets' truth."""
    indices = dataset.split_indices("validation")[:n]
    blends = dataset.images("blend", indices)
    centre = float(model.stamp_pixels // 2)
    labels = dataset.labels()
    if true_positions:
        offsets = np.stack([labels["neighbour_dx"][indices], labels["neighbour_dy"][indices]],
                           axis=-1) / dataset.pixel_scale  # arcsec -> pixels, (n, max, 2)
        positions = [np.concatenate([[[centre, centre]], centre + o[np.isfinite(o).all(axis=1)]])
                     for o in offsets]
    else:
        positions = detect_around_target(blends, dataset.survey, dataset.bands, (centre, centre),
                                         settings.detection_band, settings.detection_threshold,
                                         settings.max_sources)
    truth = Truth(dataset.images("clean", indices),
                  np.stack([labels["e1"][indices], labels["e2"][indices]], axis=1),
                  labels[f"mag_{dataset_ref_band(dataset)}"][indices])
    return blends, positions, truth


def dataset_ref_band(dataset: Any) -> str:
    """The dataset's reference band (its simulation config's ``ref_band``)."""
    return dataset.meta["simulation"].get("ref_band", "i")


# -- dense fields ---------------------------------------------------------------------------------
def match_detections(detections: np.ndarray, truth_xy: np.ndarray,
                     radius: float = MATCH_RADIUS) -> list[tuple[int, int]]:
    """One-to-one (detection, truth) pairs within ``radius`` pixels, minimising the summed
    distance (Hungarian assignment)."""
    if len(detections) == 0 or len(truth_xy) == 0:
        return []
    distance = np.hypot(detections[:, None, 0] - truth_xy[None, :, 0],
                        detections[:, None, 1] - truth_xy[None, :, 1])
    cost = np.where(distance <= radius, distance, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if distance[r, c] <= radius]


def field_scenes(model: Deblender, fields: Any, settings: MapConfig
                 ) -> tuple[list[np.ndarray], list[np.ndarray], Truth, list[tuple[int, int, int]]]:
    """Detections of every field, which of them are measured (matched to a true galaxy), the
    matched galaxies' truth, and (field, detection, truth row) of each measured galaxy."""
    found = detect_sources(fields.images, fields.survey, tuple(fields.bands),
                           settings.detection_band, settings.detection_threshold,
                           max_sources=max(settings.max_sources, int(fields.n_galaxies.max()) * 2))
    measured, matches = [], []
    for i, (detections, table) in enumerate(zip(found, fields.truth)):
        pairs = match_detections(detections, np.stack([table["x"], table["y"]], axis=1))
        measured.append(np.array([d for d, _ in pairs], int))
        matches += [(i, d, t) for d, t in pairs]
    truth = Truth(np.stack([fields.isolated[i, t] for i, _, t in matches]),
                  np.stack([[fields.truth[i]["e1"][t], fields.truth[i]["e2"][t]]
                            for i, _, t in matches]),
                  np.array([fields.truth[i]["mag"][t] for i, _, t in matches]))
    return found, measured, truth, matches


def on_truth_grid(result: MethodResult, fields: Any, matches: list[tuple[int, int, int]],
                  positions: list[np.ndarray], stamp: int) -> MethodResult:
    """Each reconstruction (centred on its detection's pixel) moved onto its true galaxy's
    pixel grid, the one :attr:`Truth.stamps` is on: pasted at the detection, cut at the truth."""
    moved = np.empty_like(result.reconstruction)
    for j, (i, d, t) in enumerate(matches):
        canvas = np.zeros((result.reconstruction.shape[1], 3 * stamp, 3 * stamp), np.float32)
        det = nearest_pixel(*positions[i][d])
        tru = nearest_pixel(fields.truth[i]["x"][t], fields.truth[i]["y"][t])
        centre = 3 * stamp // 2
        paste_stamp(canvas, result.reconstruction[j], centre + det[0] - tru[0],
                    centre + det[1] - tru[1])
        moved[j] = cut_stamp(canvas, centre, centre, stamp)
    return replace(result, reconstruction=moved)


# -- shear ----------------------------------------------------------------------------------------
def map_shear_bias(model: Deblender, config: Config, prior: str, n_scenes: int,
                   population: str = "galsim", neighbours: bool = False) -> dict[str, Any]:
    """m and c of MAP's regressor (and of Gaussian-weighted moments of MAP's reconstruction)
    against the applied shear, on ``n_scenes`` +-g pairs of ``population``: the five metacal
    images of each scene are MAP-deblended like any scene (target at the centre, neighbours
    detected), and the per-object responses come from them (:mod:`evaluation.metacal_shear`)."""
    from simulation.shear_pairs import draw_shear_pairs

    settings, metacal = config.map, config.metacal
    g = (metacal.g, metacal.g)
    pairs = draw_shear_pairs(population, n_scenes, settings.seed, g, neighbours=neighbours,
                             sim=drawing_simulation(config))
    centre = float(model.stamp_pixels // 2)
    measured = {}
    for sign, stamps in (("plus", pairs.plus), ("minus", pairs.minus)):
        mc = model.metacal(stamps, pairs.psfs, delta=metacal.delta,
                           target_fwhm=metacal.target_psf_fwhm, views=1, keep_inputs=True,
                           reconstruct=False, hold_sky_plane=metacal.hold_sky_plane)
        regressor, moments = {}, {}
        for name, images in mc.inputs.items():
            positions = detect_around_target(images, config.simulation.survey, model.bands,
                                             (centre, centre), settings.detection_band,
                                             settings.detection_threshold, settings.max_sources)
            out = model.map_deblend(images, positions, pairs.sky_variance, prior=prior,
                                    steps=settings.steps, learning_rate=settings.learning_rate,
                                    batch_size=settings.batch_size)
            first = first_sources(positions)
            raw = out.ellipticity_raw if out.ellipticity_raw is not None else out.ellipticity
            regressor[name] = raw[first]
            moments[name] = weighted_ellipticity(
                label_image(out.reconstruction[first], model.bands, LABEL_BANDS))
        measured[sign] = {"regressor": metacal_measurement(regressor, mc.delta),
                          "recon_gauss": metacal_measurement(moments, mc.delta)}
    return {name: shear_bias(measured["plus"][name], measured["minus"][name], g,
                             delta=metacal.delta, n_bootstrap=metacal.bootstrap,
                             seed=metacal.seed).to_dict()
            for name in ("regressor", "recon_gauss")} | {
        "population": population, "neighbours": neighbours, "n_scenes": n_scenes,
        "prior": prior, "g": list(g)}
