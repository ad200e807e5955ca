"""The sky plane of a stamp (:mod:`deblend.core.sky_plane`): fitted away from galaxies, and held
out of metacal's shear (``metacal.hold_sky_plane``)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from deblend.core.inference import Deblender
from deblend.core.networks import Decoder, Encoder, Regressor
from deblend.core.normalization import NormalizationConstants
from deblend.core.runs import DataIdentity
from deblend.core.sky_plane import plane_design, sky_plane, sky_plane_coefficients
from tests.conftest import background_gradient

SIZE, SIGMA = 45, 10.0
BANDS = ("r", "i")


def plane(a: float, b: float, c: float, size: int = SIZE) -> np.ndarray:
    """(size, size) a + b x + c y, pixels from the centre (x along axis 1)."""
    return (plane_design(size, size) @ np.array([a, b, c])).reshape(size, size)


def galaxy_stamps(n: int, seed: int = 0, flux: float = 3e4) -> np.ndarray:
    """(n, 2, SIZE, SIZE) GalSim exponential galaxies (half-light 0.6", random shapes) under a
    0.7" Moffat PSF at 0.2"/pixel, with Gaussian sky noise of SIGMA electrons per pixel."""
    rng = np.random.default_rng(seed)
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    out = np.empty((n, len(BANDS), SIZE, SIZE), np.float32)
    for i in range(n):
        e1, e2 = rng.uniform(-0.4, 0.4, 2)
        galaxy = galsim.Exponential(half_light_radius=0.6, flux=flux).shear(e1=e1, e2=e2)
        image = galsim.Convolve(galaxy, psf).drawImage(nx=SIZE, ny=SIZE, scale=0.2).array
        out[i] = image + rng.normal(0.0, SIGMA, (len(BANDS), SIZE, SIZE))
    return out


def test_the_plane_is_fitted_away_from_the_galaxy() -> None:
    """A constant and a gradient under a bright galaxy are recovered to a small fraction of the
    noise; the galaxy itself (2,000 sigma of flux) is clipped, not fitted: a least-squares
    plane through every pixel would sit 1.5 sigma above the sky."""
    stamps = galaxy_stamps(20)
    truth = (0.3 * SIGMA, 0.3 * SIGMA / 22, -0.2 * SIGMA / 22)
    fitted = sky_plane_coefficients(stamps + plane(*truth).astype(np.float32))
    assert fitted.shape == (20, 2, 3)
    errors = fitted - np.array(truth)
    assert np.abs(errors[..., 0]).max() < 0.1 * SIGMA  # what is left of the wings: above
    assert np.abs(errors[..., 1:]).max() < 0.01 * SIGMA  # gradients: symmetric wings cancel
    assert stamps.mean() > 1.4 * SIGMA  # what an unclipped fit of the constant would be off by
    # a plane is removed whole: the stamps with it are those without, to the fit's noise
    with_plane = stamps + plane(*truth).astype(np.float32)
    np.testing.assert_allclose(with_plane - sky_plane(with_plane), stamps - sky_plane(stamps),
                               atol=0.02 * SIGMA)


def test_a_constant_band_and_bad_pixels() -> None:
    """A missing band (all 0 by the fill rule) has a zero plane; non-finite pixels are refused
    (missing bands are filled before); shapes and dtype are kept."""
    stamps = galaxy_stamps(2)
    stamps[0, 1] = 0.0
    fitted = sky_plane(stamps)
    assert fitted.shape == stamps.shape and fitted.dtype == np.float32
    assert np.all(fitted[0, 1] == 0.0) and np.all(np.isfinite(fitted))
    stamps[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sky_plane(stamps)
    with pytest.raises(ValueError, match="bands, H, W"):
        sky_plane(np.zeros((SIZE, SIZE)))


def test_excluded_pixels_are_never_fitted() -> None:
    """``exclude`` (masked pixels): whatever they hold, the plane is the same; a band wholly
    excluded fits to 0; an exclusion of another shape is refused. Excluding pixels is not a
    no-op: the plane of a stamp with 1e5 in a corner moves when they are kept (by 0.1 sigma:
    the clipping catches most of it)."""
    stamps = galaxy_stamps(3) + plane(0.3 * SIGMA, 0.01 * SIGMA, 0.0).astype(np.float32)
    exclude = np.zeros(stamps.shape, bool)
    exclude[:, :, :6, :9] = True
    exclude[2, 1] = True
    garbage = np.where(exclude, np.float32(1e5), stamps)
    np.testing.assert_array_equal(sky_plane(garbage, exclude=exclude),
                                  sky_plane(np.where(exclude, 0.0, stamps).astype(np.float32),
                                            exclude=exclude))
    assert np.all(sky_plane_coefficients(garbage, exclude=exclude)[2, 1] == 0.0)
    assert np.abs(sky_plane(garbage) - sky_plane(garbage, exclude=exclude))[:2].max() > 0.05 * SIGMA
    with pytest.raises(ValueError, match="exclude"):
        sky_plane(stamps, exclude=exclude[0])


def deblender(hold: bool = False) -> Deblender:
    """A tiny untrained deblender; ``hold``: its run's ``metacal.hold_sky_plane``."""
    torch.manual_seed(0)
    data = DataIdentity("tiny", "tiny", "LSST", BANDS, SIZE, 0.2,
                        NormalizationConstants(BANDS, (2000.0, 2000.0)))
    return Deblender(Encoder(2, SIZE, 8), Decoder(2, SIZE, 8), Regressor(8, (16,)), data,
                     metacal_hold_sky_plane=hold)


def test_metacal_holds_the_sky_plane_unsheared() -> None:
    """``hold_sky_plane``: a residual plane under the galaxies reaches the five metacal images
    as it was (what the real shear did to it: nothing), and the networks' inputs differ from the
    residual-free stamps' by the residual alone; without it metacal shears the residual's
    gradient, which differs between the +delta and -delta images, a false response to shear."""
    stamps = np.pad(galaxy_stamps(6, seed=1), ((0, 0), (0, 0), (10, 10), (10, 10)),
                    mode="reflect")
    residual = plane(0.5 * SIGMA, 0.5 * SIGMA / 22, 0.3 * SIGMA / 22, SIZE + 20)
    psf = galsim.Moffat(beta=3.0, fwhm=0.7).drawImage(nx=SIZE, ny=SIZE, scale=0.2).array
    psfs = np.stack([psf, psf])
    model = deblender()
    common = dict(views=1, reconstruct=False, keep_inputs=True)
    inner = residual[10:-10, 10:-10]
    for hold in (True, False):
        clean = model.metacal(stamps, psfs, hold_sky_plane=hold, **common)
        dirty = model.metacal(stamps + residual.astype(np.float32), psfs, hold_sky_plane=hold,
                              **common)
        added = {k: dirty.inputs[k] - clean.inputs[k] for k in clean.inputs}
        shear_1 = np.abs(added["1p"] - added["1m"]).max()
        if hold:
            for image in added.values():
                np.testing.assert_allclose(image, np.broadcast_to(inner, image.shape),
                                           atol=1e-3 * SIGMA)
            assert shear_1 < 1e-3 * SIGMA
        else:  # the gradient sheared by +-delta: about delta x gradient x radius
            assert shear_1 > 5e-3 * SIGMA
    assert len(model.metacal(stamps[:0], psfs, hold_sky_plane=True).images["noshear"].mu) == 0
    # a run that holds the plane holds it by default (the same images as asked explicitly)
    dirty = stamps + residual.astype(np.float32)
    by_default = deblender(hold=True).metacal(dirty, psfs, **common).inputs
    for name, image in model.metacal(dirty, psfs, hold_sky_plane=True, **common).inputs.items():
        np.testing.assert_array_equal(by_default[name], image)
    assert not np.array_equal(model.metacal(dirty, psfs, **common).inputs["1p"],
                              by_default["1p"])


def test_per_object_responses_in_cells_hold_the_cell_s_plane() -> None:
    """The per-object metacal responses of the cells' walk (``r11``...) shear each stamp less
    the cell's held plane: with it, a sky-reading estimator responds on a cell with a plane
    exactly as on the same cell without; without it, by the plane's sheared gradient."""
    from deblend.core.cell_measure import object_responses
    from deblend.core.fourier_metacal import FourierMetacal

    cell = np.zeros((len(BANDS), 101, 101), np.float32)
    for k, (x, y) in enumerate(((30, 30), (70, 35), (50, 72))):
        cell[:, y - 22:y + 23, x - 22:x + 23] += galaxy_stamps(1, seed=k)[0]
    positions = np.array([[30.0, 30.0], [70.0, 35.0], [50.0, 72.0]])
    slope = 0.01 * SIGMA
    sky = np.broadcast_to(plane(0.0, slope, 0.0, 101), cell.shape).astype(np.float32)
    masked = np.zeros(cell.shape, bool)
    psf = galsim.Moffat(beta=3.0, fwhm=0.7).drawImage(nx=33, ny=33, scale=0.2).array
    operator = FourierMetacal(np.stack([psf, psf]), pad=12)

    def r11(image: np.ndarray, held: np.ndarray | None) -> np.ndarray:
        columns = object_responses(image, np.zeros_like(image), positions, background_gradient,
                                   operator, False, held, masked, SIZE)
        return columns["r11"]

    clean = r11(cell, sky_plane(cell))
    np.testing.assert_allclose(r11(cell + sky, sky_plane(cell + sky)), clean,
                               atol=1e-3 * slope * SIZE)
    assert np.all(r11(cell + sky, None) - r11(cell, None) < -0.7 * slope * (SIZE - 1))
