"""A galaxy population drawn directly with GalSim (not through BTK) that no network saw.

Used by the shear benchmark (:mod:`simulation.shear_pairs`) as an out-of-distribution population:
its galaxies, sizes, magnitudes, colours and PSFs all differ from the embedded CatSim catalog.

Survey: bands, pixel scale, zero points and exposure times (``surveycodex`` ``mag2counts``), sky
levels (``mean_sky_level``) and PSFs from ``btk.survey.get_surveys(survey)`` (LSST by default:
u g r i z y, 0.2"/pixel), as :mod:`simulation.scenes` and :mod:`simulation.surveys` use them.

Galaxies (:class:`PopulationSpec`, all drawn per galaxy):

- bulge + disk: an exponential disk and a de Vaucouleurs bulge (truncated at
  ``bulge_truncation`` half-light radii, which keeps GalSim's FFTs small) with the SAME
  half-light radius r (so r is the galaxy's half-light radius) and the same intrinsic
  ellipticity; bulge flux fraction uniform in ``bulge_fraction``;
- r log-uniform in ``hlr`` (arcsec);
- intrinsic ellipticity in GalSim's reduced-shear convention, |e| = (a - b)/(a + b): each
  component normal with sigma ``e_sigma``, redrawn until |e| < ``e_max``; uniform orientation;
- target ``ref_band`` magnitude uniform in ``target_mag``; ``min_neighbours`` to
  ``max_neighbours`` neighbours (uniform count), each fainter than the target by a uniform
  ``neighbour_dmag``, at a radius uniform in ``neighbour_shift`` (arcsec) and a uniform
  position angle;
- colours, a smooth SED-like rule: with x_b = ln(lambda_b / lambda_ref) (effective wavelengths
  of the survey's filters), m_b = m_ref + s x_b + c x_b^2, the slope s uniform in ``colour_slope``
  and the curvature c uniform in ``colour_curvature`` (s = -2 gives g - i ~ 0.9); flux in
  electrons = surveycodex's ``mag2counts`` (zero point, full exposure time), without its
  integer rounding.

Scenes come in rotated-twin pairs: scene 2k+1 is scene 2k rotated by +90 degrees about the stamp
centre (positions (x, y) -> (-y, x), intrinsic ellipticities (e1, e2) -> (-e1, -e2)), before
the shear. A constant shear g acts on the whole scene: every profile is sheared (after its
intrinsic ellipticity) and every position (offset from the target, the stamp centre) is mapped
by ``galsim.Shear(g1=, g2=).getMatrix()``.

PSF of each band: the survey's PSF dilated by ``psf_scale`` (its FWHM times ``psf_scale``),
then sheared by ``psf_shear`` (a reduced shear g, so the PSF's ellipticity is |g| = (a - b)/(a + b)
along the position angle of g; pixel frame; the default (0, 0) leaves it round).

Real galaxies (``real_catalog``, a GalSim real-galaxy catalogue such as COSMOS's
``real_galaxy_catalog_*.fits``): each galaxy's bulge+disk profile is replaced by a catalogue
galaxy drawn uniformly (with replacement), at a uniform orientation (its twin's turned by a further
90 degrees), with the same morphology in every band and the population's positions and colour
rule. Its ``ref_band`` magnitude is the population's, but never more than
``real_max_brightening`` brighter than the galaxy's catalogue magnitude (the catalogue's band,
F814W for COSMOS, taken as ``ref_band``): its HST noise is brightened with it (1 mag keeps that
noise below ~6% of LSST's 10-year i-band sky noise per pixel for 90% of the COSMOS galaxies), so
a neighbour may come out brighter than the target. Each HST image is used as
:func:`real_galaxies` says: its background pedestal removed, its own HST noise kept. With
``real_rows="held_out"`` only the catalogue's odd rows are drawn, those that training scenes
never show (:func:`real_galaxy_split`).

Images: noiseless, electrons per pixel, pixel frame (x = array axis 1, the ra offset; y = axis 0,
the dec offset), drawn with GalSim's default ``drawImage`` (the pixel included) with the stamp
centre (S-1)/2 (0-based) as the origin of the offsets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import galsim
import numpy as np
from surveycodex.utilities import mag2counts

from simulation.surveys import get_survey, survey_geometry, survey_sky_levels


@dataclass(frozen=True)
class PopulationSpec:
    """Distributions of the GalSim population (module docstring). Lengths in arcsec."""

    target_mag: tuple[float, float] = (20.0, 24.0)
    ref_band: str = "i"
    hlr: tuple[float, float] = (0.3, 1.2)
    bulge_fraction: tuple[float, float] = (0.0, 0.5)
    bulge_truncation: float = 8.0
    e_sigma: float = 0.25
    e_max: float = 0.6
    min_neighbours: int = 0
    max_neighbours: int = 2
    neighbour_shift: tuple[float, float] = (1.0, 4.0)
    neighbour_dmag: tuple[float, float] = (0.1, 3.0)
    colour_slope: tuple[float, float] = (-3.5, -0.5)
    colour_curvature: tuple[float, float] = (0.0, 1.5)
    real_max_brightening: float = 1.0
    """mag: how much brighter than its catalogue magnitude a real galaxy may be drawn"""


@dataclass(frozen=True)
class GalSimScene:
    """One scene's galaxies, unsheared; row 0 is the target (at the stamp centre)."""

    ra: np.ndarray
    """(n,) offsets along +x (arcsec) from the stamp centre, before the shear"""
    dec: np.ndarray
    """(n,) offsets along +y (arcsec), before the shear"""
    hlr: np.ndarray
    """(n,) half-light radius (arcsec) of bulge and disk alike"""
    bulge_fraction: np.ndarray
    e1: np.ndarray
    """(n,) intrinsic ellipticity, reduced-shear convention, pixel frame"""
    e2: np.ndarray
    mags: np.ndarray
    """(n, bands) AB magnitudes"""
    twin: int = 0
    real_index: np.ndarray | None = None
    """(n,) int rows of the population's real-galaxy catalogue, or None (bulge+disk galaxies; with
    real galaxies ``hlr``, ``bulge_fraction``, ``e1`` and ``e2`` are NaN: the images set them)"""
    real_angle: np.ndarray | None = None
    """(n,) radians, counter-clockwise rotation of each real galaxy's image (pixel frame)"""

    @property
    def n_galaxies(self) -> int:
        return len(self.ra)

    def rotated(self) -> GalSimScene:
        """The scene rotated by +90 degrees about the stamp centre: (x, y) -> (-y, x), e -> -e
        (real galaxies: their images turned by a further 90 degrees)."""
        angle = None if self.real_angle is None else self.real_angle + np.pi / 2
        return replace(self, ra=-self.dec, dec=self.ra.copy(), e1=-self.e1, e2=-self.e2, twin=1,
                       real_angle=angle)

    def positions(self, g: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (ra, dec) in arcsec after the shear ``g`` of the whole scene."""
        if g[0] == 0.0 and g[1] == 0.0:
            return self.ra.copy(), self.dec.copy()
        m = galsim.Shear(g1=float(g[0]), g2=float(g[1])).getMatrix()
        return m[0, 0] * self.ra + m[0, 1] * self.dec, m[1, 0] * self.ra + m[1, 1] * self.dec


@dataclass
class GalSimPopulation:
    """The GalSim population of a survey: sampling scenes and drawing them at a shear."""

    survey_name: str = "LSST"
    stamp_pixels: int = 45
    psf_scale: float = 1.0
    spec: PopulationSpec = field(default_factory=PopulationSpec)
    psf_shear: tuple[float, float] = (0.0, 0.0)
    """Reduced shear g (g1, g2) of every band's PSF, pixel frame (module docstring)."""
    real_catalog: str | None = None
    """Path of a GalSim real-galaxy catalogue whose galaxies replace the bulge+disk profiles
    (its image files beside it); None: bulge+disk."""
    real_rows: Literal["all", "held_out"] = "all"
    """Which of the catalogue's galaxies are drawn: all, or only the half that training never
    shows (:func:`real_galaxy_split`)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.psf_scale, (int, float)) and np.isfinite(self.psf_scale)
                and self.psf_scale > 0):
            raise ValueError(f"psf_scale must be a positive number, got {self.psf_scale!r}")
        g1, g2 = (float(x) for x in self.psf_shear)
        if not (math.isfinite(g1) and math.isfinite(g2) and math.hypot(g1, g2) < 0.5):
            raise ValueError(f"psf_shear must be a finite (g1, g2) with |g| < 0.5, got "
                             f"{self.psf_shear!r}")
        if isinstance(self.stamp_pixels, bool) or int(self.stamp_pixels) != self.stamp_pixels \
                or self.stamp_pixels < 9:
            raise ValueError(f"stamp_pixels must be an integer >= 9, got {self.stamp_pixels!r}")
        geometry = survey_geometry(self.survey_name, int(self.stamp_pixels))
        if self.spec.ref_band not in geometry.bands:
            raise ValueError(f"ref_band '{self.spec.ref_band}' is not a {self.survey_name} band")
        if self.spec.neighbour_shift[1] > geometry.stamp_pixels * geometry.pixel_scale / 2:
            raise ValueError(f"neighbour_shift max {self.spec.neighbour_shift[1]}\" lies outside "
                             f"the {geometry.stamp_pixels}-pixel stamp")
        survey = get_survey(self.survey_name)
        self.bands: tuple[str, ...] = geometry.bands
        self.pixel_scale: float = geometry.pixel_scale
        filters = [survey.get_filter(b) for b in self.bands]
        self.sky_levels = survey_sky_levels(survey, self.bands)
        # electrons of a magnitude-0 source; flux(m) = counts0 * 10^(-0.4 m) (mag2counts unrounded)
        self._counts0 = np.array(
            [mag2counts(0.0, survey, f).to_value("electron") for f in filters], np.float64)
        wavelength = np.array([f.effective_wavelength.to_value("nm") for f in filters])
        self._x = np.log(wavelength / wavelength[self.bands.index(self.spec.ref_band)])
        self.psfs: list[galsim.GSObject] = [
            sheared(dilated(_survey_psf(survey, f), float(self.psf_scale)), (g1, g2))
            for f in filters]
        self._real: RealGalaxies | None = (
            None if self.real_catalog is None else real_galaxies(str(self.real_catalog)))
        if self.real_rows not in ("all", "held_out"):
            raise ValueError(f"real_rows must be 'all' or 'held_out', got {self.real_rows!r}")
        self._real_rows = (None if self._real is None else
                           np.arange(len(self._real.profiles)) if self.real_rows == "all"
                           else real_galaxy_split(len(self._real.profiles))[1])

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, n: int, seed: int, neighbours: bool = True) -> list[GalSimScene]:
        """``n`` (even) scenes: pairs (scene, its rotated twin); pair k from ``[seed, k]`` alone."""
        if n % 2:
            raise ValueError(f"n must be even (rotated-twin pairs), got {n}")
        scenes: list[GalSimScene] = []
        for k in range(n // 2):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0, k]))
            scene = self._sample_scene(rng, neighbours)
            scenes += [scene, scene.rotated()]
        return scenes

    def _sample_scene(self, rng: np.random.Generator, neighbours: bool) -> GalSimScene:
        spec = self.spec
        n_neighbours = (int(rng.integers(spec.min_neighbours, spec.max_neighbours + 1))
                        if neighbours else 0)
        n = 1 + n_neighbours
        target_mag = rng.uniform(*spec.target_mag)
        ref_mag = np.concatenate([[target_mag],
                                  target_mag + rng.uniform(*spec.neighbour_dmag, n_neighbours)])
        radius = rng.uniform(*spec.neighbour_shift, n_neighbours)
        angle = rng.uniform(0.0, 2 * np.pi, n_neighbours)
        ra = np.concatenate([[0.0], radius * np.cos(angle)])
        dec = np.concatenate([[0.0], radius * np.sin(angle)])
        hlr = np.exp(rng.uniform(np.log(spec.hlr[0]), np.log(spec.hlr[1]), n))
        bulge = rng.uniform(*spec.bulge_fraction, n)
        e = rng.normal(0.0, spec.e_sigma, (n, 2))
        while True:
            bad = np.hypot(e[:, 0], e[:, 1]) >= spec.e_max
            if not bad.any():
                break
            e[bad] = rng.normal(0.0, spec.e_sigma, (int(bad.sum()), 2))
        slope = rng.uniform(*spec.colour_slope, n)
        curvature = rng.uniform(*spec.colour_curvature, n)
        if self._real is None:
            mags = ref_mag[:, None] + slope[:, None] * self._x + curvature[:, None] * self._x ** 2
            return GalSimScene(ra=ra, dec=dec, hlr=hlr, bulge_fraction=bulge, e1=e[:, 0].copy(),
                               e2=e[:, 1].copy(), mags=mags)
        assert self._real_rows is not None
        index = self._real_rows[rng.integers(0, len(self._real_rows), n)]  # after bulge+disk draws
        angle = rng.uniform(0.0, np.pi, n)
        ref_mag = np.maximum(ref_mag, self._real.mags[index] - spec.real_max_brightening)
        mags = ref_mag[:, None] + slope[:, None] * self._x + curvature[:, None] * self._x ** 2
        nan = np.full(n, np.nan)
        return GalSimScene(ra=ra, dec=dec, hlr=nan, bulge_fraction=nan, e1=nan, e2=nan.copy(),
                           mags=mags, real_index=index, real_angle=angle)

    # -- drawing ----------------------------------------------------------------------------
    def fluxes(self, scene: GalSimScene) -> np.ndarray:
        """(n, bands) fluxes in electrons."""
        return self._counts0 * 10.0 ** (-0.4 * scene.mags)

    def galaxy(self, scene: GalSimScene, i: int, g: tuple[float, float]) -> galsim.GSObject:
        """Galaxy ``i`` of ``scene``, unit flux, sheared by ``g`` (not shifted, no PSF)."""
        if scene.real_index is not None and scene.real_angle is not None:
            assert self._real is not None, "a real-galaxy scene needs the real_catalog"
            profile = self._real.profiles[int(scene.real_index[i])].rotate(
                float(scene.real_angle[i]) * galsim.radians)
        else:
            r, fb = float(scene.hlr[i]), float(scene.bulge_fraction[i])
            parts = [galsim.Exponential(half_light_radius=r, flux=1.0 - fb)]
            if fb > 0:
                parts.append(galsim.DeVaucouleurs(half_light_radius=r, flux=fb,
                                                  trunc=self.spec.bulge_truncation * r))
            profile = galsim.Add(parts).shear(g1=float(scene.e1[i]), g2=float(scene.e2[i]))
        if g[0] != 0.0 or g[1] != 0.0:
            profile = profile.shear(g1=float(g[0]), g2=float(g[1]))
        return profile

    def draw(self, scene: GalSimScene, g: tuple[float, float] = (0.0, 0.0)
             ) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless (blend, target alone), each (bands, S, S) float64 electrons, at shear ``g``."""
        size, scale = int(self.stamp_pixels), self.pixel_scale
        ra, dec = scene.positions(g)
        flux = self.fluxes(scene)
        blend = np.zeros((len(self.bands), size, size))
        target = np.zeros_like(blend)
        for i in range(scene.n_galaxies):
            gal = self.galaxy(scene, i, g)
            for b, psf in enumerate(self.psfs):
                image = galsim.Convolve(gal.withFlux(float(flux[i, b])), psf).shift(
                    float(ra[i]), float(dec[i])).drawImage(nx=size, ny=size, scale=scale).array
                blend[b] += image
                if i == 0:
                    target[b] = image
        return blend, target

    def psf_images(self) -> np.ndarray:
        """(bands, S, S) float64 effective PSFs (dilated PSF x pixel), unit sum, centred at
        (S-1)/2, drawn as :func:`simulation.surveys.psf_images` draws the survey's."""
        return draw_psf_images(self.psfs, self.pixel_scale, int(self.stamp_pixels))


def _survey_psf(survey, filt) -> galsim.GSObject:
    psf = filt.psf(survey, filt) if callable(filt.psf) else filt.psf  # BTK allows both
    if not isinstance(psf, galsim.GSObject):
        raise TypeError(f"the {filt.name}-band PSF is not a GalSim profile: {type(psf)}")
    return psf


def survey_psfs(survey_name: str, bands: Sequence[str], psf_scale: float = 1.0
                ) -> list[galsim.GSObject]:
    """The survey's GalSim PSF profiles of ``bands``, dilated by ``psf_scale``."""
    survey = get_survey(survey_name)
    return [dilated(_survey_psf(survey, survey.get_filter(b)), float(psf_scale)) for b in bands]


def dilated(psf: galsim.GSObject, scale: float) -> galsim.GSObject:
    """``psf`` dilated by ``scale`` (flux kept, every length times ``scale``); itself at 1."""
    return psf if scale == 1.0 else psf.dilate(scale)


def sheared(psf: galsim.GSObject, g: tuple[float, float]) -> galsim.GSObject:
    """``psf`` sheared by the reduced shear ``g`` (area kept); itself at (0, 0)."""
    return psf if g[0] == 0.0 and g[1] == 0.0 else psf.shear(g1=float(g[0]), g2=float(g[1]))


@dataclass(frozen=True)
class RealGalaxies:
    """The galaxies of a real-galaxy catalogue (:func:`real_galaxies`)."""

    profiles: tuple[galsim.GSObject, ...]
    """unit-flux profiles (HST image deconvolved by its PSF), before any PSF of ours"""
    mags: np.ndarray
    """(n,) catalogue magnitudes, in the catalogue's band (F814W for COSMOS)"""


def real_galaxy_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an ``n``-galaxy real-galaxy catalogue that training may draw (the even ones) and
    those held out for measurement (the odd ones). COSMOS's example catalogue is roughly ordered
    by magnitude, so both halves span its range."""
    rows = np.arange(n)
    return rows[0::2], rows[1::2]


@lru_cache(maxsize=4)
def real_galaxies(catalog: str) -> RealGalaxies:
    """Every galaxy of the GalSim real-galaxy catalogue file ``catalog`` (image files in its
    directory), as a unit-flux :class:`galsim.RealGalaxy`, with its catalogue magnitude.

    Each image first has its background pedestal removed: the median of its border pixels (the
    outermost row and column on each side) is subtracted from every pixel. Its HST noise is kept
    (not whitened, no noise padding), so it is sheared with the galaxy. Unit flux is the image's
    sum after the subtraction.
    """
    path = Path(catalog)
    if not path.is_file():
        raise FileNotFoundError(f"real-galaxy catalogue not found: {path}")
    cat = galsim.RealGalaxyCatalog(path.name, dir=str(path.parent))
    profiles = []
    for i in range(cat.nobjects):
        image = cat.getGalImage(i)
        a = image.array
        border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
        image = image - float(np.median(border))
        if not image.array.sum() > 0:
            raise ValueError(f"{path}: galaxy {i} has no positive flux above its border")
        profiles.append(galsim.RealGalaxy.makeFromImage(image, cat.getPSF(i), cat.getNoise(i))
                        .withFlux(1.0))
    return RealGalaxies(tuple(profiles), np.asarray(cat.mag, np.float64).copy())


def draw_psf_images(psfs: Sequence[galsim.GSObject], pixel_scale: float, stamp_pixels: int
                    ) -> np.ndarray:
    """(len(psfs), S, S) float64: each PSF drawn with GalSim's default ``drawImage`` (x pixel),
    centred at (S-1)/2, normalised to unit sum (as :func:`simulation.surveys.psf_images`)."""
    out = np.empty((len(psfs), stamp_pixels, stamp_pixels), np.float64)
    for k, psf in enumerate(psfs):
        image = psf.drawImage(nx=stamp_pixels, ny=stamp_pixels, scale=pixel_scale).array
        total = image.sum()
        if not np.all(np.isfinite(image)) or not total > 0:
            raise ValueError(f"PSF image {k} is not finite or sums to {total}")
        out[k] = image / total
    return out
