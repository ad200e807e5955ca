"""Ellipticities between the catalog's sky frame and the cutout's pixel frame.

Frames (SPEC 6 and 7):

- *Pixel frame*: x along array axis 1 (columns, FITS axis 1), y along array axis 0 (rows, FITS
  axis 2); the frame of every image, label and model output in deblend.
- *Sky frame*: the local tangent plane at the object with x toward **east** (increasing RA) and y
  toward **north** (increasing Dec); the frame of im3shape's ``e_1``/``e_2`` (e1 > 0 elongated
  east-west, e2 > 0 elongated north-east / south-west).

A cutout's WCS maps pixel offsets to sky offsets through its local Jacobian
``J = [[dE/dx, dE/dy], [dN/dx, dN/dy]]`` (degrees per pixel). A second-moment tensor transforms as
``Q_sky = J Q_pix J^T``, which fixes how (e1, e2) change. For the standard sky orientation of DES
coadds, north up and east left (``CD1_1 < 0``, ``CD2_2 > 0``, det J < 0), the map is a mirror:
e1 is unchanged and **e2 changes sign**. A rotated WCS also rotates (e1, e2) by twice its angle;
a WCS with east to the right (det J > 0) keeps e2's sign.

The transform is done exactly on the tensor with distortions e = (a^2 - b^2)/(a^2 + b^2), the
convention of deblend; shear-like ellipticities (im3shape's |e| = (a - b)/(a + b)) are converted
with :func:`shear_to_distortion` / :func:`distortion_to_shear` first.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS


def standard_jacobian(pixel_scale_arcsec: float) -> np.ndarray:
    """Jacobian (degrees per pixel) of a north-up, east-left image: ``diag(-s, s)``."""
    s = pixel_scale_arcsec / 3600.0
    return np.array([[-s, 0.0], [0.0, s]])


def local_jacobian(wcs: WCS, x: float, y: float) -> np.ndarray:
    """Local (east, north) per (x, y) Jacobian of ``wcs`` at 0-based pixel (x, y), in degrees.

    Central finite differences of the celestial WCS over one pixel; the east component is the
    RA difference times cos(Dec). Works for any celestial projection and axis order.
    """
    celestial = wcs.celestial
    if celestial.naxis != 2 or not celestial.has_celestial:
        raise ValueError("the WCS has no celestial axes")
    xs = np.array([x + 0.5, x - 0.5, x, x], dtype=float)
    ys = np.array([y, y, y + 0.5, y - 0.5], dtype=float)
    lon, lat = celestial.all_pix2world(xs, ys, 0)
    if celestial.wcs.lng == 1:  # latitude first: swap
        lon, lat = lat, lon
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    cos_dec = np.cos(np.deg2rad(np.mean(lat)))
    dlon = (lon[[0, 2]] - lon[[1, 3]] + 180.0) % 360.0 - 180.0  # wrap-safe RA differences
    d_east = dlon * cos_dec
    d_north = lat[[0, 2]] - lat[[1, 3]]
    jac = np.array([[d_east[0], d_east[1]], [d_north[0], d_north[1]]])
    if not np.all(np.isfinite(jac)) or abs(np.linalg.det(jac)) == 0:
        raise ValueError("the WCS Jacobian is singular or not finite at the cutout centre")
    return jac


def orientation(jacobian: np.ndarray) -> str:
    """Human-readable orientation, e.g. "north up, east left" or "rotated 30.0 deg, east right"."""
    jac = np.asarray(jacobian, dtype=float)
    east_left = np.linalg.det(jac) < 0
    # Angle of north (pixel direction of +N) from +y.
    inv = np.linalg.inv(jac)
    north_px = inv @ np.array([0.0, 1.0])
    angle = np.degrees(np.arctan2(-north_px[0], north_px[1]))
    side = "east left" if east_left else "east right"
    if abs(angle) < 0.5:
        return f"north up, {side}"
    return f"north rotated {angle:.1f} deg from up, {side}"


def _transform(e1: np.ndarray, e2: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) of ``M Q M^T`` where Q has distortion (e1, e2) and unit trace."""
    e1 = np.asarray(e1, dtype=np.float64)
    e2 = np.asarray(e2, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim == 2:
        m = np.broadcast_to(m, np.broadcast(e1, e2).shape + (2, 2))
    qxx, qyy, qxy = 1.0 + e1, 1.0 - e1, e2
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    # Q' = M Q M^T
    pxx = a * a * qxx + 2 * a * b * qxy + b * b * qyy
    pyy = c * c * qxx + 2 * c * d * qxy + d * d * qyy
    pxy = a * c * qxx + (a * d + b * c) * qxy + b * d * qyy
    trace = pxx + pyy
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pxx - pyy) / trace, 2.0 * pxy / trace


def pixel_to_sky(e1: np.ndarray, e2: np.ndarray, jacobian: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) in the pixel frame -> sky frame, through the local WCS Jacobian.

    ``jacobian`` is (2, 2) or (N, 2, 2), as returned by :func:`local_jacobian`.
    """
    return _transform(e1, e2, jacobian)


def sky_to_pixel(e1: np.ndarray, e2: np.ndarray, jacobian: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) in the sky frame -> pixel frame (inverse of :func:`pixel_to_sky`)."""
    return _transform(e1, e2, np.linalg.inv(np.asarray(jacobian, dtype=np.float64)))


def shear_to_distortion(g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shear-like ellipticity |g| = (a-b)/(a+b) -> distortion e = 2g / (1 + |g|^2)."""
    g1 = np.asarray(g1, dtype=np.float64)
    g2 = np.asarray(g2, dtype=np.float64)
    factor = 2.0 / (1.0 + g1 * g1 + g2 * g2)
    return g1 * factor, g2 * factor


def distortion_to_shear(e1: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distortion -> shear-like ellipticity g = e / (1 + sqrt(1 - |e|^2)) (|e| < 1)."""
    e1 = np.asarray(e1, dtype=np.float64)
    e2 = np.asarray(e2, dtype=np.float64)
    e_sq = np.clip(e1 * e1 + e2 * e2, 0.0, 1.0)
    factor = 1.0 / (1.0 + np.sqrt(1.0 - e_sq))
    return e1 * factor, e2 * factor
