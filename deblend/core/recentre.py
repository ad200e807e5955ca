"""Stamps recentred on a detection to a fraction of a pixel, and templates moved back.

The networks were trained on stamps whose target sits on the central pixel's centre (SPEC 2:
BTK draws the target at the stamp centre). A stamp cut around a detection at (x, y) is centred on
the nearest pixel, so the galaxy sits at the sub-pixel offset ``(x, y) - nearest`` from that
pixel's centre, in [-0.5, 0.5) along each axis: images the networks never saw. For faint
galaxies the error this makes is small next to the noise; for a bright one the reconstruction,
drawn at the pixel centre and averaged over views rotated about it, leaves a dipole in the
residual that dominates it (the bright real DES galaxy of ``des_validation.real_pixels``).

:func:`recentred_stamps` cuts a stamp ``PAD`` pixels wider on each side, moves its content by
minus the offset with a Fourier phase (the band-limited shift: the flux is kept, and away from
the edges white noise stays nearly white: at half a pixel along both axes, the largest shift,
it keeps 0.97 of its variance and its neighbours correlate by 0.017, where a bilinear
interpolation would halve the one and raise the other to 0.5) and crops it, so the detection lands on the
central pixel's centre; :func:`shifted_templates` moves a reconstruction drawn there back to the
detection. Stamps whose offset is exactly zero are returned untouched (bit for bit).

Frames: pixel frame, x = column (last axis), y = row, pixel centres at integers (as
:mod:`deblend.core.stamps`). Edges: a Fourier shift treats the stamp as periodic, and a sky
gradient or a neighbour's wing that does not wrap smoothly would ring across it. So the plane
through the stamp's outer ring (:func:`border_plane`) is taken off and moved exactly (a plane is
linear: any plane taken off and moved back gives the same shift, and a sky plane is moved to
rounding), and the rest is shifted as one period of itself and its mirror images (continuous at
every edge); ``PAD`` keeps the edges, where what is left of the ringing lies, out of the crop. A stamp that
overhangs its image is zero there and rings at that edge after the shift; such stamps carry
metadetection's EDGE flag.
"""

from __future__ import annotations

import numpy as np

from deblend.core.stamps import cut_stamps, nearest_pixel

PAD = 8
"""Pixels cut beyond the stamp on each side before the shift, and cropped after it."""
BORDER = 2
"""Width (pixels) of the stamp's outer ring through which its sky plane is fitted."""


def subpixel_offsets(positions: np.ndarray) -> np.ndarray:
    """(K, 2) offsets (dx, dy) of (K, 2) positions (x, y) from their nearest pixel's centre, in
    [-0.5, 0.5) pixels."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    nearest = np.array([nearest_pixel(x, y) for x, y in positions], np.float64).reshape(-1, 2)
    return positions - nearest


def shift_stamps(stamps: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(K, ..., n, n) ``stamps`` with their content moved by ``shifts`` (K, 2) (dx, dy) pixels
    (a point at x goes to x + dx), by a Fourier phase over the last two axes of each stamp
    extended by its mirror images (module docstring: callers pad). Same dtype; rows of zero
    shift are copied unchanged. Non-finite pixels are refused."""
    stamps = np.asarray(stamps)
    shifts = np.asarray(shifts, np.float64).reshape(-1, 2)
    if len(shifts) != len(stamps):
        raise ValueError(f"{len(shifts)} shifts for {len(stamps)} stamps")
    if not np.isfinite(shifts).all():
        raise ValueError("shifts must be finite")
    out = stamps.copy()
    moved = np.flatnonzero(np.any(shifts != 0.0, axis=1))
    if len(moved) == 0:
        return out
    block = stamps[moved].astype(np.float64)
    if not np.isfinite(block).all():
        raise ValueError("stamps to shift hold non-finite pixels")
    height, width = block.shape[-2:]
    dx = shifts[moved, 0].reshape((-1,) + (1,) * (block.ndim - 1))
    dy = shifts[moved, 1].reshape((-1,) + (1,) * (block.ndim - 1))
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    level, slope_x, slope_y = border_plane(block)
    rest = block - (level + slope_x * x + slope_y * y)
    mirrored = np.concatenate([rest, rest[..., ::-1, :]], axis=-2)
    mirrored = np.concatenate([mirrored, mirrored[..., ::-1]], axis=-1)
    ky = np.fft.fftfreq(2 * height)[:, None]
    kx = np.fft.rfftfreq(2 * width)[None, :]
    phase = np.exp(-2j * np.pi * (kx * dx + ky * dy))
    shifted = np.fft.irfft2(np.fft.rfft2(mirrored) * phase, s=(2 * height, 2 * width))
    plane = level + slope_x * (x - dx) + slope_y * (y - dy)
    out[moved] = (shifted[..., :height, :width] + plane).astype(stamps.dtype)
    return out


def border_plane(stamps: np.ndarray, width: int = BORDER
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(level, slope_x, slope_y), each (..., 1, 1): the least-squares plane a + b x + c y
    through the outermost ``width`` pixels of each (..., h, w) stamp (x = column, y = row)."""
    height, full = stamps.shape[-2:]
    y, x = np.mgrid[0:height, 0:full]
    ring = ~((x >= width) & (x < full - width) & (y >= width) & (y < height - width))
    design = np.stack([np.ones(ring.sum()), x[ring], y[ring]], axis=1).astype(np.float64)
    coefficients = np.linalg.pinv(design) @ stamps[..., ring][..., None]
    return tuple(coefficients[..., k, :][..., None] for k in range(3))


def recentred_stamps(image: np.ndarray, positions: np.ndarray, size: int, pad: int = PAD
                     ) -> np.ndarray:
    """(K, ..., size, size) stamps of (..., H, W) ``image`` around the (K, 2) ``positions``
    (x, y), each moved so that its position lies on the central pixel's centre (module
    docstring); same dtype as ``image``. Positions outside the image are refused as by
    :func:`~deblend.core.stamps.cut_stamps`."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    wide = cut_stamps(image, positions, size + 2 * pad)
    return shift_stamps(wide, -subpixel_offsets(positions))[..., pad:pad + size, pad:pad + size]


def shifted_templates(templates: np.ndarray, positions: np.ndarray, pad: int = PAD
                      ) -> np.ndarray:
    """(K, ..., n, n) ``templates`` drawn on the central pixel's centre (the networks'
    reconstructions of :func:`recentred_stamps`, non-negative) moved to the sub-pixel offsets of
    their (K, 2) ``positions``, ready to paste at the nearest pixels; same dtype. The shift rings
    where a template drops to its floor of exact zeros (below 1e-3 of its peak: the bright real
    DES galaxy's reconstruction, -30 electrons against a peak of 57,653, a 1e-4 of its flux);
    what rings below zero is clipped to zero, so a template stays a non-negative model."""
    templates = np.asarray(templates)
    n = templates.shape[-1]
    padded = np.zeros(templates.shape[:-2] + (n + 2 * pad, n + 2 * pad), templates.dtype)
    padded[..., pad:pad + n, pad:pad + n] = templates
    moved = shift_stamps(padded, subpixel_offsets(positions))
    return np.maximum(moved[..., pad:pad + n, pad:pad + n], 0).astype(templates.dtype)


__all__ = ["BORDER", "PAD", "border_plane", "recentred_stamps", "shift_stamps", "shifted_templates", "subpixel_offsets"]
