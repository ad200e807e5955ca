"""Forced photometry (deblend.core.photometry): per-band amplitudes of the deblended sources'
reconstructions fitted jointly to the pixels, on GalSim galaxies."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from deblend.core.photometry import fit_amplitudes, fitted_scene

SCALE, SIZE = 0.2, 45


def galaxy(hlr: float, e1: float, flux: float) -> np.ndarray:
    """A PSF-convolved exponential on a SIZE x SIZE stamp (electrons)."""
    profile = galsim.Convolve(galsim.Exponential(half_light_radius=hlr, flux=flux)
                              .shear(e1=e1, e2=0.0), galsim.Moffat(beta=3.0, fwhm=0.8))
    return profile.drawImage(nx=SIZE, ny=SIZE, scale=SCALE).array.astype(np.float64)


@pytest.fixture(scope="module")
def blend() -> dict:
    """Two overlapping galaxies in two bands (10 pixels apart) and a third far away, with
    their templates at unit flux and the true amplitudes."""
    templates = np.stack([np.stack([galaxy(0.6, 0.2, 1.0)] * 2),
                          np.stack([galaxy(0.9, -0.3, 1.0)] * 2),
                          np.stack([galaxy(0.4, 0.0, 1.0)] * 2)])
    positions = np.array([[40.2, 40.0], [49.0, 44.4], [100.0, 100.0]])
    truth = np.array([[3000.0, 500.0], [1500.0, 2000.0], [800.0, 900.0]])
    image = fitted_scene((2, 140, 140), templates, positions, truth)
    return {"templates": templates, "positions": positions, "truth": truth, "image": image}


def test_the_amplitudes_of_a_noiseless_blend_are_found_exactly(blend) -> None:
    """Noiseless pixels drawn from the templates give back their amplitudes, the blended pair's
    included (a per-source fit that ignored the neighbour would give the pair's overlap to
    both)."""
    variance = np.ones_like(blend["image"])
    a = fit_amplitudes(blend["image"], variance, blend["templates"], blend["positions"])
    np.testing.assert_allclose(a, blend["truth"], rtol=1e-8)
    alone = np.stack([fit_amplitudes(blend["image"], variance, blend["templates"][k:k + 1],
                                     blend["positions"][k:k + 1])[0] for k in range(2)])
    assert np.all(alone > 1.01 * blend["truth"][:2])


def test_the_fit_is_unbiased_and_its_scatter_is_the_noise(blend) -> None:
    """On 200 noise fields (sigma 3 electrons per pixel) the mean amplitudes are the truth
    within 3 standard errors, and their scatter is that of the weighted least-squares fit
    (sigma^2 (A^T A)^-1) within 20%."""
    rng = np.random.default_rng(0)
    sigma = 3.0
    variance = np.full_like(blend["image"], sigma ** 2)
    fits = np.stack([fit_amplitudes(blend["image"] + rng.normal(0, sigma, blend["image"].shape),
                                    variance, blend["templates"], blend["positions"])
                     for _ in range(200)])
    error = fits.std(axis=0, ddof=1)
    assert np.all(np.abs(fits.mean(axis=0) - blend["truth"]) < 3 * error / np.sqrt(200))
    columns = np.stack([fitted_scene((2, 140, 140), blend["templates"][k:k + 1],
                                     blend["positions"][k:k + 1], np.ones((1, 2)))[0].ravel()
                        for k in range(3)], axis=1)
    expected = sigma * np.sqrt(np.diag(np.linalg.inv(columns.T @ columns)))
    np.testing.assert_allclose(error[:, 0], expected, rtol=0.2)


def test_masked_pixels_and_missing_bands_carry_no_weight(blend) -> None:
    """A masked patch over the pair's centre (NaN pixels of infinite variance) changes nothing
    in noiseless pixels; a band with no finite variance (a missing band) keeps amplitude 1, as
    does a source whose template is zero in a band."""
    image, variance = blend["image"].copy(), np.ones_like(blend["image"])
    image[0, 38:43, 38:43] = np.nan
    variance[0, 38:43, 38:43] = np.inf
    variance[1] = np.inf
    templates = blend["templates"].copy()
    templates[2, 0] = 0.0
    a = fit_amplitudes(image, variance, templates, blend["positions"])
    np.testing.assert_allclose(a[:2, 0], blend["truth"][:2, 0], rtol=1e-8)
    np.testing.assert_array_equal(a[:, 1], 1.0)
    assert a[2, 0] == 1.0


def test_amplitudes_are_never_negative(blend) -> None:
    """An image darker than the sky under one source gives it amplitude 0, not less."""
    image = blend["image"].copy()
    image[:, 90:111, 90:111] = -50.0
    a = fit_amplitudes(image, np.ones_like(image), blend["templates"], blend["positions"])
    assert np.all(a >= 0) and np.all(a[2] == 0)


def test_bad_inputs_are_refused(blend) -> None:
    image, templates, positions = blend["image"], blend["templates"], blend["positions"]
    variance = np.ones_like(image)
    with pytest.raises(ValueError, match="variance of the same shape"):
        fit_amplitudes(image, variance[:1], templates, positions)
    with pytest.raises(ValueError, match="templates"):
        fit_amplitudes(image, variance, templates[:, :1], positions)
    with pytest.raises(ValueError, match="non-finite"):
        bad = templates.copy()
        bad[0, 0, 0, 0] = np.nan
        fit_amplitudes(image, variance, bad, positions)
    with pytest.raises(ValueError, match="finite variance"):
        bad = image.copy()
        bad[0, 5, 5] = np.nan
        fit_amplitudes(bad, variance, templates, positions)
    with pytest.raises(ValueError, match="outside the image"):
        fit_amplitudes(image, variance, templates, positions + 200)
    assert fit_amplitudes(image, variance, templates[:0], positions[:0]).shape == (0, 2)


def test_two_detections_of_one_source_share_its_light(blend) -> None:
    """The same template twice at the same place (a source detected twice) gives finite,
    non-negative amplitudes whose sum is the source's."""
    templates = np.concatenate([blend["templates"][:1], blend["templates"][:1]])
    positions = np.concatenate([blend["positions"][:1], blend["positions"][:1]])
    image = fitted_scene((2, 140, 140), templates[:1], positions[:1], blend["truth"][:1])
    a = fit_amplitudes(image, np.ones_like(image), templates, positions)
    assert np.all(np.isfinite(a)) and np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=0), blend["truth"][0], rtol=1e-6)


def test_the_fallback_without_a_cholesky_factor_gives_the_same_amplitudes(blend, monkeypatch
                                                                          ) -> None:
    """When the normal matrix has no Cholesky factor in floating point, the group is solved
    from its weighted pixels directly: the same answer on a noisy blend."""
    rng = np.random.default_rng(3)
    image = blend["image"] + rng.normal(0, 3.0, blend["image"].shape)
    variance = np.full_like(image, 9.0)
    expected = fit_amplitudes(image, variance, blend["templates"], blend["positions"])

    def no_factor(matrix):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(np.linalg, "cholesky", no_factor)
    np.testing.assert_allclose(fit_amplitudes(image, variance, blend["templates"],
                                              blend["positions"]), expected, rtol=1e-6)
