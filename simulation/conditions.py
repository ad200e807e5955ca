"""Observing conditions of a scene: each band's PSF, depth and availability (issue 23).

A survey's images differ from scene to scene: the PSF's size and ellipticity, the depth (how long
the sky was observed), which bands exist. With ``simulation.conditions`` set
(:class:`deblend.core.config.ConditionsConfig`), every training scene draws its own
:class:`Conditions`, BTK draws it under them, and the dataset stores them (label columns of shape
(N, bands)) with the PSF image of every scene and band. Without it, every scene has the survey's
nominal conditions (:meth:`SurveyConditions.nominal`), which is what datasets written before
stored implicitly.

Conventions, per band b:

- PSF: the survey's PSF profile (BTK's, e.g. LSST's Kolmogorov x Airy) dilated to FWHM
  ``psf_fwhm[b]`` (arcsec, the profile without the pixel, before the shear), then sheared by the
  reduced shear (``psf_g1[b]``, ``psf_g2[b]``) (pixel frame, area kept): |g| = (a - b)/(a + b).
- depth: ``years[b]`` of the survey's full depth (:data:`NOMINAL_YEARS`); the exposure time, the
  source counts and the sky level all scale as ``years / NOMINAL_YEARS`` (surveycodex's
  ``mag2counts`` and ``mean_sky_level`` with the scaled exposure time, as BTK calls them).
- ``sky_level[b]``: the mean sky level, electrons per pixel (the sky noise variance).
- ``available[b]``: False for a band the scene is taken to lack; its images are drawn as any
  other, and training fills it as inference fills a missing band.
- ``sky_residual[b]``, ``sky_residual_angle[b]``: a sky-subtraction residual left in the noisy
  images (:func:`sky_residual`): level in units of the band's sky noise sigma, and the direction
  (radians from +x) of its gradient.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import btk
import galsim
import numpy as np

from deblend.core.config import ConditionsConfig, SimulationConfig
from simulation.galsim_population import dilated, draw_psf_images, sheared, survey_psfs
from simulation.surveys import get_survey, survey_sky_levels

NOMINAL_YEARS = {"LSST": 10.0, "DES": 6.0}
"""Years of each survey's full depth: the exposure time of surveycodex's definition."""
FWHM_BAND = "r"
"""The band whose FWHM ``simulation.conditions.psf_fwhm`` draws (every band dilates with it)."""
CONDITION_COLUMNS = ("psf_fwhm", "psf_g1", "psf_g2", "years", "sky_level", "available",
                     "sky_residual", "sky_residual_angle")
"""The label columns (N, bands) a dataset drawn under conditions stores."""
CONDITION_DESCRIPTIONS = {
    "psf_fwhm": "with simulation.conditions: (N, bands) FWHM of each band's PSF profile (without "
                "the pixel, before its shear), arcsec",
    "psf_g1, psf_g2": "with simulation.conditions: (N, bands) reduced shear of each band's PSF, "
                      "pixel frame",
    "years": "with simulation.conditions: (N, bands) depth, years of the survey's full depth",
    "sky_level": "with simulation.conditions: (N, bands) mean sky level, electrons per pixel",
    "available": "with simulation.conditions: (N, bands) 1 where the band is available, 0 where "
                 "the scene is taken to lack it (drawn all the same)",
    "sky_residual, sky_residual_angle": "with simulation.conditions: (N, bands) sky-subtraction "
                                        "residual in the noisy images: level (sky sigma) and "
                                        "gradient direction (radians from +x)",
}


@dataclass(frozen=True)
class Conditions:
    """One scene's conditions: arrays of one value per band, in the survey's band order."""

    psf_fwhm: np.ndarray
    psf_g1: np.ndarray
    psf_g2: np.ndarray
    years: np.ndarray
    available: np.ndarray
    sky_residual: np.ndarray
    """level of the sky-subtraction residual, sky sigma (0: none)"""
    sky_residual_angle: np.ndarray
    """direction of its gradient, radians from +x (pixel frame)"""


class SurveyConditions:
    """The conditions of one survey's scenes: nominal ones, random draws, and what they mean
    (each band's PSF, exposure time and sky level)."""

    def __init__(self, survey_name: str, bands: Sequence[str] | None = None) -> None:
        if survey_name not in NOMINAL_YEARS:
            raise ValueError(f"no nominal depth for survey '{survey_name}' "
                             f"(known: {', '.join(NOMINAL_YEARS)})")
        self.survey_name = survey_name
        survey = get_survey(survey_name)
        self.bands = tuple(bands) if bands is not None else tuple(survey.available_filters)
        self.pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
        self.nominal_years = NOMINAL_YEARS[survey_name]
        self._profiles = survey_psfs(survey_name, self.bands)
        self.nominal_fwhm = np.array(nominal_fwhm(survey_name, self.bands))
        self._exposure = [survey.get_filter(b).full_exposure_time for b in self.bands]
        self._reference = (self.bands.index(FWHM_BAND) if FWHM_BAND in self.bands else 0)

    def nominal(self) -> Conditions:
        """The survey's own conditions: its PSFs, full depth, every band."""
        n = len(self.bands)
        return Conditions(psf_fwhm=self.nominal_fwhm.copy(), psf_g1=np.zeros(n),
                          psf_g2=np.zeros(n), years=np.full(n, self.nominal_years),
                          available=np.ones(n, bool), sky_residual=np.zeros(n),
                          sky_residual_angle=np.zeros(n))

    def draw(self, config: ConditionsConfig, rng: np.random.Generator) -> Conditions:
        """A random scene's conditions (the rules of :class:`ConditionsConfig`)."""
        n = len(self.bands)
        fwhm = rng.uniform(*config.psf_fwhm)
        scale = fwhm / self.nominal_fwhm[self._reference]
        jitter = 1.0 + rng.uniform(-config.psf_fwhm_band_scatter, config.psf_fwhm_band_scatter, n)
        modulus = config.psf_g_max * np.sqrt(rng.uniform())
        angle = rng.uniform(0.0, 2.0 * np.pi)
        lo, hi = np.log(config.depth_years)
        years = np.exp(rng.uniform(lo, hi)
                       + rng.uniform(-config.depth_band_scatter, config.depth_band_scatter, n))
        available = rng.uniform(size=n) >= config.band_missing
        if not available.any():
            available[rng.integers(n)] = True
        residual = residual_angle = np.zeros(n)
        if config.sky_residual > 0:  # drawn only when asked: other draws keep their values
            residual = rng.uniform(-config.sky_residual, config.sky_residual, n)
            residual_angle = rng.uniform(0.0, 2.0 * np.pi, n)
        return Conditions(psf_fwhm=self.nominal_fwhm * scale * jitter,
                          psf_g1=np.full(n, modulus * np.cos(angle)),
                          psf_g2=np.full(n, modulus * np.sin(angle)), years=years,
                          available=available, sky_residual=residual,
                          sky_residual_angle=residual_angle)

    def psfs(self, conditions: Conditions) -> list[galsim.GSObject]:
        """Each band's GalSim PSF profile under ``conditions`` (without the pixel)."""
        return [sheared(dilated(profile, float(conditions.psf_fwhm[b] / self.nominal_fwhm[b])),
                        (float(conditions.psf_g1[b]), float(conditions.psf_g2[b])))
                for b, profile in enumerate(self._profiles)]

    def psf_images(self, conditions: Conditions, stamp_pixels: int) -> np.ndarray:
        """(bands, S, S) float64 effective PSFs (profile x pixel), unit sum, centred at (S-1)/2,
        drawn as :func:`simulation.surveys.psf_images` draws the survey's."""
        return draw_psf_images(self.psfs(conditions), self.pixel_scale, stamp_pixels)

    def exposure_scale(self, conditions: Conditions) -> np.ndarray:
        """(bands,) exposure time over the survey's full one."""
        return np.asarray(conditions.years, np.float64) / self.nominal_years

    def survey(self, conditions: Conditions) -> btk.survey.Survey:
        """A BTK survey of its own whose filters carry ``conditions``: each band's PSF profile
        and its exposure time scaled by :meth:`exposure_scale` (so BTK's source counts and sky
        level follow the depth). The survey of :func:`simulation.surveys.get_survey` is not
        touched."""
        survey = copy.deepcopy(get_survey(self.survey_name))
        self.apply(survey, conditions)
        return survey

    def apply(self, survey: btk.survey.Survey, conditions: Conditions) -> None:
        """Set ``conditions`` on the filters of ``survey`` (a BTK survey this class owns)."""
        for band, psf, exposure, scale in zip(self.bands, self.psfs(conditions), self._exposure,
                                              self.exposure_scale(conditions)):
            filt = survey.get_filter(band)
            filt.psf = psf
            filt.full_exposure_time = exposure * float(scale)

    def sky_levels(self, survey: btk.survey.Survey) -> np.ndarray:
        """(bands,) mean sky level (electrons per pixel) of ``survey`` as BTK computes it."""
        return survey_sky_levels(survey, self.bands)


def sky_residual(shape: tuple[int, int], level: np.ndarray, angle: np.ndarray,
                 sigma: np.ndarray, half_width: float) -> np.ndarray:
    """(bands, H, W) sky-subtraction residual, electrons per pixel: per band b,
    ``level[b] sigma[b] (1 + (x cos angle[b] + y sin angle[b]) / half_width)``, (x, y) pixels from
    the image centre ((W-1)/2, (H-1)/2; x along axis 1), ``sigma[b]`` the band's sky noise per
    pixel: a constant of ``level`` sigma plus a gradient of ``level`` sigma per ``half_width``
    pixels."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w] - np.array([(h - 1) / 2, (w - 1) / 2])[:, None, None]
    level, angle, sigma = (np.asarray(a, np.float64)[:, None, None] for a in (level, angle, sigma))
    return level * sigma * (1.0 + (x * np.cos(angle) + y * np.sin(angle)) / half_width)


def at_nominal_conditions(sim: SimulationConfig) -> SimulationConfig:
    """``sim`` with every scene at the survey's nominal conditions (``conditions`` off) and
    CatSim's own targets (no ``bright`` ones): how the benchmarks draw their own populations,
    whatever the training drew, so that their figures and PSF images mean the same for every
    model."""
    return dataclasses.replace(sim, conditions=None, bright=None)


@lru_cache(maxsize=16)
def nominal_fwhm(survey_name: str, bands: tuple[str, ...]) -> tuple[float, ...]:
    """FWHM (arcsec) of each band's PSF profile in ``survey_name``'s definition (no pixel)."""
    return tuple(float(p.calculateFWHM()) for p in survey_psfs(survey_name, bands))


def stack_conditions(items: Sequence[Conditions], sky_levels: Sequence[np.ndarray]
                     ) -> dict[str, np.ndarray]:
    """The :data:`CONDITION_COLUMNS` of scenes drawn under ``items`` (each (N, bands))."""
    return {"psf_fwhm": np.array([c.psf_fwhm for c in items], np.float64),
            "psf_g1": np.array([c.psf_g1 for c in items], np.float64),
            "psf_g2": np.array([c.psf_g2 for c in items], np.float64),
            "years": np.array([c.years for c in items], np.float64),
            "sky_level": np.array(sky_levels, np.float64),
            "available": np.array([c.available for c in items], np.uint8),
            "sky_residual": np.array([c.sky_residual for c in items], np.float64),
            "sky_residual_angle": np.array([c.sky_residual_angle for c in items], np.float64)}


def conditions_of(columns: dict[str, np.ndarray], index: int) -> Conditions:
    """Scene ``index``'s :class:`Conditions` from stored :data:`CONDITION_COLUMNS`."""
    return Conditions(**{name: np.asarray(columns[name][index], np.float64)
                         for name in ("psf_fwhm", "psf_g1", "psf_g2", "years", "sky_residual",
                                      "sky_residual_angle")},
                      available=np.asarray(columns["available"][index]).astype(bool))
