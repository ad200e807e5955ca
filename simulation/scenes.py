"""Drawing scenes with BTK: the three aligned image sets of every sample (SPEC section 2).

For each scene BTK draws the blend (with its noise model) and each galaxy alone, noiseless.
From that we keep
- ``clean``: the target alone, noiseless (BTK's isolated image of row 0);
- ``noisy``: the same target image plus an independent realisation of BTK's noise model
  (galaxy Poisson noise, then sky-background Poisson noise with the mean sky subtracted),
  drawn with GalSim's noise classes exactly as BTK draws the blend's;
- ``blend``: BTK's noisy blend.
All three are float32 (bands, H, W) in electrons, pixel frame.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import btk
import galsim
import numpy as np
from astropy.table import Table

from deblend.core.config import ConditionsConfig
from deblend.core.homogenize import homogenize
from simulation.centring import crop_around, detection_offsets
from simulation.conditions import Conditions, SurveyConditions, sky_residual, stack_conditions
from simulation.morphology import MorphologyGenerator
from simulation.sampling import CentralTargetSampling
from simulation.surveys import SurveyGeometry, sky_levels


@dataclass
class SceneBatch:
    """Images (N, bands, H, W) float32 in electrons, and each scene's BTK table (row 0 = target)."""

    clean: np.ndarray
    noisy: np.ndarray
    blend: np.ndarray
    tables: list[Table]
    isolated: np.ndarray | None = None
    """(N, max galaxies, bands, H, W) every galaxy alone, noiseless; kept only on request."""
    offsets: np.ndarray | None = None
    """(N, 2) int pixels (dx, dy) of the stamp centre from the target's true position, with
    detection-centred stamps (:mod:`simulation.centring`); None: centred on the truth."""
    detected: np.ndarray | None = None
    """(N,) bool: the target was detected (else its stamp keeps the true centre)."""
    conditions: dict[str, np.ndarray] | None = None
    """Drawn under ``simulation.conditions``: the :data:`simulation.conditions.CONDITION_COLUMNS`,
    each (N, bands); None: the survey's nominal conditions."""
    psf: np.ndarray | None = None
    """Drawn under ``simulation.conditions``: (N, bands, S, S) float32 effective PSF of each
    scene and band, unit sum, centred at (S-1)/2 (S the stamp's pixels)."""


def homogenized(scenes: SceneBatch, target_sigma: Sequence[float], nominal_psfs: np.ndarray,
                nominal_sky: np.ndarray, seed: int) -> SceneBatch:
    """``scenes`` with every image at the round Gaussian target of ``target_sigma`` (pixels, per
    band; ``simulation.target_psf_fwhm``): each deconvolved by its scene's PSF (``scenes.psf``,
    else ``nominal_psfs`` (bands, S, S)) and reconvolved (:func:`deblend.core.homogenize.
    homogenize`). The noisy sets get metacal's correction noise, as metacal's noshear image
    has it: an independent field of the sky's variance (``scenes.conditions["sky_level"]``,
    else ``nominal_sky``), one per set, drawn from ``seed``; the noiseless target is extended
    by zeros, the noisy sets by reflection."""
    n = len(scenes.clean)
    psfs = (scenes.psf.astype(np.float64) if scenes.psf is not None
            else np.broadcast_to(nominal_psfs, (n,) + nominal_psfs.shape))
    sky = (scenes.conditions["sky_level"] if scenes.conditions is not None
           else np.broadcast_to(nominal_sky, (n, len(nominal_sky))))
    rng = np.random.default_rng([seed, 23])
    sigma = np.sqrt(np.asarray(sky, np.float64))[:, :, None, None]
    out = {"clean": homogenize(scenes.clean, psfs, target_sigma, edge="zero")}
    for name in ("noisy", "blend"):
        images = getattr(scenes, name)
        out[name] = homogenize(images, psfs, target_sigma, edge="reflect",
                               noise=rng.normal(size=images.shape) * sigma)
    return dataclasses.replace(scenes, **out)


def add_btk_noise(images: np.ndarray, sky_level: float, seed: int, noise: str) -> np.ndarray:
    """One noise realisation of BTK's model on noiseless single-band images (electrons/pixel).

    ``images`` is (..., H, W); all of them are noised in one GalSim call on a stacked image
    (every pixel gets an independent draw). ``noise`` is BTK's ``add_noise``: "all", "galaxy",
    "background" or "none".
    """
    shape = images.shape
    stacked = galsim.Image(np.array(images, dtype=np.float64).reshape(-1, shape[-1]))
    if noise in ("galaxy", "all"):
        stacked.addNoise(galsim.PoissonNoise(rng=galsim.BaseDeviate(seed), sky_level=0.0))
    if noise in ("background", "all"):
        background = galsim.Image(np.zeros(stacked.array.shape))
        background.addNoise(galsim.PoissonNoise(rng=galsim.BaseDeviate(seed + 1),
                                                sky_level=sky_level))
        stacked += background
    return stacked.array.reshape(shape)


class SceneDrawer:
    """Draws batches of scenes for one survey from one catalog, reproducibly from a seed."""

    def __init__(self, catalog: btk.catalog.CatsimCatalog, survey: btk.survey.Survey,
                 geometry: SurveyGeometry, sampling: CentralTargetSampling, *, batch_size: int,
                 noise: str, apply_shear: bool, seed: int, keep_isolated: bool = False,
                 stamp_pixels: int | None = None,
                 conditions: ConditionsConfig | None = None) -> None:
        """``geometry`` is the canvas BTK draws; with ``stamp_pixels`` smaller than its stamp,
        every scene is cut to ``stamp_pixels`` around the detected target
        (:mod:`simulation.centring`). With ``conditions``, every scene draws its own
        (:mod:`simulation.conditions`; rotated twins share them) on a copy of ``survey``, one
        scene per BTK batch (``batch_size`` must then be 1)."""
        if conditions is not None:
            if batch_size != 1:
                raise ValueError(f"scenes drawn under conditions are drawn one per BTK batch "
                                 f"(batch_size 1), got batch_size={batch_size}")
            survey = copy.deepcopy(survey)
        self.survey = survey
        self.geometry = geometry
        self.stamp_pixels = stamp_pixels if stamp_pixels is not None else geometry.stamp_pixels
        self.noise = noise
        self.keep_isolated = keep_isolated
        generator = (MorphologyGenerator if getattr(sampling, "morphology", None) is not None
                     else btk.draw_blends.CatsimGenerator)
        self.generator = generator(
            catalog, sampling, survey, batch_size=batch_size, njobs=1, add_noise=noise,
            seed=seed, apply_shear=apply_shear, augment_data=False)
        self._noise_seeds = np.random.SeedSequence([seed, 7])
        self.sky_levels = [float(level) for level in sky_levels(geometry.name, geometry.bands)]
        self.conditions = conditions
        if conditions is not None:
            self.rotated_twins = sampling.rotated_twins
            self.survey_conditions = SurveyConditions(geometry.name, geometry.bands)
            self._conditions_rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
            self._scenes_drawn = 0
            self._current: Conditions | None = None

    def draw(self) -> SceneBatch:
        """Draw one BTK batch of scenes (one scene under its own conditions, with them)."""
        levels = self.sky_levels if self.conditions is None else self._next_conditions()
        batch = next(self.generator)
        blend = batch.blend_images.astype(np.float32)
        isolated = batch.isolated_images
        clean = isolated[:, 0].astype(np.float32)
        seeds = self._noise_seeds.spawn(1)[0].generate_state(clean.shape[1]) % (2**31 - 2)
        noisy = np.empty_like(clean)
        for b, (sky, seed) in enumerate(zip(levels, seeds)):
            noisy[:, b] = add_btk_noise(clean[:, b], sky, int(seed), self.noise)
        scenes = SceneBatch(clean=clean, noisy=noisy, blend=blend,
                            tables=list(batch.catalog_list),
                            isolated=isolated.astype(np.float32) if self.keep_isolated else None)
        if self.conditions is not None:
            current = self._current
            if np.any(current.sky_residual):
                residual = sky_residual(clean.shape[2:], current.sky_residual,
                                        current.sky_residual_angle, np.sqrt(levels),
                                        (self.stamp_pixels - 1) / 2).astype(np.float32)
                scenes.noisy += residual
                scenes.blend += residual
            scenes.conditions = stack_conditions([current], [levels])
            scenes.psf = self.survey_conditions.psf_images(
                current, self.stamp_pixels)[None].astype(np.float32)
        if self.stamp_pixels == self.geometry.stamp_pixels:
            return scenes
        return centre_on_detection(scenes, np.array(levels), self.geometry.bands,
                                   self.stamp_pixels)

    def _next_conditions(self) -> list[float]:
        """Draw the next scene's conditions (a rotated twin keeps its original's), set them on
        the generator's survey, and return its sky levels."""
        if self._current is None or not (self.rotated_twins and self._scenes_drawn % 2 == 1):
            self._current = self.survey_conditions.draw(self.conditions, self._conditions_rng)
        self._scenes_drawn += 1
        self.survey_conditions.apply(self.survey, self._current)
        return [float(x) for x in self.survey_conditions.sky_levels(self.survey)]


def centre_on_detection(scenes: SceneBatch, sky_levels: np.ndarray, bands: tuple[str, ...],
                        stamp_pixels: int) -> SceneBatch:
    """``scenes`` drawn on a wider canvas, each image set cut to ``stamp_pixels`` around the
    target's detection in the blend (:func:`simulation.centring.detection_offsets`)."""
    offsets, detected = detection_offsets(scenes.blend, sky_levels, bands)
    cut = {name: None if images is None else crop_around(images, offsets, stamp_pixels)
           for name, images in (("clean", scenes.clean), ("noisy", scenes.noisy),
                                ("blend", scenes.blend), ("isolated", scenes.isolated))}
    return SceneBatch(tables=scenes.tables, offsets=offsets, detected=detected,
                      conditions=scenes.conditions, psf=scenes.psf, **cut)
