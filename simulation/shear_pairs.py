"""Paired +g / -g shear populations for the shear benchmark (one entry point, two populations).

Each scene is drawn twice, at +g and at -g, with the same galaxies, the same unsheared positions
and the same noise. The shear acts on the whole scene, a sheared sky: every profile AND every
position relative to the target (the stamp centre, the shear centre) is sheared, positions by
GalSim's area-preserving matrix ``galsim.Shear(g1=, g2=).getMatrix()``. Scenes come in rotated
twins (scene 2k+1 = scene 2k rotated by 90 degrees about the centre, before the shear).

Populations:

- ``"btk"``: BTK scenes of a :class:`~deblend.core.config.SimulationConfig` (default: the
  embedded catalog of ``Config().simulation``) through :class:`simulation.builder.SceneSource`,
  with ``shear=+-g``, ``rotated_twins=True``, ``noise="none"`` and sheared positions
  (``CentralTargetSampling(shear_positions=True)``). The sampling's random draws do not depend on
  the shear, so one seed gives the same galaxies at +g and -g.
- ``"galsim"``: :class:`simulation.galsim_population.GalSimPopulation`, a bulge+disk population
  drawn directly with GalSim that no network saw, with the survey's PSFs dilated by
  ``psf_scale`` (and, optionally, sheared by ``psf_shear``; its galaxies optionally real ones from
  ``real_catalog``); survey, stamp size and the neighbours' count and radius range come from
  ``sim``.

Noise (the same for +g and -g): a Gaussian approximation of BTK's Poisson model on
sky-subtracted images (BTK's images are sky-subtracted too),

    noisy = image + sqrt(sky_level + max(image, 0)) * z,

with z a standard-normal field (bands, H, W) drawn from ``SeedSequence([seed, 1, population,
scene index])`` (population 0 = btk, 1 = galsim), identical for +g and -g, so the noise cancels in
plus - minus except for the O(g) change of its amplitude where galaxies are. (GalSim's Poisson
draws go out of step when the mean changes, so they cannot be shared between +g and -g.)
``correction_noise`` = sqrt(sky_level) * z' with an independent z' from the same seed sequence:
sky variance only, for metacalibration's noise correction.

Other observing conditions are built from the noiseless pairs: :func:`scale_exposure` (another
depth) and :func:`observe_pairs` (the noise above).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deblend.core.config import Config, SimulationConfig
from simulation.builder import SceneSource
from simulation.galsim_population import (
    GalSimPopulation,
    PopulationSpec,
    draw_psf_images,
    survey_psfs,
)
from simulation.conditions import at_nominal_conditions
from simulation.surveys import psf_images, sky_levels

POPULATIONS = ("btk", "galsim")
MAX_SHEAR = 0.1
"""|g| must stay below this (the benchmark's shears are small; positions and profiles are
sheared exactly, but the scenes are built for weak shear)."""
PSF_SCALE_RANGE = (0.9, 1.1)
"""Allowed PSF dilation factors by default (the PSF FWHM within +-10% of the survey's); a caller
that means to go further passes its own ``psf_scale_range``."""


@dataclass(frozen=True)
class ShearPairBatch:
    """n scenes, each drawn at +g and at -g with the same galaxies, positions (sheared with the
    scene) and noise."""

    plus: np.ndarray
    """(n, bands, H, W) float32 noisy blend at +g (electrons)"""
    minus: np.ndarray
    """(n, bands, H, W) float32 noisy blend at -g"""
    correction_noise: np.ndarray
    """(n, bands, H, W) float32 an independent noise field with the sky variance only (for
    metacal's noise correction)"""
    psfs: np.ndarray
    """(bands, S, S) float64 effective PSF images (PSF x pixel, unit sum, centred at (S-1)/2) of
    this batch, S = stamp size"""
    sky_variance: np.ndarray
    """(bands,) sky noise variance per pixel, electrons^2"""
    g: tuple[float, float]
    bands: tuple[str, ...]
    n_galaxies: np.ndarray
    """(n,) int, galaxies in the scene incl. the target"""
    neighbour_distance: np.ndarray
    """(n,) float, pixels from the target to the nearest neighbour in the UNSHEARED scene (the
    same for +g and -g, so cuts on it keep pairs together); inf when alone"""
    target_snr: np.ndarray
    """(n,) float, S/N of the noiseless isolated target: with I the target image summed over the
    label bands (r, i, z by default; electrons) and B the sum of their sky levels,
    sqrt(sum over pixels of I^2 / (B + I)), I the mean of the +g and -g images (the unsheared
    target to first order; the same value for both members of a pair)"""
    twin: np.ndarray
    """(n,) int 0/1: 1 for the 90-degree-rotated twin of the previous scene"""


@dataclass(frozen=True)
class NoiselessPairs:
    """The noiseless scenes behind a :class:`ShearPairBatch` (float32, electrons, pixel frame)."""

    plus_blend: np.ndarray
    """(n, bands, H, W) the blend at +g"""
    minus_blend: np.ndarray
    plus_target: np.ndarray
    """(n, bands, H, W) the target alone at +g"""
    minus_target: np.ndarray
    offsets: list[np.ndarray]
    """per scene, (n_galaxies, 2) unsheared offsets (x, y) from the target in arcsec (row 0 the
    target, (0, 0)); at shear g the offsets are ``offsets @ S(g).T``"""
    psfs: np.ndarray
    sky_levels: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    label_bands: tuple[str, ...]
    twin: np.ndarray


def draw_shear_pairs(population: Literal["btk", "galsim"], n: int, seed: int,
                     g: tuple[float, float], *, neighbours: bool,
                     sim: SimulationConfig | None = None, psf_scale: float = 1.0,
                     psf_scale_range: tuple[float, float] = PSF_SCALE_RANGE,
                     psf_shear: tuple[float, float] = (0.0, 0.0),
                     real_catalog: str | None = None) -> ShearPairBatch:
    """``n`` scenes (even: rotated-twin pairs) of ``population``, each at +g and -g, with noise.

    ``sim``: the simulation config (default ``Config().simulation``): the BTK scenes, and for
    both populations the survey, stamp size and label bands (and, for ``"galsim"``, the
    neighbours' count range and radius range). ``neighbours=False`` draws isolated targets.
    ``psf_scale`` dilates every band's PSF (within ``psf_scale_range``, by default [0.9, 1.1]).
    ``"galsim"`` only: ``psf_shear`` shears every band's PSF by a reduced shear (pixel frame),
    ``real_catalog`` replaces its galaxies by those of a GalSim real-galaxy catalogue
    (:class:`~simulation.galsim_population.GalSimPopulation`). Same arguments, same bytes.
    """
    pairs = draw_noiseless_pairs(population, n, seed, g, neighbours=neighbours, sim=sim,
                                 psf_scale=psf_scale, psf_scale_range=psf_scale_range,
                                 psf_shear=psf_shear, real_catalog=real_catalog)
    return observe_pairs(pairs, seed, population, g)


def observe_pairs(pairs: NoiselessPairs, seed: int, population: Literal["btk", "galsim"],
                  g: tuple[float, float]) -> ShearPairBatch:
    """The noisy :class:`ShearPairBatch` of noiseless ``pairs`` drawn at shear ``g``: scene i's
    noise from :func:`noise_fields` of (``seed``, ``population``, i), the same for +g and -g."""
    shape = pairs.plus_blend.shape
    plus = np.empty(shape, np.float32)
    minus = np.empty(shape, np.float32)
    correction = np.empty(shape, np.float32)
    sky = pairs.sky_levels[:, None, None]
    for i in range(shape[0]):
        z, z_correction = noise_fields(seed, population, i, shape[1:])
        plus[i] = add_noise(pairs.plus_blend[i], pairs.sky_levels, z)
        minus[i] = add_noise(pairs.minus_blend[i], pairs.sky_levels, z)
        correction[i] = np.sqrt(sky) * z_correction
    label = [pairs.bands.index(b) for b in pairs.label_bands]
    target = 0.5 * (pairs.plus_target[:, label].astype(np.float64)
                    + pairs.minus_target[:, label].astype(np.float64)).sum(axis=1)
    sky_label = float(pairs.sky_levels[label].sum())
    snr = np.sqrt(np.sum(target ** 2 / (sky_label + np.maximum(target, 0.0)), axis=(1, 2)))
    distance = np.array([np.min(np.hypot(o[1:, 0], o[1:, 1])) / pairs.pixel_scale
                         if len(o) > 1 else np.inf for o in pairs.offsets])
    return ShearPairBatch(
        plus=plus, minus=minus, correction_noise=correction, psfs=pairs.psfs,
        sky_variance=pairs.sky_levels.copy(), g=(float(g[0]), float(g[1])), bands=pairs.bands,
        n_galaxies=np.array([len(o) for o in pairs.offsets], int),
        neighbour_distance=distance, target_snr=snr, twin=pairs.twin)


def scale_exposure(pairs: NoiselessPairs, factor: float) -> NoiselessPairs:
    """The same scenes observed ``factor`` times as long: every image (electrons) and the sky
    levels multiplied by ``factor`` (a depth of ``factor`` times the survey's; the noise of
    :func:`observe_pairs` then grows as sqrt(factor), the signal-to-noise too)."""
    factor = float(factor)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"the exposure factor must be a finite number > 0, got {factor!r}")
    return dataclasses.replace(
        pairs, plus_blend=pairs.plus_blend * np.float32(factor),
        minus_blend=pairs.minus_blend * np.float32(factor),
        plus_target=pairs.plus_target * np.float32(factor),
        minus_target=pairs.minus_target * np.float32(factor),
        sky_levels=pairs.sky_levels * factor)


def noise_fields(seed: int, population: str, index: int, shape: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index``'s two standard-normal fields (z for the images, z' for the correction)."""
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), 1, POPULATIONS.index(population), int(index)]))
    return rng.standard_normal(shape), rng.standard_normal(shape)


def add_noise(image: np.ndarray, sky_levels: np.ndarray, z: np.ndarray) -> np.ndarray:
    """image + sqrt(sky + max(image, 0)) * z per band (``image`` (bands, H, W), electrons)."""
    image = np.asarray(image, np.float64)
    return image + np.sqrt(np.asarray(sky_levels, np.float64)[:, None, None]
                           + np.maximum(image, 0.0)) * z


def draw_noiseless_pairs(population: Literal["btk", "galsim"], n: int, seed: int,
                         g: tuple[float, float], *, neighbours: bool,
                         sim: SimulationConfig | None = None, psf_scale: float = 1.0,
                         psf_scale_range: tuple[float, float] = PSF_SCALE_RANGE,
                         psf_shear: tuple[float, float] = (0.0, 0.0),
                         real_catalog: str | None = None,
                         real_rows: Literal["all", "held_out"] = "all") -> NoiselessPairs:
    """The noiseless +g / -g scenes of :func:`draw_shear_pairs` (same arguments); ``real_rows``:
    all of ``real_catalog``'s galaxies, or only the half training never draws
    (:func:`~simulation.galsim_population.real_galaxy_split`)."""
    g = _check(population, n, seed, g, neighbours, sim, psf_scale, psf_scale_range)
    sim = sim if sim is not None else Config().simulation
    if population == "btk":
        if tuple(psf_shear) != (0.0, 0.0) or real_catalog is not None:
            raise ValueError("psf_shear and real_catalog are options of the galsim population")
        return _btk_pairs(n, seed, g, neighbours, sim, float(psf_scale))
    return _galsim_pairs(n, seed, g, neighbours, sim, float(psf_scale),
                         (float(psf_shear[0]), float(psf_shear[1])), real_catalog, real_rows)


def _check(population, n, seed, g, neighbours, sim, psf_scale, psf_scale_range
           ) -> tuple[float, float]:
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}: expected one of {POPULATIONS}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
        raise ValueError(f"n must be a positive even integer (rotated-twin pairs), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        g1, g2 = (float(x) for x in g)
    except (TypeError, ValueError):
        raise ValueError(f"g must be a pair of numbers (g1, g2), got {g!r}") from None
    if not (math.isfinite(g1) and math.isfinite(g2)) or math.hypot(g1, g2) >= MAX_SHEAR:
        raise ValueError(f"the shear must satisfy |g| < {MAX_SHEAR}, got g = {g!r}")
    if not isinstance(neighbours, (bool, np.bool_)):  # a ValueError, as for the other arguments
        raise ValueError(f"neighbours must be True or False, got {neighbours!r}")  # noqa: TRY004
    if sim is not None and not isinstance(sim, SimulationConfig):
        raise TypeError(f"sim must be a SimulationConfig or None, got {type(sim).__name__}")
    low, high = (float(x) for x in psf_scale_range)
    if not 0 < low <= high < math.inf:
        raise ValueError(f"psf_scale_range must be (low, high) with 0 < low <= high, got "
                         f"{psf_scale_range!r}")
    if (isinstance(psf_scale, bool) or not isinstance(psf_scale, (int, float, np.floating))
            or not low <= psf_scale <= high):
        raise ValueError(f"psf_scale must be a number in [{low:g}, {high:g}], got {psf_scale!r}")
    return g1, g2


def _btk_pairs(n: int, seed: int, g: tuple[float, float], neighbours: bool,
               sim: SimulationConfig, psf_scale: float) -> NoiselessPairs:
    batch = min(n, sim.btk_batch_size + sim.btk_batch_size % 2)  # even, for the twins
    changes: dict = {"shear": g, "rotated_twins": True, "noise": "none", "btk_batch_size": batch}
    if not neighbours:
        changes.update(min_neighbours=0, max_neighbours=0)
    plus_sim = dataclasses.replace(at_nominal_conditions(sim), **changes)
    source = SceneSource(plus_sim)
    if psf_scale != 1.0:
        for band in source.geometry.bands:  # SceneSource's own survey object, a fresh one
            filt = source.survey.get_filter(band)
            filt.psf = survey_psfs(plus_sim.survey, (band,), psf_scale)[0]
    minus_source = copy.copy(source)  # the same catalog and survey; only the shear differs
    minus_source.sim = dataclasses.replace(plus_sim, shear=(-g[0], -g[1]))
    plus_blend, plus_target, plus_tables = _btk_draw(source, n, seed)
    minus_blend, minus_target, minus_tables = _btk_draw(minus_source, n, seed)
    offsets = []
    for k, (tp, tm) in enumerate(zip(plus_tables, minus_tables)):
        op, om = _unsheared_offsets(tp), _unsheared_offsets(tm)
        if op.shape != om.shape or not np.allclose(op, om, rtol=0, atol=1e-9):
            raise RuntimeError(f"scene {k}: the +g and -g draws have different galaxies")
        offsets.append(op)
    bands = source.geometry.bands
    if psf_scale == 1.0:
        psfs = psf_images(plus_sim.survey, bands, plus_sim.stamp_pixels)
    else:
        psfs = draw_psf_images([source.survey.get_filter(b).psf for b in bands],
                               source.geometry.pixel_scale, plus_sim.stamp_pixels)
    sky = sky_levels(plus_sim.survey, bands)
    return NoiselessPairs(
        plus_blend=plus_blend, minus_blend=minus_blend, plus_target=plus_target,
        minus_target=minus_target, offsets=offsets, psfs=np.array(psfs, np.float64),
        sky_levels=sky, bands=bands, pixel_scale=source.geometry.pixel_scale,
        label_bands=tuple(plus_sim.label_bands),
        twin=np.array([int(t["twin"][0]) for t in plus_tables], int))


def _btk_draw(source: SceneSource, n: int, seed: int):
    drawer = source.drawer(seed, shear_positions=True)
    blends, targets, tables = [], [], []
    drawn = 0
    while drawn < n:
        batch = drawer.draw()
        blends.append(batch.blend)
        targets.append(batch.clean)
        tables += batch.tables
        drawn += len(batch.tables)
    return (np.concatenate(blends)[:n], np.concatenate(targets)[:n], tables[:n])


def _unsheared_offsets(table) -> np.ndarray:
    if "ra_unsheared" in table.colnames:
        x, y = table["ra_unsheared"], table["dec_unsheared"]
    else:  # zero shear: the positions are the unsheared ones
        x, y = table["ra"], table["dec"]
    return np.stack([np.asarray(x, float), np.asarray(y, float)], axis=1)


def _galsim_pairs(n: int, seed: int, g: tuple[float, float], neighbours: bool,
                  sim: SimulationConfig, psf_scale: float, psf_shear: tuple[float, float],
                  real_catalog: str | None, real_rows: Literal["all", "held_out"]
                  ) -> NoiselessPairs:
    spec = PopulationSpec(ref_band="i", min_neighbours=sim.min_neighbours,
                          max_neighbours=sim.max_neighbours,
                          neighbour_shift=tuple(sim.neighbour_shift))
    pop = GalSimPopulation(sim.survey, sim.stamp_pixels, psf_scale, spec, psf_shear,
                           real_catalog, real_rows)
    scenes = pop.sample(n, seed, neighbours=neighbours)
    shape = (n, len(pop.bands), sim.stamp_pixels, sim.stamp_pixels)
    out = {k: np.empty(shape, np.float32) for k in ("pb", "pt", "mb", "mt")}
    minus = (-g[0], -g[1])
    for i, scene in enumerate(scenes):
        out["pb"][i], out["pt"][i] = pop.draw(scene, g)
        out["mb"][i], out["mt"][i] = pop.draw(scene, minus)
    return NoiselessPairs(
        plus_blend=out["pb"], minus_blend=out["mb"], plus_target=out["pt"],
        minus_target=out["mt"], offsets=[np.stack([s.ra, s.dec], axis=1) for s in scenes],
        psfs=pop.psf_images(), sky_levels=pop.sky_levels.copy(), bands=pop.bands,
        pixel_scale=pop.pixel_scale, label_bands=tuple(sim.label_bands),
        twin=np.array([s.twin for s in scenes], int))


__all__ = ["NoiselessPairs", "ShearPairBatch", "add_noise", "draw_noiseless_pairs",
           "draw_shear_pairs", "noise_fields", "observe_pairs", "scale_exposure"]
