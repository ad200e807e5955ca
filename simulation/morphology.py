"""Galaxy morphologies beyond CatSim's smooth bulge + disk: star-forming knots and off-centre
bulges (issue 23, build 2), drawn through BTK.

With ``simulation.morphology`` (:class:`deblend.core.config.MorphologyConfig`) the sampling
function gives every galaxy of a scene the columns of :data:`MORPHOLOGY_COLUMNS`, and
:class:`MorphologyGenerator` (BTK's ``CatsimGenerator`` with its ``render_single`` extended)
draws each galaxy as

    (1 - f) disk + knots + (bulge + AGN) shifted

- disk, bulge and AGN: BTK's own profiles of the CatSim row (``btk.draw_blends.get_catsim_galaxy``);
- knots: ``galsim.RandomKnots`` with ``n_knots`` points and a fraction f = ``knot_fraction`` of the
  disk's flux, with the disk's half-light radius sqrt(a_d b_d), then sheared to the disk's axis
  ratio b_d / a_d and turned to its position angle; the points come from ``knot_seed``, so every
  band has the same knots (their flux follows the disk's colour) and a rotated twin's are turned
  with it;
- the bulge (and the AGN) shifted by (``bulge_dx``, ``bulge_dy``) disk half-light radii in the
  galaxy's frame (x along its major axis), turned to the disk's position angle.

A galaxy with ``cosmos_index`` >= 0 (with ``cosmos_fraction`` > 0) is drawn instead as the
parametric profile GalSim builds from that row of a COSMOS fit catalogue
(``galsim.GalaxySample.makeGalaxy(gal_type="parametric")``: a Sersic or a bulge + disk fitted
to the HST image, :class:`CosmosFits`), with BTK's total flux of the CatSim row in the band (so
its colour is CatSim's) and turned by the row's ``pa_disk`` (so that random rotations and twins
turn it); it gets no knots and no bulge offset. The row is picked among the
:data:`COSMOS_WINDOW` fits nearest in magnitude (F814W ``mag_auto`` against the ``ref_band``
magnitude), so sizes follow the real size-magnitude relation; galaxies fainter than the
catalogue keep CatSim's profile.

A galaxy with ``real_index`` >= 0 (with ``real_fraction`` > 0) is drawn instead from a real HST
image: the unit-flux ``galsim.RealGalaxy`` of that row of the real-galaxy catalogue
(:func:`simulation.galsim_population.real_galaxies`: deconvolved by its HST PSF, background
pedestal removed, HST noise kept), at BTK's flux of the CatSim row and turned by its
``pa_disk``. Only the catalogue's training half is drawn
(:func:`~simulation.galsim_population.real_galaxy_split`; the other half is the benchmark's),
picked among the :data:`REAL_WINDOW` nearest in magnitude of those at most
``REAL_MAX_BRIGHTENING`` fainter in the catalogue than the row (its HST noise brightens with it);
a row brighter than that keeps its profile. A real galaxy is never also a COSMOS fit.

Then, as BTK does: rotated by ``btk_rotation``, sheared by (g1, g2), convolved with the PSF,
shifted to (ra, dec) and drawn on the stamp. Rows without the columns are drawn by BTK itself.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import galsim
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
from btk.draw_blends import CatsimGenerator, SourceNotVisible, get_catsim_galaxy

from deblend.core.config import MorphologyConfig
from simulation.galsim_population import PopulationSpec, real_galaxies, real_galaxy_split

MORPHOLOGY_COLUMNS = ("knot_fraction", "n_knots", "knot_seed", "bulge_dx", "bulge_dy")
COSMOS_COLUMN = "cosmos_index"
"""With ``cosmos_fraction`` > 0: the row of :class:`CosmosFits` a galaxy is drawn as, -1 for
CatSim's profile."""
REAL_COLUMN = "real_index"
"""With ``real_fraction`` > 0: the row of the real-galaxy catalogue a galaxy is drawn from, -1
for none."""
MORPHOLOGY_DESCRIPTIONS = {
    "knot_fraction, n_knots, knot_seed": "with simulation.morphology: the target's fraction of "
                                         "disk flux in knots, their number and their seed",
    "bulge_dx, bulge_dy": "with simulation.morphology: the target's bulge offset from the disk "
                          "centre, disk half-light radii, galaxy frame",
    COSMOS_COLUMN: "with simulation.morphology.cosmos_fraction: the row of the COSMOS fit "
                   "catalogue (after withholding) the target is drawn as, -1 for CatSim's "
                   "profile (where >= 0 its CatSim shape columns describe nothing drawn)",
    REAL_COLUMN: "with simulation.morphology.real_fraction: the row of the real-galaxy "
                 "catalogue whose HST image the target is drawn from, -1 for none",
}
COSMOS_WINDOW = 100
"""Rows of the COSMOS fits, nearest in magnitude, among which a galaxy's fit is picked."""
WITHHELD_RADIUS_ARCSEC = 1.0
REAL_WINDOW = 10
"""Training galaxies of the real-galaxy catalogue, nearest in magnitude, among which one is
picked."""
REAL_MAX_BRIGHTENING = PopulationSpec().real_max_brightening
"""mag: how much brighter than its catalogue magnitude a real galaxy may be drawn (the
benchmark's rule)."""


def packaged_cosmos_fits() -> Path:
    """The COSMOS fit catalogue packaged with fpfs (found without importing fpfs and JAX)."""
    spec = importlib.util.find_spec("fpfs")
    path = (Path(spec.submodule_search_locations[0]) / "data" / "src_cosmos.fits"
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "simulation.morphology.cosmos_fraction needs the COSMOS fits packaged with fpfs "
            "(pip install -e .[cosmos]) or simulation.morphology.cosmos_catalog")
    return path


class CosmosFits:
    """Parametric fits of real COSMOS galaxies, through ``galsim.GalaxySample``.

    ``catalog``: a GalSim parametric-fit catalogue (None: :func:`packaged_cosmos_fits`);
    ``withheld``: a GalSim real-galaxy catalogue whose galaxies (``RA``/``DEC``, degrees) are
    left out, with every fit within :data:`WITHHELD_RADIUS_ARCSEC` of one. Fits that GalSim
    marks failed (``exclusion_level="bad_fits"``) are left out too. Indices count the rest.
    """

    def __init__(self, catalog: str | None = None, withheld: str | None = None) -> None:
        path = Path(catalog) if catalog is not None else packaged_cosmos_fits()
        if not path.is_file():
            raise FileNotFoundError(f"simulation.morphology.cosmos_catalog: no file {path}")
        try:
            self.sample = galsim.GalaxySample(file_name=path.name, dir=str(path.parent),
                                              use_real=False, exclusion_level="bad_fits")
        except (OSError, KeyError, ValueError, galsim.GalSimError) as error:
            raise ValueError(f"simulation.morphology.cosmos_catalog: {path} is not a GalSim "
                             f"parametric-fit catalogue ({error})") from error
        keep = np.arange(len(self.sample))
        if withheld is not None:
            keep = keep[~self._near(keep, Path(withheld))]
        self.rows = keep
        """Indices into ``sample`` of the fits that may be drawn."""
        mags = self._column("mag_auto", keep)
        self._order = np.argsort(mags, kind="stable")
        self.mags = mags[self._order]
        """F814W magnitudes of the drawable fits, ascending."""

    def _near(self, rows: np.ndarray, withheld: Path) -> np.ndarray:
        """Which of ``rows`` lie within the withholding radius of a galaxy of ``withheld``."""
        if not withheld.is_file():
            raise FileNotFoundError(f"simulation.morphology.cosmos_withheld: no file {withheld}")
        try:
            others = Table.read(withheld, format="fits", hdu=1)
            other = SkyCoord(np.asarray(others["RA"], float), np.asarray(others["DEC"], float),
                             unit="deg")
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"simulation.morphology.cosmos_withheld: {withheld} is not a "
                             f"catalogue with RA and DEC columns ({error})") from error
        fits = SkyCoord(self._column("ra", rows), self._column("dec", rows), unit="deg")
        _, separation, _ = fits.match_to_catalog_sky(other)
        return separation.arcsec < WITHHELD_RADIUS_ARCSEC

    def _column(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Column ``name`` of the fits ``rows`` (indices of ``sample``)."""
        try:
            return np.asarray(self.sample.param_cat[name][self.sample.orig_index[rows]], float)
        except (KeyError, ValueError) as error:
            raise ValueError(f"simulation.morphology.cosmos_catalog lacks the column "
                             f"'{name}'") from error

    def __len__(self) -> int:
        return len(self.rows)

    def pick(self, mags: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each magnitude, a fit among the :data:`COSMOS_WINDOW` nearest in F814W
        magnitude; -1 beyond the faintest fit."""
        mags = np.asarray(mags, float)
        width = min(COSMOS_WINDOW, len(self.mags))
        start = np.clip(np.searchsorted(self.mags, mags) - width // 2, 0, len(self.mags) - width)
        picked = start + rng.integers(0, width, size=len(mags))
        return np.where(mags <= self.mags[-1], self._order[picked], -1)

    def galaxy(self, index: int, flux: float) -> galsim.GSObject:
        """GalSim's parametric profile of fit ``index`` (as :meth:`pick` gives), at ``flux``."""
        return self.sample.makeGalaxy(int(self.rows[index]), gal_type="parametric"
                                      ).withFlux(float(flux))


@lru_cache(maxsize=2)
def cosmos_fits(catalog: str | None, withheld: str | None) -> CosmosFits:
    """One :class:`CosmosFits` per process and pair of files."""
    return CosmosFits(catalog, withheld)


def morphology_cosmos(config: MorphologyConfig) -> CosmosFits | None:
    """The COSMOS fits ``config`` draws from, None without ``cosmos_fraction``."""
    if config.cosmos_fraction <= 0:
        return None
    return cosmos_fits(config.cosmos_catalog, config.cosmos_withheld)


class RealImages:
    """The training half of a GalSim real-galaxy catalogue, picked by magnitude."""

    def __init__(self, catalog: str) -> None:
        if not Path(catalog).is_file():
            raise FileNotFoundError(f"simulation.morphology.real_catalog: no file {catalog}")
        try:
            real = real_galaxies(catalog)
        except (OSError, KeyError, ValueError, galsim.GalSimError) as error:
            raise ValueError(f"simulation.morphology.real_catalog: {catalog} is not a GalSim "
                             f"real-galaxy catalogue with its images ({error})") from error
        rows = real_galaxy_split(len(real.profiles))[0]
        self.rows = rows[np.argsort(real.mags[rows], kind="stable")]
        """Catalogue rows training may draw, by ascending catalogue magnitude."""
        self.mags = real.mags[self.rows]
        self.profiles = real.profiles

    def pick(self, mags: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each magnitude, a catalogue row among the :data:`REAL_WINDOW` nearest in
        magnitude of those no more than :data:`REAL_MAX_BRIGHTENING` fainter; -1 where none."""
        mags = np.asarray(mags, float)
        eligible = np.searchsorted(self.mags, mags + REAL_MAX_BRIGHTENING, side="right")
        width = np.minimum(REAL_WINDOW, eligible)
        start = np.clip(np.searchsorted(self.mags, mags) - width // 2, 0, eligible - width)
        picked = start + np.floor(rng.uniform(size=len(mags)) * width).astype(np.int64)
        return np.where(width > 0, self.rows[np.minimum(picked, len(self.rows) - 1)], -1)

    def galaxy(self, row: int, flux: float) -> galsim.GSObject:
        """The HST galaxy of catalogue ``row`` (PSF-deconvolved), at ``flux``."""
        return self.profiles[row].withFlux(float(flux))


@lru_cache(maxsize=2)
def real_images(catalog: str) -> RealImages:
    """One :class:`RealImages` per process and catalogue."""
    return RealImages(catalog)


def morphology_real(config: MorphologyConfig) -> RealImages | None:
    """The real HST galaxies ``config`` draws from, None without ``real_fraction``."""
    if config.real_fraction <= 0:
        return None
    assert config.real_catalog is not None  # the config refuses a fraction without one
    return real_images(config.real_catalog)


def draw_morphology(config: MorphologyConfig, n: int, rng: np.random.Generator,
                    mags: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The :data:`MORPHOLOGY_COLUMNS` of ``n`` galaxies drawn by ``config``'s rules, with
    ``cosmos_fraction`` > 0 their :data:`COSMOS_COLUMN` and with ``real_fraction`` > 0 their
    :data:`REAL_COLUMN`, picked by their ``mags`` (ref band)."""
    radius = config.bulge_offset * np.sqrt(rng.uniform(size=n))
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    columns = {"knot_fraction": rng.uniform(*config.knot_fraction, n),
               "n_knots": rng.integers(config.n_knots[0], config.n_knots[1] + 1, n),
               "knot_seed": rng.integers(1, 2**31 - 1, n),
               "bulge_dx": radius * np.cos(angle), "bulge_dy": radius * np.sin(angle)}
    for column, source, fraction in (
            (COSMOS_COLUMN, morphology_cosmos(config), config.cosmos_fraction),
            (REAL_COLUMN, morphology_real(config), config.real_fraction)):
        if source is not None:
            if mags is None:
                raise ValueError(f"{column} is picked by magnitude: give the galaxies' mags")
            chosen = rng.uniform(size=n) < fraction
            columns[column] = np.where(chosen, source.pick(mags, rng), -1).astype(np.int64)
    if COSMOS_COLUMN in columns and REAL_COLUMN in columns:  # a real galaxy is not also a fit
        columns[COSMOS_COLUMN][columns[REAL_COLUMN] >= 0] = -1
    return columns


def load_morphology_sources(config: MorphologyConfig) -> None:
    """Load (and so check, one line naming the key) the catalogues ``config`` draws from, for a
    command to refuse a bad one before it writes anything."""
    morphology_cosmos(config)
    morphology_real(config)


def _component(entry: Table, filt, survey, **which: bool) -> galsim.GSObject | None:
    """BTK's profile of some of the row's components, None when they have no flux."""
    try:
        return get_catsim_galaxy(entry, filt, survey, **which)
    except SourceNotVisible:
        return None


def morphology_galaxy(entry: Table, filt, survey, cosmos: CosmosFits | None = None,
                      real: RealImages | None = None) -> galsim.GSObject:
    """The galaxy of one row with knots and an off-centre bulge, or as its COSMOS fit, or from
    its real HST image (module docstring), before BTK's rotation, shear, PSF and shift; raises
    BTK's ``SourceNotVisible`` when it has no flux."""
    for column, source in ((REAL_COLUMN, real), (COSMOS_COLUMN, cosmos)):
        index = int(entry[column]) if column in entry.colnames else -1
        if index >= 0:
            if source is None:
                raise ValueError(f"a row with {column} {index} needs its catalogue")
            flux = get_catsim_galaxy(entry, filt, survey).flux
            return source.galaxy(index, flux).rotate(float(entry["pa_disk"]) * galsim.degrees)
    disk = _component(entry, filt, survey, no_bulge=True, no_agn=True)
    centre = _component(entry, filt, survey, no_disk=True)
    if disk is None and centre is None:
        raise SourceNotVisible
    hlr = float(np.sqrt(entry["a_d"] * entry["b_d"]))
    angle = float(entry["pa_disk"]) * galsim.degrees
    parts = []
    if disk is not None:
        fraction = float(entry["knot_fraction"])
        if fraction > 0:
            knots = galsim.RandomKnots(int(entry["n_knots"]), half_light_radius=hlr,
                                       flux=fraction * disk.flux,
                                       rng=galsim.BaseDeviate(int(entry["knot_seed"])))
            knots = knots.shear(q=float(entry["b_d"] / entry["a_d"]),
                                beta=0.0 * galsim.degrees).rotate(angle)
            disk = disk.withFlux((1.0 - fraction) * disk.flux) + knots
        parts.append(disk)
    if centre is not None:
        dx, dy = float(entry["bulge_dx"]) * hlr, float(entry["bulge_dy"]) * hlr
        cos, sin = np.cos(angle.rad), np.sin(angle.rad)
        parts.append(centre.shift(dx * cos - dy * sin, dx * sin + dy * cos))
    return parts[0] if len(parts) == 1 else galsim.Add(parts)


class MorphologyGenerator(CatsimGenerator):
    """BTK's CatSim generator, drawing rows with :data:`MORPHOLOGY_COLUMNS` by
    :func:`morphology_galaxy` (others as BTK does)."""

    def render_single(self, entry: Table, filt, psf: galsim.GSObject, survey):
        if "knot_seed" not in entry.colnames:
            return super().render_single(entry, filt, psf, survey)
        morphology = self.blend_generator.sampling_function.morphology
        try:
            galaxy = morphology_galaxy(entry, filt, survey, morphology_cosmos(morphology),
                                       morphology_real(morphology))
        except SourceNotVisible:
            entry["not_drawn_" + filt.name] = 1
            return None
        galaxy = galaxy.rotate(galsim.Angle(entry["btk_rotation"], unit=galsim.degrees))
        if self.apply_shear:
            galaxy = galaxy.shear(g1=entry["g1"], g2=entry["g2"])
        image = galsim.Convolve(galaxy, psf).shift(entry["ra"], entry["dec"])
        return image.drawImage(nx=self._get_pix_stamp_size(survey),
                               ny=self._get_pix_stamp_size(survey),
                               scale=survey.pixel_scale.to_value("arcsec"))
