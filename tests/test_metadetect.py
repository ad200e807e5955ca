"""Metadetection of cells: detection finds sheared positions, the population response holds
the selection that a per-object response misses, and the deblender measures tiled cells once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import galsim
import numpy as np
import pytest

from deblend.core.cells import CellImage, tile
from deblend.core.fourier_metacal import FourierMetacal
from deblend.core.metacal import metacal_images, metacal_response, population_shear, shear_matrix
from deblend.core.metadetect import (
    EDGE,
    FLAGS,
    LOW_SNR,
    MetadetectSettings,
    cell_plane,
    detect_cell,
    measure_cell,
    metadetect_shear,
    step_means,
)
from deblend.core.shapes import ellipticity_from_moments, gaussian_weight, second_moments
from deblend.core.sky_plane import held_metacal
from deblend.core.stamps import cut_stamp
from tests.conftest import background_gradient

SCALE = 0.2
BANDS = ("r", "i")
PSF = galsim.Moffat(beta=3.5, fwhm=0.8)
SKY_SIGMA = 10.0


def psf_images(size: int = 33) -> np.ndarray:
    image = PSF.drawImage(nx=size, ny=size, scale=SCALE).array.astype(np.float64)
    return np.stack([image] * len(BANDS))


def field(offsets: np.ndarray, shapes: np.ndarray, g: tuple[float, float], size: int,
          noise: np.ndarray | None = None, flux: float = 3e4) -> tuple[np.ndarray, np.ndarray]:
    """(bands, size, size) image of exponential galaxies at ``offsets`` (pixels from the
    centre, unsheared) with intrinsic distortions ``shapes``, shear g on profiles and
    positions; and the sheared positions (x, y) in pixels."""
    centre = (size - 1) / 2.0
    sheared = offsets @ shear_matrix(*g).T
    image = galsim.ImageD(size, size, scale=SCALE)
    for (dx, dy), (e1, e2) in zip(sheared, shapes):
        galaxy = (galsim.Exponential(half_light_radius=0.45, flux=flux).shear(e1=e1, e2=e2)
                  .shear(g1=g[0], g2=g[1]))
        galsim.Convolve(galaxy, PSF).drawImage(image=image, add_to_image=True,
                                               offset=(dx, dy))
    array = np.stack([image.array] * len(BANDS))
    if noise is not None:
        array = array + noise
    return array, sheared + centre


def test_detection_on_a_sheared_noiseless_field_finds_the_sheared_positions():
    rng = np.random.default_rng(0)
    offsets = np.array([[-30.0, -25.0], [28.0, -20.0], [-22.0, 31.0], [25.0, 27.0],
                        [0.0, 0.0]]) + rng.uniform(-0.5, 0.5, (5, 2))
    shapes = rng.uniform(-0.3, 0.3, (5, 2))
    g = (0.05, -0.03)
    image, truth = field(offsets, shapes, g, 101)
    found = detect_cell(image.mean(axis=0), 1.0, 5.0, 5, 0.005)
    assert len(found) == len(truth)
    distance = np.hypot(*(found[:, None] - truth[None]).transpose(2, 0, 1)).min(axis=0)
    assert distance.max() < 0.02  # windowed centroids of symmetric profiles
    unsheared = offsets + 50.0  # the test can fail: unsheared positions are ~1 px away
    assert np.hypot(*(found[:, None] - unsheared[None]).transpose(2, 0, 1)).min(
        axis=0).max() > 0.3
    box = (0, 50, 0, 50)  # a cell owning the lower-left quarter: the same detections there
    near = detect_cell(image.mean(axis=0), 1.0, 5.0, 5, 0.005, near=box)
    owned = CellImage(image, np.ones_like(image), psf_images(), owned=box).owns
    assert np.array_equal(near[owned(*near.T)], found[owned(*found.T)])
    assert 1 <= len(near) < len(found)  # the far ones got no windowed centroid


def toy_estimator(stamps: np.ndarray) -> np.ndarray:
    """Gaussian-weighted (sigma 3 px) moments of the band sum, about the stamp centre."""
    weight = gaussian_weight(stamps.shape[-1], 3.0)
    return np.stack(ellipticity_from_moments(second_moments(stamps.sum(axis=1), weight)), 1)


CUT = 0.04


def select(table, name: str = "toy") -> None:
    """A selection on the estimator itself: keep |e| > CUT (a third of the galaxies go)."""
    e = np.hypot(table[f"{name}_e1"], table[f"{name}_e2"])
    table["flags"][~(e > CUT)] |= LOW_SNR


@pytest.mark.slow
def test_population_response_recovers_the_shear_a_per_object_response_misses():
    """Galaxies on a grid and their 90-degree twins, +g and -g with the same noise,
    metadetection with a toy estimator and a cut on its own |e| applied to every image's
    catalogue: the population response recovers g; the per-object response (detections of the
    noshear image, cut applied there only) misses the selection response (measured on these
    seeds: m = +0.036 and +0.198; without the cut both are -0.02, the noise of 196 objects)."""
    rng = np.random.default_rng(3)
    grid = np.array([(x, y) for x in range(-96, 97, 32) for y in range(-96, 97, 32)], float)
    offsets = np.concatenate([grid + rng.uniform(-2, 2, grid.shape) for _ in range(2)])
    shapes = np.clip(rng.normal(0, 0.3, grid.shape), -0.5, 0.5)
    shapes = np.concatenate([shapes, -shapes])  # 90-degree twins
    size, g = 240, (0.02, 0.0)
    psfs = psf_images()
    settings = MetadetectSettings(stamp_pixels=25, min_snr=5.0, threshold=3.0,
                                  detection_bands=BANDS)
    variance = np.full((len(BANDS), size, size), SKY_SIGMA ** 2)
    operator = FourierMetacal(psfs)
    population, per_object = {}, {}
    for sign in (1, -1):
        sums = {"e": [], "R": []}
        cats = []
        for half in (0, 1):
            rows = slice(half * len(grid), (half + 1) * len(grid))
            noise = np.random.default_rng(10 + half).normal(0, SKY_SIGMA, variance.shape)
            image, _ = field(offsets[rows], shapes[rows], (sign * g[0], sign * g[1]), size,
                             noise)
            cell = CellImage(image, variance, psfs)
            table = measure_cell(cell, BANDS, {"toy": toy_estimator}, settings, seed=half,
                                 operator=operator)
            select(table)
            cats.append(table)
            noshear = table[table["mdet_step"] == "noshear"]
            positions = np.stack([noshear["x"], noshear["y"]], 1)
            stamps = np.stack([cut_stamp(image, x, y, 45) for x, y in positions])
            images = metacal_images(stamps, psfs, margin=10)
            e = {name: toy_estimator(a) for name, a in images.items()}
            kept = np.hypot(*e["noshear"].T) > CUT
            sums["e"].append(e["noshear"][kept])
            sums["R"].append(metacal_response(e)[kept])
        from astropy.table import vstack
        population[sign] = metadetect_shear(vstack(cats), "toy")[0]
        per_object[sign] = population_shear(np.concatenate(sums["e"]),
                                            np.concatenate(sums["R"]))
    m_population = (population[1][0] - population[-1][0]) / (2 * g[0]) - 1
    m_object = (per_object[1][0] - per_object[-1][0]) / (2 * g[0]) - 1
    assert abs(m_population) < 0.06
    assert m_object > 0.12  # the selection response it misses


def test_measure_cell_flags_and_ownership():
    """Detections outside the owned square are not in the catalogue; edge stamps, low S/N and
    masked pixels are flagged with the documented bits; bad input is refused."""
    rng = np.random.default_rng(1)
    offsets = np.array([[-40.0, 0.0], [0.0, 0.0], [38.0, 4.0]])
    image, truth = field(offsets, np.zeros((3, 2)), (0.0, 0.0), 101,
                         rng.normal(0, SKY_SIGMA, (2, 101, 101)))
    variance = np.full(image.shape, SKY_SIGMA ** 2)
    psfs = psf_images()
    settings = MetadetectSettings(stamp_pixels=25, threshold=3.0, detection_bands=BANDS)
    full = measure_cell(CellImage(image, variance, psfs), BANDS, {"toy": toy_estimator},
                        settings)
    noshear = full[full["mdet_step"] == "noshear"]
    assert len(noshear) == 3 and set(full["mdet_step"]) == {"noshear", "1p", "1m", "2p", "2m"}
    assert list(noshear["flags"][np.argsort(noshear["x"])]) == [EDGE, 0, 0]  # x = 10 < 25 // 2
    owned = measure_cell(CellImage(image, variance, psfs, owned=(0, 50, 0, 101)), BANDS,
                         {"toy": toy_estimator}, settings)
    assert np.all(owned["x"] < 49.5) and (owned["mdet_step"] == "noshear").sum() == 1
    masked = variance.copy()
    masked[:, 48:53, 48:53] = np.inf
    flagged = measure_cell(CellImage(image, masked, psfs), BANDS, {"toy": toy_estimator},
                           settings)
    assert (flagged["flags"] & 2).any() and 2 in FLAGS
    missing = variance.copy()
    missing[1] = np.inf  # the i band missing from the whole cell: detected on r alone
    alone = measure_cell(CellImage(image, missing, psfs), BANDS, {"toy": toy_estimator},
                         settings)
    assert ((alone["mdet_step"] == "noshear") & (alone["flags"] == 0)).sum() == 2
    with pytest.raises(ValueError, match="detection band"):
        measure_cell(CellImage(image, variance, psfs), ("g", "u"), {"toy": toy_estimator},
                     settings)
    bad = image.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite pixels that are not masked"):
        measure_cell(CellImage(bad, variance, psfs), BANDS, {"toy": toy_estimator}, settings)


def test_tiles_partition_the_image_and_own_each_pixel_once():
    tiles = tile((130, 250), 100, 20)
    owned = np.zeros((130, 250), int)
    for t in tiles:
        x0, x1, y0, y1 = t.owned
        owned[y0:y1, x0:x1] += 1
        rx0, rx1, ry0, ry1 = t.read
        assert rx0 == max(x0 - 20, 0) and ry1 == min(y1 + 20, 130)
    assert (owned == 1).all() and len(tiles) == 6
    with pytest.raises(ValueError, match="cell"):
        tile((10, 10), 0, 2)


def test_deblender_measures_tiled_cells_once(trained_run):
    """The tiny run on a six-band field cut into overlapping cells: every row is owned by one
    cell, positions are in the field's pixels, the deblender's columns and per-object responses
    are there, and the same cells give the same catalogue (seeded correction noise)."""
    from deblend.core.inference import Deblender
    from simulation.surveys import get_survey
    from simulation.surveys import psf_images as survey_psfs

    model = Deblender.from_run(trained_run)
    survey = get_survey("LSST")
    bands = tuple(survey.available_filters)
    rng = np.random.default_rng(4)
    size = 160
    image = galsim.ImageD(size, size, scale=SCALE)
    truth = np.array([(40, 40), (80, 40), (120, 40), (40, 85), (80, 85), (120, 85), (60, 125),
                      (100, 125)], float) + rng.uniform(-3, 3, (8, 2))
    cube = np.zeros((len(bands), size, size))
    for b, band in enumerate(bands):
        image.setZero()
        for x, y in truth:
            galsim.Convolve(galsim.Exponential(half_light_radius=0.5, flux=2e5),
                            survey.get_filter(band).psf).drawImage(
                image=image, add_to_image=True, offset=(x - 79.5, y - 79.5))
        cube[b] = image.array
    variance = np.full(cube.shape, 400.0)
    cube += rng.normal(0, 20.0, cube.shape)
    psfs = survey_psfs("LSST", bands, 45)
    cells = [CellImage(t.cut(cube), t.cut(variance), psfs, origin=t.read[::2],
                       owned=t.owned_in_cell()) for t in tile((size, size), 80, 30)]
    catalogue = model.measure_cells(cells, seed=7, views=1)
    noshear = catalogue[catalogue["mdet_step"] == "noshear"]
    assert {"deblend_e1", "deblend_e2", "r11", "r22", "flux_i", "forced_flux_i", "snr", "flags",
            "cell"} <= set(catalogue.colnames)
    kept = noshear[noshear["flags"] == 0]
    distance = np.hypot(*(np.stack([kept["x"], kept["y"]], 1)[:, None] - truth[None])
                        .transpose(2, 0, 1))
    assert len(kept) == len(truth)  # each galaxy once, whichever cell owns it
    assert distance.min(axis=0).max() < 0.5  # in the field's pixels
    assert np.isfinite(noshear["r11"]).all() and np.isnan(
        catalogue[catalogue["mdet_step"] == "1p"]["r11"]).all()
    again = model.measure_cells(cells, seed=7, views=1)
    np.testing.assert_array_equal(again["deblend_e1"], catalogue["deblend_e1"])
    with pytest.raises(ValueError, match="bands"):
        model.measure_cells([CellImage(cube[:3], variance[:3], psfs[:3])])


def test_cells_hold_the_sky_plane_out_of_metacal():
    """``hold_sky_plane`` on cells: each cell's fitted plane (masked pixels left out) is put
    back unsheared in the five images, so an estimator that reads the sky's gradient sees the
    same gradient at +delta and -delta (no false response); without the hold metacal shears the
    gradient into one. The walk applies it (population response through ``measure_cell``)."""
    rng = np.random.default_rng(2)
    offsets = np.array([[-25.0, -20.0], [22.0, -18.0], [-15.0, 24.0], [20.0, 25.0]])
    image, _ = field(offsets, rng.uniform(-0.2, 0.2, (4, 2)), (0.0, 0.0), 101, flux=3e3)
    slope = 0.05  # electrons per pixel: 0.25 sigma at the cell's edges, never detected
    sky = (np.arange(101) - 50.0)[None, None, :] * slope + 0.2 * SKY_SIGMA
    variance = np.full(image.shape, SKY_SIGMA ** 2)
    variance[:, 5:12, 80:90] = np.inf  # masked: garbage that the plane must not see
    dirty = np.where(np.isfinite(variance), image + sky, 1e5)
    psfs = psf_images()
    settings = MetadetectSettings(stamp_pixels=25, threshold=3.0, detection_bands=BANDS,
                                  noise_correction=False)
    held = dataclasses.replace(settings, hold_sky_plane=True)
    masked = ~np.isfinite(variance)
    plane = cell_plane(np.where(masked, 0.0, dirty), masked, held)
    assert cell_plane(dirty, masked, settings) is None
    np.testing.assert_allclose(plane, np.broadcast_to(sky, plane.shape), atol=0.02 * SKY_SIGMA)
    operator = FourierMetacal(psfs, settings.delta)
    clean = held_metacal(operator, np.where(masked, 0.0, image), None, None)
    for name, sheared in held_metacal(operator, np.where(masked, 0.0, dirty), None, plane,
                                      masked).items():
        np.testing.assert_allclose(sheared - clean[name], plane, atol=1e-3 * SKY_SIGMA)

    def response(cell: np.ndarray, walk: MetadetectSettings) -> float:
        """R11 of the sky-reading estimator (galaxies' wings in the stamps' edges, and the sky)."""
        means = step_means(measure_cell(CellImage(cell, variance, psfs), BANDS,
                                        {"sky": background_gradient}, walk), "sky")
        return (means["1p"][0] - means["1m"][0]) / (2 * settings.delta)

    galaxies = response(np.where(masked, 1e5, image), held)  # the galaxies' own, no sky
    gradient = slope * 24  # what the estimator reads off the plane
    assert abs(response(dirty, held) - galaxies) < 1e-3 * gradient
    assert response(dirty, settings) - galaxies < -0.7 * gradient  # the plane sheared, read as R


def test_the_hold_leaves_cache_keys_alone_when_off():
    """Settings without the hold key caches as before it existed; with it, differently; a
    non-boolean is refused."""
    settings = MetadetectSettings(stamp_pixels=25)
    assert "hold_sky_plane" not in settings.identity()
    assert settings.identity() == {k: v for k, v in settings.__dict__.items()
                                   if k not in ("hold_sky_plane", "min_size_ratio")}
    assert dataclasses.replace(settings, hold_sky_plane=True).identity()["hold_sky_plane"]
    with pytest.raises(ValueError, match="hold_sky_plane"):
        MetadetectSettings(hold_sky_plane="yes")


def test_the_walks_default_views_cancel_the_regressors_preferred_orientation():
    """Round galaxies have e = 0. The packaged quick regressor read in one view prefers an
    orientation (e = (-0.018, -0.024) +- 0.001 on these: an additive shear bias that metacal
    keeps); the walk's default of two views, the second turned by 90 degrees (e -> -e), cancels
    it to within its noise ((-0.0006, -0.0010) +- 0.0009). 200 round exponentials (half-light
    radius 0.4", S/N about 40 in i) under a 0.86" Kolmogorov PSF with the quick job's sky
    noise."""
    from deblend import Deblender
    from deblend.core.metadetect import WALK_VIEWS

    model = Deblender.from_run(Path(__file__).resolve().parents[1] / "deblend" / "weights"
                               / "quick", device="cpu")
    size = model.stamp_pixels
    sky = np.array([1612.0, 24790.0, 130617.0, 188799.0, 257811.0, 298745.0])
    colour = np.array([0.25, 0.5, 0.83, 1.0, 1.08, 1.17])
    galaxy = galsim.Convolve(galsim.Exponential(half_light_radius=0.4, flux=1.2e5),
                             galsim.Kolmogorov(fwhm=0.86))
    clean = galaxy.drawImage(nx=size, ny=size, scale=SCALE).array
    rng = np.random.default_rng(5)
    stamps = (colour[None, :, None, None] * clean
              + rng.normal(size=(200, 6, size, size)) * np.sqrt(sky)[None, :, None, None])

    def mean_e(views: int) -> tuple[np.ndarray, np.ndarray]:
        out = model.predict(stamps.astype(np.float32), 256, views, reconstruct=False)
        e = out.ellipticity if out.ellipticity_raw is None else out.ellipticity_raw
        return e.mean(axis=0), e.std(axis=0) / np.sqrt(len(e))

    walk, walk_err = mean_e(WALK_VIEWS)
    one, one_err = mean_e(1)
    assert WALK_VIEWS == 2
    assert (np.abs(walk) < 4 * walk_err + 1e-3).all(), (walk, walk_err)
    assert one[1] < -0.01 and abs(one[1]) > 8 * one_err[1], (one, one_err)
