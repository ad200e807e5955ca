"""The stamp's 8 symmetric views: images and the exact action on measured distortions."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from deblend.core.shapes import moments_ellipticity
from deblend.core.symmetry import (
    N_VIEWS,
    ellipticity_in_view,
    image_from_view,
    image_view,
    position_from_view,
    position_in_view,
    random_views,
)


def sheared_galaxy(e1: float, e2: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """A 45x45 exponential disk with distortion (e1, e2), drawn by GalSim (0.2"/pixel)."""
    galaxy = galsim.Exponential(half_light_radius=0.6).shear(e1=e1, e2=e2)
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    image = galsim.Convolve(galaxy, psf).drawImage(nx=45, ny=45, scale=0.2,
                                                   offset=(dx, dy))
    return image.array.astype(np.float64)


@pytest.mark.parametrize("view", range(N_VIEWS))
def test_measured_distortion_follows_the_view(view: int) -> None:
    image = sheared_galaxy(0.3, -0.2, dx=0.4, dy=-0.3)
    e = np.array(moments_ellipticity(image[None])).T[0]
    seen = image_view(torch.from_numpy(image), view).numpy()
    measured = np.array(moments_ellipticity(seen[None])).T[0]
    expected = ellipticity_in_view(torch.from_numpy(e), view).numpy()
    assert np.allclose(measured, expected, atol=1e-9)
    # only the identity and the 180-degree rotation leave an elliptical galaxy's (e1, e2) alone
    assert np.allclose(measured, e, atol=1e-3) == (view in (0, 2))


def test_views_keep_the_centre_and_invert() -> None:
    x = torch.randn(3, 6, 45, 45, dtype=torch.float64)
    for view in range(N_VIEWS):
        seen = image_view(x, view)
        assert torch.equal(seen[..., 22, 22], x[..., 22, 22])
        assert torch.equal(image_from_view(seen, view), x)
        assert torch.equal(image_view(image_from_view(x, view), view), x)
        back = ellipticity_in_view(ellipticity_in_view(torch.tensor([0.1, 0.2]), view), view)
        assert torch.equal(back, torch.tensor([0.1, 0.2]))
    assert {tuple(image_view(x, v)[0, 0, 0, :3].tolist()) for v in range(N_VIEWS)}.__len__() == 8
    with pytest.raises(ValueError, match="0..7"):
        image_view(x, 8)


@pytest.mark.parametrize("shape", [(13, 13), (9, 14)])
def test_positions_follow_the_pixels_into_each_view_and_back(shape: tuple[int, int]) -> None:
    height, width = shape
    xy = np.array([[0.0, 0.0], [width - 1.0, 2.0], [3.0, height - 1.0], [5.0, 4.0]])
    for view in range(N_VIEWS):
        moved = position_in_view(xy, view, height, width)
        for (x, y), (vx, vy) in zip(xy.astype(int), moved):
            image = torch.zeros(height, width)
            image[y, x] = 1.0
            seen = image_view(image, view)
            row, col = np.unravel_index(int(seen.argmax()), tuple(seen.shape))
            assert (vx, vy) == (col, row)
        np.testing.assert_allclose(position_from_view(moved, view, height, width), xy)
    # sub-pixel positions move like the pixel grid (the transforms are affine)
    inner = np.array([[2.25, 3.5]])
    np.testing.assert_allclose(
        position_from_view(position_in_view(inner, 5, height, width), 5, height, width), inner)


def test_random_views_transform_inputs_and_targets_together() -> None:
    rng = np.random.default_rng(0)
    images = np.stack([sheared_galaxy(*rng.uniform(-0.4, 0.4, 2)) for _ in range(32)])
    stamps = torch.from_numpy(np.repeat(images[:, None], 2, axis=1))      # (32, 2 bands, 45, 45)
    labels = torch.from_numpy(np.array(moments_ellipticity(images)).T)    # (32, 2)
    generator = torch.Generator().manual_seed(1)
    seen, seen_labels = random_views(stamps, labels, targets_are_images=False,
                                     generator=generator)
    measured = np.array(moments_ellipticity(seen[:, 0].numpy())).T
    assert np.allclose(measured, seen_labels.numpy(), atol=1e-9)
    assert not torch.equal(seen, stamps) and torch.equal(stamps[:, 0], stamps[:, 1])
    seen_images, seen_targets = random_views(stamps, stamps.clone(), targets_are_images=True,
                                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(seen_images, seen_targets) and torch.equal(seen_images, seen)
