"""Cells: the pieces of a survey image that are measured one at a time, and who owns an object.

A survey image (a coadd tile, a simulated field, a FITS image given to ``deblend measure``) is
cut into square cells of ``cell`` pixels, each read with ``margin`` pixels of its neighbours on
every side (:func:`tile`). Metacalibration, detection and stamps run on the whole padded cell,
so that an object near a cell edge sees its neighbours as it would in the survey; an object
belongs to the one cell whose *owned* square (the cell without its margin) holds its detection,
so that every object is measured once. The owned squares partition the image.

Conventions: pixel (x, y) is column x, row y of the last two array axes; pixel centres are at
integers; an owned square is half-open, ``x0 <= x < x1`` with x the detection's centroid
rounded to the nearest pixel (:func:`deblend.core.stamps.nearest_pixel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deblend.core.arguments import require_positive_int


@dataclass(frozen=True)
class CellImage:
    """One multi-band image region to measure, in the model's units.

    ``images`` (bands, H, W): sky-subtracted flux per pixel in the model's units (electrons of
    the model's survey; :mod:`deblend.core.survey_input` converts FITS images), pixel frame.
    ``variance`` (bands, H, W): each pixel's noise variance in the same units squared; masked
    pixels hold ``inf``. ``psfs`` (bands, S, S): each band's effective PSF image (pixel
    included, unit sum, centred at ((S-1)/2, (S-1)/2)). ``origin`` (x0, y0): where pixel (0, 0)
    of this cell lies in the parent image; ``owned`` (x0, x1, y0, y1): the half-open square,
    in this cell's pixels, whose detections this cell owns (the whole cell when None).
    """

    images: np.ndarray
    variance: np.ndarray
    psfs: np.ndarray
    origin: tuple[int, int] = (0, 0)
    owned: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        images, variance = np.asarray(self.images), np.asarray(self.variance)
        if images.ndim != 3:
            raise ValueError(f"cell images must have shape (bands, H, W), got {images.shape}")
        if variance.shape != images.shape:
            raise ValueError(f"cell variance must have the images' shape {images.shape}, got "
                             f"{variance.shape}")
        if np.asarray(self.psfs).ndim != 3 or len(self.psfs) != len(images):
            raise ValueError(f"one PSF image per band: got PSFs of shape "
                             f"{np.asarray(self.psfs).shape} for {len(images)} bands")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(np.asarray(self.images).shape[1:])  # type: ignore[return-value]

    @property
    def owned_box(self) -> tuple[int, int, int, int]:
        height, width = self.shape
        return self.owned if self.owned is not None else (0, width, 0, height)

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether detections at (x, y) (this cell's pixels) belong to this cell."""
        x0, x1, y0, y1 = self.owned_box
        ix, iy = np.floor(np.asarray(x) + 0.5), np.floor(np.asarray(y) + 0.5)
        return (ix >= x0) & (ix < x1) & (iy >= y0) & (iy < y1)


@dataclass(frozen=True)
class Tile:
    """Where one cell lies in its parent image: the padded region read (``read``, half-open
    (x0, x1, y0, y1) in the parent's pixels, clipped to the image) and the square it owns
    (``owned``, same frame)."""

    index: int
    read: tuple[int, int, int, int]
    owned: tuple[int, int, int, int]

    def owned_in_cell(self) -> tuple[int, int, int, int]:
        """``owned`` in the cell's own pixels (relative to ``read``'s corner)."""
        x0, _, y0, _ = self.read
        a, b, c, d = self.owned
        return a - x0, b - x0, c - y0, d - y0

    def cut(self, array: np.ndarray) -> np.ndarray:
        """The cell's region of a (..., H, W) parent array."""
        x0, x1, y0, y1 = self.read
        return array[..., y0:y1, x0:x1]


def tile(shape: tuple[int, int], cell: int, margin: int) -> list[Tile]:
    """Cells of ``cell`` pixels covering an image of ``shape`` (H, W), each read with ``margin``
    pixels on every side (clipped at the image's edge), row by row. The owned squares partition
    the image: the last row and column of cells own what is left (less than ``cell``)."""
    height, width = (int(v) for v in shape)
    cell = require_positive_int(cell, "cell")
    if int(margin) < 0:
        raise ValueError(f"margin must be >= 0 pixels, got {margin!r}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an empty image of shape {shape}")
    tiles = []
    for y0 in range(0, height, cell):
        for x0 in range(0, width, cell):
            owned = (x0, min(x0 + cell, width), y0, min(y0 + cell, height))
            read = (max(owned[0] - margin, 0), min(owned[1] + margin, width),
                    max(owned[2] - margin, 0), min(owned[3] + margin, height))
            tiles.append(Tile(len(tiles), read, owned))
    return tiles
