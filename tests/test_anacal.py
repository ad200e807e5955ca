"""AnaCal/FPFS as a peer shear estimator (evaluation.anacal_peer), on GalSim galaxies, no mocks."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from deblend.core.metacal import population_shear as solve_shear
from evaluation.anacal_peer import (
    FLAG_NONPOSITIVE_DENOMINATOR,
    AnacalShapes,
    anacal_available,
    anacal_shapes,
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
