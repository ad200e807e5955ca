"""Stamps recentred on a detection to a fraction of a pixel, and templates moved back.

The networks were trained on stamps whose target sits on the central pixel's centre (SPEC 2:
BTK draws the target at the stamp centre). A stamp cut around a detection at (x, y) is centred on
the nearest pixel, so the galaxy sits at the sub-pixel offset ``(x, y) - nearest`` from that
pixel's centre, in [-0.5, 0.5) along each axis: images the networks never saw. For faint
galaxies the error this makes is small next to the noise; for a bright one the reconstruction,
drawn at the pixel centre and averaged over views rotated about it, leaves a dipole in the
residual that dominates it (the bright real DES galaxy of ``des_validation.real_pixels``).

:func:`recentred_stamps` cuts a stamp ``PAD`` pixels wider on each side, moves its content by
minus the offset and crops it, so that the detection lands on the central pixel's centre;
:func:`shifted_templates` moves a reconstruction drawn there back to the detection. Stamps whose
offset is exactly zero are returned untouched (bit for bit).

The shift (:func:`shift_stamps`) is band-limited: the plane through the stamp's outer ring
(:func:`border_plane`) is taken off and moved exactly (so a sky plane moves to rounding, and
the rest carries no gradient across the stamp's edges); the rest is interpolated
with the periodic sinc of the stamp extended by its mirror images (period twice the stamp, so
the stamp joins itself continuously at every edge, where a plain periodic shift would ring
across it: what rings is left at the edges, which ``PAD`` keeps out of the crop). That is a
Fourier phase on the mirrored stamp, applied as one matrix per axis (the 2-D shift is
separable). The flux is kept, and white noise stays nearly white: at half a pixel along both
axes, the largest shift, it keeps 0.97 of its variance and neighbouring pixels correlate by
0.017, where a bilinear interpolation would halve the one and raise the other to 0.5.

Frames: pixel frame, x = column (last axis), y = row, pixel centres at integers (as
:mod:`deblend.core.stamps`). A stamp that overhangs its image is zero there and rings at that
edge after the shift; such stamps carry metadetection's EDGE flag.
"""

from __future__ import annotations

from functools import lru_cache

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


def periodic_sinc(u: np.ndarray, period: int) -> np.ndarray:
    """The band-limited interpolant of one sample of an even ``period``: sin(pi u)
    cot(pi u / period) / period (1 at multiples of the period, 0 at the other integers)."""
    u = u - period * np.round(u / period)
    angle = np.pi * u / period
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.sinc(u) * angle / np.tan(angle)
    return np.where(u == 0, 1.0, value)


def shift_matrices(shifts: np.ndarray, n: int, crop: int = 0) -> np.ndarray:
    """(K, n - 2 crop, n) matrices S_k: ``S_k @ v`` is the length-n vector v with its content moved
    by ``shifts[k]`` pixels (a point at j goes to j + shift), v extended by its mirror image
    (period 2n) and interpolated band-limited (:func:`periodic_sinc`), outputs ``crop`` to
    ``n - crop - 1``. S_k[i, j] = D(i - j - shift) + D(i + j + 1 - 2n - shift): the sample and its
    mirror image; built from the two diagonals' values (what a Fourier phase on the mirrored
    vector does, to 1e-15)."""
    period = 2 * n
    differences, sums = _diagonals(n, crop)
    shift = np.asarray(shifts, np.float64).reshape(-1, 1)
    direct = periodic_sinc(np.arange(-(n - 1), n)[None, :] - shift, period)
    mirror = periodic_sinc(np.arange(2 * n - 1)[None, :] + 1 - period - shift, period)
    return direct[:, differences] + mirror[:, sums]


@lru_cache(maxsize=16)
def _diagonals(n: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices i - j + n - 1 and i + j of the (n - 2 crop, n) output-by-input grid."""
    i = np.arange(crop, n - crop)[:, None]
    j = np.arange(n)[None, :]
    return i - j + n - 1, i + j


def shift_stamps(stamps: np.ndarray, shifts: np.ndarray, crop: int = 0) -> np.ndarray:
    """(K, ..., n - 2 crop, n - 2 crop) ``stamps`` (K, ..., n, n) with their content moved by
    ``shifts`` (K, 2) (dx, dy) pixels (a point at x goes to x + dx) and ``crop`` pixels cropped
    from every side: the plane through each stamp's border moved exactly and the rest by a
    Fourier phase on the stamp extended by its mirror images (module docstring), applied as one
    shift matrix per axis (the 2-D shift is separable). Same dtype; rows of zero shift are only
    cropped. Non-finite pixels are refused."""
    stamps = np.asarray(stamps)
    shifts = np.asarray(shifts, np.float64).reshape(-1, 2)
    if len(shifts) != len(stamps):
        raise ValueError(f"{len(shifts)} shifts for {len(stamps)} stamps")
    if not np.isfinite(shifts).all():
        raise ValueError("shifts must be finite")
    height, width = stamps.shape[-2:]
    out = stamps[..., crop:height - crop, crop:width - crop].copy()
    moved = np.flatnonzero(np.any(shifts != 0.0, axis=1))
    if len(moved) == 0:
        return out
    block = stamps[moved].astype(np.float64)
    if not np.isfinite(block).all():
        raise ValueError("stamps to shift hold non-finite pixels")
    axes = (len(moved),) + (1,) * (block.ndim - 3)
    rows = shift_matrices(shifts[moved, 1], height, crop)  # (K, h', h)
    columns = shift_matrices(shifts[moved, 0], width, crop)  # (K, w', w)
    y, x = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    level, slope_x, slope_y = border_plane(block)
    # S_y (X - P) S_x^T + P moved, with S_y P S_x^T from the matrices' sums (P is rank 2)
    row_sum, row_y = rows.sum(axis=2), rows @ y  # (K, h')
    column_sum, column_x = columns.sum(axis=2), columns @ x  # (K, w')
    outer = (lambda a, b: (a[:, :, None] * b[:, None, :]).reshape(axes + a.shape[1:]
                                                                   + b.shape[1:]))
    dx, dy = (shifts[moved, k].reshape(axes + (1, 1)) for k in (0, 1))
    y_out, x_out = y[crop:height - crop, None], x[None, crop:width - crop]
    moved_plane = (level * (1.0 - outer(row_sum, column_sum))
                   + slope_x * (x_out - dx - outer(row_sum, column_x))
                   + slope_y * (y_out - dy - outer(row_y, column_sum)))
    shape = block.shape[:-2]  # numpy's matmul is faster on explicitly broadcast operands
    rows = np.broadcast_to(rows.reshape(axes + rows.shape[1:]), shape + rows.shape[1:])
    columns = np.broadcast_to(np.ascontiguousarray(columns.transpose(0, 2, 1)).reshape(
        axes + (width, width - 2 * crop)), shape + (width, width - 2 * crop))
    shifted = (rows @ block) @ columns
    out[moved] = (shifted + moved_plane).astype(stamps.dtype)
    return out


def border_plane(stamps: np.ndarray, width: int = BORDER
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(level, slope_x, slope_y), each (..., 1, 1): the least-squares plane a + b x + c y
    through the outermost ``width`` pixels of each (..., h, w) stamp (x = column, y = row)."""
    ring, solve = _border_fit(*stamps.shape[-2:], width)
    coefficients = solve @ stamps[..., ring][..., None]
    return tuple(coefficients[..., k, :][..., None] for k in range(3))


@lru_cache(maxsize=16)
def _border_fit(height: int, full: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The (height, full) mask of the outer ring and the (3, ring pixels) least-squares solver
    of the plane a + b x + c y through it."""
    y, x = np.mgrid[0:height, 0:full]
    ring = ~((x >= width) & (x < full - width) & (y >= width) & (y < height - width))
    design = np.stack([np.ones(ring.sum()), x[ring], y[ring]], axis=1).astype(np.float64)
    return ring, np.linalg.pinv(design)


def recentred_stamps(image: np.ndarray, positions: np.ndarray, size: int, pad: int = PAD
                     ) -> np.ndarray:
    """(K, ..., size, size) stamps of (..., H, W) ``image`` around the (K, 2) ``positions``
    (x, y), each moved so that its position lies on the central pixel's centre (module
    docstring); same dtype as ``image``. Positions outside the image are refused as by
    :func:`~deblend.core.stamps.cut_stamps`."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    wide = cut_stamps(image, positions, size + 2 * pad)
    return shift_stamps(wide, -subpixel_offsets(positions), crop=pad)


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
    return np.maximum(shift_stamps(padded, subpixel_offsets(positions), crop=pad), 0
                      ).astype(templates.dtype)


__all__ = ["BORDER", "PAD", "border_plane", "periodic_sinc", "recentred_stamps", "shift_matrices",
           "shift_stamps", "shifted_templates", "subpixel_offsets"]
