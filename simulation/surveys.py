"""Surveys known to deblend: BTK/surveycodex survey objects and their stamp geometry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import btk
import galsim
import numpy as np
from surveycodex.utilities import mag2counts, mean_sky_level

KNOWN_SURVEYS = ("LSST", "DES")


@dataclass(frozen=True)
class SurveyGeometry:
    """Bands and pixel grid of a survey's stamps (pixel frame: x to the right, y up)."""

    name: str
    bands: tuple[str, ...]
    pixel_scale: float
    """arcsec per pixel"""
    stamp_pixels: int

    @property
    def stamp_arcsec(self) -> float:
        """BTK stamp size (arcsec) that BTK turns back into exactly ``stamp_pixels`` pixels.

        BTK computes ``int(stamp_size / pixel_scale)``; half a pixel of margin keeps that
        integer exact despite floating-point rounding (e.g. DES's 0.2637").
        """
        return (self.stamp_pixels + 0.5) * self.pixel_scale


def get_survey(name: str) -> btk.survey.Survey:
    """The BTK survey object (with its default PSFs) for ``name``; clear error if unknown."""
    if name not in KNOWN_SURVEYS:
        raise ValueError(f"unknown survey '{name}': known surveys are {', '.join(KNOWN_SURVEYS)}")
    return btk.survey.get_surveys(name)


def sky_levels(name: str, bands: Sequence[str]) -> np.ndarray:
    """(bands,) mean sky level of each band of survey ``name``, electrons per pixel: the
    variance of the (Poisson) sky noise of sky-subtracted images."""
    return survey_sky_levels(get_survey(name), bands)


def survey_sky_levels(survey: btk.survey.Survey, bands: Sequence[str]) -> np.ndarray:
    """:func:`sky_levels` of a BTK survey object as it stands (its filters' exposure times may
    differ from the survey's own: :mod:`simulation.conditions`)."""
    return np.array([mean_sky_level(survey, survey.get_filter(b)).to_value("electron")
                     for b in bands], np.float64)


def zero_points(name: str, bands: Sequence[str]) -> dict[str, float]:
    """{band: AB magnitude of one electron} of survey ``name`` over its full exposure time, as
    its simulations turn magnitudes into electrons (surveycodex ``mag2counts``)."""
    survey = get_survey(name)
    return {b: 2.5 * float(np.log10(mag2counts(0.0, survey, survey.get_filter(b))
                                    .to_value("electron"))) for b in bands}


def survey_geometry(name: str, stamp_pixels: int) -> SurveyGeometry:
    """Bands and pixel scale of ``name`` with a stamp of ``stamp_pixels`` on a side."""
    survey = get_survey(name)
    return SurveyGeometry(
        name=name,
        bands=tuple(survey.available_filters),
        pixel_scale=float(survey.pixel_scale.to_value("arcsec")),
        stamp_pixels=stamp_pixels,
    )


def check_bands(bands: tuple[str, ...] | list[str], survey: SurveyGeometry, what: str) -> None:
    """Raise a clear ValueError if any of ``bands`` is not a band of ``survey``."""
    unknown = [b for b in bands if b not in survey.bands]
    if unknown:
        raise ValueError(
            f"{what}: band '{unknown[0]}' is not a {survey.name} band "
            f"(bands: {' '.join(survey.bands)})"
        )


def psf_images(survey_name: str, bands: Sequence[str], stamp_pixels: int) -> np.ndarray:
    """Images (len(bands), S, S) float64 of each band's PSF in BTK's definition of the survey.

    Each is the *effective* PSF, the survey's GalSim PSF profile (BTK's
    ``get_survey(name).get_filter(band).psf``) convolved with the pixel, as GalSim's default
    ``drawImage(nx=S, ny=S, scale=pixel_scale)`` draws it (the same way BTK draws the galaxies);
    centred at the stamp's true centre, (S-1)/2 in 0-based pixel coordinates on both axes (a pixel
    centre for odd S, a pixel corner for even S); normalised to unit sum over the stamp; pixel
    frame (x = array axis 1, columns; y = array axis 0, rows), S = ``stamp_pixels``.

    Raises ValueError for an unknown survey, a band the survey does not have, or S < 1.
    """
    if isinstance(stamp_pixels, bool) or int(stamp_pixels) != stamp_pixels or stamp_pixels < 1:
        raise ValueError(f"psf_images: stamp_pixels must be a positive integer, got {stamp_pixels!r}")
    size, bands = int(stamp_pixels), tuple(bands)
    check_bands(bands, survey_geometry(survey_name, size), "psf_images")
    out = np.empty((len(bands), size, size), np.float64)
    for k, band in enumerate(bands):
        out[k] = _psf_image(survey_name, band, size)
    return out


@lru_cache(maxsize=64)
def _psf_image(survey_name: str, band: str, stamp_pixels: int) -> np.ndarray:
    survey = get_survey(survey_name)
    filt = survey.get_filter(band)
    psf = filt.psf(survey, filt) if callable(filt.psf) else filt.psf  # BTK allows both
    if not isinstance(psf, galsim.GSObject):
        raise TypeError(f"the {survey_name} {band}-band PSF is not a GalSim profile: {type(psf)}")
    scale = float(survey.pixel_scale.to_value("arcsec"))
    image = psf.drawImage(nx=stamp_pixels, ny=stamp_pixels, scale=scale).array.astype(np.float64)
    total = image.sum()
    if not np.all(np.isfinite(image)) or not total > 0:
        raise ValueError(f"the {survey_name} {band}-band PSF image is not finite or sums to "
                         f"{total} on a {stamp_pixels}-pixel stamp")
    image /= total
    image.flags.writeable = False
    return image
