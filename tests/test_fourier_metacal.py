"""Metacalibration of whole cells by FFT: equal to the GalSim reference on a noisy cell (noise
correction included), to the stamp operator on stamps, and strict about its input."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from deblend.core.fourier_metacal import FourierMetacal
from deblend.core.metacal import METACAL_SHEARS, metacal_images, metacal_images_galsim
from simulation.surveys import get_survey, psf_images

SCALE = 0.2
BANDS = ("r", "i")


def lsst_psfs(bands: tuple[str, ...] = BANDS) -> np.ndarray:
    survey = get_survey("LSST")
    every = tuple(survey.available_filters)
    return psf_images("LSST", every, 45)[[every.index(b) for b in bands]]


def noisy_cell(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (1, 2, height, width) LSST cell of eight galaxies spread over it, sky noise of 40 e,
    and an independent noise field for the correction."""
    survey = get_survey("LSST")
    rng = np.random.default_rng(seed)
    cell = np.zeros((1, len(BANDS), height, width))
    for _ in range(8):
        galaxy = (galsim.Exponential(half_light_radius=rng.uniform(0.3, 1.0))
                  .shear(e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
                  .shift(rng.uniform(-0.4, 0.4) * width * SCALE,
                         rng.uniform(-0.4, 0.4) * height * SCALE) * rng.uniform(1e4, 5e4))
        for b, band in enumerate(BANDS):
            psf = survey.get_filter(band).psf
            cell[0, b] += galsim.Convolve(galaxy, psf).drawImage(
                nx=width, ny=height, scale=SCALE).array
    return cell + rng.normal(0.0, 40.0, cell.shape), rng.normal(0.0, 40.0, cell.shape)


def test_cell_metacal_equals_galsim_on_a_noisy_cell():
    """A non-square 90 x 110 cell with the noise correction: every metacal image within 1e-5
    of the peak of GalSim's (measured: ~5e-6, GalSim's own k-interpolation error; the FFT
    path equals the exact transform to 1e-8), edges included."""
    cell, noise = noisy_cell(90, 110, seed=1)
    psfs = lsst_psfs()
    reference = metacal_images_galsim(cell, psfs, SCALE, noise=noise)
    fast = FourierMetacal(psfs).apply(cell, noise)
    for name in METACAL_SHEARS:
        peak = np.abs(reference[name]).max()
        assert fast[name].shape == cell.shape
        assert np.abs(fast[name].numpy() - reference[name]).max() < 1e-5 * peak, name
    # the test can fail: the bands' PSFs swapped are far off
    wrong = FourierMetacal(psfs[::-1].copy()).apply(cell, noise)
    assert np.abs(wrong["1p"].numpy() - reference["1p"]).max() > 1e-3 * np.abs(
        reference["1p"]).max()


def test_cell_metacal_equals_the_stamp_operator_and_batches():
    """On a batch of stamps (three-dimensional and four-dimensional input alike) it gives the
    stamp operator's images, away from the edge (where the stamp operator's own Fourier torus
    leaves ~2e-5 of the peak): 55-pixel stamps cropped to 45."""
    cell, _ = noisy_cell(55, 55, seed=2)
    stamps = np.concatenate([cell, cell[..., ::-1, :].copy()])
    psfs = lsst_psfs()
    dense = metacal_images(stamps, psfs, margin=5)
    operator = FourierMetacal(psfs, dtype=torch.float64)
    batched = operator.apply(stamps)
    single = operator.apply(stamps[1])
    for name in METACAL_SHEARS:
        peak = np.abs(dense[name]).max()
        central = batched[name].numpy()[..., 5:-5, 5:-5]
        assert np.abs(central - dense[name]).max() < 1e-5 * peak, name
        np.testing.assert_allclose(single[name].numpy(), batched[name][1].numpy(), atol=1e-9)


def test_cell_metacal_refuses_bad_input():
    psfs = lsst_psfs()
    operator = FourierMetacal(psfs)
    with pytest.raises(ValueError, match=r"shape \(\[N,\] 2, H, W\)"):
        operator.apply(np.zeros((3, 40, 40)))
    bad = np.zeros((2, 40, 40))
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        operator.apply(bad)
    with pytest.raises(ValueError, match="noise must have the images' shape"):
        operator.apply(np.zeros((2, 40, 40)), np.zeros((2, 40, 41)))
    with pytest.raises(ValueError, match="delta"):
        FourierMetacal(psfs, delta=0.2)
    with pytest.raises(ValueError, match="pad"):
        FourierMetacal(psfs, pad=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cell_metacal_runs_on_cuda_and_agrees_with_cpu():
    cell, noise = noisy_cell(120, 120, seed=3)
    psfs = lsst_psfs()
    cpu = FourierMetacal(psfs).apply(cell, noise)
    gpu = FourierMetacal(psfs, device="cuda").apply(cell, noise)
    for name in METACAL_SHEARS:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=0,
                                   atol=1e-5 * float(cpu[name].abs().max()))
