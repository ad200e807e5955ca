"""AnaCal (FPFS, Li & Mandelbaum) as a peer shear estimator, forced at the known stamp centre.

Install: ``pip install anacal`` (0.8.3 needs only ``numpy>=1.23`` and lives with our numpy<2.4 and
astropy<7 pins; it is in the project's ``test`` extra).

What is measured. For every stamp, AnaCal's FPFS measurement (``anacal.fpfs``, one C++ pass with
the GIL released) projects the PSF-deconvolved image onto polar shapelets of a Gaussian kernel of
``sigma_arcsec`` (0.52" is the scale of the AnaCal papers for LSST-like data), at the given
position: no detection and no re-centring. The ellipticity is FPFS's

    e1 = M22c / (M00 + C0),   e2 = M22s / (M00 + C0),

and the response is its analytic derivative with respect to the *reduced shear* g, from the
shapelets' shear responses: ``response[n, i, j] = d e_i / d g_j`` (a full 2x2 matrix per object;
the off-diagonal terms are small and average to zero over an isotropic population).

Conventions.

- ``e`` is neither a shear nor a distortion: it is FPFS's shapelet ellipticity of the galaxy seen
  through the kernel, ``e ~ R g`` with R ~ 0.4-0.6 for LSST-like galaxies at sigma_arcsec = 0.52;
  only ``e`` divided by its response estimates a shear. The population estimate
  (:func:`deblend.core.metacal.population_shear`) is ``g_hat = <R>^-1 <e>`` over unflagged
  objects: a *reduced-shear* g, comparable with the applied ``galsim.shear(g1=, g2=)``, not with a
  distortion.
- Pixel frame: arrays are indexed ``[y, x]`` (rows, columns) and ``e1 > 0`` means elongated along x
  (axis 1), ``e2 > 0`` along the line y = x; the same frame as GalSim's ``drawImage(...).array`` and
  as the moment ellipticities of :mod:`deblend.core.shapes`. No sky-frame sign flip is applied.
- Positions are 0-based pixel coordinates ``(y, x)`` in each stamp; by default the geometric centre
  ``((H - 1) / 2, (W - 1) / 2)``, where GalSim draws a profile (sub-pixel positions are exact: FPFS
  shifts the phase in Fourier space).
- ``C0`` is given in units of AnaCal's m00 noise (``c0 * m00_err`` for the stated
  ``noise_variance``), so the estimator does not depend on the image's flux units. A larger ``c0``
  down-weights faint objects and reduces noise bias; the noiseless limit (tiny variance) gives
  ``C0 -> 0``, i.e. ``e = M22 / M00``.
- Noise bias: with ``rng`` given, a pure-noise stamp of ``noise_variance`` is drawn per object and
  AnaCal adds it, measured through the PSF rotated by 90 degrees, which removes the second-order
  noise bias of the ratio at the price of doubling the noise (AnaCal's standard practice). Without
  ``rng`` nothing is added: right for noiseless or high-S/N stamps.

Flags (bits of ``AnacalShapes.flags``): :data:`FLAG_NONFINITE` a non-finite output,
:data:`FLAG_NONPOSITIVE_DENOMINATOR` ``M00 + C0 <= 0`` (no usable flux: the ratio is meaningless).
Dropping flagged objects is a selection; it is harmless only while they are rare.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np

INSTALL_HINT = "pip install anacal  (or: pip install -e '.[test]')"
FLAG_NONFINITE = 1
FLAG_NONPOSITIVE_DENOMINATOR = 2
DEFAULT_NPIX = 64
"""FFT stamp of the measurement (AnaCal's default); smaller stamps are zero-padded to it."""
KMAX_THRES = 1e-12
"""Fourier-space truncation threshold of the deconvolved kernel (AnaCal's FpfsConfig default)."""
_MAX_CHUNK = 2048


def anacal_available() -> bool:
    """True when ``anacal`` can be imported."""
    return importlib.util.find_spec("anacal") is not None


def _anacal() -> ModuleType:
    try:
        import anacal.fpfs
    except ImportError as exc:  # pragma: no cover - exercised only without anacal
        raise ImportError(f"AnaCal is not installed: {INSTALL_HINT}") from exc
    return anacal


@dataclass(frozen=True)
class AnacalShapes:
    """Per-object FPFS measurements (N objects).

    e: (N, 2) FPFS ellipticity (e1, e2), pixel frame.
    response: (N, 2, 2) analytic shear response, ``response[n, i, j] = d e_i / d g_j``.
    flags: (N,) int, 0 for a good measurement (bits :data:`FLAG_NONFINITE`,
        :data:`FLAG_NONPOSITIVE_DENOMINATOR`).
    m00: (N,) FPFS flux moment M00 (image flux units), and m00_err its noise std.
    c0: the C0 used, in M00 units.
    """

    e: np.ndarray
    response: np.ndarray
    flags: np.ndarray
    m00: np.ndarray
    m00_err: float
    c0: float

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: unflagged objects."""
        return self.flags == 0


def _check_images(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {a.shape}")
    if a.shape[0] == 0 or min(a.shape[1:]) < 8:
        raise ValueError(f"images must hold at least one stamp of >= 8x8 pixels, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"images must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("images contain non-finite values (NaN or inf)")
    return a


def _psf_fwhm_pixels(psf: np.ndarray) -> float:
    """FWHM in pixels from the area above half maximum (robust to Moffat/Kolmogorov wings)."""
    area = float((psf >= 0.5 * psf.max()).sum())
    return 2.0 * np.sqrt(area / np.pi)


def _check_psf(psf: np.ndarray, pixel_scale: float, sigma_arcsec: float, npix: int) -> np.ndarray:
    p = np.asarray(psf, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"psf must be a 2-D image (H_psf, W_psf), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("psf contains non-finite values (NaN or inf)")
    total = p.sum()
    if not total > 0 or p.max() <= 0:
        raise ValueError("psf must have a positive sum and peak")
    p = p / total
    h, w = p.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = float((p * yy).sum()), float((p * xx).sum())
    if abs(cy - h // 2) > 0.5 or abs(cx - w // 2) > 0.5:
        raise ValueError(
            f"psf must be centred on pixel (H//2, W//2) = ({h // 2}, {w // 2}); its centroid is "
            f"({cy:.2f}, {cx:.2f}) (an even-sized GalSim PSF needs "
            ".shift(0.5 * scale, 0.5 * scale))")
    fwhm = _psf_fwhm_pixels(p)
    if fwhm < 1.5:
        raise ValueError(
            f"psf FWHM is {fwhm:.2f} pixels: under-sampled, or not drawn at pixel_scale="
            f"{pixel_scale}\" (FPFS needs the PSF on the images' pixel grid)")
    psf_sigma = fwhm * pixel_scale / 2.3548
    if psf_sigma > 2.0 * sigma_arcsec:
        raise ValueError(
            f"psf FWHM {fwhm * pixel_scale:.2f}\" (at pixel_scale={pixel_scale}\") is too large "
            f"for the FPFS kernel sigma_arcsec={sigma_arcsec}\": check the PSF's pixel scale, "
            "or raise sigma_arcsec")
    if fwhm > npix / 4:
        raise ValueError(f"psf FWHM is {fwhm:.1f} pixels, too large for a {npix}-pixel stamp")
    # Crop or zero-pad so that pixel (h//2, w//2) lands on (npix//2, npix//2), as AnaCal requires.
    out = np.zeros((npix, npix))
    oy, ox = npix // 2 - h // 2, npix // 2 - w // 2
    sy0, sx0 = max(0, -oy), max(0, -ox)
    sy1, sx1 = min(h, npix - oy), min(w, npix - ox)
    out[sy0 + oy:sy1 + oy, sx0 + ox:sx1 + ox] = p[sy0:sy1, sx0:sx1]
    return out


def _check_positions(positions: np.ndarray | None, n: int, h: int, w: int) -> np.ndarray:
    if positions is None:
        return np.tile([(h - 1) / 2.0, (w - 1) / 2.0], (n, 1))
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n, 2):
        raise ValueError(f"positions must be (N, 2) = ({n}, 2) pixel (y, x), got {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain non-finite values")
    if (pos < 0).any() or (pos[:, 0] > h - 1).any() or (pos[:, 1] > w - 1).any():
        raise ValueError("positions must lie inside the stamps (0-based pixel (y, x))")
    return pos


def _tiles(images: np.ndarray, anchors: np.ndarray, npix: int) -> np.ndarray:
    """(N * npix, npix) mosaic: tile n is stamp n's npix window around its integer anchor (y, x),
    zero-padded, so that each forced measurement sees its own stamp only."""
    n, h, w = images.shape
    half = npix // 2
    padded = np.zeros((n, h + npix, w + npix), dtype=np.float32)
    padded[:, half:half + h, half:half + w] = images
    out = np.empty((n, npix, npix), dtype=np.float32)
    if (anchors == anchors[0]).all():
        y, x = anchors[0]
        out[:] = padded[:, y:y + npix, x:x + npix]
    else:
        for i, (y, x) in enumerate(anchors):
            out[i] = padded[i, y:y + npix, x:x + npix]
    return out.reshape(n * npix, npix)


def anacal_shapes(
    images: np.ndarray,
    psf: np.ndarray,
    noise_variance: float,
    pixel_scale: float,
    *,
    sigma_arcsec: float = 0.52,
    c0: float = 4.0,
    positions: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    npix: int = DEFAULT_NPIX,
) -> AnacalShapes:
    """FPFS ellipticities and analytic shear responses of ``images`` (N, H, W), forced at the known
    positions (default: each stamp's geometric centre), one band.

    psf: (H_psf, W_psf) image on the same pixel grid, centred on pixel (H_psf//2, W_psf//2)
        (normalised here). noise_variance: per-pixel variance of the images' noise (> 0; pass a
        tiny value for noiseless stamps). pixel_scale: arcsec per pixel. sigma_arcsec: FPFS kernel.
    c0: C0 in units of the m00 noise (see the module docstring). rng: when given, AnaCal's
    noise-bias correction with a drawn pure-noise stamp per object. npix: even FFT stamp size.
    """
    ana = _anacal()
    fpfs = ana.fpfs
    if not (np.isfinite(pixel_scale) and pixel_scale > 0):
        raise ValueError(f"pixel_scale must be positive (arcsec/pixel), got {pixel_scale}")
    if not (np.isfinite(noise_variance) and noise_variance > 0):
        raise ValueError(f"noise_variance must be positive and finite, got {noise_variance}")
    if not (np.isfinite(sigma_arcsec) and pixel_scale <= sigma_arcsec < 3.0):
        raise ValueError(
            f"sigma_arcsec must lie in [pixel_scale, 3) arcsec, got {sigma_arcsec}")
    if not (np.isfinite(c0) and c0 >= 0):
        raise ValueError(f"c0 must be >= 0, got {c0}")
    if npix < 16 or npix % 2:
        raise ValueError(f"npix must be even and >= 16, got {npix}")
    imgs = _check_images(images)
    n, h, w = imgs.shape
    psf_n = _check_psf(psf, pixel_scale, sigma_arcsec, npix)
    pos = _check_positions(positions, n, h, w)
    anchors = np.floor(pos + 0.5).astype(int)  # the C++ side rounds half away from zero
    frac = pos - anchors

    # The m00 noise for the stated variance (AnaCal's m00_err: image + rotated-noise image) sets C0.
    task = fpfs.FpfsTask(npix=npix, pixel_scale=pixel_scale, sigma_shapelets=sigma_arcsec,
                         psf_array=psf_n, kmax_thres=KMAX_THRES)
    task.prepare_covariance(variance=float(noise_variance))
    m00_err = float(task.std_m00)
    c0_abs = float(c0) * m00_err
    # mag_zero = AnaCal's reference zero-point makes its C0 rescaling a no-op: C0 is c0_abs.
    config = fpfs.FpfsConfig(npix=npix, kmax_thres=KMAX_THRES, sigma_shapelets1=sigma_arcsec,
                             c0=c0_abs)
    mag_zero = float(ana.task.THRESHOLD_REF_MAG_ZERO)

    rows = []
    for start in range(0, n, _MAX_CHUNK):
        sl = slice(start, min(n, start + _MAX_CHUNK))
        k = sl.stop - sl.start
        noise = None
        if rng is not None:
            draw = rng.normal(0.0, np.sqrt(noise_variance), size=(k, h, w)).astype(np.float32)
            noise = _tiles(draw, anchors[sl], npix)
        det = np.zeros(k, dtype=[("y", "f8"), ("x", "f8")])
        det["y"] = np.arange(k) * npix + npix // 2 + frac[sl, 0]
        det["x"] = npix // 2 + frac[sl, 1]
        rows.append(fpfs.process_image(
            fpfs_config=config, pixel_scale=pixel_scale, noise_variance=float(noise_variance),
            mag_zero=mag_zero, gal_array=_tiles(imgs[sl], anchors[sl], npix), psf_array=psf_n,
            noise_array=noise, detection=det))
    cat = np.concatenate(rows)

    e = np.stack([cat["fpfs1_e1"], cat["fpfs1_e2"]], axis=1)
    response = np.stack([
        np.stack([cat["fpfs1_de1_dg1"], cat["fpfs1_de1_dg2"]], axis=1),
        np.stack([cat["fpfs1_de2_dg1"], cat["fpfs1_de2_dg2"]], axis=1),
    ], axis=1)
    m00 = np.asarray(cat["fpfs1_m00"], dtype=np.float64)
    flags = np.zeros(n, dtype=np.int32)
    finite = np.isfinite(e).all(axis=1) & np.isfinite(response).all(axis=(1, 2))
    flags[~finite] |= FLAG_NONFINITE
    flags[~(m00 + c0_abs > 0)] |= FLAG_NONPOSITIVE_DENOMINATOR
    return AnacalShapes(e=e, response=response, flags=flags, m00=m00, m00_err=m00_err, c0=c0_abs)
