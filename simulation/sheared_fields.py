"""Constant-shear fields for the metadetection shear benchmark: +g / -g and 90-degree twins.

A *field* is a square image of ``field_pixels`` on a side (default 300 LSST pixels = 60" =
1 arcmin) holding every galaxy of a random sky at a realistic LSST density. Each field index
gives a *field set* of four images (:func:`draw_field_set`):

- ``plus``: the sky sheared by +g;   ``minus``: the same sky sheared by -g;
- ``plus_rot`` / ``minus_rot``: the whole UNSHEARED sky rotated by +90 degrees about the field
  centre (offsets (dx, dy) -> (-dy, dx), every intrinsic profile turned by +90 degrees, so its
  intrinsic ellipticity (e1, e2) -> (-e1, -e2)), then sheared by +g / -g.

Shear: constant reduced shear g = (g1, g2) (GalSim's ``galsim.Shear(g1=, g2=)``, the
reduced-shear convention |g| = (a - b)/(a + b), not the distortion (a^2 - b^2)/(a^2 + b^2)).
It acts on every profile (after its intrinsic ellipticity, before the PSF) AND on every
position: offsets from the field centre are mapped by ``galsim.Shear(g1=, g2=).getMatrix()``,
the area-preserving map GalSim applies to a profile sheared with ``.shear``. The unsheared sky
is the same for +g and -g, so a galaxy sheared out of the field at +g may be inside at -g.

Galaxies (one unsheared sky per (population, seed, index)): a Poisson process of ``density``
galaxies per arcmin^2 brighter than ``max_mag`` in the reference band (``sim.ref_band``, i),
uniform over the sky. Default: **40 galaxies per arcmin^2 with i < 25.3**, the LSST gold
sample (25.3 is also the training targets' limit, ``simulation.target_max_mag``); measured:
40.1 +- 0.4 (btk) and 39.9 +- 0.4 (galsim) per arcmin^2 over 300 skies of 1 arcmin^2. The
embedded catalog model's own normalisation gives only 16 per arcmin^2 at i < 25.3 (its 64 per
arcmin^2 to i < 28 come from the bounding box of a 100-row sample), so the default renormalises
it by 2.46; BTK's figure for the full CatSim file (185 per arcmin^2 to i < 27.3) would give 56
per arcmin^2 at i < 25.3 with the model's counts, so 40 is the conservative choice. The sky is
tiled in squares of :data:`TILE_ARCSEC` about the field centre, each tile's galaxies drawn
from ``SeedSequence([tag, population, seed, index, tile])`` alone, so the same (seed, index)
gives the same sky whatever the shear and field size (a 120-pixel field is the centre of the
300-pixel one); only galaxies whose stamp can reach the field are drawn.

- ``"btk"``: the training catalog (:class:`simulation.builder.SceneSource` of ``sim``, default
  the embedded CatSim model), each tile sampled by :class:`simulation.dense_fields.FieldSampling`
  (BTK's ``DefaultSampling``: rows with ``i_ab <= max_mag`` picked uniformly, so magnitudes
  follow the model's i-band counts, slope 0.32 dex/mag; each galaxy turned by a uniform random
  position angle). Drawn by BTK's ``CatsimGenerator`` (:class:`simulation.scenes.SceneDrawer`)
  with ``apply_shear=True``; BTK shears profiles only, so the positions are sheared here
  (:func:`simulation.sampling.shear_scene_positions`) and the twin rotated by
  :func:`simulation.sampling.rotate_scene_90` (position angles + 90 deg).
- ``"galsim"``: the independent population of :mod:`simulation.galsim_population` (bulge+disk,
  sizes, ellipticities and colours of its :class:`PopulationSpec`, its ``galaxy()`` profiles,
  ``fluxes()`` and PSFs), each galaxy sampled as an isolated target by
  ``GalSimPopulation.sample``; its reference-band magnitude is then redrawn from power-law
  counts dN/dm ~ 10^(0.322 m) (the catalog model's bright slope) on
  [``spec.target_mag[0]``, ``max_mag``] = [20, 25.3], keeping its colours.

Drawing: each galaxy is drawn alone on an odd postage stamp (:data:`STAMP_SIZES`, chosen from
its half-light semi-major axis, see :func:`stamp_pixels`) with GalSim's default ``drawImage``
(pixel included), at its sub-pixel offset from the stamp's central pixel, and added into the
field with that pixel on the galaxy's nearest field pixel; light beyond the stamp is dropped.

Pixel frame: x = array axis 1 (columns), y = axis 0 (rows), 0-based, pixel centres at integers;
the field centre is ((W-1)/2, (H-1)/2); an offset (dx, dy) in arcsec is at
x = (W-1)/2 + dx / pixel_scale. Images in electrons per pixel (surveycodex ``mag2counts``, the
full 10-year exposure), sky-subtracted.

Noise (:func:`simulation.shear_pairs.noise_fields`, seeded by ``(seed, index)`` and the
population, not by g): one standard-normal field z of shape (bands, H, W) per field index;

- ``plus`` and ``minus``: image + sqrt(sky) z with the SAME z, so plus - minus is exactly the
  noiseless difference (up to float32 rounding);
- ``plus_rot`` and ``minus_rot``: a second, independent field z' (shared by the two twins).
  Rotating z with the sky would make ``plus_rot`` exactly the 90-degree rotation of ``minus``
  (a rotation by 90 degrees turns g into -g): the twins would add no information and the
  additive bias c of any rotation-equivariant estimator would be zero by construction;
- ``galaxy_noise=True`` uses :func:`simulation.shear_pairs.add_noise` instead (the galaxies'
  Poisson term too, variance sky + image): then plus - minus is noise-free only where the sky
  dominates.

``variance`` is the sky level per pixel (electrons^2): the noise variance of every pixel (of the
empty pixels with ``galaxy_noise``). ``psfs`` are the effective PSFs (PSF x pixel, unit sum,
:data:`PSF_PIXELS` on a side, centred on the central pixel).

Cost per 300 x 300 six-band field set (four images, ~60-75 galaxies drawn in each, ~1,500
GalSim FFT draws), one core of a busy 2-core machine: 2.0-3.8 s (mean 2.7) for btk, where BTK's
per-galaxy bookkeeping takes more than the draws, and 1.4-1.7 s for galsim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import astropy.table
import galsim
import numpy as np
from astropy.table import Table
from btk.sampling_functions import SamplingFunction
from scipy import special

from deblend.core.arguments import NON_NEGATIVE_INT, POSITIVE_FLOAT, require_positive_int
from deblend.core.config import Config, SimulationConfig
from simulation.builder import SceneSource
from simulation.catalog_model import COUNTS_BRIGHT_SLOPE
from simulation.dense_fields import FieldSampling
from simulation.galsim_population import GalSimPopulation, GalSimScene, PopulationSpec
from simulation.conditions import at_nominal_conditions
from simulation.galsim_population import draw_psf_images
from simulation.sampling import rotate_scene_90, shear_scene_positions
from simulation.scenes import SceneDrawer
from simulation.shear_pairs import POPULATIONS, add_noise, noise_fields
from simulation.surveys import SurveyGeometry, psf_images, sky_levels

VARIANTS = ("plus", "minus", "plus_rot", "minus_rot")
"""The four fields of a set: shear sign and whether the sky is rotated by 90 degrees."""
DEFAULT_FIELD_PIXELS = 300
DEFAULT_MAX_MAG = 25.3
"""Faintest galaxy (reference band, AB) in a field: the LSST gold sample's limit."""
DEFAULT_DENSITY = 40.0
"""Galaxies per arcmin^2 brighter than ``max_mag`` (LSST gold sample)."""
PSF_PIXELS = 41
"""Side of the PSF images of a :class:`ShearedField`."""
TILE_ARCSEC = 30.0
"""Side of the sky tiles whose galaxies follow from their own seed."""
STAMP_SIZES = (47, 63, 95, 127, 191, 255)
"""Odd postage-stamp sides (pixels) a galaxy is drawn on; the smallest holds 99.4% of the
LSST PSF's light."""
STAMP_PSF_RADIUS_ARCSEC = 4.0
STAMP_HLR_RADII = 6.0
"""A stamp's half-side covers STAMP_PSF_RADIUS_ARCSEC + STAMP_HLR_RADII half-light semi-major
axes (stretched by the shear), up to the largest of :data:`STAMP_SIZES`."""
_SEED_TAG = 0x5EA4F1
"""Mixed into every seed so that fields never share a random stream with other products."""


@dataclass(frozen=True)
class ShearedField:
    """One field of a set (module docstring): noisy image, noise, PSFs and truth."""

    images: np.ndarray
    """(bands, H, W) float32, electrons per pixel, sky-subtracted, noisy"""
    variance: np.ndarray
    """(bands,) float64 per-pixel noise variance of the sky (electrons^2)"""
    psfs: np.ndarray
    """(bands, S, S) float64 effective PSF images (pixel included), unit sum, S odd (41)"""
    truth: astropy.table.Table
    """one row per galaxy drawn into the field (its stamp overlaps it): ``id`` (the same galaxy
    has the same id in the four fields of a set), ``x``, ``y`` (pixels, AFTER the shear,
    0-based, pixel centres at integers), ``dx``, ``dy`` (arcsec from the field centre, after
    the shear), ``dx_unsheared``, ``dy_unsheared`` (after the twin's rotation, before the
    shear), ``in_field`` (centre inside the image), ``mag`` (reference band, AB), ``mag_<band>``,
    ``hlr`` (arcsec), intrinsic ``e1``, ``e2`` (reduced-shear convention, in this field's
    frame: negated in the rotated twins), ``bulge_fraction``, ``flux`` ((bands,) electrons
    drawn on the galaxy's stamp), ``stamp_pixels``, ``g1``, ``g2``; ``redshift`` for btk"""
    g: tuple[float, float]
    """the shear applied to this field"""
    bands: tuple[str, ...]
    pixel_scale: float
    """arcsec per pixel"""


# -- arguments -----------------------------------------------------------------------------------
def _check_population(population: Any) -> str:
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}: expected one of {POPULATIONS}")
    return str(population)


def _check_shear(g: Any) -> tuple[float, float]:
    try:
        g1, g2 = (float(x) for x in g)
    except (TypeError, ValueError):
        raise ValueError(f"g must be a pair of numbers (g1, g2), got {g!r}") from None
    if not (math.isfinite(g1) and math.isfinite(g2)) or math.hypot(g1, g2) >= 1.0:
        raise ValueError(f"the shear must satisfy |g| < 1, got g = {g!r}")
    return g1, g2


def _check_draw(seed: Any, index: Any, g: Any, field_pixels: Any
                ) -> tuple[int, int, tuple[float, float], int]:
    """(seed, index, g, field_pixels) checked; ValueError naming the first bad one."""
    return (NON_NEGATIVE_INT.require(seed, "seed"), NON_NEGATIVE_INT.require(index, "index"),
            _check_shear(g), require_positive_int(field_pixels, "field_pixels"))


# -- geometry ------------------------------------------------------------------------------------
def stamp_pixels(semi_major_arcsec: np.ndarray, g: tuple[float, float],
                 pixel_scale: float) -> np.ndarray:
    """Stamp side (pixels, one of :data:`STAMP_SIZES`) of galaxies with half-light semi-major
    axes ``semi_major_arcsec`` under the shear ``g`` (which stretches them by up to
    sqrt((1+|g|)/(1-|g|)))."""
    gabs = math.hypot(*g)
    radius = STAMP_PSF_RADIUS_ARCSEC + STAMP_HLR_RADII * np.asarray(semi_major_arcsec, float) \
        * math.sqrt((1 + gabs) / (1 - gabs))
    wanted = 2 * np.ceil(radius / pixel_scale) + 1
    sizes = np.array(STAMP_SIZES)
    return sizes[np.minimum(np.searchsorted(sizes, wanted), len(sizes) - 1)]


def sky_half_width(field_pixels: int, g: tuple[float, float], pixel_scale: float) -> float:
    """Half-side (arcsec) of the unsheared square about the field centre that holds every galaxy
    whose stamp can reach the field at shear +g or -g, rotated or not: the field's half-side
    plus the largest stamp's, times ||S(-+g)||_inf = (1 + |g1| + |g2|) / sqrt(1 - |g|^2) (the
    square is invariant under the 90-degree rotation)."""
    g1, g2 = g
    stretch = (1 + abs(g1) + abs(g2)) / math.sqrt(1 - g1 * g1 - g2 * g2)
    return (field_pixels + max(STAMP_SIZES)) / 2 * pixel_scale * stretch


def _tile_range(half_width: float) -> range:
    """Tile indices i whose tile [i T, (i+1) T) meets [-half_width, half_width]."""
    return range(math.floor(-half_width / TILE_ARCSEC), math.floor(half_width / TILE_ARCSEC) + 1)


def _tile_seeds(population: str, seed: int, index: int, i: int, j: int
                ) -> tuple[int, int, int]:
    """Seeds of tile (i, j): (its galaxy count, its sampling, the population's own draws)."""
    zigzag = [2 * k if k >= 0 else -2 * k - 1 for k in (i, j)]
    state = np.random.SeedSequence([_SEED_TAG, POPULATIONS.index(population), seed, index,
                                    *zigzag]).generate_state(3)
    return int(state[0]), int(state[1] % (2**31 - 1)), int(state[2])


def _noise_seed(seed: int) -> int:
    return int(np.random.SeedSequence([_SEED_TAG, seed]).generate_state(1)[0])


def _paste(field: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add (bands, S, S) ``stamp`` into (bands, H, W) ``field`` with its central pixel on
    (column ``ix``, row ``iy``), clipped to the field."""
    h = stamp.shape[-1] // 2
    height, width = field.shape[-2:]
    y0, x0 = iy - h, ix - h
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(iy + h + 1, height), min(ix + h + 1, width)
    if ye > ys and xe > xs:
        field[:, ys:ye, xs:xe] += stamp[:, ys - y0:ye - y0, xs - x0:xe - x0]


# -- the two populations -------------------------------------------------------------------------
class _QueuedScenes(SamplingFunction):
    """A BTK sampling function handing out prepared one-galaxy scenes in order."""

    def __init__(self, stamp_arcsec: float, scenes: list[Table]) -> None:
        super().__init__(stamp_size=stamp_arcsec, max_number=1, min_number=1, seed=0)
        self._scenes = iter(scenes)

    def __call__(self, table: Table) -> Table:
        return next(self._scenes)


def composite_half_light_radius(hlr_disk: np.ndarray, hlr_bulge: np.ndarray,
                                bulge_fraction: np.ndarray) -> np.ndarray:
    """Half-light radius (arcsec) of round exponential + de Vaucouleurs profiles of radii
    ``hlr_disk``, ``hlr_bulge`` (0 when absent) and bulge flux fraction ``bulge_fraction``."""
    b_exp, b_dev = special.gammaincinv(2, 0.5), special.gammaincinv(8, 0.5)

    def enclosed(r: np.ndarray) -> np.ndarray:
        disk = special.gammainc(2, b_exp * r / np.where(hlr_disk > 0, hlr_disk, 1.0))
        bulge = special.gammainc(8, b_dev * (r / np.where(hlr_bulge > 0, hlr_bulge, 1.0)) ** 0.25)
        return np.where(hlr_disk > 0, (1 - bulge_fraction) * disk, 0.0) + \
            np.where(hlr_bulge > 0, bulge_fraction * bulge, 0.0)

    radii = np.stack([hlr_disk, hlr_bulge])
    some = np.where(radii > 0, radii, np.nan)  # an absent component has radius 0
    lo, hi = np.log(np.nan_to_num(np.nanmin(some, axis=0), nan=1.0)), \
        np.log(np.nan_to_num(np.nanmax(some, axis=0), nan=1.0))
    for _ in range(60):  # bisection in log r: the radius lies between the components'
        mid = 0.5 * (lo + hi)
        below = enclosed(np.exp(mid)) < 0.5
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where((hlr_disk > 0) | (hlr_bulge > 0), np.exp(0.5 * (lo + hi)), 0.0)


class _BtkSky:
    """The "btk" population: CatSim-schema rows of the simulation's catalog, drawn by BTK."""

    def __init__(self, sim: SimulationConfig) -> None:
        self.sim = sim = at_nominal_conditions(sim)
        self.source = SceneSource(sim)
        geometry = self.source.geometry
        self.bands, self.pixel_scale = geometry.bands, geometry.pixel_scale
        self.ref_band = sim.ref_band
        self.sky_levels = sky_levels(sim.survey, self.bands)
        self.psfs = np.array(psf_images(sim.survey, self.bands, PSF_PIXELS), np.float64)
        self._mags = np.asarray(self.source.catalog.table[f"{sim.ref_band}_ab"], float)

    def check_max_mag(self, max_mag: float) -> None:
        if not np.any(self._mags <= max_mag):
            raise ValueError(f"max_mag = {max_mag}: no catalog galaxy is that bright in "
                             f"{self.ref_band} (brightest {np.nanmin(self._mags):.2f})")

    def sample_tile(self, seeds: tuple[int, int, int], n: int, centre: tuple[float, float],
                    max_mag: float) -> Table:
        if n == 0:  # an empty sky (astropy cannot add a scalar column to an empty table)
            table = self.source.catalog.table[:0].copy()
            for name in ("g1", "g2", "twin"):  # the columns the sampling would add
                table[name] = np.zeros(0)
            return table
        sampling = FieldSampling(stamp_size=TILE_ARCSEC, min_number=n, max_number=n,
                                 max_shift=TILE_ARCSEC / 2, max_mag=max_mag,
                                 ref_band=self.ref_band, seed=seeds[1], random_rotation=True)
        table = sampling(self.source.catalog.table)
        table["ra"] = np.asarray(table["ra"], float) + centre[0]
        table["dec"] = np.asarray(table["dec"], float) + centre[1]
        return table

    @staticmethod
    def join(tables: list[Table]) -> Table:
        return astropy.table.vstack(tables, metadata_conflicts="silent")

    @staticmethod
    def offsets(table: Table) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(table["ra"], float), np.asarray(table["dec"], float)

    @staticmethod
    def select(table: Table, keep: np.ndarray) -> Table:
        return table[keep]

    @staticmethod
    def rotated(table: Table) -> Table:
        return rotate_scene_90(table)

    @staticmethod
    def sheared_offsets(table: Table, g: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        sheared = shear_scene_positions(table, g)
        return np.asarray(sheared["ra"], float), np.asarray(sheared["dec"], float)

    @staticmethod
    def semi_major(table: Table) -> np.ndarray:
        return np.maximum(np.asarray(table["a_d"], float), np.asarray(table["a_b"], float))

    def columns(self, table: Table) -> dict[str, np.ndarray]:
        """Truth columns: magnitudes, redshift, hlr, bulge fraction, intrinsic e (flux-weighted
        mean of the disk's and bulge's reduced-shear ellipticities, which share the position
        angle), in the pixel frame of ``table`` (rotated for a twin)."""
        col = {name: np.asarray(table[name], float) for name in (
            "a_d", "b_d", "a_b", "b_b", "pa_disk", "fluxnorm_disk", "fluxnorm_bulge",
            "fluxnorm_agn")}
        total = col["fluxnorm_disk"] + col["fluxnorm_bulge"] + col["fluxnorm_agn"]
        f_bulge = col["fluxnorm_bulge"] / total
        f_disk = col["fluxnorm_disk"] / total

        def ellipticity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            q = np.where(a > 0, b / np.where(a > 0, a, 1.0), 1.0)
            return (1 - q) / (1 + q)

        e = f_disk * ellipticity(col["a_d"], col["b_d"]) + \
            f_bulge * ellipticity(col["a_b"], col["b_b"])
        angle = 2 * np.radians(np.where(col["fluxnorm_disk"] > 0, col["pa_disk"],
                                        np.asarray(table["pa_bulge"], float)))
        hlr = composite_half_light_radius(np.sqrt(col["a_d"] * col["b_d"]),
                                          np.sqrt(col["a_b"] * col["b_b"]), f_bulge)
        return {"mag": np.asarray(table[f"{self.ref_band}_ab"], float),
                **{f"mag_{b}": np.asarray(table[f"{b}_ab"], float) for b in self.bands},
                "redshift": np.asarray(table["redshift"], float), "hlr": hlr,
                "e1": e * np.cos(angle), "e2": e * np.sin(angle), "bulge_fraction": f_bulge}

    def draw_many(self, jobs: list[tuple[Table, tuple[float, float], np.ndarray, np.ndarray,
                                         np.ndarray]]) -> list[list[np.ndarray]]:
        """Per job (table, g, rows, offsets, sizes): the (bands, S, S) stamps of galaxies ``rows``
        of ``table``, profiles sheared by ``g`` (by BTK), each at its sub-pixel offset (pixels,
        (n, 2)) from the stamp's central pixel; one BTK batch per stamp size."""
        scenes, sizes, owner = [], [], []
        for k, (table, g, rows, offsets, size) in enumerate(jobs):
            for row, (fx, fy), s in zip(rows, offsets, size):
                scene = table[[int(row)]]
                scene["ra"] = fx * self.pixel_scale
                scene["dec"] = fy * self.pixel_scale
                scene["g1"], scene["g2"] = g
                scenes.append(scene)
                sizes.append(int(s))
                owner.append(k)
        stamps = self._draw_scenes(scenes, np.array(sizes, int))
        out: list[list[np.ndarray]] = [[] for _ in jobs]
        for k, stamp in zip(owner, stamps):
            out[k].append(stamp)
        return out

    def _draw_scenes(self, scenes: list[Table], sizes: np.ndarray) -> list[np.ndarray]:
        stamps: list[np.ndarray | None] = [None] * len(scenes)
        for size in np.unique(sizes):
            which = np.flatnonzero(sizes == size)
            geometry = SurveyGeometry(self.source.geometry.name, self.bands, self.pixel_scale,
                                      int(size))
            sampling = _QueuedScenes(geometry.stamp_arcsec, [scenes[k] for k in which])
            drawer = SceneDrawer(self.source.catalog, self.source.survey, geometry, sampling,
                                 batch_size=len(which), noise="none", apply_shear=True, seed=0)
            blend = drawer.draw().blend
            for n, k in enumerate(which):
                stamps[k] = blend[n]
        return stamps  # type: ignore[return-value]


class _GalSimSky:
    """The "galsim" population: :class:`GalSimPopulation`'s galaxies at field number counts."""

    def __init__(self, sim: SimulationConfig) -> None:
        self.pop = GalSimPopulation(sim.survey, PSF_PIXELS, 1.0,
                                    PopulationSpec(ref_band=sim.ref_band))
        self.bands, self.pixel_scale = self.pop.bands, self.pop.pixel_scale
        self.ref_band = sim.ref_band
        self.sky_levels = self.pop.sky_levels.copy()
        self.psfs = draw_psf_images(self.pop.psfs, self.pixel_scale, PSF_PIXELS)
        self._ref = self.bands.index(sim.ref_band)
        self.bright = float(self.pop.spec.target_mag[0])

    def check_max_mag(self, max_mag: float) -> None:
        if not max_mag > self.bright:
            raise ValueError(f"max_mag must exceed the galsim population's brightest magnitude "
                             f"{self.bright}, got {max_mag}")

    def sample_tile(self, seeds: tuple[int, int, int], n: int, centre: tuple[float, float],
                    max_mag: float) -> GalSimScene:
        rng = np.random.default_rng(seeds[1])
        single = self.pop.sample(2 * n, seeds[2], neighbours=False)[0::2] if n else []
        a = COUNTS_BRIGHT_SLOPE
        span = 10.0 ** (a * (max_mag - self.bright)) - 1.0
        mag = self.bright + np.log10(1.0 + rng.random(n) * span) / a
        ra = centre[0] + rng.uniform(-TILE_ARCSEC / 2, TILE_ARCSEC / 2, n)
        dec = centre[1] + rng.uniform(-TILE_ARCSEC / 2, TILE_ARCSEC / 2, n)

        def stack(name: str) -> np.ndarray:
            return np.concatenate([getattr(s, name) for s in single]) if n else np.zeros(0)

        colours = (np.concatenate([s.mags - s.mags[:, [self._ref]] for s in single]) if n
                   else np.zeros((0, len(self.bands))))
        return GalSimScene(ra=ra, dec=dec, hlr=stack("hlr"),
                           bulge_fraction=stack("bulge_fraction"), e1=stack("e1"),
                           e2=stack("e2"), mags=colours + mag[:, None])

    @staticmethod
    def join(scenes: list[GalSimScene]) -> GalSimScene:
        return GalSimScene(**{name: np.concatenate([getattr(s, name) for s in scenes])
                              for name in ("ra", "dec", "hlr", "bulge_fraction", "e1", "e2",
                                           "mags")})

    @staticmethod
    def offsets(scene: GalSimScene) -> tuple[np.ndarray, np.ndarray]:
        return scene.ra, scene.dec

    @staticmethod
    def select(scene: GalSimScene, keep: np.ndarray) -> GalSimScene:
        return replace(scene, **{name: getattr(scene, name)[keep] for name in (
            "ra", "dec", "hlr", "bulge_fraction", "e1", "e2", "mags")})

    @staticmethod
    def rotated(scene: GalSimScene) -> GalSimScene:
        return scene.rotated()

    @staticmethod
    def sheared_offsets(scene: GalSimScene, g: tuple[float, float]
                        ) -> tuple[np.ndarray, np.ndarray]:
        return scene.positions(g)

    @staticmethod
    def semi_major(scene: GalSimScene) -> np.ndarray:
        e = np.hypot(scene.e1, scene.e2)
        return scene.hlr * np.sqrt((1 + e) / (1 - e))

    def columns(self, scene: GalSimScene) -> dict[str, np.ndarray]:
        return {"mag": scene.mags[:, self._ref].copy(),
                **{f"mag_{b}": scene.mags[:, k].copy() for k, b in enumerate(self.bands)},
                "hlr": scene.hlr.copy(), "e1": scene.e1.copy(), "e2": scene.e2.copy(),
                "bulge_fraction": scene.bulge_fraction.copy()}

    def draw_many(self, jobs: list[tuple[GalSimScene, tuple[float, float], np.ndarray,
                                         np.ndarray, np.ndarray]]) -> list[list[np.ndarray]]:
        out = []
        for scene, g, rows, offsets, sizes in jobs:
            flux = self.pop.fluxes(scene)
            stamps = []
            for row, (fx, fy), size in zip(rows, offsets, sizes):
                gal = self.pop.galaxy(scene, int(row), g)
                stamp = np.empty((len(self.bands), int(size), int(size)), np.float64)
                for b, psf in enumerate(self.pop.psfs):
                    stamp[b] = galsim.Convolve(gal.withFlux(float(flux[row, b])), psf).shift(
                        fx * self.pixel_scale, fy * self.pixel_scale).drawImage(
                        nx=int(size), ny=int(size), scale=self.pixel_scale).array
                stamps.append(stamp)
            out.append(stamps)
        return out


# -- the simulator -------------------------------------------------------------------------------
class ShearedFieldSimulator:
    """Draws field sets of one population (module docstring); holds its catalog, survey and
    PSFs, so build it once and draw many field indices. Same arguments, same bytes."""

    def __init__(self, population: Literal["btk", "galsim"] = "btk",
                 sim: SimulationConfig | None = None, *, max_mag: float = DEFAULT_MAX_MAG,
                 density: float = DEFAULT_DENSITY) -> None:
        self.population = _check_population(population)
        if sim is not None and not isinstance(sim, SimulationConfig):
            raise TypeError(f"sim must be a SimulationConfig or None, got {type(sim).__name__}")
        self.max_mag = POSITIVE_FLOAT.require(max_mag, "max_mag")
        self.density = POSITIVE_FLOAT.require(density, "density")
        sim = sim if sim is not None else Config().simulation
        self.sky = _BtkSky(sim) if self.population == "btk" else _GalSimSky(sim)
        self.sky.check_max_mag(self.max_mag)
        self.bands: tuple[str, ...] = tuple(self.sky.bands)
        self.pixel_scale: float = float(self.sky.pixel_scale)

    # -- the unsheared sky ----------------------------------------------------------------------
    def _sample(self, seed: int, index: int, half_width: float) -> Any:
        """The population's native galaxies with unsheared offsets in [-h, h]^2 (arcsec)."""
        mean = self.density * (TILE_ARCSEC / 60.0) ** 2
        parts = []
        for i in _tile_range(half_width):
            for j in _tile_range(half_width):
                seeds = _tile_seeds(self.population, seed, index, i, j)
                n = int(np.random.default_rng(seeds[0]).poisson(mean))
                if n:
                    centre = ((i + 0.5) * TILE_ARCSEC, (j + 0.5) * TILE_ARCSEC)
                    parts.append(self.sky.sample_tile(seeds, n, centre, self.max_mag))
        if not parts:
            parts.append(self.sky.sample_tile(_tile_seeds(self.population, seed, index, 0, 0),
                                              0, (0.0, 0.0), self.max_mag))
        native = self.sky.join(parts)
        dx, dy = self.sky.offsets(native)
        return self.sky.select(native, (np.abs(dx) <= half_width) & (np.abs(dy) <= half_width))

    def sample(self, seed: int, index: int, half_width_arcsec: float) -> Table:
        """Galaxies of sky ``(seed, index)`` whose unsheared offsets from the field centre lie in
        [-h, h]^2 (arcsec): columns ``dx``, ``dy`` (arcsec, x = +column, y = +row) and the
        truth columns of :class:`ShearedField` that do not depend on the shear."""
        seed = NON_NEGATIVE_INT.require(seed, "seed")
        index = NON_NEGATIVE_INT.require(index, "index")
        half_width = POSITIVE_FLOAT.require(half_width_arcsec, "half_width_arcsec")
        native = self._sample(seed, index, half_width)
        dx, dy = self.sky.offsets(native)
        return Table({"dx": np.asarray(dx, float), "dy": np.asarray(dy, float),
                      **self.sky.columns(native)})

    # -- drawing --------------------------------------------------------------------------------
    def draw(self, seed: int, index: int, g: tuple[float, float], *,
             field_pixels: int = DEFAULT_FIELD_PIXELS, noise: bool = True,
             galaxy_noise: bool = False) -> dict[str, ShearedField]:
        """The four fields ``plus``, ``minus``, ``plus_rot``, ``minus_rot`` of field ``index``
        of sky ``seed`` at shear +-``g`` (see :func:`draw_field_set`)."""
        seed, index, g, side = _check_draw(seed, index, g, field_pixels)
        if not isinstance(noise, (bool, np.bool_)) or not isinstance(galaxy_noise,
                                                                      (bool, np.bool_)):
            raise ValueError(f"noise and galaxy_noise must be True or False, got {noise!r} and "
                             f"{galaxy_noise!r}")
        pix = self.pixel_scale
        native = self._sample(seed, index, sky_half_width(side, g, pix))
        skies = {False: native, True: self.sky.rotated(native)}
        minus = (-g[0], -g[1])
        shears = {"plus": (g, False), "minus": (minus, False), "plus_rot": (g, True),
                  "minus_rot": (minus, True)}
        sizes = stamp_pixels(self.sky.semi_major(native), g, pix)
        centre = (side - 1) / 2
        jobs, placements = [], {}
        for name, (shear, rotated) in shears.items():
            sky = skies[rotated]
            dx, dy = self.sky.sheared_offsets(sky, shear)
            x, y = centre + np.asarray(dx) / pix, centre + np.asarray(dy) / pix
            ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)  # nearest pixel
            half = sizes // 2
            rows = np.flatnonzero((ix + half >= 0) & (ix - half <= side - 1)
                                  & (iy + half >= 0) & (iy - half <= side - 1))
            offsets = np.stack([x[rows] - ix[rows], y[rows] - iy[rows]], axis=1)
            jobs.append((sky, shear, rows, offsets, sizes[rows]))
            placements[name] = (rows, x, y, ix, iy, dx, dy)
        stamps = self.sky.draw_many(jobs)

        z, z_twin = noise_fields(_noise_seed(seed), self.population, index,
                                 (len(self.bands), side, side)) if noise else (None, None)
        out = {}
        for (name, (shear, rotated)), drawn in zip(shears.items(), stamps):
            rows, x, y, ix, iy, dx, dy = placements[name]
            image = np.zeros((len(self.bands), side, side))
            for k, stamp in zip(rows, drawn):
                _paste(image, stamp, int(ix[k]), int(iy[k]))
            if z is not None:
                zz = z_twin if rotated else z
                image = (add_noise(image, self.sky.sky_levels, zz) if galaxy_noise else
                         image + np.sqrt(self.sky.sky_levels)[:, None, None] * zz)
            truth = self._truth(skies[rotated], rows, (x, y, ix, iy, dx, dy), drawn, sizes, shear,
                                side)
            truth.meta.update({"population": self.population, "seed": seed, "index": index,
                               "field": name, "g1": shear[0], "g2": shear[1],
                               "rotated": rotated, "field_pixels": side,
                               "max_mag": self.max_mag, "density_arcmin2": self.density,
                               "ref_band": self.sky.ref_band,
                               "pixel_frame": "x = axis 1 (columns), y = axis 0 (rows), 0-based; "
                                              "field centre ((W-1)/2, (H-1)/2)",
                               "ellipticity": "reduced shear |e| = (a-b)/(a+b) (galsim.Shear)"})
            out[name] = ShearedField(
                images=image.astype(np.float32), variance=self.sky.sky_levels.copy(),
                psfs=self.sky.psfs.copy(), truth=truth, g=shear, bands=self.bands,
                pixel_scale=pix)
        return out

    def _truth(self, native: Any, rows: np.ndarray, where: tuple[np.ndarray, ...],
               stamps: Sequence[np.ndarray], sizes: np.ndarray, g: tuple[float, float],
               side: int) -> Table:
        """The truth table of galaxies ``rows`` of ``native``; ``where`` = (x, y, nearest
        column, nearest row, dx, dy) of every galaxy after the shear."""
        x, y, ix, iy, dx, dy = (np.asarray(a)[rows] for a in where)
        ux, uy = self.sky.offsets(native)
        columns = self.sky.columns(native)
        flux = (np.array([s.sum(axis=(-2, -1)) for s in stamps], np.float64) if len(rows)
                else np.zeros((0, len(self.bands))))
        table = Table({
            "id": rows.astype(np.int64), "x": x.astype(float), "y": y.astype(float),
            "dx": dx.astype(float), "dy": dy.astype(float),
            "dx_unsheared": np.asarray(ux, float)[rows],
            "dy_unsheared": np.asarray(uy, float)[rows],
            "in_field": (ix >= 0) & (ix < side) & (iy >= 0) & (iy < side),
            **{name: values[rows] for name, values in columns.items()},
            "flux": flux, "stamp_pixels": sizes[rows].astype(np.int64),
            "g1": np.full(len(rows), g[0]), "g2": np.full(len(rows), g[1]),
        })
        return table


@lru_cache(maxsize=8)
def _simulator(population: str, sim: SimulationConfig | None, max_mag: float,
               density: float) -> ShearedFieldSimulator:
    return ShearedFieldSimulator(population, sim, max_mag=max_mag, density=density)


def draw_field_set(population: str, seed: int, index: int, g: tuple[float, float], *,
                   field_pixels: int = DEFAULT_FIELD_PIXELS, max_mag: float = DEFAULT_MAX_MAG,
                   density: float = DEFAULT_DENSITY, sim: SimulationConfig | None = None,
                   noise: bool = True, galaxy_noise: bool = False) -> dict[str, ShearedField]:
    """Field ``index`` of sky ``seed`` of ``population`` ("btk" or "galsim") at shear +-g.

    Returns ``{"plus", "minus", "plus_rot", "minus_rot"}`` -> :class:`ShearedField`
    (module docstring): +g and -g with the same noise, the twins the sky rotated by 90 degrees
    (with the noise rotated too). ``field_pixels``: side of the square field (300 = 1 arcmin
    for LSST). ``max_mag``, ``density``: the faintest reference-band magnitude drawn and the
    galaxies per arcmin^2 brighter than it. ``sim``: survey, catalog and reference band
    (default ``Config().simulation``: LSST, the embedded catalog, i). ``noise=False`` returns
    the noiseless images; ``galaxy_noise`` adds the galaxies' Poisson term (module docstring).
    Depends on its arguments alone (the catalog and population are built once and cached).

    Raises ValueError for an unknown population, |g| >= 1, a non-positive ``field_pixels``,
    ``density`` or ``max_mag``, or a negative ``seed`` or ``index``.
    """
    population = _check_population(population)
    _check_draw(seed, index, g, field_pixels)
    POSITIVE_FLOAT.require(max_mag, "max_mag")
    POSITIVE_FLOAT.require(density, "density")
    if sim is not None and not isinstance(sim, SimulationConfig):
        raise TypeError(f"sim must be a SimulationConfig or None, got {type(sim).__name__}")
    simulator = _simulator(population, sim, float(max_mag), float(density))
    return simulator.draw(seed, index, g, field_pixels=field_pixels, noise=noise,
                          galaxy_noise=galaxy_noise)


__all__ = ["DEFAULT_DENSITY", "DEFAULT_FIELD_PIXELS", "DEFAULT_MAX_MAG", "PSF_PIXELS",
           "STAMP_SIZES", "ShearedField", "ShearedFieldSimulator", "VARIANTS",
           "composite_half_light_radius", "draw_field_set", "sky_half_width", "stamp_pixels"]
