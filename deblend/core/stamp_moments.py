"""Gaussian-weighted moments of a stamp, as inputs of the regressor (``model.regressor_moments``).

The regressor of SPEC 4 reads e from the latent mean mu alone, and mu is trained to reconstruct
galaxies like the training set's. On real HST galaxy profiles, which it never saw, it nearly stops
responding to shear (README, "Real COSMOS fits in training"), while moment-based estimators on the
same stamps keep their response. These features hand the regressor the stamp's own second
moments beside mu, so that it can fall back on them where the latent says little.

For each weight scale s (pixels), on the band sum I of the normalised stamp (SPEC 3's
tanh(asinh), which keeps every isophote's shape) and a round Gaussian weight W of sigma s centred
on the central pixel (pixel frame: x the column index, y the row index, as
:func:`deblend.core.shapes.second_moments`):

    F0 = sum W I / sum W                        the weighted level
    F+ = sum W I (x^2 - y^2) / (s^2 sum W)      the distortion's e1 numerator
    Fx = sum W I 2 x y / (s^2 sum W)            the distortion's e2 numerator
    Fr = sum W I (x^2 + y^2) / (s^2 sum W)      the size
    F+ / (|Fr| + C), Fx / (|Fr| + C)            weighted distortions, tamed where Fr is noise

with C = :data:`RATIO_FLOOR` (normalised units; the weighted noise of one LSST stamp is about
0.002 at s = 4). Linear moments are exact to compute and noise-unbiased; the ratios are what a
dense network does not form well. Under the stamp's 8 symmetric views (:mod:`deblend.core.
symmetry`) (F+, Fx) and the ratios transform as (e1, e2) do and F0, Fr are invariant, so the
regressor's average over views keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deblend.core.arguments import POSITIVE_FLOAT

FEATURES_PER_SCALE = 6
"""F0, F+, Fx, Fr and the two ratios, per weight scale."""
RATIO_FLOOR = 0.02
"""C of the ratio features (normalised units)."""


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """The weight sigmas (pixels) as floats, each finite and > 0 (the library's
    :data:`~deblend.core.arguments.POSITIVE_FLOAT`), or a ValueError."""
    out = tuple(float(s) for s in scales)
    for s in out:
        if not POSITIVE_FLOAT.accepts(s):
            raise ValueError(f"moment weight scales must be finite and > 0 pixels, got {s!r}")
    return out


def stamp_moments(stamps: Tensor, scales: Sequence[float]) -> Tensor:
    """``(N, FEATURES_PER_SCALE * len(scales))`` features of normalised stamps ``(N, bands, S,
    S)``, scale by scale in the module's order; ``(N, 0)`` for no scale."""
    if stamps.dim() != 4 or stamps.shape[-1] != stamps.shape[-2]:
        raise ValueError(f"stamps must have shape (N, bands, S, S), got {tuple(stamps.shape)}")
    if not scales:  # a regressor of mu alone: nothing to compute on the training's hot path
        return stamps.new_zeros((stamps.shape[0], 0))
    image = stamps.sum(dim=1)
    size = image.shape[-1]
    axis = torch.arange(size, dtype=image.dtype, device=image.device) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    r2 = x ** 2 + y ** 2
    kernels = (x ** 2 - y ** 2, 2.0 * x * y, r2)  # the same at every scale
    features: list[Tensor] = []
    for s in scales:
        weight = torch.exp(-r2 / (2.0 * s * s))
        weighted = image * weight / weight.sum()
        level = weighted.sum(dim=(-2, -1))
        plus, cross, size2 = ((weighted * kernel).sum(dim=(-2, -1)) / (s * s)
                              for kernel in kernels)
        floor = size2.abs() + RATIO_FLOOR
        features += [level, plus, cross, size2, plus / floor, cross / floor]
    return torch.stack(features, dim=1)
