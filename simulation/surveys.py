"""Surveys known to deblend: BTK/surveycodex survey objects and their stamp geometry."""

from __future__ import annotations

from dataclasses import dataclass

import btk

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
