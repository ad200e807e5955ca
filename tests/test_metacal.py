"""Metacalibration images: the response they give recovers the applied shear; the fast matrix
operator matches the GalSim reference; the noise correction removes the sheared noise's bias."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from deblend.core.metacal import (
    METACAL_SHEARS,
    MetacalOperator,
    metacal_images,
    metacal_images_galsim,
    metacal_response,
    reconvolution_sigma,
)
from simulation.surveys import psf_images

SCALE = 0.2
PSF_PROFILES = (galsim.Moffat(beta=3.5, fwhm=0.9), galsim.Kolmogorov(fwhm=0.75))


def psf_image(profile: galsim.GSObject, size: int = 45) -> np.ndarray:
    """The effective PSF image (with the pixel) of a GalSim profile."""
    return profile.drawImage(nx=size, ny=size, scale=SCALE).array.astype(np.float64)


PSFS = np.stack([psf_image(p) for p in PSF_PROFILES])


def stamps(g1: float, g2: float, angle_deg: float) -> np.ndarray:
    """Two bands of one elliptical exponential, rotated by ``angle_deg`` then sheared."""
    galaxy = (galsim.Exponential(half_light_radius=0.5).shear(e1=0.3, e2=0.1)
              .rotate(angle_deg * galsim.degrees).shear(g1=g1, g2=g2))
    return np.stack([galsim.Convolve(galaxy, psf).drawImage(nx=45, ny=45, scale=SCALE).array
                     for psf in PSF_PROFILES])[None]


def hsm_e(images: np.ndarray) -> np.ndarray:
    """(N, 2) adaptive-moment distortions of the band sum."""
    return np.array([[m.observed_shape.e1, m.observed_shape.e2] for m in
                     (galsim.hsm.FindAdaptiveMom(galsim.Image(img.sum(axis=0), scale=SCALE))
                      for img in images)])


@pytest.mark.parametrize("g", [(0.02, 0.0), (0.0, -0.03)])
def test_metacal_shear_estimate_matches_the_applied_shear(g):
    """90-degree pairs cancel the intrinsic shape; g_hat = <R>^-1 <e> within 0.2% of g."""
    pair = np.concatenate([stamps(*g, angle) for angle in (0.0, 90.0)])
    images = metacal_images(pair, PSFS)
    assert set(images) == set(METACAL_SHEARS)
    assert all(a.shape == pair.shape for a in images.values())
    e = {name: hsm_e(a) for name, a in images.items()}
    response = metacal_response(e)
    g_hat = np.linalg.solve(response.mean(axis=0), e["noshear"].mean(axis=0))
    component = int(np.argmax(np.abs(g)))
    assert g_hat[component] / g[component] - 1 == pytest.approx(0.0, abs=0.002)
    assert abs(g_hat[1 - component]) < 2e-4
    assert 0.6 < response.mean(axis=0)[component, component] < 1.2


def test_metacal_refuses_bad_input():
    good = stamps(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one PSF per band"):
        metacal_images(good, PSFS[:1])
    bad = good.copy()
    bad[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        metacal_images(bad, PSFS)
    bad_psf = PSFS.copy()
    bad_psf[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="PSF images contain non-finite"):
        metacal_images(good, bad_psf)
    with pytest.raises(ValueError, match="delta"):
        metacal_images(good, PSFS, delta=0.5)
    with pytest.raises(ValueError, match="pixel_scale"):
        metacal_images_galsim(good, PSFS, -0.2)
    operator = MetacalOperator.build(PSFS, 45)
    with pytest.raises(ValueError, match=r"shape \(N, 2, 45, 45\)"):
        operator.apply(torch.zeros(1, 2, 44, 44))


def correlation_anisotropy(images: np.ndarray) -> np.ndarray:
    """Per stamp: correlation of x-neighbours minus that of y-neighbours (first band)."""
    x = images[:, 0]
    return (x[:, :, 1:] * x[:, :, :-1]).mean(axis=(1, 2)) - (
        x[:, 1:, :] * x[:, :-1, :]).mean(axis=(1, 2))


def test_the_noise_correction_removes_the_sheared_noise_anisotropy():
    """On pure-noise stamps, metacal's +delta shear makes the noise correlations anisotropic
    (an additive bias of any estimator); adding a rotated noise field put through the same
    operations cancels it."""
    rng = np.random.default_rng(5)
    noise_stamps = rng.normal(size=(60, 2, 33, 33))
    correction = rng.normal(size=noise_stamps.shape)
    delta = 0.05  # a large step makes the effect easy to see on few stamps
    plain = metacal_images(noise_stamps, PSFS, delta)
    fixed = metacal_images(noise_stamps, PSFS, delta, noise=correction)

    def spurious(images):  # 1p minus 1m: what a response would pick up from noise alone
        a = correlation_anisotropy(images["1p"]) - correlation_anisotropy(images["1m"])
        return a.mean(), a.std(ddof=1) / np.sqrt(a.size)

    bias, error = spurious(plain)
    assert abs(bias) > 10 * error  # sheared noise is anisotropic
    bias, error = spurious(fixed)
    assert abs(bias) < 3 * error  # and the correction cancels it
    with pytest.raises(ValueError, match="noise must have the stamps' shape"):
        metacal_images(noise_stamps, PSFS, noise=correction[:1])


def shear_matrix(g1: float, g2: float) -> np.ndarray:
    """GalSim's area-preserving shear of coordinates by reduced shear (g1, g2)."""
    return np.array([[1 + g1, g2], [g2, 1 - g1]]) / np.sqrt(1 - g1 ** 2 - g2 ** 2)


def test_metacal_of_a_gaussian_has_the_analytic_response():
    """Gaussian galaxy, Gaussian PSF: the second moments of every metacal image are the sheared
    galaxy covariance plus the reconvolution Gaussian's, in closed form, and so is the response
    of the uniform-weight distortion."""
    from deblend.core.shapes import moments_ellipticity

    sigma, g_gal, sigma_psf, delta = 0.45, (0.15, -0.05), 0.35, 0.01
    psf = galsim.Gaussian(sigma=sigma_psf)
    galaxy = galsim.Gaussian(sigma=sigma).shear(g1=g_gal[0], g2=g_gal[1])
    image = galsim.Convolve(galaxy, psf).drawImage(nx=65, ny=65, scale=SCALE).array
    psf_images_ = psf_image(psf, 65)[None]
    images = metacal_images(image[None, None], psf_images_, delta)
    sigma_reconvolved = reconvolution_sigma(psf_images_[0], delta) * SCALE
    assert sigma_psf < sigma_reconvolved < 2 * sigma_psf

    def distortion(s1: float, s2: float) -> np.ndarray:
        a = shear_matrix(s1, s2) @ shear_matrix(*g_gal)
        c = sigma ** 2 * a @ a.T + sigma_reconvolved ** 2 * np.eye(2)
        return np.array([c[0, 0] - c[1, 1], 2 * c[0, 1]]) / (c[0, 0] + c[1, 1])

    measured = {name: np.array(moments_ellipticity(a[0, 0])) for name, a in images.items()}
    expected = {name: distortion(s1 * delta, s2 * delta)
                for name, (s1, s2) in METACAL_SHEARS.items()}
    for name in METACAL_SHEARS:
        np.testing.assert_allclose(measured[name], expected[name], atol=1e-4)
    response = metacal_response({k: v[None] for k, v in measured.items()}, delta)[0]
    analytic = metacal_response({k: v[None] for k, v in expected.items()}, delta)[0]
    np.testing.assert_allclose(response, analytic, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("g", [(0.02, 0.0), (0.0, 0.02)])
def test_population_shear_of_a_nonlinear_toy_estimator(g):
    """An estimator of strongly nonlinear, unknown response (tanh of 3x the distortion) still
    gives the applied shear once its metacal response is divided out."""
    from deblend.core.metacal import population_shear
    from deblend.core.shapes import moments_ellipticity

    def toy(images: np.ndarray) -> np.ndarray:
        e1, e2 = moments_ellipticity(images[:, 0])
        return np.tanh(3.0 * np.stack([e1, e2], axis=1))

    psf = galsim.Gaussian(sigma=0.35)
    pair = []
    for angle in (0.0, 45.0, 90.0, 135.0):  # a ring cancels the intrinsic shape
        galaxy = (galsim.Gaussian(sigma=0.45).shear(g1=0.2, g2=0.0)
                  .rotate(angle * galsim.degrees).shear(g1=g[0], g2=g[1]))
        pair.append(galsim.Convolve(galaxy, psf).drawImage(nx=65, ny=65, scale=SCALE).array)
    images = metacal_images(np.array(pair)[:, None], psf_image(psf, 65)[None])
    e = {name: toy(a) for name, a in images.items()}
    g_hat = population_shear(e["noshear"], metacal_response(e))
    np.testing.assert_allclose(g_hat, g, atol=2e-4)  # m within 1% at g = 0.02, c ~ 0


def realistic_stamps(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy six-band LSST stamps (electrons) of a bulge+disk target and a neighbour, and
    the survey's PSF images."""
    from simulation.surveys import get_survey

    survey = get_survey("LSST")
    bands = tuple(survey.available_filters)
    rng = np.random.default_rng(seed)
    stamps = np.empty((n, len(bands), 45, 45))
    for i in range(n):
        target = galsim.Add(galsim.DeVaucouleurs(half_light_radius=0.3, flux=0.3),
                            galsim.Exponential(half_light_radius=0.8, flux=0.7)).shear(
            e1=rng.uniform(-0.4, 0.4), e2=rng.uniform(-0.4, 0.4))
        neighbour = galsim.Exponential(half_light_radius=0.5).shift(
            rng.uniform(-3, 3), rng.uniform(-3, 3))
        scene = galsim.Add(target * 4e4, neighbour * 1e4)
        for b, band in enumerate(bands):
            psf = survey.get_filter(band).psf
            stamps[i, b] = galsim.Convolve(scene, psf).drawImage(nx=45, ny=45, scale=SCALE).array
    return stamps + rng.normal(0.0, 40.0, stamps.shape), psf_images("LSST", bands, 45)


def test_the_matrix_operator_matches_galsim_on_realistic_stamps():
    """Six-band noisy LSST blends with BTK's PSFs: the float32 torch operator and GalSim agree
    to 1e-4 of the image peak in every band and metacal image (measured: ~1.5e-5)."""
    stamps, psfs = realistic_stamps(2, seed=3)
    reference = metacal_images_galsim(stamps, psfs, SCALE)
    operator = MetacalOperator.build(psfs, 45)
    fast = operator.apply(torch.from_numpy(stamps))
    for name in METACAL_SHEARS:
        peak = np.abs(reference[name]).max(axis=(2, 3), keepdims=True)
        error = np.abs(fast[name].numpy() - reference[name]) / peak
        assert error.max() < 1e-4, name
    # a wrong PSF is visible at this precision: the test can fail
    wrong = MetacalOperator.build(psfs[::-1].copy(), 45).apply(torch.from_numpy(stamps))
    assert np.abs(wrong["1p"].numpy() - reference["1p"]).max() > 1e-2 * np.abs(
        reference["1p"]).max()


def test_the_noise_corrected_images_match_galsim_too():
    stamps, psfs = realistic_stamps(1, seed=4)
    noise = np.random.default_rng(9).normal(0.0, 40.0, stamps.shape)
    reference = metacal_images_galsim(stamps[:, :2], psfs[:2], SCALE, noise=noise[:, :2])
    fast = metacal_images(stamps[:, :2], psfs[:2], noise=noise[:, :2])
    for name in METACAL_SHEARS:
        assert np.abs(fast[name] - reference[name]).max() < 1e-4 * np.abs(reference[name]).max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_operator_runs_on_cuda_and_agrees_with_cpu():
    stamps, psfs = realistic_stamps(4, seed=5)
    cpu = MetacalOperator.build(psfs, 45).apply(torch.from_numpy(stamps))
    gpu = MetacalOperator.build(psfs, 45, device="cuda").apply(torch.from_numpy(stamps))
    for name in METACAL_SHEARS:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=0, atol=1e-4 * float(
            cpu[name].abs().max()))


def test_the_reconvolution_gaussian_never_amplifies_a_fourier_mode():
    """The rule: |Gaussian(k)| <= |PSF(A_s k)| on the grid, so the ratio is at most 1; and the
    Gaussian is wider for a wider PSF."""
    from deblend.core.metacal import RULE_GRID, fourier_grid, sheared_psf_transforms

    for psf in PSFS / PSFS.sum(axis=(1, 2), keepdims=True):
        sigma = reconvolution_sigma(psf)
        k = fourier_grid(RULE_GRID)
        gaussian = np.exp(-0.5 * sigma ** 2 * (k[None, :] ** 2 + k[:, None] ** 2))
        for transform in sheared_psf_transforms(psf, RULE_GRID, 0.01).values():
            assert (gaussian <= np.abs(transform) * (1 + 1e-9)).all()
    assert reconvolution_sigma(psf_image(galsim.Moffat(beta=3.5, fwhm=1.1))) > \
        reconvolution_sigma(PSFS[0])


def test_a_margin_crops_the_same_images():
    """An operator for 55-pixel inputs and 45-pixel outputs gives exactly the central crop of
    the 55-pixel operator's images (two bands: the crop is band by band); sizes that cannot be
    cropped are refused."""
    stamps, psfs = realistic_stamps(2, seed=6)
    stamps, psfs = stamps[:, :2], psfs[:2]
    big = np.pad(stamps, ((0, 0), (0, 0), (5, 5), (5, 5)))
    big += np.random.default_rng(2).normal(0.0, 40.0, big.shape)
    full = metacal_images(big, psfs)
    cropped = metacal_images(big, psfs, margin=5)
    for name in METACAL_SHEARS:
        np.testing.assert_allclose(cropped[name], full[name][:, :, 5:-5, 5:-5], rtol=0,
                                   atol=1e-9 * np.abs(full[name]).max())
    with pytest.raises(ValueError, match="even difference"):
        MetacalOperator.build(psfs, 45, input_pixels=54)
    with pytest.raises(ValueError, match="at least as large"):
        MetacalOperator.build(psfs, 45, input_pixels=43)


def test_a_float32_operator_is_built_in_single_precision_to_1e6():
    """The float32 operator's FFTs run in complex64: its matrices equal the float64 build's to
    1e-6 of their largest element (measured 2.6e-7; 6.5e-7 without reducing the phases, which
    reach 200 radians on this 65-pixel input, modulo 2 pi first); other precisions are
    refused."""
    from deblend.core.metacal import operator_matrices

    single, sigma32 = operator_matrices(PSFS[1], 45, 0.01, 82, 65, dtype=torch.float32)
    double, sigma64 = operator_matrices(PSFS[1], 45, 0.01, 82, 65, dtype=torch.float64)
    assert single.dtype == np.float32 and double.dtype == np.float64 and sigma32 == sigma64
    assert np.abs(single - double).max() < 1e-6 * np.abs(double).max()
    with pytest.raises(ValueError, match="float32 or float64"):
        operator_matrices(PSFS[1], 45, 0.01, 82, 65, dtype=torch.float16)
