"""BTK sampling function: a bright central target with 0-N fainter neighbours around it."""

from __future__ import annotations

import galsim
import numpy as np
from astropy.table import Table
from btk.sampling_functions import SamplingFunction

from deblend.core.config import BrightTargetsConfig, MorphologyConfig
from simulation.morphology import draw_morphology


class CentralTargetSampling(SamplingFunction):
    """Scenes whose first row is the target, at the stamp centre, brighter than its neighbours.

    Positions ``ra``/``dec`` are offsets from the stamp centre in arcsec (BTK's convention).
    Neighbours are strictly fainter than the target in ``ref_band``, at a radius drawn uniformly
    in ``neighbour_shift`` and a uniform position angle. The number of neighbours is uniform in
    ``[min_neighbours, max_neighbours]``.

    Every galaxy gets the constant shear ``shear`` in columns ``g1``/``g2`` (used by BTK when
    ``apply_shear=True``). With ``random_rotation`` each galaxy's position angle is rotated by a
    uniform random angle (what BTK's ``augment_data`` does, done here so that twins can share it).
    With ``rotated_twins`` every other call returns the previous scene rotated by 90 degrees about
    the stamp centre: positions (x, y) -> (-y, x) and position angles + 90 deg; to first order the
    twin's intrinsic ellipticities are the negatives of the original's, so shape noise cancels.

    With ``shear_positions`` (and a non-zero ``shear``) the scene is a sheared sky: besides each
    profile (sheared by BTK), every galaxy's offset (ra, dec) from the target (the stamp centre,
    the shear centre) is mapped by GalSim's area-preserving shear matrix
    ``galsim.Shear(g1=, g2=).getMatrix()``, the map GalSim applies to a profile sheared with
    ``.shear(g1, g2)``; BTK shifts each galaxy by (ra, dec) with GalSim's ``shift``, so ra is
    +x (array axis 1) and dec is +y (array axis 0). The unsheared offsets are kept in the columns
    ``ra_unsheared``/``dec_unsheared``, and a rotated twin rotates the unsheared scene, then
    shears its positions. Random draws do not depend on the shear, so the same seed gives the
    same galaxies and (unsheared) positions at +g and -g. Off (the default), or at zero shear,
    the tables are exactly those of the plain sampling.

    With ``morphology`` every galaxy also gets the columns of
    :data:`simulation.morphology.MORPHOLOGY_COLUMNS` (knots, bulge offset: in the galaxy's frame,
    so a rotated twin keeps them and turns them with its position angle), and with its
    ``cosmos_fraction`` the COSMOS fit each is drawn as, picked by its ``ref_band`` magnitude.

    With ``bright`` (:class:`deblend.core.config.BrightTargetsConfig`) a fraction of the targets
    is brightened and grown (:func:`brighten_target`, before the morphology is drawn, so a COSMOS
    fit is picked at the new magnitude), from a stream of its own: the other scenes are those
    drawn without it.
    """

    def __init__(
        self,
        stamp_size: float,
        min_neighbours: int = 0,
        max_neighbours: int = 2,
        neighbour_shift: tuple[float, float] = (1.0, 4.0),
        target_max_mag: float = 25.3,
        neighbour_max_mag: float = 27.0,
        ref_band: str = "i",
        shear: tuple[float, float] = (0.0, 0.0),
        random_rotation: bool = True,
        rotated_twins: bool = False,
        seed: int = 0,
        shear_positions: bool = False,
        morphology: MorphologyConfig | None = None,
        bright: BrightTargetsConfig | None = None,
    ) -> None:
        super().__init__(stamp_size=stamp_size, max_number=max_neighbours + 1,
                         min_number=min_neighbours + 1, seed=int(seed))
        if neighbour_shift[1] > stamp_size / 2:
            raise ValueError(
                f"neighbour_shift max {neighbour_shift[1]}\" lies outside the "
                f"{stamp_size:.2f}\" stamp")
        self.min_neighbours = min_neighbours
        self.max_neighbours = max_neighbours
        self.neighbour_shift = neighbour_shift
        self.target_max_mag = target_max_mag
        self.neighbour_max_mag = neighbour_max_mag
        self.mag_column = f"{ref_band}_ab"
        self.shear = shear
        self.random_rotation = random_rotation
        self.rotated_twins = rotated_twins
        self.shear_positions = bool(shear_positions)
        self.morphology = morphology
        self._morphology_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
        """Morphology's own stream: the same seed gives the same scenes with or without it."""
        self.bright = bright
        self._bright_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
        """Bright targets' own stream, likewise."""
        self._previous: Table | None = None
        self._prepared_for: int | None = None

    def _prepare(self, table: Table) -> None:
        """Index the catalog once: rows sorted by magnitude, and the target candidates."""
        if self.mag_column not in table.colnames:
            raise ValueError(f"catalog lacks the reference magnitude column '{self.mag_column}'")
        mags = np.asarray(table[self.mag_column], dtype=float)
        self._order = np.argsort(mags, kind="stable")
        self._sorted_mags = mags[self._order]
        self._targets = np.flatnonzero(mags <= self.target_max_mag)
        if len(self._targets) == 0:
            raise ValueError(
                f"no catalog galaxy is brighter than target_max_mag={self.target_max_mag} "
                f"in {self.mag_column}")
        self._n_faint_limit = int(np.searchsorted(self._sorted_mags, self.neighbour_max_mag,
                                                  side="right"))
        self._prepared_for = id(table)

    def __call__(self, table: Table) -> Table:
        """One scene's table: row 0 the target, then the neighbours."""
        if self.rotated_twins and self._previous is not None:
            twin = rotate_scene_90(self._previous)
            self._previous = None
            return self._sheared_sky(twin)
        if self._prepared_for != id(table):
            self._prepare(table)
        rng = self.rng
        target = int(rng.choice(self._targets))
        target_mag = float(table[self.mag_column][target])
        first_fainter = int(np.searchsorted(self._sorted_mags, target_mag, side="right"))
        n_wanted = int(rng.integers(self.min_neighbours, self.max_neighbours + 1))
        n_available = max(self._n_faint_limit - first_fainter, 0)
        n_neighbours = n_wanted if n_available > 0 else 0
        picks = first_fainter + rng.integers(0, max(n_available, 1), size=n_neighbours)
        rows = [target] + [int(self._order[p]) for p in picks]
        scene = table[rows]
        scene["ra"] = 0.0
        scene["dec"] = 0.0
        if n_neighbours:
            radius = rng.uniform(*self.neighbour_shift, size=n_neighbours)
            angle = rng.uniform(0.0, 2 * np.pi, size=n_neighbours)
            scene["ra"][1:] = radius * np.cos(angle)
            scene["dec"][1:] = radius * np.sin(angle)
        if self.random_rotation:
            turn = rng.uniform(0.0, 180.0, size=len(scene))
            scene["pa_disk"] = (np.asarray(scene["pa_disk"], float) + turn) % 180.0
            scene["pa_bulge"] = (np.asarray(scene["pa_bulge"], float) + turn) % 180.0
        if self.bright is not None:
            bright_rng = self._bright_rng
            if bright_rng.uniform() < self.bright.fraction:
                brighten_target(scene, self.mag_column, bright_rng.uniform(*self.bright.mag),
                                self.bright.size_slope)
        if self.morphology is not None:
            for name, column in draw_morphology(self.morphology, len(scene),
                                                self._morphology_rng,
                                                np.asarray(scene[self.mag_column])).items():
                scene[name] = column
        scene["g1"] = float(self.shear[0])
        scene["g2"] = float(self.shear[1])
        scene["twin"] = 0
        if self.rotated_twins:
            self._previous = scene
        return self._sheared_sky(scene)

    def _sheared_sky(self, scene: Table) -> Table:
        """``scene`` with its positions sheared (a copy), or ``scene`` itself when not asked."""
        g1, g2 = float(self.shear[0]), float(self.shear[1])
        if not self.shear_positions or (g1 == 0.0 and g2 == 0.0):
            return scene
        return shear_scene_positions(scene, (g1, g2))


SIZE_COLUMNS = ("a_d", "b_d", "a_b", "b_b")
"""CatSim's disk and bulge semi-axes (arcsec), grown with a brightened target."""


def brighten_target(scene: Table, mag_column: str, mag: float, size_slope: float) -> None:
    """Row 0 of ``scene`` (the target) brightened in place to ``mag`` in ``mag_column``: every
    band's magnitude minus the same dm (colours kept), the semi-axes of :data:`SIZE_COLUMNS`
    times 10^(0.4 size_slope dm). A target already at least that bright is left as it is."""
    dm = float(scene[mag_column][0]) - float(mag)
    if dm <= 0:
        return
    for name in scene.colnames:
        if name.endswith("_ab"):
            scene[name][0] -= dm
    grow = 10.0 ** (0.4 * size_slope * dm)
    for name in SIZE_COLUMNS:
        if name in scene.colnames:
            scene[name][0] *= grow


def shear_scene_positions(scene: Table, g: tuple[float, float]) -> Table:
    """A copy of ``scene`` whose offsets (ra, dec) from the stamp centre are sheared by ``g``.

    (ra, dec) -> S (ra, dec) with S = ``galsim.Shear(g1=g[0], g2=g[1]).getMatrix()``, the map of
    positions of a profile sheared with GalSim's ``.shear``; the unsheared offsets are kept in
    ``ra_unsheared``/``dec_unsheared``.
    """
    matrix = galsim.Shear(g1=float(g[0]), g2=float(g[1])).getMatrix()
    out = scene.copy()
    ra = np.asarray(scene["ra"], float)
    dec = np.asarray(scene["dec"], float)
    out["ra_unsheared"] = ra
    out["dec_unsheared"] = dec
    out["ra"] = matrix[0, 0] * ra + matrix[0, 1] * dec
    out["dec"] = matrix[1, 0] * ra + matrix[1, 1] * dec
    return out


def rotate_scene_90(scene: Table) -> Table:
    """The scene rotated by +90 degrees about the stamp centre (counter-clockwise on the sky image).

    Positions (x, y) -> (-y, x); each galaxy's position angle + 90 deg. The applied shear columns
    are kept: the twin is sheared by the same (g1, g2).
    """
    twin = scene.copy()
    ra = np.asarray(scene["ra"], float)
    dec = np.asarray(scene["dec"], float)
    twin["ra"] = -dec
    twin["dec"] = ra
    twin["pa_disk"] = (np.asarray(scene["pa_disk"], float) + 90.0) % 180.0
    twin["pa_bulge"] = (np.asarray(scene["pa_bulge"], float) + 90.0) % 180.0
    twin["twin"] = 1
    return twin
