"""Paired +g / -g shear populations (simulation.shear_pairs): real BTK and GalSim, small draws."""

from __future__ import annotations

import dataclasses

import galsim
import numpy as np
import pytest

from deblend.core.config import Config
from simulation.builder import SceneSource
from simulation.galsim_population import GalSimPopulation
from simulation.sampling import CentralTargetSampling
from simulation.shear_pairs import (
    add_noise,
    draw_noiseless_pairs,
    draw_shear_pairs,
    noise_fields,
)

POPULATIONS = ("btk", "galsim")
G = (0.09, 0.0)


def two_galaxy_sim():
    """Scenes of exactly one neighbour, close enough that a wide stamp holds all its light."""
    return dataclasses.replace(Config().simulation, stamp_pixels=101, min_neighbours=1,
                               max_neighbours=1, neighbour_shift=(1.5, 2.5))


def centroid(image: np.ndarray) -> np.ndarray:
    """Light centroid (x, y) in pixels from the stamp centre (S-1)/2 of a (bands, S, S) image."""
    image = image.astype(np.float64).sum(axis=0)
    y, x = np.indices(image.shape)
    c = (image.shape[0] - 1) / 2
    return np.array([(image * x).sum(), (image * y).sum()]) / image.sum() - c


def shear_matrix(g):
    return galsim.Shear(g1=g[0], g2=g[1]).getMatrix()


# (a) +g and -g share the noise ------------------------------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_zero_shear_pairs_are_identical(population):
    batch = draw_shear_pairs(population, 2, 4, (0.0, 0.0), neighbours=True)
    assert np.array_equal(batch.plus, batch.minus)
    assert not np.array_equal(batch.plus, batch.correction_noise)


@pytest.mark.parametrize("population", POPULATIONS)
def test_plus_minus_noise_cancels_away_from_galaxies(population):
    g, seed = (0.05, -0.03), 8
    batch = draw_shear_pairs(population, 2, seed, g, neighbours=True)
    clean = draw_noiseless_pairs(population, 2, seed, g, neighbours=True)
    sky = batch.sky_variance
    assert np.allclose(sky, clean.sky_levels)
    for i in range(2):
        z, z_corr = noise_fields(seed, population, i, batch.plus.shape[1:])
        # the stated rule, bit for bit
        for noisy, noiseless in ((batch.plus, clean.plus_blend), (batch.minus, clean.minus_blend)):
            assert np.array_equal(noisy[i], add_noise(noiseless[i], sky, z).astype(np.float32))
        assert np.array_equal(batch.correction_noise[i],
                              (np.sqrt(sky)[:, None, None] * z_corr).astype(np.float32))
        signal = clean.plus_blend[i].astype(np.float64) - clean.minus_blend[i]
        residual = (batch.plus[i].astype(np.float64) - batch.minus[i]) - signal
        faint = np.maximum(np.abs(clean.plus_blend[i]), np.abs(clean.minus_blend[i])) \
            < 1e-4 * sky[:, None, None]
        sigma = np.broadcast_to(np.sqrt(sky)[:, None, None], faint.shape)
        assert faint.mean() > 0.3
        # where there is no galaxy light the noise cancels (up to float32 rounding)
        assert np.all(np.abs(residual[faint]) < 1e-3 * sigma[faint])
        # where galaxies are, plus and minus differ (by the sheared signal)
        assert np.abs(signal).max() > 0.01 * np.abs(clean.plus_blend[i]).max() > 0
    # the correction field has the sky variance, and is independent of the image noise
    noise = batch.correction_noise.astype(np.float64)
    assert np.allclose(noise.var(axis=(0, 2, 3)), sky, rtol=0.1)


# (b) positions are sheared with the scene -------------------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_neighbour_positions_are_sheared(population):
    sim = two_galaxy_sim()
    sheared = draw_noiseless_pairs(population, 4, 2, G, neighbours=True, sim=sim)
    still = draw_noiseless_pairs(population, 4, 2, (0.0, 0.0), neighbours=True, sim=sim)
    for i in range(4):
        offset = sheared.offsets[i][1] / sheared.pixel_scale  # unsheared, pixels
        assert np.allclose(offset, still.offsets[i][1] / still.pixel_scale)
        c0 = centroid(still.plus_blend[i] - still.plus_target[i])
        assert np.allclose(c0, offset, atol=0.1)
        for g, blend, target in ((G, sheared.plus_blend, sheared.plus_target),
                                 ((-G[0], -G[1]), sheared.minus_blend, sheared.minus_target)):
            moved = centroid(blend[i] - target[i]) - c0
            expected = shear_matrix(g) @ offset - offset
            assert np.linalg.norm(expected) > 0.3
            assert np.allclose(moved, expected, atol=0.05), (population, i, moved, expected)
        # the target stays at the centre
        assert np.allclose(centroid(sheared.plus_target[i]), 0.0, atol=0.01)


def test_btk_positions_do_not_move_without_shear_positions():
    sim = dataclasses.replace(two_galaxy_sim(), noise="none", rotated_twins=True,
                              btk_batch_size=4)
    images = {}
    for g in ((0.0, 0.0), G):
        source = SceneSource(dataclasses.replace(sim, shear=g))
        batch = source.drawer(5, shear_positions=False).draw()
        images[g] = batch.blend - batch.clean
        assert all("ra_unsheared" not in t.colnames for t in batch.tables)
    for i in range(4):
        assert np.allclose(centroid(images[G][i]), centroid(images[(0.0, 0.0)][i]), atol=0.05)


# (c) twins ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_twins_rotate_the_unsheared_scene(population):
    pairs = draw_noiseless_pairs(population, 6, 1, (0.04, 0.06), neighbours=True)
    assert list(pairs.twin) == [0, 1] * 3
    for k in range(0, 6, 2):
        first, twin = pairs.offsets[k], pairs.offsets[k + 1]
        assert np.allclose(twin, np.stack([-first[:, 1], first[:, 0]], axis=1), atol=1e-12)


def test_sampling_twin_shears_the_rotated_unsheared_positions():
    table = SceneSource(Config().simulation).catalog.table
    g = (0.07, -0.04)
    sampling = CentralTargetSampling(9.1, min_neighbours=2, shear=g, rotated_twins=True, seed=2,
                                     shear_positions=True)
    plain = CentralTargetSampling(9.1, min_neighbours=2, shear=g, rotated_twins=True, seed=2)
    matrix = shear_matrix(g)
    for _ in range(2):
        scene, twin = sampling(table), sampling(table)
        plain_scene, plain_twin = plain(table), plain(table)
        for sheared, unsheared in ((scene, plain_scene), (twin, plain_twin)):
            xy = np.stack([np.asarray(unsheared["ra"]), np.asarray(unsheared["dec"])])
            assert np.array_equal(sheared["ra_unsheared"], unsheared["ra"])
            assert np.array_equal(sheared["dec_unsheared"], unsheared["dec"])
            assert np.allclose(np.stack([sheared["ra"], sheared["dec"]]), matrix @ xy, atol=1e-12)
            assert np.array_equal(sheared["pa_disk"], unsheared["pa_disk"])
        assert np.allclose(twin["ra_unsheared"], -np.asarray(scene["dec_unsheared"]))
        assert np.allclose(twin["dec_unsheared"], scene["ra_unsheared"])
        assert list(scene["twin"]) == [0] * 3 and list(twin["twin"]) == [1] * 3


# (d) PSF scale -----------------------------------------------------------------------------------
def hsm_sigma(image: np.ndarray) -> float:
    return galsim.hsm.FindAdaptiveMom(galsim.Image(image, scale=0.2)).moments_sigma


def test_galsim_psf_scale_dilates_the_psf():
    base = draw_shear_pairs("galsim", 2, 0, (0.0, 0.0), neighbours=False).psfs
    assert np.allclose(base, GalSimPopulation().psf_images())
    for scale in (0.9, 1.1):
        batch = draw_shear_pairs("galsim", 2, 0, (0.0, 0.0), neighbours=False, psf_scale=scale)
        assert np.allclose(batch.psfs.sum(axis=(1, 2)), 1.0)
        for b in range(len(batch.bands)):
            ratio = hsm_sigma(batch.psfs[b]) / hsm_sigma(base[b])
            assert ratio == pytest.approx(scale, rel=0.02)
        # and the galaxies are drawn with it: a wider PSF spreads the target's light
        narrow = draw_noiseless_pairs("galsim", 2, 0, (0.0, 0.0), neighbours=False)
        wide = draw_noiseless_pairs("galsim", 2, 0, (0.0, 0.0), neighbours=False, psf_scale=scale)
        peak = wide.plus_target.max() / narrow.plus_target.max()
        assert (peak < 1.0) if scale > 1 else (peak > 1.0)


def test_btk_psfs_are_the_survey_psfs():
    from simulation.surveys import psf_images

    batch = draw_shear_pairs("btk", 2, 0, (0.0, 0.0), neighbours=False)
    assert np.array_equal(batch.psfs, psf_images("LSST", batch.bands, 45))
    assert batch.bands == ("u", "g", "r", "i", "z", "y")


# (e) reproducibility, output format and bad inputs -----------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_reproducible_and_well_formed(population):
    a = draw_shear_pairs(population, 4, 11, (0.02, 0.01), neighbours=True)
    b = draw_shear_pairs(population, 4, 11, (0.02, 0.01), neighbours=True)
    c = draw_shear_pairs(population, 4, 12, (0.02, 0.01), neighbours=True)
    for name in ("plus", "minus", "correction_noise", "psfs", "n_galaxies", "neighbour_distance",
                 "target_snr", "twin"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert not np.array_equal(a.plus, c.plus)
    assert a.plus.shape == a.minus.shape == a.correction_noise.shape == (4, 6, 45, 45)
    assert a.plus.dtype == a.minus.dtype == a.correction_noise.dtype == np.float32
    assert a.psfs.shape == (6, 45, 45) and a.psfs.dtype == np.float64
    assert a.sky_variance.shape == (6,) and np.all(a.sky_variance > 0)
    assert a.g == (0.02, 0.01)
    assert list(a.twin) == [0, 1, 0, 1]
    assert np.all(a.n_galaxies >= 1) and np.all(a.target_snr > 0)
    alone = a.n_galaxies == 1
    assert np.all(np.isinf(a.neighbour_distance[alone]))
    assert np.all(np.isfinite(a.neighbour_distance[~alone]) & (a.neighbour_distance[~alone] >= 5))
    isolated = draw_shear_pairs(population, 4, 11, (0.02, 0.01), neighbours=False)
    assert np.all(isolated.n_galaxies == 1)
    # the S/N rule stated in ShearPairBatch.target_snr
    clean = draw_noiseless_pairs(population, 4, 11, (0.02, 0.01), neighbours=True)
    label = [2, 3, 4]
    image = 0.5 * (clean.plus_target[:, label].astype(np.float64)
                   + clean.minus_target[:, label]).sum(axis=1)
    snr = np.sqrt((image ** 2 / (clean.sky_levels[label].sum() + np.maximum(image, 0))).sum((1, 2)))
    assert np.allclose(a.target_snr, snr)


@pytest.mark.parametrize("kwargs, match", [
    ({"population": "catsim"}, "unknown population"),
    ({"n": 3}, "even"),
    ({"n": 0}, "even"),
    ({"n": True}, "even"),
    ({"n": 2.0}, "even"),
    ({"seed": -1}, "seed"),
    ({"g": (0.1, 0.0)}, r"\|g\| < 0.1"),
    ({"g": (0.08, 0.08)}, r"\|g\| < 0.1"),
    ({"g": (float("nan"), 0.0)}, r"\|g\|"),
    ({"g": 0.01}, "pair"),
    ({"psf_scale": 1.2}, "psf_scale"),
    ({"psf_scale": 0.0}, "psf_scale"),
    ({"neighbours": None}, "neighbours"),
])
def test_bad_inputs_raise(kwargs, match):
    args = {"population": "galsim", "n": 2, "seed": 0, "g": (0.01, 0.0), "neighbours": True}
    args.update(kwargs)
    neighbours = args.pop("neighbours")
    with pytest.raises(ValueError, match=match):
        draw_shear_pairs(**args, neighbours=neighbours)


def test_sim_of_the_wrong_type_raises():
    with pytest.raises(TypeError, match="SimulationConfig"):
        draw_shear_pairs("btk", 2, 0, (0.0, 0.0), neighbours=True, sim={"survey": "LSST"})


# (f) the default sampling is unchanged ----------------------------------------------------------
@pytest.mark.parametrize("shear, twins", [((0.0, 0.0), False), ((0.03, -0.02), True),
                                          ((0.0, 0.0), True)])
def test_default_sampling_unchanged(shear, twins):
    table = SceneSource(Config().simulation).catalog.table
    default = CentralTargetSampling(9.1, shear=shear, rotated_twins=twins, seed=7)
    explicit = CentralTargetSampling(9.1, shear=shear, rotated_twins=twins, seed=7,
                                     shear_positions=False)
    others = [explicit]
    if shear == (0.0, 0.0):
        others.append(CentralTargetSampling(9.1, shear=shear, rotated_twins=twins, seed=7,
                                            shear_positions=True))
    for _ in range(6):
        expected = default(table)
        for other in others:
            got = other(table)
            assert got.colnames == expected.colnames
            for name in expected.colnames:
                assert np.array_equal(np.asarray(got[name]), np.asarray(expected[name])), name
