"""A survey's own sky model of a frame, evaluated on its pixels (image units, pixel frame).

Single-epoch frames are not sky-subtracted, and a cut-out's own statistics are a poor sky where a
large galaxy fills it: on the real DECam cut-outs of ``../shared/data/des_decam`` the
sigma-clipped median of the frame sits 0.6-0.8 sky sigma above the survey's sky model, and
subtracting it leaves the pixels 50 px from the bright galaxy 0.4-0.5 sigma below zero. So a
survey's sky model, fitted over the whole CCD with its sources masked, is read when there is one:

- a **sky image**: a 2-D plane of the image's shape, in the image's units;
- a **legacypipe SplineSky** table (``*-splinesky.fits``: columns ``xgrid``, ``ygrid``,
  ``gridvals``, ``x0``, ``y0``, ``order``): the sky at the grid's knots of the whole CCD,
  interpolated by a bicubic spline through them (scipy's ``RectBivariateSpline``, smoothing 0,
  as legacypipe builds it), evaluated at the cut-out's pixel (x, y) as CCD pixel
  (x + x0, y + y0), 0-based, x the column. legacypipe writes the cut-out's origin as x0, y0
  when it cuts the sky model with the image (as in ``../shared/data/des_decam``); a whole
  CCD's model (x0 = y0 = 0) with a cut-out image would be read at the wrong place on the CCD,
  which nothing in the cut-out's header lets this module detect: give the image and its sky
  model alike, whole or cut.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.io import fits
from scipy.interpolate import RectBivariateSpline

SPLINE_SKY_COLUMNS: tuple[str, ...] = ("xgrid", "ygrid", "gridvals", "x0", "y0", "order")
"""The columns of a legacypipe SplineSky table that the sky is evaluated from."""


def is_spline_sky(data: Any) -> bool:
    """A FITS table with a SplineSky's ``gridvals`` column."""
    return isinstance(data, fits.FITS_rec) and "gridvals" in [n.lower() for n in data.names]


def spline_sky(table: fits.FITS_rec, shape: tuple[int, int], where: str) -> np.ndarray:
    """(H, W) sky of a cut-out of ``shape`` from a SplineSky ``table``'s first row (module
    docstring); a ValueError naming ``where`` when a column is missing or the grid is bad."""
    names = {n.lower(): n for n in table.names}
    absent = [c for c in SPLINE_SKY_COLUMNS if c not in names]
    if absent:
        raise ValueError(f"sky model {where} lacks the SplineSky column(s) {' '.join(absent)}")
    if len(table) != 1:
        raise ValueError(f"sky model {where} holds {len(table)} SplineSky rows; one is read")
    row = table[0]
    x0, y0 = (float(row[names[c]]) for c in ("x0", "y0"))
    height, width = shape
    return evaluate_spline_sky(row[names["xgrid"]], row[names["ygrid"]], row[names["gridvals"]],
                               int(row[names["order"]]), np.arange(width) + x0,
                               np.arange(height) + y0, where)


def evaluate_spline_sky(xgrid: Any, ygrid: Any, gridvals: Any, order: int, x: np.ndarray,
                        y: np.ndarray, where: str) -> np.ndarray:
    """(len(y), len(x)) sky at CCD pixel columns ``x`` and rows ``y`` of the spline through
    ``gridvals`` (rows along ``ygrid``, columns along ``xgrid``) of degree ``order``."""
    xgrid, ygrid = np.asarray(xgrid, np.float64), np.asarray(ygrid, np.float64)
    values = np.asarray(gridvals, np.float64)
    if values.shape != (len(ygrid), len(xgrid)):
        raise ValueError(f"sky model {where}: gridvals has shape {values.shape}, the grid "
                         f"{len(ygrid)} x {len(xgrid)} knots")
    if not np.isfinite(values).all():
        raise ValueError(f"sky model {where} has non-finite grid values")
    if not (1 <= order <= 5 and min(len(xgrid), len(ygrid)) > order):
        raise ValueError(f"sky model {where}: a spline of order {order} needs more than "
                         f"{order} knots per axis ({len(xgrid)} x {len(ygrid)})")
    if (np.diff(xgrid) <= 0).any() or (np.diff(ygrid) <= 0).any():
        raise ValueError(f"sky model {where}: the grid's knots are not increasing")
    spline = RectBivariateSpline(xgrid, ygrid, values.T, kx=order, ky=order, s=0)
    return spline(np.asarray(x, np.float64), np.asarray(y, np.float64)).T
