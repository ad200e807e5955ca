"""scarlet2 (Melchior et al., JAX) as an optional peer deblender on the same scenes as deblend.

Install (optional, not a core dependency): ``pip install "scarlet2==0.5.1"`` (pulls jax/jaxlib CPU
0.10.2, equinox, optax, numpyro; lives with our numpy<2.4 / astropy<7 / torch 2.13 pins).
scarlet2 is imported lazily: without it only :func:`scarlet2_deblend` and friends fail, with an
ImportError naming that command.

What runs, per blend (scarlet2 0.5.1's documented workflow, docs/0-example.ipynb of that tag):

1. ``Observation(data, weights=1/variance, psf=psf_images, channels=bands)``: the noisy,
   sky-subtracted blend in electrons; ``variance = sky_level + max(data, 0)`` per band (BTK's
   noise model: background plus source Poisson, the source term estimated from the data itself);
   the PSF is each band's effective PSF image (PSF convolved with the pixel, unit sum, centred on
   the central pixel of an odd-sized image: :attr:`simulation.dataset.StampData.psf_images`; for
   a BTK batch, :func:`simulation.surveys.psf_images` of its survey with an odd size: the same
   GalSim profiles ``blend_batch.psf`` drawn at the survey's pixel scale). The sky levels of a
   survey are ``surveycodex.utilities.mean_sky_level(survey, survey.get_filter(band))``.
2. ``Frame.from_observations(obs)``: the model frame, on the same pixel grid, with scarlet2's
   default narrow model PSF (a Gaussian of sigma 0.7 pixels); the observation renders the model
   by convolving with the difference kernel to each band's PSF.
3. One ``Source`` per detected peak: ``init.from_gaussian_moments(obs, centre)`` (spectrum from
   the 0th moments, an elliptical Gaussian morphology from the PSF-deconvolved 2nd moments, in a box
   grown while its edge keeps S/N >= ``min_snr``); where it raises ValueError the documented
   fallback ``init.pixel_spectrum`` + ``init.compact_morphology`` (a point source) is used. A
   spectrum element <= 0 is raised to 1e-6 so that the positivity constraint holds at the start.
   The morphology is then a free pixel array in that box (non-parametric), one morphology shared
   by all bands (spectrum x morphology).
4. ``Parameters``: every spectrum with ``constraints.positive`` and step
   ``relative_step(factor=0.05)``, every morphology with ``constraints.unit_interval`` and step
   ``relative_step(factor=1e-3)`` (the 0.5.1 example's values).
5. ``scene.fit(obs, max_iter, e_rel)``: Adam on the Gaussian log-likelihood; it stops when the
   largest relative change of any parameter in one step is below ``e_rel`` (1e-4, the documented
   value) or after ``max_iter`` steps (1000, idem). The steps taken are counted and reported.

Outputs, per source: the model as the observation sees it (reconvolved with each band's PSF and
rendered into the observation frame: ``obs.render(scene.evaluate_source(source))``, electrons,
(bands, H, W)), a stamp of it centred on the source's nearest pixel (:meth:`Scarlet2Source.stamp`),
its flux per band (``scarlet2.measure.flux``: the sum of the model in the model frame, electrons)
and the sum of the rendered model (what falls inside the observation). Per blend: CPU and wall
seconds (initialisation + fit, JIT compilation included: scarlet2 compiles one update step per scene
layout, so every blend pays a compile) and the number of steps.

Known behaviour on LSST-like 45x45 stamps (quick validation split, 30 blends, default settings):
the fit never meets ``e_rel`` (the largest per-pixel change of the free morphologies stays ~1e-3)
and runs the 1000 steps, ~3.4 CPU-seconds per blend; ``from_gaussian_moments`` fails (NaN
deconvolved size) for ~40% of the targets, which then start as point sources; the default source
boxes are small (11-25 pixels) and the uniform-weight moments of the models come out rounder than
the labels (slopes ~0.5-0.7). Larger boxes (``box_sizes=[31]``, the quickstart's) absorb noise
and neighbour light under the positivity constraint: fluxes +10%, worse shapes.

Conventions: positions are pixel ``(x, y)`` = (column, row), 0-based, pixel centres at integers
(scarlet2 itself uses (y, x); the swap is done here). Ellipticities (:func:`model_ellipticity`)
are the project's uniform-weight moment *distortions* of the reconvolved model summed over the label
bands, in the pixel frame: the estimator of the truth labels and of ``recon_moments``
(:func:`evaluation.estimators.moments_estimator`).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from deblend.core.stamps import cut_stamp
from evaluation.estimators import moments_estimator

INSTALL_HINT = 'pip install "scarlet2==0.5.1"  (JAX CPU build; see evaluation/scarlet2_peer.py)'
DEFAULT_MAX_ITER = 1000
"""Maximum Adam steps (scarlet2's documented value)."""
DEFAULT_E_REL = 1e-4
"""Stop when no parameter changes by more than this fraction in one step (documented value)."""
SPECTRUM_STEP = 0.05
"""``relative_step`` factor of the spectra (scarlet2 0.5.1 example)."""
MORPHOLOGY_STEP = 1e-3
"""``relative_step`` factor of the morphologies (scarlet2 0.5.1 example)."""
_TINY = 1e-6


def scarlet2_available() -> bool:
    """True when ``scarlet2`` (and so jax) can be imported."""
    return importlib.util.find_spec("scarlet2") is not None


def _scarlet2() -> ModuleType:
    try:
        import scarlet2
    except ImportError as exc:
        raise ImportError(f"scarlet2 is not installed: {INSTALL_HINT}") from exc
    return scarlet2


@dataclass(frozen=True)
class Scarlet2Source:
    """One deblended source (electrons, pixel frame).

    ``x``, ``y``: the detection it was initialised at (column, row; 0-based).
    ``model``: (bands, H, W) the source as observed (reconvolved with each band's PSF).
    ``flux``: (bands,) scarlet2's ``measure.flux`` of the source (model frame).
    ``observed_flux``: (bands,) the sum of ``model`` (the part inside the observation).
    ``initialisation``: "gaussian_moments" or "point_source" (the documented fallback).
    """

    x: float
    y: float
    model: np.ndarray
    flux: np.ndarray
    observed_flux: np.ndarray
    initialisation: str

    def stamp(self, size: int = 45) -> np.ndarray:
        """(bands, size, size) cut of :attr:`model` centred on the pixel nearest (x, y),
        zero-padded where it overhangs the observation (:func:`deblend.core.stamps.cut_stamp`)."""
        return cut_stamp(self.model, self.x, self.y, size)


@dataclass(frozen=True)
class Scarlet2Blend:
    """The scarlet2 fit of one blend: its sources (in the order of the positions given), the CPU
    and wall seconds of initialisation + fit (JIT compilation included), the Adam steps taken,
    whether it stopped on ``e_rel`` (``converged``) and the mean chi^2 of the fit."""

    sources: tuple[Scarlet2Source, ...]
    cpu_seconds: float
    wall_seconds: float
    steps: int
    converged: bool
    chi2: float


# -- input checks ------------------------------------------------------------------------------
def _check_inputs(images: np.ndarray, psfs: np.ndarray, positions: Sequence[Any],
                  sky_levels: np.ndarray, bands: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 3:
        images = images[None]
        positions = [positions]
    n_bands = len(bands)
    if images.ndim != 4 or images.shape[1] != n_bands:
        raise ValueError(f"expected images (N, {n_bands}, H, W) or ({n_bands}, H, W) for bands "
                         f"{' '.join(bands)}, got shape {np.shape(images)}")
    if not np.all(np.isfinite(images)):
        bad = np.argwhere(~np.isfinite(images).all(axis=(1, 2, 3))).ravel()
        raise ValueError(f"images have non-finite values (NaN/inf) in blend(s) {bad[:10].tolist()}")
    psfs = np.asarray(psfs, dtype=np.float64)
    if psfs.ndim == 3:
        psfs = np.broadcast_to(psfs, (len(images),) + psfs.shape)
    if psfs.ndim != 4 or psfs.shape[:2] != (len(images), n_bands):
        raise ValueError(f"expected PSF images ({n_bands}, S, S) or (N, {n_bands}, S, S), "
                         f"got shape {np.shape(psfs)}")
    if psfs.shape[-1] != psfs.shape[-2] or psfs.shape[-1] % 2 == 0:
        raise ValueError(f"PSF images must be square with an odd size (centred on the central "
                         f"pixel, as scarlet2's ArrayPSF requires), got {psfs.shape[-2:]}")
    if not np.all(np.isfinite(psfs)) or np.any(psfs.sum(axis=(-2, -1)) <= 0):
        raise ValueError("PSF images must be finite with a positive sum in every band")
    sky_levels = np.asarray(sky_levels, dtype=np.float64)
    if sky_levels.shape != (n_bands,) or not np.all(np.isfinite(sky_levels)) \
            or np.any(sky_levels <= 0):
        raise ValueError(f"sky_levels must be {n_bands} positive numbers (electrons per pixel, one "
                         f"per band), got {sky_levels!r}")
    if len(positions) != len(images):
        raise ValueError(f"{len(positions)} position lists for {len(images)} blends")
    height, width = images.shape[-2:]
    checked = []
    for k, pos in enumerate(positions):
        pos = np.asarray(pos, dtype=np.float64).reshape(-1, 2) if np.size(pos) else \
            np.empty((0, 2))
        if len(pos) == 0:
            raise ValueError(f"blend {k} has no source position (give at least one (x, y))")
        inside = ((pos[:, 0] >= -0.5) & (pos[:, 0] < width - 0.5)
                  & (pos[:, 1] >= -0.5) & (pos[:, 1] < height - 0.5))
        if not np.all(np.isfinite(pos)) or not inside.all():
            raise ValueError(f"blend {k}: positions (x, y) must lie in the {width}x{height} image, "
                             f"got {pos.tolist()}")
        checked.append(pos)
    return images, psfs, checked, sky_levels


# -- the fit -----------------------------------------------------------------------------------
def scarlet2_deblend(images: np.ndarray, psfs: np.ndarray, positions: Sequence[Any],
                     sky_levels: np.ndarray, bands: Sequence[str], *,
                     max_iter: int = DEFAULT_MAX_ITER, e_rel: float = DEFAULT_E_REL,
                     box_sizes: Sequence[int] | None = None, min_snr: float = 3.0,
                     spectrum_step: float = SPECTRUM_STEP,
                     morphology_step: float = MORPHOLOGY_STEP,
                     validate: bool = False) -> list[Scarlet2Blend]:
    """Deblend each blend with scarlet2 (see the module docstring for the recipe).

    images: (N, bands, H, W) or (bands, H, W) noisy sky-subtracted blends, electrons per pixel.
    psfs: (bands, S, S) or (N, bands, S, S) effective PSF images, odd S, centred (any sum: scarlet2
        normalises them).
    positions: per blend a sequence of (x, y) pixel positions (x = column, y = row), one source
        each (for a single (bands, H, W) image, one sequence of (x, y)).
    sky_levels: (bands,) background level per pixel, electrons (the variance of the sky noise).
    box_sizes: candidate source boxes (pixels) for ``init.from_gaussian_moments``; None is
        scarlet2's default (multiples of the PSF FWHM).
    validate: run scarlet2's automatic validation checks (printed; off by default).

    Returns one :class:`Scarlet2Blend` per blend. Raises ValueError on inconsistent input
    (band count, shapes, non-finite pixels, positions outside the image) and ImportError, naming
    the pip command, when scarlet2 is missing.
    """
    images, psfs, positions, sky_levels = _check_inputs(images, psfs, positions, sky_levels,
                                                        bands)
    if max_iter < 1 or not e_rel > 0:
        raise ValueError(f"max_iter must be >= 1 and e_rel > 0, got {max_iter}, {e_rel}")
    sc2 = _scarlet2()
    from scarlet2 import validation_utils

    previous = validation_utils.VALIDATION_SWITCH
    sc2.set_validation(validate)
    try:
        return [_fit_one(sc2, image, psf, pos, sky_levels, list(bands), max_iter=max_iter,
                         e_rel=e_rel, box_sizes=box_sizes, min_snr=min_snr,
                         spectrum_step=spectrum_step, morphology_step=morphology_step)
                for image, psf, pos in zip(images, psfs, positions)]
    finally:
        sc2.set_validation(previous)


def _fit_one(sc2: ModuleType, image: np.ndarray, psf: np.ndarray, positions: np.ndarray,
             sky_levels: np.ndarray, bands: list[str], *, max_iter: int, e_rel: float,
             box_sizes: Sequence[int] | None, min_snr: float, spectrum_step: float,
             morphology_step: float) -> Scarlet2Blend:
    from functools import partial

    import jax.numpy as jnp
    from numpyro.distributions import constraints

    cpu0, wall0 = time.process_time(), time.perf_counter()
    variance = sky_levels[:, None, None] + np.clip(image, 0.0, None)
    obs = sc2.Observation(image, weights=1.0 / variance, psf=psf, channels=bands)
    frame = sc2.Frame.from_observations(obs)
    kinds = []
    with sc2.Scene(frame) as scene:
        for x, y in positions:
            centre = jnp.array([y, x])  # scarlet2 is (y, x)
            try:
                spectrum, morph = sc2.init.from_gaussian_moments(
                    obs, centre, box_sizes=None if box_sizes is None else list(box_sizes),
                    min_snr=min_snr)
                if not (jnp.all(jnp.isfinite(spectrum)) and jnp.all(jnp.isfinite(morph))):
                    raise ValueError("non-finite moments")
                kinds.append("gaussian_moments")
            except ValueError:
                spectrum = sc2.init.pixel_spectrum(obs, centre)
                morph = sc2.init.compact_morphology()
                kinds.append("point_source")
            sc2.Source(centre, jnp.maximum(spectrum, _TINY), morph)

    spec_step = partial(sc2.relative_step, factor=spectrum_step)
    morph_step = partial(sc2.relative_step, factor=morphology_step)
    with sc2.Parameters(scene):
        for j, source in enumerate(scene.sources):
            sc2.Parameter(source.spectrum, name=f"spectrum:{j}", constraint=constraints.positive,
                          stepsize=spec_step)
            sc2.Parameter(source.morphology, name=f"morph:{j}",
                          constraint=constraints.unit_interval, stepsize=morph_step)

    state = {"steps": 0, "max_change": np.inf}

    def count(_scene: Any, convergence: Any, _loss: Any) -> None:
        state["steps"] += 1
        import jax

        state["max_change"] = float(jax.tree_util.tree_reduce(max, convergence))

    fitted = scene.fit(obs, max_iter=max_iter, e_rel=e_rel, progress_bar=False, callback=count)
    sources = []
    for (x, y), source, kind in zip(positions, fitted.sources, kinds):
        model = np.asarray(obs.render(fitted.evaluate_source(source)), dtype=np.float64)
        sources.append(Scarlet2Source(
            x=float(x), y=float(y), model=model,
            flux=np.asarray(sc2.measure.flux(source), dtype=np.float64),
            observed_flux=model.sum(axis=(-2, -1)), initialisation=kind))
    chi2 = float(obs.goodness_of_fit(fitted()))
    return Scarlet2Blend(sources=tuple(sources), cpu_seconds=time.process_time() - cpu0,
                         wall_seconds=time.perf_counter() - wall0, steps=state["steps"],
                         converged=state["max_change"] < e_rel, chi2=chi2)


# -- shapes ------------------------------------------------------------------------------------
def model_ellipticity(models: np.ndarray, bands: Sequence[str], label_bands: Sequence[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-weight moment distortion (e1, e2) of reconvolved models (N, bands, H, W) summed
    over ``label_bands``, pixel frame: the labels' and ``recon_moments``' estimator."""
    return moments_estimator(np.asarray(models), bands, label_bands)
