"""Square stamps cut from and pasted into larger images, on the pixel grid (no resampling).

Pixel (x, y) is column x, row y of the last two array axes; a stamp of odd ``size`` is centred
on the pixel nearest (x, y) (halves round up), so its central pixel ``size // 2`` is that pixel.

Edges: the centre's nearest pixel must lie in the image (x in [-0.5, W - 0.5), y likewise), or
the call is refused with a ValueError naming the centre and the image's size; a stamp around a
centre near the edge overhangs the image, and is zero there (:func:`cut_stamp`) or cropped to
it (:func:`paste_stamp`). Callers that must know flag such stamps themselves (metadetection's
EDGE flag, :func:`deblend.core.metadetect.stamp_inside`).
"""

from __future__ import annotations

import numpy as np


def nearest_pixel(x: float, y: float) -> tuple[int, int]:
    """The pixel (column, row) containing the point (x, y) (pixel centres at integers)."""
    return int(np.floor(x + 0.5)), int(np.floor(y + 0.5))


def check_centre(x: float, y: float, shape: tuple[int, ...], what: str = "stamp centre"
                 ) -> tuple[int, int]:
    """The pixel nearest (x, y), or a ValueError when it is not finite or not in an image of
    ``shape`` (..., H, W)."""
    height, width = shape[-2:]
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError(f"{what} (x, y) = ({x}, {y}) is not finite")
    cx, cy = nearest_pixel(x, y)
    if not (0 <= cx < width and 0 <= cy < height):
        raise ValueError(f"{what} (x, y) = ({x:g}, {y:g}) is outside the image of {width} x "
                         f"{height} pixels (x in [-0.5, {width - 0.5:g}), y in [-0.5, "
                         f"{height - 0.5:g}))")
    return cx, cy


def central(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """The central ``size`` x ``size`` (or (rows, columns)) pixels of images (..., H, W) (all
    of them along an axis where they are fewer)."""
    rows, columns = (size, size) if isinstance(size, (int, np.integer)) else size
    h, w = images.shape[-2:]
    top, left = max((h - rows) // 2, 0), max((w - columns) // 2, 0)
    return images[..., top:top + min(rows, h), left:left + min(columns, w)]


def overlap(cx: int, cy: int, stamp_shape: tuple[int, ...], shape: tuple[int, ...]
            ) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where a stamp of ``stamp_shape`` (..., h, w) centred on pixel (cx, cy) (its pixel
    (w // 2, h // 2)) meets an image of ``shape`` (..., H, W): the (rows, columns) slices of the
    image and of the stamp, or None when they do not meet."""
    h, w = stamp_shape[-2:]
    height, width = shape[-2:]
    y0, x0 = cy - h // 2, cx - w // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, height), min(x0 + w, width)
    if ye <= ys or xe <= xs:
        return None
    return ((slice(ys, ye), slice(xs, xe)),
            (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0)))


def cut_stamp(image: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """(..., size, size) stamp of (..., H, W) ``image`` centred on the pixel nearest (x, y);
    zero where the stamp overhangs the image. Same dtype as ``image``. A centre outside the
    image is refused (module docstring)."""
    cx, cy = check_centre(x, y, image.shape)
    stamp = np.zeros(image.shape[:-2] + (size, size), image.dtype)
    window = overlap(cx, cy, (size, size), image.shape)
    if window is not None:
        stamp[(..., *window[1])] = image[(..., *window[0])]
    return stamp


def cut_stamps(image: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """(K, ..., size, size) stamps of (..., H, W) ``image`` around each of the (K, 2) (x, y)
    ``positions`` (:func:`cut_stamp`); an empty (0, ..., size, size) array for no position. A
    position outside the image is refused, naming its index."""
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    if len(positions) == 0:
        return np.zeros((0,) + image.shape[:-2] + (size, size), image.dtype)
    for k, (x, y) in enumerate(positions):
        check_centre(x, y, image.shape, f"positions[{k}]")
    return np.stack([cut_stamp(image, x, y, size) for x, y in positions])


def paste_stamp(canvas: np.ndarray, stamp: np.ndarray, cx: int, cy: int) -> None:
    """Add a (..., size, size) stamp centred on pixel (cx, cy) into ``canvas``, cropped to it.
    A centre outside the canvas is refused (module docstring)."""
    check_centre(cx, cy, canvas.shape)
    window = overlap(cx, cy, stamp.shape[-2:], canvas.shape)
    if window is not None:
        canvas[(..., *window[0])] += stamp[(..., *window[1])]
