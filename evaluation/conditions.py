"""A grid of observing conditions for a fixed-condition model: where does it break? (issue 23)

The model under test was trained at LSST nominal conditions: the survey's PSFs (the r band's
profile 0.82" FWHM), 10-year depth, all six bands, a perfectly subtracted sky and parametric
galaxies. Each row of the grid (:data:`CONDITIONS`) changes one of them, on the independent GalSim
population with 0-2 neighbours (:mod:`simulation.shear_pairs`, ``population="galsim"``). Every
row draws the SAME scenes and noise fields (one seed per chunk, shared by the rows), so rows
differ only by their condition:

- PSF FWHM: every band's PSF dilated by the one factor that gives the r band's PSF profile
  (without the pixel; GalSim's ``calculateFWHM``) the row's FWHM in arcsec;
- PSF ellipticity: every band's PSF sheared by a reduced shear g_psf (|g_psf| = (a - b)/(a + b),
  pixel frame; its distortion is 2|g|/(1 + |g|^2)); the PSF images given to metacal are those of
  the same elliptical PSF. Leakage alpha = (c - c_nominal) / g_psf on the sheared component, with
  c_nominal the round-PSF row's c on the same scenes and noise (SPEC 6), its error from one
  bootstrap over twin pairs of both rows together;
- depth: the exposure time times years / 10, source fluxes and sky level alike
  (:func:`simulation.shear_pairs.scale_exposure`; images stay in electrons);
- a missing band: its pixels set to 0 in all the model sees (the +g and -g stamps and metacal's
  correction-noise field, so the band is 0 in every metacal image); the model has no
  band-availability input;
- real galaxies: the galaxies of a GalSim real-galaxy catalogue (COSMOS) in place of the
  bulge+disk profiles, with the population's positions, colours and magnitudes, the latter never
  more than 1 mag brighter than the galaxy's own (its HST noise brightens with it; pedestal
  removal and the rule: :mod:`simulation.galsim_population`); row ``cosmos_held_out`` draws only
  the catalogue's odd rows, which training never draws
  (:func:`simulation.galsim_population.real_galaxy_split`); a run that trained on the
  catalogue's images is measured on that row alone;
- sky-subtraction residuals: :func:`with_sky_residual`.

Measured per row, with the run's ``metacal`` settings (g, delta, views, noise correction, margin,
chunks, bootstrap, seed, target PSF): m and c of the regressor's own output on the metacal images
against the applied shear, with 1-sigma bootstrap errors over twin pairs
(:func:`evaluation.metacal_shear.shear_bias`), and AnaCal's on the same stamps (left out of the
missing-band rows, whose stamps AnaCal would read as the nominal row's); the regressor's mean
metacal response R11, R22; the shear noise per galaxy of both (:func:`shear_noise`); and, on the
+g stamps without metacal, the RMSE per component of the
regressor's calibrated e against the true label (the uniform-weight distortion of the noiseless
isolated target summed over the label bands, SPEC 6) and the median relative flux residual of the
reconstruction (one view), summed over the label bands. A model trained on images homogenised to
a target PSF (``simulation.target_psf_fwhm``) is measured there on the +g stamps and truth
homogenised the same way, as it was trained. Shears and c are reduced shears g; e and its RMSE
are distortions; all in the pixel frame.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from deblend.core.atomic import atomic_output, write_text_atomic
from deblend.core.chunk_cache import (
    chunk_key,
    join_chunks,
    read_chunk,
    without_defaults,
    write_chunk,
)
from deblend.core.config import Config
from deblend.core.homogenize import homogenize
from deblend.core.inference import Deblender
from deblend.core.outputs import refuse_foreign
from deblend.core.shapes import moments_ellipticity
from deblend.core.stamps import central
from evaluation.metacal_benchmark import chunk_seed, drawing_simulation, open_benchmark
from evaluation.metacal_shear import (
    Measured,
    measure_metacal,
    measured_from_arrays,
    measured_to_arrays,
    pair_bootstrap,
    selected_shear,
    shear_bias,
)
from evaluation.reconstruction_defects import SNR_EDGES
from evaluation.report_io import (
    fmt, fmt_err, jsonable, markdown_table, noise_correction_words, read_metrics,
    reconvolution_words, write_metrics)
from evaluation.shear_calibration import chunk_sizes
from simulation.conditions import FWHM_BAND, nominal_fwhm, sky_residual
from simulation.conditions import NOMINAL_YEARS as SURVEY_YEARS
from simulation.galsim_population import PopulationSpec
from simulation.shear_pairs import (
    NoiselessPairs,
    ShearPairBatch,
    draw_noiseless_pairs,
    observe_pairs,
    scale_exposure,
)
from simulation.surveys import survey_geometry

KIND = "conditions"
"""The kind of output a conditions directory is (:mod:`deblend.core.outputs`)."""
REPORT = "report.md"
HELD_WORDS = "; each stamp sheared less its fitted sky plane, the plane put back unsheared"
"""What the report says of ``metacal.hold_sky_plane``."""
FIGURE = "fig_conditions.png"
CACHE_DIR = "cache"
CACHE_VERSION = 3
"""Bumped when what a chunk holds changes for the same settings (2: the metacal images sheared
by ``metacal.delta``, not always 0.01; 3: AnaCal corrects its noise bias with metacal's
correction noise)."""
NOMINAL_YEARS = SURVEY_YEARS["LSST"]
"""LSST's full depth in years (a row's depth is a fraction of its survey's: :func:`depth_factor`)."""
PSF_SCALE_LIMITS = (0.5, 2.0)
"""PSF dilation factors the grid may use (wider than the shear benchmark's default)."""
TARGET_M = 0.003
TARGET_ALPHA = 0.005
"""Targets of a future conditions model: |m| <= TARGET_M, |alpha| <= TARGET_ALPHA."""
ESTIMATORS = ("regressor", "anacal")
MIN_SCENES = 4
"""Fewest scenes per row: two twin pairs, the least a bootstrap over pairs can use."""


@dataclass(frozen=True)
class Condition:
    """One row: how its scenes differ from its survey's nominal sky (the defaults)."""

    name: str
    label: str
    psf_fwhm: float | None = None
    """FWHM (arcsec) of the :data:`FWHM_BAND` PSF profile; None: the survey's"""
    psf_g: tuple[float, float] = (0.0, 0.0)
    """reduced shear of every band's PSF (pixel frame)"""
    years: float | None = None
    """depth: exposure time in years; None: the survey's full depth (LSST 10, DES 6)"""
    missing_band: str | None = None
    real_galaxies: bool = False
    real_rows: Literal["all", "held_out"] = "all"
    """with real galaxies: all of the catalogue's, or the half training never draws"""
    sky_residual: float = 0.0
    """sky-subtraction residual, in units of the sky noise sigma per pixel"""

    @property
    def drawing(self) -> tuple[Any, ...]:
        """What the noiseless scenes depend on (rows sharing it share one drawing)."""
        return self.psf_fwhm, self.psf_g, self.real_galaxies, self.real_rows

    @property
    def leaks(self) -> bool:
        """Whether the row's PSF is elliptical (it has a leakage alpha)."""
        return self.psf_g != (0.0, 0.0)


def condition_grid(survey: str, bands: Sequence[str]) -> tuple[Condition, ...]:
    """The grid of a model of ``survey`` with ``bands``, in the order it is measured (rows
    sharing a PSF together: one metacal operator): one row per missing band of the model."""
    return (
        Condition("nominal", f"{survey} nominal"),
        Condition("depth_1yr", "depth 1 year", years=1.0),
        Condition("depth_3yr", "depth 3 years", years=3.0),
        Condition("sky_0.1", "sky residual 0.1 sigma", sky_residual=0.1),
        Condition("sky_0.3", "sky residual 0.3 sigma", sky_residual=0.3),
        *(Condition(f"no_{b}", f"{b} band missing (zeros)", missing_band=b) for b in bands),
        Condition("cosmos", "COSMOS real galaxies", real_galaxies=True),
        Condition("cosmos_held_out", "COSMOS real galaxies, held-out half", real_galaxies=True,
                  real_rows="held_out"),
        Condition("psf_g1", "PSF g1 = +0.05", psf_g=(0.05, 0.0)),
        Condition("psf_g2", "PSF g2 = +0.05", psf_g=(0.0, 0.05)),
        *(Condition(f"fwhm_{f:.1f}", f"PSF FWHM {f:.1f}\" ({FWHM_BAND})", psf_fwhm=f)
          for f in (0.6, 0.8, 1.0, 1.2)),
    )


CONDITIONS = condition_grid("LSST", "ugrizy")
"""LSST's grid (a run's own: :func:`run_grid`)."""
ROW_NAMES = tuple(c.name for c in CONDITIONS)
NOMINAL_SKY = "LSST nominal: the survey's PSFs, 10-year depth, six bands"
REFERENCE = "nominal"


# -- conditions ---------------------------------------------------------------------------------
def reference_fwhm(survey: str, band: str = FWHM_BAND) -> float:
    """FWHM (arcsec) of ``survey``'s ``band`` PSF profile, without the pixel."""
    return nominal_fwhm(survey, (band,))[0]


def run_grid(config: Config) -> tuple[Condition, ...]:
    """The grid of a run: its survey's, with a missing-band row per band of the survey."""
    sim = config.simulation
    return condition_grid(sim.survey, survey_geometry(sim.survey, sim.stamp_pixels).bands)


def depth_factor(condition: Condition, survey: str) -> float:
    """The row's exposure over the survey's full depth (1 at nominal)."""
    return 1.0 if condition.years is None else condition.years / SURVEY_YEARS[survey]


def psf_scale(condition: Condition, survey: str) -> float:
    """The dilation of every band's PSF in ``condition`` (1 for the survey's PSFs)."""
    if condition.psf_fwhm is None:
        return 1.0
    return condition.psf_fwhm / reference_fwhm(survey)


def with_sky_residual(batch: ShearPairBatch, level: float, seed: int, half_width: float
                      ) -> ShearPairBatch:
    """``batch`` with a sky-subtraction residual added to every band of each scene, the same at
    +g and -g: ``level`` sigma_b (1 + (x cos phi + y sin phi) / half_width), sigma_b the band's
    sky noise per pixel, (x, y) pixels from the stamp centre (x along axis 1), phi uniform per
    scene and band from ``SeedSequence([seed, 2, scene])``. A constant under-subtraction of
    ``level`` sigma plus a gradient of ``level`` sigma per ``half_width`` pixels in a random
    direction. The correction noise is untouched (it models the noise, not the sky)."""
    n, bands, h, w = batch.plus.shape
    sigma = np.sqrt(batch.sky_variance)
    residual = np.empty(batch.plus.shape, np.float32)
    for i in range(n):
        phi = np.random.default_rng(np.random.SeedSequence([int(seed), 2, i])).uniform(
            0.0, 2 * np.pi, bands)
        residual[i] = sky_residual((h, w), np.full(bands, level), phi, sigma, half_width)
    return dataclasses.replace(batch, plus=batch.plus + residual, minus=batch.minus + residual)


def without_band(batch: ShearPairBatch, band: str) -> ShearPairBatch:
    """``batch`` with ``band``'s pixels set to 0 in the +g and -g stamps and the correction
    noise (everything the model sees of it)."""
    b = batch.bands.index(band)
    arrays = {}
    for name in ("plus", "minus", "correction_noise"):
        array = getattr(batch, name).copy()
        array[:, b] = 0.0
        arrays[name] = array
    return dataclasses.replace(batch, **arrays)


def draw_condition(condition: Condition, n: int, seed: int, g: tuple[float, float],
                   config: Config, cosmos: str | None) -> NoiselessPairs:
    """The noiseless +g / -g scenes of ``condition``'s drawing (PSF and galaxies), nominal
    depth, with the margin of ``metacal.margin_pixels``."""
    sim = drawing_simulation(config)
    return draw_noiseless_pairs(
        "galsim", n, seed, g, neighbours=True, sim=sim, psf_scale=psf_scale(condition, sim.survey),
        psf_scale_range=PSF_SCALE_LIMITS, psf_shear=condition.psf_g,
        real_catalog=cosmos if condition.real_galaxies else None, real_rows=condition.real_rows)


def observe(pairs: NoiselessPairs, condition: Condition, seed: int, g: tuple[float, float],
            half_width: float) -> ShearPairBatch:
    """The noisy stamps of ``condition`` from its noiseless ``pairs`` (already at its depth)."""
    batch = observe_pairs(pairs, seed, "galsim", g)
    if condition.sky_residual > 0:
        batch = with_sky_residual(batch, condition.sky_residual, seed, half_width)
    if condition.missing_band is not None:
        batch = without_band(batch, condition.missing_band)
    return batch


# -- measurement --------------------------------------------------------------------------------
def measure_chunk(model: Deblender, batch: ShearPairBatch, truth: NoiselessPairs,
                  condition: Condition, config: Config) -> dict[str, np.ndarray]:
    """The regressor (and AnaCal) at +g and -g, and the +g stamps against the truth (both
    homogenised to the model's target PSF when its training images were)."""
    mc = config.metacal
    if tuple(batch.bands) != tuple(model.bands):
        raise ValueError(f"the scenes' bands {batch.bands} are not the model's {model.bands}")
    arrays: dict[str, np.ndarray] = {"twin": batch.twin, "target_snr": batch.target_snr}
    noise = batch.correction_noise if mc.noise_correction else None
    estimators = ESTIMATORS if condition.missing_band is None else ("regressor",)
    for sign, stamps in (("plus", batch.plus), ("minus", batch.minus)):
        measured = measure_metacal(model, stamps, batch.psfs, correction_noise=noise,
                                   sky_variance=batch.sky_variance, views=mc.views,
                                   estimators=estimators, delta=mc.delta,
                                   target_fwhm=mc.target_psf_fwhm,
                                   hold_sky_plane=mc.hold_sky_plane)
        for name, m in measured.items():
            arrays.update(measured_to_arrays(f"{sign}.{name}", m))
    size = model.stamp_pixels
    label = [model.bands.index(b) for b in config.simulation.label_bands]
    stamps, clean = batch.plus, truth.plus_target
    if model.data.target_psf_fwhm is not None:  # what the networks saw in training
        psfs = np.broadcast_to(batch.psfs, (len(stamps),) + batch.psfs.shape)
        sigma = model.target_sigma(model.data.target_psf_fwhm)
        stamps = homogenize(stamps, psfs, sigma, noise=noise, edge="zero")
        clean = homogenize(clean, psfs, sigma, edge="zero")
    prediction = model.predict(central(stamps, size), views=mc.views, reconstruct=True,
                               reconstruction_views=1)
    assert prediction.ellipticity is not None and prediction.reconstruction is not None
    target = central(clean, size)[:, label].astype(np.float64).sum(axis=1)
    arrays["e_true"] = np.stack(moments_ellipticity(target), axis=1)
    arrays["e_pred"] = prediction.ellipticity.astype(np.float64)
    arrays["flux_true"] = target.sum(axis=(1, 2))
    arrays["flux_recon"] = prediction.reconstruction[:, label].astype(np.float64).sum(
        axis=(1, 2, 3))
    return arrays


def _cache_key(config: Config, condition: Condition, chunk: int, n: int, model_id: str,
               cosmos: str | None) -> str:
    mc = config.metacal
    settings = without_defaults(
        {k: getattr(mc, k) for k in ("g", "delta", "views", "noise_correction", "margin_pixels",
                                     "seed", "target_psf_fwhm", "hold_sky_plane")},
        {"target_psf_fwhm": None, "hold_sky_plane": False})
    row = without_defaults(dataclasses.asdict(condition), {"real_rows": "all"})
    return chunk_key({"version": CACHE_VERSION, "condition": row,
                      "metacal": settings, "simulation": config.to_dict()["simulation"],
                      "chunk": chunk, "n": n, "model": model_id,
                      "cosmos": [cosmos, PopulationSpec().real_max_brightening]
                      if condition.real_galaxies else None})


def measure_rows(model: Deblender, config: Config, conditions: Sequence[Condition], cache: Path,
                 model_id: str, cosmos: str | None, bar: Any) -> dict[str, dict[str, np.ndarray]]:
    """Every chunk of every row, from the cache where possible; rows sharing a drawing share
    its noiseless scenes, drawn only when one of them is not cached."""
    mc = config.metacal
    g = (mc.g, mc.g)
    half_width = (model.stamp_pixels - 1) / 2
    parts: dict[str, list[dict[str, np.ndarray]]] = {c.name: [] for c in conditions}
    drawings = list(dict.fromkeys(c.drawing for c in conditions))
    for drawing in drawings:
        group = [c for c in conditions if c.drawing == drawing]
        for chunk, n in enumerate(chunk_sizes(mc.n_scenes, mc.chunk_scenes)):
            seed = chunk_seed(mc.seed, KIND, chunk)
            keys = {c.name: _cache_key(config, c, chunk, n, model_id, cosmos) for c in group}
            paths = {c.name: cache / f"{c.name}_chunk{chunk:04d}.npz" for c in group}
            cached = {c.name: read_chunk(paths[c.name], keys[c.name]) for c in group}
            pairs = None
            for c in group:
                arrays = cached[c.name]
                if arrays is None:
                    if pairs is None:
                        pairs = draw_condition(c, n, seed, g, config, cosmos)
                    truth = scale_exposure(pairs, depth_factor(c, config.simulation.survey))
                    batch = observe(truth, c, seed, g, half_width)
                    arrays = measure_chunk(model, batch, truth, c, config)
                    write_chunk(paths[c.name], keys[c.name], arrays)
                parts[c.name].append(arrays)
                bar.update(n)
    return {name: join_chunks(p) for name, p in parts.items()}


# -- results ------------------------------------------------------------------------------------
def _pair(arrays: dict[str, np.ndarray], name: str) -> tuple[Measured, Measured]:
    return measured_from_arrays(f"plus.{name}", arrays), measured_from_arrays(f"minus.{name}",
                                                                               arrays)


def leakage(row: tuple[Measured, Measured], reference: tuple[Measured, Measured],
            g_psf: tuple[float, float], *, delta: float, n_bootstrap: int, seed: int = 0
            ) -> tuple[float, float]:
    """alpha = (c_j(row) - c_j(reference)) / g_psf_j on the PSF's sheared component j, and its
    1-sigma error from a bootstrap over twin pairs drawn together for both (same scenes), each
    given as its (+g, -g) measurements; c = (g_hat(+g) + g_hat(-g)) / 2."""
    j = int(np.argmax(np.abs(g_psf)))
    n_units = row[0].e.shape[0] // 2
    units = np.arange(2 * n_units) // 2

    def alpha(unit_weights: np.ndarray) -> float:
        weights = unit_weights[units]
        c = [(selected_shear(p.e, p.response, p.kept, weights, delta)
              + selected_shear(m.e, m.response, m.kept, weights, delta)) / 2
             for p, m in (row, reference)]
        return float((c[0][j] - c[1][j]) / g_psf[j])

    value, draws = pair_bootstrap(alpha, np.arange(n_units), n_units, n_bootstrap, seed)
    return value, float(np.std(draws, ddof=1))


def row_result(condition: Condition, arrays: dict[str, np.ndarray],
               reference: dict[str, np.ndarray], config: Config) -> dict[str, Any]:
    """m, c (, alpha) per estimator, R, e RMSE and flux residual of one row."""
    mc = config.metacal
    out: dict[str, Any] = {"label": condition.label,
                           "condition": dataclasses.asdict(condition),
                           "n_scenes": int(arrays["twin"].size)}
    for name in ESTIMATORS:
        if f"plus.{name}.e" not in arrays:
            continue
        pair = _pair(arrays, name)
        out[name] = shear_bias(*pair, (mc.g, mc.g), delta=mc.delta,
                               n_bootstrap=mc.bootstrap).to_dict()
        if condition.leaks and f"plus.{name}.e" in reference:
            alpha, error = leakage(pair, _pair(reference, name), condition.psf_g,
                                   delta=mc.delta, n_bootstrap=mc.bootstrap)
            out[name].update(alpha=alpha, alpha_err=error)
        out[name]["shear_noise"] = shear_noise(arrays, name)
    response = np.concatenate([arrays["plus.regressor.response"],
                               arrays["minus.regressor.response"]])
    out["regressor"].update(R11=float(np.nanmean(response[:, 0, 0])),
                            R22=float(np.nanmean(response[:, 1, 1])))
    out["response_by_snr"] = response_by_snr(arrays)
    out["e_rmse"] = float(np.sqrt(np.nanmean((arrays["e_pred"] - arrays["e_true"]) ** 2)))
    out["e_rmse_row"] = row_calibrated_rmse(arrays["e_pred"], arrays["e_true"])
    out["flux_residual"] = float(np.nanmedian(
        (arrays["flux_recon"] - arrays["flux_true"]) / arrays["flux_true"]))
    return out


def response_by_snr(arrays: dict[str, np.ndarray], edges: Sequence[float] = SNR_EDGES
                    ) -> list[dict[str, Any]]:
    """Each estimator's mean metacal response (R11 + R22) / 2 over the +g and -g stamps, in
    bins of the target's S/N (``target_snr``): one dict per bin holding a scene, ``snr`` [low,
    high] (high None when open), ``scenes``, and a mean per estimator measured. Where a row's
    galaxies lose their response, and whether an estimator loses more than its peer."""
    snr = np.asarray(arrays["target_snr"], np.float64)
    out = []
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (snr >= low) & (snr < high)
        if not chosen.any():
            continue
        row: dict[str, Any] = {"snr": [float(low), None if np.isinf(high) else float(high)],
                               "scenes": int(chosen.sum())}
        for name in ESTIMATORS:
            if f"plus.{name}.response" in arrays:
                r = np.concatenate([arrays[f"{sign}.{name}.response"][chosen]
                                    for sign in ("plus", "minus")])
                row[name] = float(np.nanmean(0.5 * (r[:, 0, 0] + r[:, 1, 1])))
        out.append(row)
    return out


def shear_noise(arrays: dict[str, np.ndarray], name: str) -> float:
    """Shear noise per galaxy of an estimator, sqrt(<e_i^2> - <e_i>^2) / <R_ii> averaged over
    the two components, on the +g noshear images it keeps: the error on a survey's shear per
    galaxy (shape noise and pixel noise together, over the response). m's errors here come from
    +g / -g pairs with the same galaxies and noise, in which the shape noise cancels; this is
    what a survey, without pairs, pays."""
    e = arrays[f"plus.{name}.e"]
    response = arrays[f"plus.{name}.response"]
    kept = arrays[f"plus.{name}.kept.noshear"].astype(bool) & np.isfinite(e).all(axis=1)
    spread = np.sqrt(e[kept].var(axis=0))
    return float(np.mean(spread / np.diagonal(response[kept], axis1=1, axis2=2).mean(axis=0)))


def row_calibrated_rmse(e_pred: np.ndarray, e_true: np.ndarray) -> float:
    """RMSE of (N, 2) predictions against the truth after dividing each component by its
    least-squares slope on this row, s_j = sum(e_pred e_true) / sum(e_true^2): the precision
    the regressor would have if its one stored response were this row's."""
    ok = np.all(np.isfinite(e_pred) & np.isfinite(e_true), axis=1)
    pred, true = e_pred[ok], e_true[ok]
    slope = (pred * true).sum(axis=0) / (true ** 2).sum(axis=0)
    return float(np.sqrt(np.mean((pred / slope - true) ** 2)))


def select_rows(rows: Sequence[str] | None, cosmos: str | None, log: Callable[[str], None],
                grid: Sequence[Condition] = CONDITIONS, trained_on_cosmos: bool = False
                ) -> list[Condition]:
    """The requested rows of ``grid`` (default all) in grid order, the nominal row always among
    them; the real-galaxy rows are left out, with a note, when the catalogue ``cosmos`` is not
    there, and the row of all its galaxies when the run trained on half of them
    (``trained_on_cosmos``: only the held-out half measures something nothing was fitted on)."""
    names = [c.name for c in grid]
    wanted = set(names if rows is None else rows) | {REFERENCE}
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(names)}")
    chosen = [c for c in grid if c.name in wanted]
    if any(c.real_galaxies for c in chosen) and (cosmos is None or not Path(cosmos).is_file()):
        log(f"note: real-galaxy catalogue {cosmos} not found: the cosmos row is left out")
        chosen = [c for c in chosen if not c.real_galaxies]
    if trained_on_cosmos and any(c.real_galaxies and c.real_rows == "all" for c in chosen):
        log(f"note: the run trained on half of the galaxies of {cosmos}: only the held-out half "
            f"is measured (row cosmos_held_out)")
        chosen = [c for c in chosen if not (c.real_galaxies and c.real_rows == "all")]
    return chosen


def trains_on(config: Config, catalog: str | None) -> bool:
    """Whether the run of ``config`` drew training galaxies from the real-galaxy ``catalog``."""
    morphology = config.simulation.morphology
    if catalog is None or morphology is None or morphology.real_fraction == 0:
        return False
    trained, measured = Path(str(morphology.real_catalog)), Path(catalog)
    if trained.is_file() and measured.is_file():
        return trained.samefile(measured)
    return trained.resolve() == measured.resolve()


def run_conditions(run: str | Path, config: Config, out: str | Path | None = None, *,
                   rows: Sequence[str] | None = None, cosmos: str | Path | None = None,
                   force: bool = False, progress: bool = True, device: str = "auto",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every row (resuming from ``OUT/cache``), write ``metrics.json``, ``report.md`` and
    the figure to ``out`` (default ``RUN/conditions``), return the results (JSON types).

    ``config``: the run's, whose ``metacal`` section sets sizes and settings; ``cosmos``: the
    real-galaxy catalogue file of the cosmos row."""
    run = Path(run)
    out = Path(out) if out is not None else run / KIND
    cosmos = None if cosmos is None else str(cosmos)
    conditions = select_rows(rows, cosmos, log, run_grid(config), trains_on(config, cosmos))
    mc = config.metacal
    if mc.n_scenes < MIN_SCENES:
        raise ValueError(f"n_scenes must be at least {MIN_SCENES} (two twin pairs for a "
                         f"bootstrap), got {mc.n_scenes}")
    complete = refuse_foreign(out, KIND) and KIND in read_metrics(out, rebuild=force)
    started = time.time()
    model, model_id, cache = open_benchmark(run, out, KIND, complete, force,
                                            "a conditions result", device)
    # the target metacal really uses (the config's, else the run's, else the training images')
    config = config.replace("metacal", target_psf_fwhm=model.target_fwhm(mc.target_psf_fwhm))
    mc = config.metacal
    with tqdm(total=len(conditions) * mc.n_scenes, desc="conditions", unit="scene",
              disable=not progress) as bar:
        arrays = measure_rows(model, config, conditions, cache, model_id, cosmos, bar)
    result = jsonable({
        "applied_g": [mc.g, mc.g], "delta": mc.delta, "views": mc.views,
        "noise_correction": mc.noise_correction, "seed": mc.seed,
        "target_psf_fwhm": mc.target_psf_fwhm, "hold_sky_plane": mc.hold_sky_plane,
        "fwhm_band": FWHM_BAND,
        "reference_fwhm": reference_fwhm(config.simulation.survey),
        "targets": {"abs_m": TARGET_M, "abs_alpha": TARGET_ALPHA},
        "rows": {c.name: row_result(c, arrays[c.name], arrays[REFERENCE], config)
                 for c in conditions},
        "trained_on": training_sky(config), "run": str(run),
        "seconds": time.time() - started})
    write_metrics(out, {KIND: result})
    write_text_atomic(out / REPORT, report_markdown(result))
    figure(result, out / FIGURE)
    return result


def training_sky(config: Config) -> str:
    """What sky a run's networks were trained on, in words (for the report)."""
    sim = config.simulation
    if sim.conditions is None:
        geometry = survey_geometry(sim.survey, sim.stamp_pixels)
        return (f"{sim.survey} nominal: the survey's PSFs, {SURVEY_YEARS[sim.survey]:g}-year "
                f"depth, {len(geometry.bands)} bands") if sim.survey != "LSST" else NOMINAL_SKY
    c = sim.conditions
    words = (f"conditions drawn per scene: r-band PSF FWHM {c.psf_fwhm[0]:g}-{c.psf_fwhm[1]:g}\", "
             f"|g_psf| <= {c.psf_g_max:g}, depth {c.depth_years[0]:g}-{c.depth_years[1]:g} "
             f"years, each band missing with probability {c.band_missing:g}, sky residual up to "
             f"{c.sky_residual:g} sigma")
    if sim.morphology is not None:
        words += "; knotty disks and off-centre bulges"
        if sim.morphology.cosmos_fraction > 0:
            words += (f", {sim.morphology.cosmos_fraction:.0%} of galaxies drawn as COSMOS "
                      f"Sersic / bulge + disk fits")
        if sim.morphology.real_fraction > 0:
            words += (f", {sim.morphology.real_fraction:.0%} from real HST images (the even "
                      f"rows of {sim.morphology.real_catalog})")
    if config.model.availability_input:
        words += "; availability mask input"
    return words


# -- report -------------------------------------------------------------------------------------
def conditions_table(result: dict[str, Any]) -> str:
    """One markdown table: a row per condition."""
    header = ["condition", "m1", "m2", "c1", "c2", "alpha", "e RMSE", "row-cal. RMSE",
              "flux resid.", "R11", "R22", "shear noise", "AnaCal m1", "AnaCal m2",
              "AnaCal shear noise", "scenes"]
    lines = []
    for r in result["rows"].values():
        reg, ana = r["regressor"], r.get("anacal", {})
        lines.append([
            r["label"], fmt_err(reg["m1"], reg["m1_err"], 4, True),
            fmt_err(reg["m2"], reg["m2_err"], 4, True), fmt_err(reg["c1"], reg["c1_err"], 5, True),
            fmt_err(reg["c2"], reg["c2_err"], 5, True),
            fmt_err(reg.get("alpha"), reg.get("alpha_err"), 4, True), fmt(r["e_rmse"], 4),
            fmt(r.get("e_rmse_row"), 4), fmt(r["flux_residual"], 3, True), fmt(reg["R11"], 3),
            fmt(reg["R22"], 3), fmt(reg.get("shear_noise"), 3),
            fmt_err(ana.get("m1"), ana.get("m1_err"), 4, True),
            fmt_err(ana.get("m2"), ana.get("m2_err"), 4, True), fmt(ana.get("shear_noise"), 3),
            str(r["n_scenes"])])
    targets = result["targets"]
    return (markdown_table(header, lines) + f"\nTargets for a conditions model: |m| <= "
            f"{targets['abs_m']:g}, |alpha| <= {targets['abs_alpha']:g}.\n")


def response_table(result: dict[str, Any]) -> str:
    """A markdown table of each row's :func:`response_by_snr`: per S/N bin, the regressor's
    mean response, AnaCal's where measured, and the scenes."""
    bins = sorted({tuple(b["snr"]) for r in result["rows"].values()
                   for b in r["response_by_snr"]}, key=lambda b: b[0])
    header = ["condition"] + [f"S/N {low:g}-{'' if high is None else f'{high:g}'}"
                              for low, high in bins]
    lines = []
    for r in result["rows"].values():
        cells = {tuple(b["snr"]): b for b in r["response_by_snr"]}
        line = [r["label"]]
        for key in bins:
            b = cells.get(key)
            if b is None:
                line.append("")
                continue
            line.append(f"{b['regressor']:.2f}" + (f" / {b['anacal']:.2f}" if "anacal" in b
                                                   else "") + f" ({b['scenes']})")
        lines.append(line)
    return ("Mean metacal response (R11 + R22) / 2 by the target's S/N: regressor / AnaCal "
            "(scenes).\n\n" + markdown_table(header, lines))


def report_markdown(result: dict[str, Any]) -> str:
    g = result["applied_g"]
    return "\n".join([
        "# A model on a grid of observing conditions", "",
        f"Model: `{result['run']}` (trained on {result.get('trained_on', NOMINAL_SKY)}). "
        "Each row changes one condition of the independent GalSim population with "
        "0-2 neighbours; all rows draw the same scenes and noise. Applied shear (g1, g2) = "
        f"({g[0]:+g}, {g[1]:+g}) and its negative; metacal delta = {result['delta']:g}; regressor "
        f"averaged over {result['views']} views; "
        f"{noise_correction_words(result['noise_correction'])}; "
        f"{reconvolution_words(result.get('target_psf_fwhm'))}"
        f"{HELD_WORDS if result.get('hold_sky_plane') else ''}. "
        "m = g_hat / g - 1, c additive (reduced "
        "shear), 1-sigma bootstrap errors over twin pairs. alpha = (c - c_nominal) / g_psf on the "
        "sheared component, g_psf the PSF's reduced shear (paired with the nominal row). PSF FWHM "
        f"rows set the {result['fwhm_band']} band's PSF profile FWHM (nominal "
        f"{result['reference_fwhm']:.3f}\") and dilate all bands alike. Depth scales fluxes and "
        "sky by years over the survey's full depth (LSST 10, DES 6). A missing band is zeros in everything the model sees. Sky residual: "
        "+level sigma_sky plus a gradient of level sigma_sky per half stamp, random direction. "
        "COSMOS: the catalogue's HST galaxies (border-median pedestal removed, HST noise kept) "
        "at random orientations, with the population's positions, colours and magnitudes, but "
        f"never more than {PopulationSpec().real_max_brightening:g} mag brighter than their "
        "catalogue F814W magnitude. "
        "e RMSE: per component, the regressor's calibrated e (distortion) on the +g stamps "
        "against the noiseless target's uniform-weight distortion (label bands); row-cal. RMSE: "
        "the same after dividing each component by its least-squares slope on the row (the "
        "precision if the stored response were the row's); flux resid.: "
        "median (recon - true) / true of the label bands' flux (one decoded view). R11, R22: "
        "the regressor's mean metacal response. Shear noise: per galaxy, the spread of e on "
        "the noshear images over the mean response (what a survey's shear error per galaxy is; "
        "m's errors come from +g / -g pairs sharing galaxies and noise, which cancel the shape "
        "noise). AnaCal: FPFS on the same stamps (not on missing-band rows).", "",
        conditions_table(result), f"![m per condition]({FIGURE})", "", response_table(result),
        ""])


def figure(result: dict[str, Any], path: Path) -> Path:
    """m1 and m2 of the regressor per row, with the target band."""
    import matplotlib.pyplot as plt

    rows = list(result["rows"].values())
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4))
    for k, offset in ((1, -0.15), (2, 0.15)):
        m = [np.nan if r["regressor"][f"m{k}"] is None else r["regressor"][f"m{k}"]
             for r in rows]
        err = [0.0 if r["regressor"][f"m{k}_err"] is None else r["regressor"][f"m{k}_err"]
               for r in rows]
        ax.errorbar(x + offset, m, yerr=err, fmt="o", capsize=2, label=f"m{k}")
    ax.axhspan(-TARGET_M, TARGET_M, color="tab:green", alpha=0.2, label=f"|m| <= {TARGET_M:g}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("regressor m (metacal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


__all__ = ["CONDITIONS", "Condition", "ROW_NAMES", "condition_grid", "conditions_table",
           "leakage", "observe", "run_conditions", "run_grid", "with_sky_residual",
           "without_band"]
