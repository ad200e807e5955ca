"""Constant-shear fields (simulation.sheared_fields): real BTK and GalSim, small fields."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from simulation.sheared_fields import (
    DEFAULT_DENSITY,
    DEFAULT_MAX_MAG,
    PSF_PIXELS,
    VARIANTS,
    ShearedFieldSimulator,
    composite_half_light_radius,
    draw_field_set,
)
from simulation.surveys import sky_levels

POPULATIONS = ("btk", "galsim")
G = (0.05, -0.03)
SIDE = 120  # pixels (24")
SEED = 7
PIXEL = 0.2  # LSST, arcsec


def shear_matrix(g: tuple[float, float]) -> np.ndarray:
    return galsim.Shear(g1=g[0], g2=g[1]).getMatrix()


def expected_shear(name: str, g: tuple[float, float]) -> tuple[float, float]:
    return g if name.startswith("plus") else (-g[0], -g[1])


def rot90(images: np.ndarray) -> np.ndarray:
    """(bands, H, W) rotated by +90 degrees about the centre: offsets (dx, dy) -> (-dy, dx)."""
    return np.rot90(images, -1, axes=(1, 2))


@pytest.fixture(scope="module", params=POPULATIONS)
def simulator(request: pytest.FixtureRequest) -> ShearedFieldSimulator:
    return ShearedFieldSimulator(request.param)


@pytest.fixture(scope="module")
def noisy(simulator: ShearedFieldSimulator):
    return simulator.draw(SEED, 0, G, field_pixels=SIDE)


@pytest.fixture(scope="module")
def clean(simulator: ShearedFieldSimulator):
    return simulator.draw(SEED, 0, G, field_pixels=SIDE, noise=False)


# -- the interface -------------------------------------------------------------------------------
def test_field_set_interface(simulator, noisy):
    assert tuple(noisy) == VARIANTS
    bands = ("u", "g", "r", "i", "z", "y")
    for name, field in noisy.items():
        assert field.images.shape == (6, SIDE, SIDE) and field.images.dtype == np.float32
        assert np.all(np.isfinite(field.images))
        assert field.variance.dtype == np.float64
        assert np.allclose(field.variance, sky_levels("LSST", bands))
        assert field.psfs.shape == (6, PSF_PIXELS, PSF_PIXELS) and PSF_PIXELS % 2 == 1
        assert np.allclose(field.psfs.sum(axis=(1, 2)), 1.0)
        c = PSF_PIXELS // 2  # each PSF peaks on the central pixel
        assert all(np.unravel_index(p.argmax(), p.shape) == (c, c) for p in field.psfs)
        assert field.g == expected_shear(name, G)
        assert field.bands == bands and field.pixel_scale == pytest.approx(PIXEL)
        truth = field.truth
        for column in ("id", "x", "y", "mag", "hlr", "e1", "e2", "in_field", "flux"):
            assert column in truth.colnames
        assert truth["in_field"].sum() >= 1
        assert np.all(truth["mag"] <= DEFAULT_MAX_MAG)
        assert np.all(truth["hlr"] > 0) and np.all(np.hypot(truth["e1"], truth["e2"]) < 1)
        assert truth["flux"].shape == (len(truth), 6) and np.all(truth["flux"] > 0)


# -- noise ---------------------------------------------------------------------------------------
def test_plus_and_minus_share_the_noise(noisy, clean):
    sigma = np.sqrt(noisy["plus"].variance)[:, None, None]
    for plus, minus in (("plus", "minus"), ("plus_rot", "minus_rot")):
        signal = clean[plus].images.astype(np.float64) - clean[minus].images
        difference = noisy[plus].images.astype(np.float64) - noisy[minus].images
        # the noise cancels exactly (float32 rounding aside): plus - minus is noiseless
        assert np.abs(difference - signal).max() < 1e-3 * sigma.min()
        # and the shear changes the images: the difference is not zero
        assert (np.abs(signal) / sigma).max() > 3
    for name in VARIANTS:  # each image does carry noise of the sky's variance
        residual = noisy[name].images.astype(np.float64) - clean[name].images
        assert np.allclose(residual.var(axis=(1, 2)) / noisy[name].variance, 1.0, atol=0.06)
        assert np.all(np.abs(residual.mean(axis=(1, 2))) < 5 * sigma[:, 0, 0] / SIDE)


def test_twin_noise_is_independent_and_shared_by_the_twins(noisy, clean):
    """The twins' noise is a second field (not the first rotated, which would make plus_rot the
    rotation of minus), the same for plus_rot and minus_rot."""
    noise = noisy["plus"].images.astype(np.float64) - clean["plus"].images
    twin = noisy["plus_rot"].images.astype(np.float64) - clean["plus_rot"].images
    twin_minus = noisy["minus_rot"].images.astype(np.float64) - clean["minus_rot"].images
    sigma = np.sqrt(noisy["plus"].variance).min()
    assert np.abs(twin - twin_minus).max() < 1e-3 * sigma
    for other in (noise, rot90(noise)):
        correlation = np.corrcoef(twin.ravel(), other.ravel())[0, 1]
        assert abs(correlation) < 0.05


def test_zero_shear_twin_is_the_rotated_field(simulator):
    fields = simulator.draw(SEED, 3, (0.0, 0.0), field_pixels=SIDE, noise=False)
    plus, twin = fields["plus"].images, fields["plus_rot"].images
    assert np.array_equal(plus, fields["minus"].images)
    peak = np.abs(plus).max()
    assert np.abs(twin.astype(np.float64) - rot90(plus)).max() < 1e-6 * peak
    assert np.abs(twin.astype(np.float64) - plus).max() > 0.1 * peak


# -- the shear and the rotation of positions -----------------------------------------------------
def test_truth_positions_are_sheared_about_the_field_centre(noisy):
    centre = (SIDE - 1) / 2
    for name, field in noisy.items():
        t = field.truth
        g = expected_shear(name, G)
        unsheared = np.stack([t["dx_unsheared"], t["dy_unsheared"]])
        dx, dy = shear_matrix(g) @ unsheared
        assert np.allclose(t["dx"], dx, atol=1e-9) and np.allclose(t["dy"], dy, atol=1e-9)
        assert np.allclose(t["x"], centre + dx / PIXEL, atol=1e-9)
        assert np.allclose(t["y"], centre + dy / PIXEL, atol=1e-9)
        inside = (np.floor(t["x"] + 0.5) >= 0) & (np.floor(t["x"] + 0.5) < SIDE) \
            & (np.floor(t["y"] + 0.5) >= 0) & (np.floor(t["y"] + 0.5) < SIDE)
        assert np.array_equal(t["in_field"], inside)
        assert np.all(t["g1"] == g[0]) and np.all(t["g2"] == g[1])
    # the shear moves galaxies: +g and -g put the same galaxy at different places
    plus, minus = noisy["plus"].truth, noisy["minus"].truth
    common, ip, im = np.intersect1d(plus["id"], minus["id"], return_indices=True)
    assert len(common) >= 3
    assert np.array_equal(plus["dx_unsheared"][ip], minus["dx_unsheared"][im])
    assert np.hypot(plus["x"][ip] - minus["x"][im], plus["y"][ip] - minus["y"][im]).max() > 1.0


def test_rotated_twin_truth_is_the_rotation(noisy):
    for name, twin_name in (("plus", "plus_rot"), ("minus", "minus_rot")):
        base, twin = noisy[name].truth, noisy[twin_name].truth
        common, ib, it = np.intersect1d(base["id"], twin["id"], return_indices=True)
        assert len(common) >= 3
        b, t = base[ib], twin[it]
        # (dx, dy) -> (-dy, dx) of the unsheared sky, intrinsic e -> -e, the same galaxy
        assert np.allclose(t["dx_unsheared"], -b["dy_unsheared"], atol=1e-12)
        assert np.allclose(t["dy_unsheared"], b["dx_unsheared"], atol=1e-12)
        assert np.allclose(t["e1"], -b["e1"]) and np.allclose(t["e2"], -b["e2"])
        for column in ("mag", "mag_g", "hlr", "bulge_fraction"):
            assert np.array_equal(t[column], b[column])


@pytest.mark.parametrize("population", POPULATIONS)
def test_centroids_of_isolated_galaxies_follow_the_shear(population):
    """HSM centroids of isolated galaxies in the noiseless fields are where the shear matrix
    about the field centre puts their unsheared offsets, in all four fields."""
    simulator = ShearedFieldSimulator(population, density=10.0, max_mag=24.0)
    side, centre, checked = 200, (200 - 1) / 2, 0
    shapes: dict[tuple[int, str, int], np.ndarray] = {}  # HSM observed shapes, isolated galaxies
    for index in range(6):
        fields = simulator.draw(1, index, G, field_pixels=side, noise=False)
        for name, field in fields.items():
            t = field.truth
            x, y = np.asarray(t["x"]), np.asarray(t["y"])
            distance = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
            np.fill_diagonal(distance, np.inf)
            isolated = (distance.min(axis=1) > 40) & (np.minimum(x, y) > 15) \
                & (np.maximum(x, y) < side - 16)
            image = galsim.Image(field.images.sum(axis=0).astype(np.float64), xmin=0, ymin=0)
            move = shear_matrix(expected_shear(name, G))
            for k in np.flatnonzero(isolated):
                offset = np.array([t["dx_unsheared"][k], t["dy_unsheared"][k]])
                predicted = centre + move @ offset / PIXEL
                shape = galsim.hsm.FindAdaptiveMom(
                    image, guess_centroid=galsim.PositionD(*predicted), strict=False)
                assert shape.moments_status == 0
                measured = np.array([shape.moments_centroid.x, shape.moments_centroid.y])
                assert np.allclose(measured, predicted, atol=0.01), (name, k)
                shapes[index, name, int(t["id"][k])] = np.array(
                    [shape.observed_shape.g1, shape.observed_shape.g2])
                if np.hypot(*offset) > 20 * PIXEL:  # the unsheared position is far off
                    assert np.hypot(*(measured - centre - offset / PIXEL)) > 0.5
                    checked += 1
        if checked >= 8:
            break
    assert checked >= 4
    # the profiles are sheared too: each galaxy's shape moves along +g between -g and +g
    response = [(shapes[i, plus, k] - shapes[i, minus, k]) @ G / (2 * np.dot(G, G))
                for (i, plus, k) in shapes if plus in ("plus", "plus_rot")
                for minus in [plus.replace("plus", "minus")] if (i, minus, k) in shapes]
    assert len(response) >= 2
    assert 0.05 < np.mean(response) < 1.2, response


# -- reproducibility -----------------------------------------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_field_set_follows_from_seed_and_index(population):
    first = draw_field_set(population, SEED, 1, G, field_pixels=80)
    again = ShearedFieldSimulator(population).draw(SEED, 1, G, field_pixels=80)
    other = draw_field_set(population, SEED, 2, G, field_pixels=80)
    for name in VARIANTS:
        assert np.array_equal(first[name].images, again[name].images)
        assert first[name].truth.colnames == again[name].truth.colnames
        for column in first[name].truth.colnames:
            assert np.array_equal(first[name].truth[column], again[name].truth[column])
        assert not np.array_equal(first[name].images, other[name].images)


def test_the_sky_does_not_depend_on_the_shear_or_field_size():
    simulator = ShearedFieldSimulator("galsim")
    small = simulator.draw(SEED, 4, (0.0, 0.0), field_pixels=60, noise=False)["plus"].truth
    large = simulator.draw(SEED, 4, (0.02, 0.01), field_pixels=100, noise=False)["minus"].truth
    key = {(round(a, 9), round(b, 9)): m for a, b, m in
           zip(large["dx_unsheared"], large["dy_unsheared"], large["mag"])}
    inner = small[small["in_field"]]
    assert len(inner) >= 1
    for a, b, m in zip(inner["dx_unsheared"], inner["dy_unsheared"], inner["mag"]):
        assert key[(round(a, 9), round(b, 9))] == m


# -- density -------------------------------------------------------------------------------------
@pytest.mark.parametrize("population", POPULATIONS)
def test_density_matches_the_stated_one(population):
    """Galaxies brighter than max_mag per arcmin^2 over 60 skies of 1 arcmin^2: Poisson."""
    simulator = ShearedFieldSimulator(population)
    n_fields, half = 60, 30.0  # arcsec
    counts, mags = [], []
    for index in range(n_fields):
        sky = simulator.sample(SEED, index, half)
        counts.append(len(sky))
        mags.append(np.asarray(sky["mag"]))
    area = n_fields * (2 * half / 60) ** 2  # arcmin^2
    expected = DEFAULT_DENSITY * area
    measured = sum(counts)
    assert abs(measured - expected) < 3 * np.sqrt(expected), measured / area
    mags = np.concatenate(mags)
    assert mags.max() <= DEFAULT_MAX_MAG and mags.max() > DEFAULT_MAX_MAG - 0.2
    # counts rise toward the limit (number counts, not a uniform magnitude distribution)
    assert np.mean(mags > DEFAULT_MAX_MAG - 1) > 0.4
    # the per-field counts scatter as Poisson's (variance = mean, within 40%)
    assert 0.6 < np.var(counts) / np.mean(counts) < 1.4


def test_drawn_truth_holds_the_sampled_galaxies(simulator):
    """At zero shear the galaxies in the field are those of the sampled sky inside it."""
    truth = simulator.draw(SEED, 5, (0.0, 0.0), field_pixels=SIDE, noise=False)["plus"].truth
    sky = simulator.sample(SEED, 5, 60.0)
    edge = SIDE / 2 * PIXEL  # arcsec; pixel centres at integers, so the field ends half a pixel out
    inside = sky[(np.abs(sky["dx"]) < edge) & (np.abs(sky["dy"]) < edge)]
    in_field = truth[truth["in_field"]]
    assert len(in_field) == len(inside) >= 1
    assert np.allclose(np.sort(in_field["mag"]), np.sort(inside["mag"]))


@pytest.mark.parametrize(("r_disk", "r_bulge", "fraction"), [
    (0.5, 0.1, 0.2), (0.3, 0.3, 0.5), (0.8, 0.05, 0.9), (0.4, 0.0, 0.0), (0.0, 0.2, 1.0)])
def test_composite_half_light_radius_is_galsims(r_disk, r_bulge, fraction):
    """The btk truth's ``hlr``: the half-light radius of the round bulge + disk."""
    parts = []
    if r_disk > 0:
        parts.append(galsim.Exponential(half_light_radius=r_disk, flux=1 - fraction))
    if r_bulge > 0:
        parts.append(galsim.DeVaucouleurs(half_light_radius=r_bulge, flux=fraction))
    profile = galsim.Add(parts)  # unit flux; enclosed flux from GalSim's own surface brightness
    radius = np.geomspace(1e-6, 1e3, 6000)
    brightness = np.array([profile.xValue(galsim.PositionD(r, 0.0)) for r in radius])
    step = 2 * np.pi * radius ** 2 * brightness  # d(flux) / d(ln r)
    enclosed = np.concatenate([[0.0], np.cumsum(0.5 * (step[1:] + step[:-1])
                                                * np.diff(np.log(radius)))])
    expected = np.exp(np.interp(0.5, enclosed, np.log(radius)))
    got = composite_half_light_radius(np.array([r_disk]), np.array([r_bulge]),
                                      np.array([fraction]))[0]
    assert got == pytest.approx(expected, rel=0.01)


# -- bad arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"population": "cosmos"}, "unknown population"),
    ({"g": (1.0, 0.0)}, r"\|g\| < 1"),
    ({"g": (0.8, 0.8)}, r"\|g\| < 1"),
    ({"g": (np.nan, 0.0)}, r"\|g\| < 1"),
    ({"g": 0.1}, "pair of numbers"),
    ({"field_pixels": 0}, "field_pixels"),
    ({"field_pixels": -5}, "field_pixels"),
    ({"seed": -1}, "seed"),
    ({"index": 1.5}, "index"),
    ({"density": 0.0}, "density"),
    ({"max_mag": -2.0}, "max_mag"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    arguments = {"population": "galsim", "seed": 0, "index": 0, "g": (0.01, 0.0)} | kwargs
    positional = [arguments.pop(k) for k in ("population", "seed", "index", "g")]
    with pytest.raises(ValueError, match=message):
        draw_field_set(*positional, **arguments)


def test_unreachable_magnitude_limit_is_refused():
    with pytest.raises(ValueError, match="max_mag"):
        ShearedFieldSimulator("btk", max_mag=10.0)
    with pytest.raises(ValueError, match="max_mag"):
        ShearedFieldSimulator("galsim", max_mag=19.0)


@pytest.mark.parametrize("population", POPULATIONS)
def test_an_empty_sky_gives_pure_noise(population):
    fields = draw_field_set(population, 0, 0, G, field_pixels=50, density=1e-6)
    for field in fields.values():
        assert len(field.truth) == 0 and "x" in field.truth.colnames
        ratio = field.images.astype(np.float64).var(axis=(1, 2)) / field.variance
        assert np.allclose(ratio, 1.0, atol=0.12)
