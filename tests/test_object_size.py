"""Detection sizes against the PSF and the size cut (deblend.core.object_size, the walk's
``size_ratio`` column and ``min_size_ratio``)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from deblend.core.cells import CellImage
from deblend.core.metadetect import SMALL, MetadetectSettings, measure_cell
from deblend.core.object_size import detection_psf_sigma, size_ratios
from tests.test_metadetect import BANDS, PSF, SCALE, SKY_SIGMA, psf_images, toy_estimator


def test_the_detection_psf_is_the_weighted_gaussians() -> None:
    assert detection_psf_sigma([2.0], [1.0], 31) == pytest.approx(2.0, rel=1e-3)
    mixed = detection_psf_sigma([2.0, 3.0], [1.0, 1.0], 41)
    assert 2.0 < mixed < 3.0
    assert detection_psf_sigma([2.0, 3.0], [1.0, 0.0], 41) == pytest.approx(2.0, rel=1e-3)


def test_a_gaussian_galaxy_has_the_ratio_of_its_variance_and_a_star_none() -> None:
    """Under a Gaussian PSF of sigma 2 px, a Gaussian galaxy of sigma s px off the pixel
    centre reads s^2 / 4 (T ratio, to 1% up to s = 2: where star cuts are made; s = 3 reads
    2.19 for 2.25, s = 6 5.5 for 9: the stamp is 8 PSF sigmas wide) and a star 0 (to 1e-3)."""
    psf = galsim.Gaussian(sigma=2.0)
    image = galsim.ImageD(81, 81, scale=1.0)
    positions = []
    for k, sigma in enumerate((0.0, 1.5, 2.0, 3.0)):
        profile = psf if sigma == 0 else galsim.Convolve(galsim.Gaussian(sigma=sigma), psf)
        offset = (-30.0 + 20 * k + 0.3, 0.2)
        profile.drawImage(image=image, add_to_image=True, offset=offset, method="no_pixel")
        positions.append((40 + offset[0], 40 + offset[1]))
    ratio = size_ratios(image.array, np.array(positions), 2.0, 25)
    assert abs(ratio[0]) < 1e-3
    np.testing.assert_allclose(ratio[1:3], [1.5 ** 2 / 4, 1.0], rtol=0.01)
    assert 0.95 * 2.25 < ratio[3] < 2.25
    assert size_ratios(image.array, np.zeros((0, 2)), 2.0, 25).shape == (0,)


def stars_and_galaxies(shapes: np.ndarray, seed: int) -> tuple[CellImage, np.ndarray]:
    """A noisy two-band cell: a row of galaxies (exponential, half-light radius 0.45", the
    given distortions) and a row of stars (the PSF), S/N about 100; (x, y) of each, galaxies
    first."""
    size = 141
    image = galsim.ImageD(size, size, scale=SCALE)
    positions = []
    for k, (e1, e2) in enumerate(shapes):
        for row, profile in ((-25.0, galsim.Exponential(half_light_radius=0.45, flux=3e4)
                              .shear(e1=e1, e2=e2)), (25.0, galsim.DeltaFunction(flux=3e4))):
            offset = (-50.0 + 25.0 * k + 0.2, row - 0.3)
            galsim.Convolve(profile, PSF).drawImage(image=image, add_to_image=True,
                                                    offset=offset)
            positions.append((70 + offset[0], 70 + offset[1]))
    rng = np.random.default_rng(seed)
    cube = np.stack([image.array] * len(BANDS)) + rng.normal(0, SKY_SIGMA,
                                                             (len(BANDS), size, size))
    positions = np.array(positions)  # galaxy, star, galaxy, star...
    galaxies, stars = positions[0::2], positions[1::2]
    return (CellImage(cube, np.full(cube.shape, SKY_SIGMA ** 2), psf_images()),
            np.concatenate([galaxies, stars]))


def nearest(table, positions: np.ndarray) -> np.ndarray:
    """Index of the truth position nearest each row, -1 beyond 1.5 pixels."""
    d = np.hypot(np.subtract.outer(np.asarray(table["x"]), positions[:, 0]),
                 np.subtract.outer(np.asarray(table["y"]), positions[:, 1]))
    return np.where(d.min(axis=1) < 1.5, d.argmin(axis=1), -1)


def test_the_size_cut_flags_the_stars_in_every_metacal_image() -> None:
    """Five galaxies and five stars through the walk: every row has its size_ratio (stars
    within 0.1 of 0, galaxies above 0.4); with min_size_ratio 0.3 every star row of the five
    images is flagged SMALL and no galaxy row; without a cut, nothing is. Each image's size is
    its own: an elliptical galaxy is larger where metacal stretches it along its major axis
    (e1 > 0: larger in 1p than in 1m; e1 < 0 the reverse; measured without the noise
    correction, whose one noise field moves these sizes by as much), which is where a size
    cut's selection response comes from, inside metacal's population response."""
    shapes = np.array([[0.3, 0.0], [-0.3, 0.0], [0.0, 0.2], [0.1, -0.1], [0.0, 0.0]])
    cell, positions = stars_and_galaxies(shapes, seed=4)
    settings = MetadetectSettings(stamp_pixels=25, threshold=3.0, detection_bands=BANDS)
    plain = measure_cell(cell, BANDS, {"toy": toy_estimator}, settings)
    cut = measure_cell(cell, BANDS, {"toy": toy_estimator},
                       MetadetectSettings(stamp_pixels=25, threshold=3.0,
                                          detection_bands=BANDS, min_size_ratio=0.3))
    for table in (plain, cut):
        which = nearest(table, positions)
        assert (which >= 0).all() and len(set(which[table["mdet_step"] == "noshear"])) == 10
        star, galaxy = which >= 5, which < 5
        assert np.all(np.abs(table["size_ratio"][star]) < 0.1)
        assert np.all(table["size_ratio"][galaxy] > 0.4)
    assert not (plain["flags"] & SMALL).any()
    which = nearest(cut, positions)
    assert np.all(cut["flags"][which >= 5] & SMALL)
    assert not (cut["flags"][which < 5] & SMALL).any()
    exact = measure_cell(cell, BANDS, {"toy": toy_estimator},
                         MetadetectSettings(stamp_pixels=25, threshold=3.0,
                                            detection_bands=BANDS, noise_correction=False))
    for index, sign in ((0, 1), (1, -1)):  # e1 = +0.3, then -0.3
        size = {step: float(exact["size_ratio"][(nearest(exact, positions) == index)
                                                 & (exact["mdet_step"] == step)][0])
                for step in ("1p", "1m")}
        assert sign * (size["1p"] - size["1m"]) > 0.002, size  # 0.004 measured, noiseless


def test_a_size_cut_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match="min_size_ratio"):
        MetadetectSettings(min_size_ratio=float("nan"))
    assert "min_size_ratio" not in MetadetectSettings().identity()
    assert MetadetectSettings(min_size_ratio=0.5).identity()["min_size_ratio"] == 0.5
