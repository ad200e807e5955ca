"""Sub-pixel recentring of detection stamps (deblend.core.recentre) and its use by the walk."""

from __future__ import annotations

from pathlib import Path

import galsim
import numpy as np
import pytest

from deblend.core.cell_measure import detection_templates
from deblend.core.inference import Deblender
from deblend.core.metadetect import MetadetectSettings, detection_stamps
from deblend.core.photometry import fit_amplitudes, fitted_scene
from deblend.core.recentre import (
    recentred_stamps,
    shift_matrices,
    shift_stamps,
    shifted_templates,
    subpixel_offsets,
)
from deblend.core.stamps import cut_stamps

WEIGHTS = Path(__file__).resolve().parents[1] / "deblend" / "weights" / "quick"
PIXEL = 0.2


def galaxy(flux: float = 1.0) -> galsim.GSObject:
    """An inclined exponential disk under a 0.7" Moffat PSF (LSST-like, sampled at 0.2")."""
    disk = galsim.Exponential(half_light_radius=0.5, flux=flux).shear(g1=0.3, g2=-0.15)
    return galsim.Convolve(disk, galsim.Moffat(beta=3.5, fwhm=0.7))


def drawn(profile: galsim.GSObject, size: int, x: float, y: float) -> np.ndarray:
    """``profile`` drawn on a size x size image (pixel centres at 0..size-1) centred at (x, y)."""
    centre = (size - 1) / 2
    return profile.drawImage(nx=size, ny=size, scale=PIXEL,
                             offset=(x - centre, y - centre)).array.astype(np.float64)


def test_subpixel_offsets_are_from_the_nearest_pixel_centre() -> None:
    offsets = subpixel_offsets(np.array([[10.3, 4.5], [7.0, -0.2], [2.49, 3.51]]))
    np.testing.assert_allclose(offsets, [[0.3, -0.5], [0.0, -0.2], [0.49, -0.49]], atol=1e-12)


@pytest.mark.parametrize("x, y", [(40.3, 37.8), (38.5, 41.45), (41.0, 40.0)])
def test_a_recentred_stamp_is_the_galaxy_drawn_on_the_pixel_centre(x, y) -> None:
    """GalSim draws the galaxy at (x, y); the recentred 45-pixel stamp equals the same galaxy
    drawn on the nearest pixel's centre to 1e-3 of its peak, keeps its flux to 1e-4, and the
    template moved back equals the stamp cut around the nearest pixel."""
    image = drawn(galaxy(), 81, x, y)[None]
    stamp = recentred_stamps(image, np.array([[x, y]]), 45)[0, 0]
    cx, cy = np.floor(x + 0.5), np.floor(y + 0.5)
    centred = drawn(galaxy(), 81, cx, cy)[None]
    expected = cut_stamps(centred, np.array([[cx, cy]]), 45)[0, 0]
    assert np.abs(stamp - expected).max() < 1e-3 * expected.max()
    assert stamp.sum() == pytest.approx(expected.sum(), rel=1e-4)
    back = shifted_templates(expected[None, None], np.array([[x, y]]))[0, 0]
    plain = cut_stamps(image, np.array([[x, y]]), 45)[0, 0]
    assert np.abs(back - plain).max() < 1e-3 * plain.max() and back.min() >= 0


@pytest.mark.parametrize("n, crop", [(61, 8), (20, 0)])
def test_the_shift_matrices_are_a_fourier_phase_on_the_mirrored_vector(n, crop) -> None:
    """The closed form (periodic sinc, two diagonals) against numpy's FFT of the vector and its
    mirror image with the shift's phase (what the module says it is), to 1e-12; a whole-pixel
    shift moves samples exactly, the mirror image coming in at the edge."""
    rng = np.random.default_rng(4)
    shifts = np.array([0.37, -0.5, 0.02, 1.0])
    vectors = rng.normal(size=(len(shifts), n))
    mirrored = np.concatenate([vectors, vectors[:, ::-1]], axis=1)
    phase = np.exp(-2j * np.pi * np.fft.rfftfreq(2 * n)[None, :] * shifts[:, None])
    expected = np.fft.irfft(np.fft.rfft(mirrored, axis=1) * phase, n=2 * n, axis=1)
    matrices = shift_matrices(shifts, n, crop)
    moved = np.einsum("kij,kj->ki", matrices, vectors)
    np.testing.assert_allclose(moved, expected[:, crop:n - crop], atol=1e-12)
    np.testing.assert_allclose(moved[3], np.concatenate([vectors[3, :1], vectors[3, :-1]]
                                                        )[crop:n - crop], atol=1e-12)


def test_an_offset_of_zero_leaves_the_stamp_bit_for_bit() -> None:
    image = np.random.default_rng(0).normal(size=(2, 60, 60)).astype(np.float32)
    positions = np.array([[30.0, 29.0], [20.25, 33.0]])
    stamps = recentred_stamps(image, positions, 21)
    assert stamps.dtype == np.float32
    np.testing.assert_array_equal(stamps[0], cut_stamps(image, positions[:1], 21)[0])
    assert not np.array_equal(stamps[1], cut_stamps(image, positions[1:], 21)[0])


def test_a_shift_keeps_white_noise_white() -> None:
    """Half a pixel along both axes, the largest shift, moves the noise and nearly keeps its
    variance (measured 0.970 of it: the mirrored stamp's highest frequencies cannot be moved by
    half a pixel) and its neighbouring pixels uncorrelated (0.017), where a bilinear
    interpolation would halve the variance and correlate neighbours by a half."""
    noise = np.random.default_rng(1).normal(size=(400, 1, 61, 61))
    moved = shift_stamps(noise, np.full((400, 2), 0.5))[..., 8:53, 8:53]
    assert moved.var() == pytest.approx(noise.var(), rel=0.04)
    lag = np.mean(moved[..., 1:] * moved[..., :-1]) / moved.var()
    assert abs(lag) < 0.025


def test_a_sky_gradient_is_moved_without_ringing() -> None:
    """A plane moves as a plane (to 1e-3 of its range over the stamp) in the crop, where a
    periodic shift of the same stamp rings by a tenth of that range."""
    y, x = np.mgrid[0:61, 0:61].astype(np.float64)
    plane = 0.05 * x - 0.03 * y + 2.0
    moved = shift_stamps(plane[None, None], np.array([[0.4, -0.3]]))[0, 0, 8:53, 8:53]
    expected = (0.05 * (x - 0.4) - 0.03 * (y + 0.3) + 2.0)[8:53, 8:53]
    assert np.abs(moved - expected).max() < 1e-3 * (plane.max() - plane.min())


def test_bad_shifts_are_refused() -> None:
    stamps = np.zeros((2, 1, 9, 9))
    with pytest.raises(ValueError, match="1 shifts for 2 stamps"):
        shift_stamps(stamps, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="finite"):
        shift_stamps(stamps, np.array([[0.1, np.nan], [0.0, 0.0]]))
    stamps[1, 0, 4, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        shift_stamps(stamps, np.array([[0.0, 0.0], [0.2, 0.0]]))


def test_recentring_is_a_setting_of_the_walk_and_of_its_cache_keys() -> None:
    """On by default; off gives the keys written before it existed (they measured without it)."""
    assert MetadetectSettings().recentre is True
    assert MetadetectSettings().identity()["recentre"] is True
    assert "recentre" not in MetadetectSettings(recentre=False).identity()
    with pytest.raises(ValueError, match="recentre must be True or False"):
        MetadetectSettings(recentre=1)


def test_the_packaged_model_draws_an_off_centre_galaxy_as_well_as_a_centred_one() -> None:
    """A bright galaxy (peak S/N 180 in i) drawn by GalSim a third of a pixel off the pixel
    centre along x and y: fitted to the pixels, the recentred reconstruction leaves within 10%
    of the residual (chi rms within 12 pixels) the same galaxy leaves on the pixel centre, the
    plain one at least 1.5 times it (measured: 0.96 and 1.92 times, 0.95 and 1.93 with another
    noise field)."""
    model = Deblender.from_run(WEIGHTS)
    bands = model.bands
    flux = np.array([0.3, 0.6, 1.0, 1.2, 1.3, 1.3]) * 2e5
    sigma = 25.0

    def chi(x: float, y: float, recentre: bool) -> float:
        image = np.stack([drawn(galaxy(f), 91, x, y) for f in flux])
        noise = np.random.default_rng(3).normal(0.0, sigma, image.shape)
        image = image + noise
        variance = np.full(image.shape, sigma ** 2)
        position = np.array([[x, y]])
        templates = detection_templates(model, image, position, recentre=recentre,
                                        reconstruction_views=8)
        scene = fitted_scene(image.shape, templates, position,
                             fit_amplitudes(image, variance, templates, position))
        ring = (np.hypot(*np.meshgrid(np.arange(91) - x, np.arange(91) - y)) < 12)
        return float(np.sqrt(np.mean(((image - scene)[:, ring] / sigma) ** 2)))

    assert len(bands) == len(flux)
    centred = chi(45.0, 45.0, True)
    assert chi(45.0, 45.0, False) == centred  # nothing to move: the same stamps
    assert chi(45.33, 44.67, True) < 1.1 * centred
    assert chi(45.33, 44.67, False) > 1.5 * centred


def test_without_recentring_the_walk_cuts_the_plain_stamps() -> None:
    image = np.random.default_rng(2).normal(size=(3, 50, 50))
    positions = np.array([[20.3, 25.2]])
    off = detection_stamps(image, positions, 21, recentre=False)
    np.testing.assert_array_equal(off, cut_stamps(image, positions, 21))
    on = detection_stamps(image, positions, 21, MetadetectSettings().recentre)
    np.testing.assert_array_equal(on, recentred_stamps(image, positions, 21))
