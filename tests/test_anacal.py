"""AnaCal/FPFS as a peer shear estimator (evaluation.anacal_peer), on GalSim galaxies, no mocks."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
from astropy.table import Table

from deblend.core.metacal import population_shear as solve_shear
from evaluation.anacal_peer import (
    CELL_COLUMNS,
    FLAG_NONPOSITIVE_DENOMINATOR,
    AnacalShapes,
    anacal_available,
    anacal_cell_catalogue,
    anacal_population_shear,
    anacal_shapes,
    anacal_shear_sums,
    detection_margin,
)

SCALE = 0.2


def population_shear(shapes: AnacalShapes) -> np.ndarray:
    """g_hat = <R>^-1 <e> over the unflagged objects."""
    return solve_shear(shapes.e[shapes.ok], shapes.response[shapes.ok])

STAMP = 45
PSFS = {"moffat": galsim.Moffat(beta=2.5, fwhm=0.8), "kolmogorov": galsim.Kolmogorov(fwhm=0.8)}
NOISELESS = 1e-6  # a tiny variance for noiseless stamps: C0 -> 0


def psf_image(psf: galsim.GSObject, size: int = STAMP) -> np.ndarray:
    return psf.drawImage(nx=size, ny=size, scale=SCALE).array


def draw(galaxy: galsim.GSObject, psf: galsim.GSObject) -> np.ndarray:
    return galsim.Convolve(galaxy, psf).drawImage(nx=STAMP, ny=STAMP, scale=SCALE).array


def population(g: tuple[float, float], psf: galsim.GSObject, n_pairs: int, seed: int,
               flux: float = 1e4) -> np.ndarray:
    """(2 n_pairs, 45, 45): exponentials of random size and ellipticity in 90-degree-rotated pairs,
    then sheared by the reduced shear g and convolved with the PSF."""
    rng = np.random.default_rng(seed)
    stamps = []
    for _ in range(n_pairs):
        base = galsim.Exponential(half_light_radius=rng.uniform(0.3, 0.8), flux=flux).shear(
            e=rng.uniform(0.0, 0.5), beta=rng.uniform(0.0, 180.0) * galsim.degrees)
        for angle in (0.0, 90.0):
            stamps.append(draw(base.rotate(angle * galsim.degrees).shear(g1=g[0], g2=g[1]), psf))
    return np.array(stamps)


def test_anacal_is_installed():
    assert anacal_available()


@pytest.mark.parametrize("psf_name", sorted(PSFS))
@pytest.mark.parametrize("g", [(0.02, 0.0), (0.0, 0.02)])
def test_population_shear_recovers_the_applied_shear(g, psf_name):
    """300 rotated pairs, noiseless: g_hat = <e>/<R> within |m| < 0.01 and |c| < 1e-4."""
    psf = PSFS[psf_name]
    shapes = anacal_shapes(population(g, psf, 300, seed=1), psf_image(psf), NOISELESS, SCALE)
    assert shapes.e.shape == (600, 2) and shapes.response.shape == (600, 2, 2)
    assert (shapes.flags == 0).all()
    g_hat = population_shear(shapes)
    k = int(np.argmax(g))
    m = g_hat[k] / g[k] - 1
    assert abs(m) < 0.01, (g_hat, m)
    assert abs(g_hat[1 - k]) < 1e-4, g_hat
    # the FPFS response of an exponential at sigma_arcsec = 0.52 is about 0.55, not 1 or 2
    assert 0.4 < shapes.response[:, k, k].mean() < 0.7


def test_additive_bias_is_zero_without_shear():
    psf = PSFS["moffat"]
    g_hat = population_shear(anacal_shapes(population((0.0, 0.0), psf, 100, seed=2),
                                           psf_image(psf), NOISELESS, SCALE))
    assert np.abs(g_hat).max() < 1e-6


def test_response_is_the_derivative_of_e_with_respect_to_reduced_shear():
    """Per object: the analytic 2x2 response equals the finite difference of e under +-0.01
    shear."""
    psf = PSFS["kolmogorov"]
    galaxy = galsim.Exponential(half_light_radius=0.5, flux=1e4).shear(e1=0.3, e2=-0.2)
    d = 0.01
    shears = [(0.0, 0.0), (d, 0.0), (-d, 0.0), (0.0, d), (0.0, -d)]
    shapes = anacal_shapes(np.array([draw(galaxy.shear(g1=a, g2=b), psf) for a, b in shears]),
                           psf_image(psf), NOISELESS, SCALE)
    finite_difference = np.stack([(shapes.e[1] - shapes.e[2]) / (2 * d),
                                  (shapes.e[3] - shapes.e[4]) / (2 * d)], axis=1)
    np.testing.assert_allclose(shapes.response[0], finite_difference, atol=2e-3)


def test_pixel_frame_positions_and_flux_units():
    psf = PSFS["moffat"]
    along_x = draw(galsim.Gaussian(sigma=0.5, flux=1e3).shear(g1=0.3), psf)
    along_diagonal = draw(galsim.Gaussian(sigma=0.5, flux=1e3).shear(g2=0.3), psf)
    shapes = anacal_shapes(np.array([along_x, along_diagonal]), psf_image(psf), 1.0, SCALE)
    assert shapes.e[0, 0] > 0.1 and abs(shapes.e[0, 1]) < 1e-6
    assert shapes.e[1, 1] > 0.1 and abs(shapes.e[1, 0]) < 1e-6
    # C0 is in units of the m00 noise: rescaling the image and its noise changes nothing
    scaled = anacal_shapes(np.array([along_x, along_diagonal]) * 50.0, psf_image(psf), 2500.0,
                           SCALE)
    np.testing.assert_allclose(scaled.e, shapes.e, rtol=1e-5, atol=1e-7)
    # a galaxy shifted by (dx, dy) = (0.3, -1.7) pixels is measured exactly at its true position
    galaxy = galsim.Exponential(half_light_radius=0.5, flux=1e4).shear(g1=0.2, g2=-0.1)
    centred, shifted = draw(galaxy, psf), draw(galaxy.shift(0.3 * SCALE, -1.7 * SCALE), psf)
    at_truth = anacal_shapes(np.array([centred, shifted]), psf_image(psf), NOISELESS, SCALE,
                             positions=np.array([[22.0, 22.0], [20.3, 22.3]]))
    np.testing.assert_allclose(at_truth.e[1], at_truth.e[0], atol=1e-5)
    off_centre = anacal_shapes(np.array([shifted]), psf_image(psf), NOISELESS, SCALE)
    assert np.abs(off_centre.e[0] - at_truth.e[0]).max() > 0.01


def test_noise_bias_correction_with_noisy_stamps():
    """Flux S/N ~ 30 with AnaCal's noise-bias correction: +g/-g populations with the same
    noise (and the same correction noise) give m within 3%, and the run is reproducible."""
    psf = PSFS["moffat"]
    sigma = 2.0
    noise = np.random.default_rng(5).normal(0.0, sigma, (1000, STAMP, STAMP))
    shapes = {}
    for sign in (1, -1):
        images = population((sign * 0.02, 0.0), psf, 500, seed=3, flux=1e3) + noise
        shapes[sign] = anacal_shapes(images, psf_image(psf), sigma**2, SCALE,
                                     rng=np.random.default_rng(6))
    assert all((s.flags == 0).all() for s in shapes.values())
    e = shapes[1].e[:, 0].mean() - shapes[-1].e[:, 0].mean()
    r = shapes[1].response[:, 0, 0].mean() + shapes[-1].response[:, 0, 0].mean()
    assert abs(e / r / 0.02 - 1) < 0.03
    again = anacal_shapes(population((0.02, 0.0), psf, 500, seed=3, flux=1e3) + noise,
                          psf_image(psf), sigma**2, SCALE, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(again.e, shapes[1].e)


def antithetic_shear_bias(noise_correction: bool, flux: float = 300.0, n: int = 1000,
                          g: float = 0.02) -> float:
    """m of one round exponential (hlr 0.5") at DES's grid (0.263"/pixel, Moffat FWHM 1.0") and
    flux S/N ~ 20, through 4n noise realisations at +g and at -g: each noise field z enters as z
    and -z and each correction field c as c and -c, so the first-order noise terms cancel and
    what is left is the noise bias (second order), at a few 0.001."""
    scale, sigma = 0.263, 2.0
    psf = galsim.Moffat(beta=2.5, fwhm=1.0)
    z = np.random.default_rng(5).normal(0.0, sigma, (n, STAMP, STAMP))
    c = np.random.default_rng(6).normal(0.0, sigma, (n, STAMP, STAMP))
    noise, correction = np.concatenate([z, -z, z, -z]), np.concatenate([c, c, -c, -c])
    e, r = 0.0, 0.0
    for sign in (1, -1):
        image = galsim.Convolve(galsim.Exponential(half_light_radius=0.5, flux=flux).shear(
            g1=sign * g), psf).drawImage(nx=STAMP, ny=STAMP, scale=scale).array
        shapes = anacal_shapes(image + noise, psf.drawImage(nx=STAMP, ny=STAMP, scale=scale).array,
                               sigma**2, scale, noise=correction if noise_correction else None)
        assert shapes.ok.all()
        e, r = e + sign * shapes.e[:, 0].mean(), r + shapes.response[:, 0, 0].mean()
    return float(e / r / g - 1)


def test_anacal_noise_bias_and_its_correction():
    """Without its noise correction AnaCal's m at S/N ~ 20 on DES's grid is about -0.08 (its
    first-order noise term in the response); with it, 0 within 0.025 (measured +0.004 +-
    0.007). The conditions benchmark's AnaCal was uncorrected until 2026-12-07: -0.03 / -0.04 at
    DES depth."""
    assert antithetic_shear_bias(False) < -0.05
    assert abs(antithetic_shear_bias(True)) < 0.025


def test_given_correction_noise_is_the_drawn_one():
    """``noise=`` gives exactly what ``rng=`` gives for the same field; both at once, a field
    of another shape, or one with a NaN (named as the noise, not the images) are refused."""
    psf = PSFS["moffat"]
    images = population((0.02, 0.0), psf, 5, seed=3, flux=1e3)
    sigma = 2.0
    drawn = anacal_shapes(images, psf_image(psf), sigma**2, SCALE, rng=np.random.default_rng(6))
    field = np.random.default_rng(6).normal(0.0, sigma, images.shape).astype(np.float32)
    given = anacal_shapes(images, psf_image(psf), sigma**2, SCALE, noise=field)
    np.testing.assert_array_equal(given.e, drawn.e)
    np.testing.assert_array_equal(given.response, drawn.response)
    assert np.abs(given.e - anacal_shapes(images, psf_image(psf), sigma**2, SCALE).e).max() > 1e-3
    with pytest.raises(ValueError, match="not both"):
        anacal_shapes(images, psf_image(psf), sigma**2, SCALE, noise=field,
                      rng=np.random.default_rng(6))
    with pytest.raises(ValueError, match="like the images"):
        anacal_shapes(images, psf_image(psf), sigma**2, SCALE, noise=field[:-1])
    field[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="^noise contain non-finite"):
        anacal_shapes(images, psf_image(psf), sigma**2, SCALE, noise=field)


def test_flags_and_population_shear_skip_negative_flux():
    psf = PSFS["moffat"]
    good = draw(galsim.Gaussian(sigma=0.5, flux=1e3).shear(g1=0.1), psf)
    shapes = anacal_shapes(np.array([good, -good]), psf_image(psf), 1.0, SCALE)
    assert shapes.flags[0] == 0 and shapes.flags[1] & FLAG_NONPOSITIVE_DENOMINATOR
    np.testing.assert_allclose(population_shear(shapes),
                               np.linalg.solve(shapes.response[0], shapes.e[0]))
    with pytest.raises(ValueError, match="no object"):
        solve_shear(np.full((1, 2), np.nan), shapes.response[:1])


def test_bad_inputs_raise():
    psf = PSFS["moffat"]
    images = np.array([draw(galsim.Gaussian(sigma=0.5, flux=1e3), psf)] * 2)
    good_psf = psf_image(psf)

    def call(imgs=images, p=good_psf, var=1.0, scale=SCALE, **kwargs):
        return anacal_shapes(imgs, p, var, scale, **kwargs)

    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        call(imgs=images[0])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        call(imgs=images[None])
    nan = images.copy()
    nan[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        call(imgs=nan)
    for var in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="noise_variance"):
            call(var=var)
    with pytest.raises(ValueError, match="pixel_scale"):
        call(scale=0.0)
    with pytest.raises(ValueError, match="2-D"):
        call(p=good_psf[None])
    bad_psf = good_psf.copy()
    bad_psf[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        call(p=bad_psf)
    with pytest.raises(ValueError, match="positive"):
        call(p=-good_psf)
    # an even-sized GalSim PSF is centred between pixels, half a pixel off (H//2, W//2)
    with pytest.raises(ValueError, match="centred"):
        call(p=psf_image(psf, size=44))
    # a PSF drawn at another pixel scale than the images'
    with pytest.raises(ValueError, match="under-sampled"):
        call(p=psf.drawImage(nx=STAMP, ny=STAMP, scale=1.0).array)
    with pytest.raises(ValueError, match="too large"):
        call(p=psf.drawImage(nx=STAMP, ny=STAMP, scale=0.03).array)
    with pytest.raises(ValueError, match="sigma_arcsec"):
        call(sigma_arcsec=0.1)
    with pytest.raises(ValueError, match="positions"):
        call(positions=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="positions"):
        call(positions=np.full((2, 2), 50.0))
    with pytest.raises(ValueError, match="npix"):
        call(npix=45)


# ---------------------------------------------------------------------------------------------
# AnaCal with its own detection on whole multi-band cells (anacal_cell_catalogue)
# ---------------------------------------------------------------------------------------------

CELL = 168
"""Cell side (pixels): a 4 x 4 grid of galaxies 32 pixels apart, 20+ pixels from the edges."""
CELL_FWHM = (0.8, 0.7)
"""PSF FWHM (arcsec) of the two bands."""
LOW_NOISE = 1e-3
"""Per-pixel variance: peak S/N ~ 1e4 (flux 3e3 and 6e3 per band)."""
# At S/N ~ 1e4 the noise is no scale for AnaCal's smooth detection steps: widths of 50 noise
# sigmas stay far below the galaxies' peak-to-neighbour differences, while 0.5 sigma would give
# the few galaxies whose peak straddles two pixels weight derivatives of ~100 (unbiased, but far
# too noisy for a few hundred galaxies). misfit_damping=0 lets AnaCal's fit move the centroid off
# the detection pixel at this S/N (its default freezes it there; the shapes, measured about the
# pixel, then scatter ~5x more between the +g and -g cells).
LOW_NOISE_SETTINGS = {"omega_f": 50.0, "omega_v": 50.0, "misfit_damping": 0.0}


def cell_psfs() -> np.ndarray:
    return np.array([galsim.Moffat(beta=2.5, fwhm=f).drawImage(nx=45, ny=45, scale=SCALE).array
                     for f in CELL_FWHM])


def sheared_cell(g: tuple[float, float], seed: int, variance: float = LOW_NOISE,
                 galaxies: list[galsim.GSObject] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((2, CELL, CELL) images, (2,) variances, (16, 2) true (x, y) pixel positions): round
    exponentials on a jittered grid, the reduced shear g applied to each profile AND to the
    positions about the cell centre (x_obs = A^-1 x_src), noise of the given variance."""
    rng = np.random.default_rng(seed)
    grid = 20 + 32 * (np.arange(4) + 0.5)
    src = np.array([(x, y) for y in grid for x in grid]) + rng.uniform(-3, 3, (16, 2))
    if galaxies is None:
        galaxies = [galsim.Exponential(half_light_radius=r, flux=1.0)
                    for r in rng.uniform(0.4, 0.6, 16)]
    centre = (CELL - 1) / 2.0
    a_inv = np.array([[1 + g[0], g[1]], [g[1], 1 - g[0]]]) / np.sqrt(1 - g[0] ** 2 - g[1] ** 2)
    truth = centre + (src - centre) @ a_inv.T
    images = np.zeros((2, CELL, CELL))
    for b, fwhm in enumerate(CELL_FWHM):
        image = galsim.ImageD(CELL, CELL, scale=SCALE)
        psf = galsim.Moffat(beta=2.5, fwhm=fwhm)
        for (x, y), galaxy in zip(truth, galaxies):
            profile = galsim.Convolve(galaxy.shear(g1=g[0], g2=g[1]).withFlux(3e3 * (b + 1)), psf)
            profile.drawImage(image=image, add_to_image=True, offset=(x - centre, y - centre))
        images[b] = image.array
    images += np.random.default_rng(seed + 1000).normal(0.0, np.sqrt(variance), images.shape)
    return images, np.full(2, variance), truth


def test_cell_detects_every_galaxy_at_its_position():
    images, variance, truth = sheared_cell((0.02, 0.0), seed=0)
    cat = anacal_cell_catalogue(images, variance, cell_psfs(), SCALE, bands=("r", "i"),
                                **LOW_NOISE_SETTINGS)
    assert len(cat) == 16 and set(CELL_COLUMNS) <= set(cat.colnames)
    dist = np.hypot(cat["x"][:, None] - truth[:, 0], cat["y"][:, None] - truth[:, 1])
    assert dist.min(axis=1).max() < 0.05  # every detection on a galaxy (x = column, y = row)
    assert len(set(dist.argmin(axis=1))) == 16  # every galaxy detected once
    assert (np.abs(cat["x_det"] - cat["x"]) <= 0.75).all()
    assert (cat["flag"] == 0).all() and cat.meta["combined"] == ["r", "i"]
    # FPFS responses of these exponentials at sigma_arcsec = 0.52: about 0.5 on the diagonal
    assert (0.35 < cat["r11"]).all() and (cat["r22"] < 0.65).all()
    # with AnaCal's own fit settings the centroid stays on the detection pixel at this S/N
    default = anacal_cell_catalogue(images, variance, cell_psfs(), SCALE)
    d = np.hypot(default["x"][:, None] - truth[:, 0], default["y"][:, None] - truth[:, 1])
    assert len(default) == 16 and d.min(axis=1).max() < 0.75


def test_cell_shear_recovers_the_applied_shear_with_plus_minus_pairs():
    """24 cells x 16 round galaxies, each cell drawn at +g and -g (profiles and positions) with
    the same noise: m = (S+ - S-) / (R+ + R-) / g - 1 within 0.01 (this set: -0.003 +- 0.003),
    c within 1e-4, from AnaCal's own detection, weights and analytic responses."""
    g = 0.02
    sums = {}
    for sign in (1, -1):
        cats = [anacal_cell_catalogue(*sheared_cell((sign * g, 0.0), seed=s)[:2], cell_psfs(),
                                      SCALE, **LOW_NOISE_SETTINGS) for s in range(24)]
        assert sum(len(c) for c in cats) == 24 * 16
        sums[sign] = anacal_shear_sums(cats)
        g_hat = anacal_population_shear(cats)
        assert abs(g_hat[0] / (sign * g) - 1) < 0.03 and abs(g_hat[1]) < 2e-4, g_hat
    num = sums[1][0] - sums[-1][0]
    den = sums[1][1] + sums[-1][1]
    m = num[0] / den[0] / g - 1
    c = (sums[1][0][1] + sums[-1][0][1]) / den[1]
    assert abs(m) < 0.01, m
    assert abs(c) < 1e-4, c


def test_cell_pixel_frame_band_weights_and_flux_units():
    """One galaxy elongated along x (g1 > 0) in band 0 and along y in band 1: AnaCal combines the
    bands with inverse-variance weights, so the noisier band drops out; ``combine`` picks bands;
    rescaling images and noise leaves the catalogue unchanged (thresholds in noise units)."""
    psfs = cell_psfs()
    centre = (64 - 1) / 2.0

    def draw(g1: float, g2: float, fwhm: float) -> np.ndarray:
        profile = galsim.Convolve(galsim.Gaussian(sigma=0.5, flux=2e3).shear(g1=g1, g2=g2),
                                  galsim.Moffat(beta=2.5, fwhm=fwhm))
        return profile.drawImage(nx=64, ny=64, scale=SCALE, offset=(3.3, -5.2)).array

    noise = np.random.default_rng(3).normal(0.0, 0.1, (2, 64, 64))
    images = np.array([draw(0.2, 0.0, CELL_FWHM[0]), draw(-0.2, 0.0, CELL_FWHM[1])]) + noise
    both = anacal_cell_catalogue(images, [0.01, 0.01], psfs, SCALE, bands=("r", "i"))
    band0 = anacal_cell_catalogue(images, [0.01, 1e4], psfs, SCALE)
    band1 = anacal_cell_catalogue(images, [1e4, 0.01], psfs, SCALE)
    only_r = anacal_cell_catalogue(images, [0.01, 0.01], psfs, SCALE, bands=("r", "i"),
                                   combine=("r",))
    assert len(both) == len(band0) == len(band1) == len(only_r) == 1
    # a uniform per-pixel variance map is the same as one variance per band
    mapped = anacal_cell_catalogue(images, np.full((2, 64, 64), 0.01), psfs, SCALE)
    np.testing.assert_array_equal(mapped["e1"], both["e1"])
    # x is the column (axis 1), y the row (axis 0); at this S/N (~2000) AnaCal's default fit
    # leaves the centroid on the detection pixel
    assert abs(both["x"][0] - (centre + 3.3)) < 0.75 and abs(both["y"][0] - (centre - 5.2)) < 0.75
    assert abs(both["e1"][0]) < 0.02
    assert band0["e1"][0] > 0.05 and band1["e1"][0] < -0.05
    np.testing.assert_allclose(only_r["e1"], band0["e1"], rtol=1e-3)
    diagonal = np.array([draw(0.0, 0.2, f) for f in CELL_FWHM]) + noise
    e = anacal_cell_catalogue(diagonal, [0.01, 0.01], psfs, SCALE)
    assert e["e2"][0] > 0.05 and abs(e["e1"][0]) < 0.01
    scaled = anacal_cell_catalogue(images * 50.0, [25.0, 25.0], psfs, SCALE)
    for name in ("e1", "e2", "r11", "w", "rw1"):
        np.testing.assert_allclose(scaled[name], both[name], rtol=1e-4, atol=1e-7)
    # AnaCal's noise-bias correction: a rotated pure-noise image is added, reproducibly
    a = anacal_cell_catalogue(images, [0.01, 0.01], psfs, SCALE, rng=np.random.default_rng(7))
    b = anacal_cell_catalogue(images, [0.01, 0.01], psfs, SCALE, rng=np.random.default_rng(7))
    assert a.meta["noise_correction"] and a["e1"][0] == b["e1"][0] != both["e1"][0]


def test_cell_keeps_only_the_owned_box():
    images, variance, _ = sheared_cell((0.0, 0.0), seed=1)
    psfs = cell_psfs()
    full = anacal_cell_catalogue(images, variance, psfs, SCALE, **LOW_NOISE_SETTINGS)
    box = (60, 120, 30, 100)
    owned = anacal_cell_catalogue(images, variance, psfs, SCALE, owned=box, **LOW_NOISE_SETTINGS)
    xi, yi = np.rint(full["x_det"]), np.rint(full["y_det"])
    inside = (xi >= box[0]) & (xi < box[1]) & (yi >= box[2]) & (yi < box[3])
    assert 0 < inside.sum() < len(full) and len(owned) == inside.sum()
    np.testing.assert_array_equal(owned["x_det"], full["x_det"][inside])
    np.testing.assert_array_equal(owned["e1"], full["e1"][inside])
    assert owned.meta["owned"] == list(box)
    margin = detection_margin(SCALE)
    assert margin == 16 and full.meta["owned"] == [16, CELL - 16, 16, CELL - 16]
    with pytest.raises(ValueError, match="margin"):
        anacal_cell_catalogue(images, variance, psfs, SCALE, owned=(0, 100, 30, 100))
    with pytest.raises(ValueError, match="owned"):
        anacal_cell_catalogue(images, variance, psfs, SCALE, owned=(100, 60, 30, 100))
    with pytest.raises(ValueError, match="owned"):
        anacal_cell_catalogue(images, variance, psfs, SCALE, owned=(60, 120, 30))


def test_cell_bad_inputs_raise():
    images = np.random.default_rng(0).normal(0.0, 1.0, (2, 64, 64))
    psfs, var = cell_psfs(), np.ones(2)

    def call(imgs=images, v=var, p=psfs, scale=SCALE, **kwargs):
        return anacal_cell_catalogue(imgs, v, p, scale, **kwargs)

    with pytest.raises(ValueError, match=r"\(bands, H, W\)"):
        call(imgs=images[0])
    nan = images.copy()
    nan[1, 5, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        call(imgs=nan)
    for bad in (np.ones(3), np.ones((2, 64, 63)), np.ones((2, 1))):
        with pytest.raises(ValueError, match="variance must be"):
            call(v=bad)
    for bad in ([1.0, 0.0], [1.0, -1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="finite and positive"):
            call(v=np.array(bad))
    zero_pixel = np.ones((2, 64, 64))
    zero_pixel[0, 3, 3] = 0.0
    with pytest.raises(ValueError, match="finite and positive"):
        call(v=zero_pixel)
    with pytest.raises(ValueError, match="psfs"):
        call(p=psfs[:1])
    with pytest.raises(ValueError, match="psfs"):
        call(p=psfs[0])
    bad_psf = psfs.copy()
    bad_psf[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        call(p=bad_psf)
    with pytest.raises(ValueError, match="pixel_scale"):
        call(scale=-0.2)
    with pytest.raises(ValueError, match="too small"):
        call(imgs=images[:, :30, :30], v=np.ones(2))
    with pytest.raises(ValueError, match="bands"):
        call(bands=("r",))
    with pytest.raises(ValueError, match="band"):
        call(bands=("r", "i"), combine=("z",))
    with pytest.raises(ValueError, match="combine"):
        call(combine=(0, 0))
    with pytest.raises(ValueError, match="omega_v"):
        call(omega_v=0.0)
    with pytest.raises(ValueError, match="no unflagged detection"):
        anacal_population_shear(call(imgs=np.zeros((2, 64, 64))))
    with pytest.raises(ValueError, match="missing columns"):
        anacal_population_shear(Table({"e1": [0.1]}))


def test_cell_weight_and_shape_responses_are_shear_derivatives():
    """A faint elliptical galaxy in the smooth step of AnaCal's detection weight (0 < w < 1):
    the analytic dw/dg, de/dg and d(w e)/dg equal finite differences of the catalogue under a
    +-0.002 shear of the image about the detection pixel (profile AND position)."""
    psfs = cell_psfs()[:1]
    pixel, offset, h = np.array([32.0, 32.0]), np.array([0.3, -0.2]), 0.002

    def run(g1: float, g2: float) -> Table:
        a_inv = np.array([[1 + g1, g2], [g2, 1 - g1]]) / np.sqrt(1 - g1**2 - g2**2)
        x, y = pixel + a_inv @ offset - 31.5
        galaxy = galsim.Exponential(half_light_radius=0.5, flux=600.0).shear(g1=0.25, g2=0.1)
        profile = galsim.Convolve(galaxy.shear(g1=g1, g2=g2),
                                  galsim.Moffat(beta=2.5, fwhm=CELL_FWHM[0]))
        image = profile.drawImage(nx=64, ny=64, scale=SCALE, offset=(x, y)).array
        cat = anacal_cell_catalogue(image[None], [1.0], psfs, SCALE)
        assert len(cat) == 1 and (cat["x_det"][0], cat["y_det"][0]) == (32.0, 32.0)
        return cat

    cat = run(0.0, 0.0)
    assert 0.1 < cat["w"][0] < 0.9 and abs(cat["dw_dg1"][0]) > 0.3
    for k, (plus, minus) in enumerate([(run(h, 0.0), run(-h, 0.0)), (run(0.0, h), run(0.0, -h))]):
        j = k + 1
        for column, analytic in (("w", f"dw_dg{j}"), (f"e{j}", f"r{j}{j}"), (f"we{j}", f"rw{j}")):
            finite = (plus[column][0] - minus[column][0]) / (2 * h)
            assert abs(finite - cat[analytic][0]) < 1e-3 * max(1.0, abs(finite)), (column, j)
