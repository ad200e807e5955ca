"""The eight symmetries of a square stamp (the dihedral group D4) and what they do to ellipticity.

Stamps are odd-sized with the target on the central pixel, so 90-degree rotations and mirror
flips map the stamp onto itself and keep the target centred. For distortions measured in the pixel
frame (x = columns, axis -1; y = rows, axis -2) they act exactly:

- a 90-degree rotation turns the position angle by 90 degrees: (e1, e2) -> (-e1, -e2);
- a flip x -> -x reverses Qxy: (e1, e2) -> (e1, -e2).

View ``v`` in 0..7 flips first when ``v >= 4``, then rotates ``v % 4`` times. Every label map is a
sign change, hence its own inverse: :func:`ellipticity_in_view` takes an ellipticity to the view's
frame *and* back. Training uses random views as exact augmentation; the deblender averages its
regressor over all eight views (after mapping each back), which makes the estimate equivariant
under the group and averages down the encoder's orientation-dependent errors. MAP deblending
fits each scene in one view (:func:`position_in_view` moves its sources there).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

N_VIEWS = 8


def _check_view(view: int) -> None:
    if not 0 <= view < N_VIEWS:
        raise ValueError(f"view must be in 0..{N_VIEWS - 1}, got {view}")


def image_view(images: Tensor, view: int) -> Tensor:
    """Stamps ``(..., H, W)`` seen in ``view`` (flip along x if ``view >= 4``, then rotate)."""
    _check_view(view)
    if view >= 4:
        images = torch.flip(images, dims=(-1,))
    return torch.rot90(images, view % 4, dims=(-2, -1))


def image_from_view(images: Tensor, view: int) -> Tensor:
    """The inverse of :func:`image_view`: stamps ``(..., H, W)`` seen in ``view`` back in the
    stamps' own frame (rotate back, then unflip)."""
    _check_view(view)
    images = torch.rot90(images, -(view % 4), dims=(-2, -1))
    if view >= 4:
        images = torch.flip(images, dims=(-1,))
    return images


def in_views(arrays: np.ndarray, views: np.ndarray,
             transform: Callable[[Tensor, int], Tensor]) -> np.ndarray:
    """A copy of ``arrays`` whose rows (axis 0) in each view v are ``transform(rows, v)``: e.g.
    ``in_views(stamps, views, image_view)`` shows stamp i in ``views[i]``."""
    out = np.array(arrays, copy=True)
    for view in np.unique(views):
        rows = views == view
        out[rows] = transform(torch.from_numpy(np.ascontiguousarray(arrays[rows])),
                              int(view)).numpy()
    return out


def position_in_view(xy: np.ndarray, view: int, height: int, width: int) -> np.ndarray:
    """(K, 2) pixel positions (x = column, y = row) in an image of ``height`` x ``width``
    moved to where :func:`image_view` puts those pixels; float64."""
    _check_view(view)
    x, y = np.asarray(xy, np.float64)[:, 0], np.asarray(xy, np.float64)[:, 1]
    if view >= 4:
        x = width - 1 - x
    for _ in range(view % 4):  # one rot90: (x, y) -> (y, W - 1 - x), and H, W swap
        x, y = y, width - 1 - x
        height, width = width, height
    return np.stack([x, y], axis=1)


def position_from_view(xy: np.ndarray, view: int, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`position_in_view`: positions in ``view`` of an image that is
    ``height`` x ``width`` in its own frame, back in that frame; float64."""
    _check_view(view)
    # rotations are undone by the opposite rotation; a flip then a rotation is its own inverse
    inverse = view if view >= 4 else (4 - view) % 4
    in_view = (width, height) if view % 2 else (height, width)  # odd views swap H and W
    return position_in_view(xy, inverse, *in_view)


def ellipticity_in_view(e: Tensor, view: int) -> Tensor:
    """Distortions ``(..., 2)`` (pixel frame) mapped into ``view``, or back out of it."""
    _check_view(view)
    sign = torch.ones(2, dtype=e.dtype, device=e.device)
    if view % 2:
        sign = -sign
    if view >= 4:
        sign[1] = -sign[1]
    return e * sign


def random_views(inputs: Tensor, targets: Tensor, targets_are_images: bool,
                 generator: torch.Generator | None = None, in_place: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """Each sample of a batch in an independent random view; targets follow exactly.

    ``inputs`` are ``(N, bands, H, W)``; ``targets`` images of the same shape
    (``targets_are_images``) or distortions ``(N, 2)``. Views are drawn on the CPU from
    ``generator`` (the global torch RNG when None). ``in_place`` moves the given tensors' own
    samples (a training batch fresh from the loader) instead of copies.
    """
    views = torch.randint(N_VIEWS, (inputs.shape[0],), generator=generator).to(inputs.device)
    if not in_place:
        inputs, targets = inputs.clone(), targets.clone()
    for view in range(1, N_VIEWS):
        chosen = views == view
        if not chosen.any():
            continue
        inputs[chosen] = image_view(inputs[chosen], view)
        targets[chosen] = (image_view(targets[chosen], view) if targets_are_images
                           else ellipticity_in_view(targets[chosen], view))
    return inputs, targets
