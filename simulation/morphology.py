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

Then, as BTK does: rotated by ``btk_rotation``, sheared by (g1, g2), convolved with the PSF,
shifted to (ra, dec) and drawn on the stamp. Rows without the columns are drawn by BTK itself.
"""

from __future__ import annotations

import galsim
import numpy as np
from astropy.table import Table
from btk.draw_blends import CatsimGenerator, SourceNotVisible, get_catsim_galaxy

from deblend.core.config import MorphologyConfig

MORPHOLOGY_COLUMNS = ("knot_fraction", "n_knots", "knot_seed", "bulge_dx", "bulge_dy")
MORPHOLOGY_DESCRIPTIONS = {
    "knot_fraction, n_knots, knot_seed": "with simulation.morphology: the target's fraction of "
                                         "disk flux in knots, their number and their seed",
    "bulge_dx, bulge_dy": "with simulation.morphology: the target's bulge offset from the disk "
                          "centre, disk half-light radii, galaxy frame",
}


def draw_morphology(config: MorphologyConfig, n: int, rng: np.random.Generator
                    ) -> dict[str, np.ndarray]:
    """The :data:`MORPHOLOGY_COLUMNS` of ``n`` galaxies drawn by ``config``'s rules."""
    radius = config.bulge_offset * np.sqrt(rng.uniform(size=n))
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return {"knot_fraction": rng.uniform(*config.knot_fraction, n),
            "n_knots": rng.integers(config.n_knots[0], config.n_knots[1] + 1, n),
            "knot_seed": rng.integers(1, 2**31 - 1, n),
            "bulge_dx": radius * np.cos(angle), "bulge_dy": radius * np.sin(angle)}


def _component(entry: Table, filt, survey, **which: bool) -> galsim.GSObject | None:
    """BTK's profile of some of the row's components, None when they have no flux."""
    try:
        return get_catsim_galaxy(entry, filt, survey, **which)
    except SourceNotVisible:
        return None


def morphology_galaxy(entry: Table, filt, survey) -> galsim.GSObject:
    """The galaxy of one row with knots and an off-centre bulge (module docstring), before BTK's
    rotation, shear, PSF and shift; raises BTK's ``SourceNotVisible`` when it has no flux."""
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
        try:
            galaxy = morphology_galaxy(entry, filt, survey)
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
