"""AnaCal (FPFS, Li & Mandelbaum) as a peer shear estimator: forced at the known stamp centre
(:func:`anacal_shapes`), or with AnaCal's own detection on whole multi-band cells
(:func:`anacal_cell_catalogue`, described in the second half of this docstring).

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
- Noise bias: with ``rng`` given, a pure-noise stamp of ``noise_variance`` is drawn per object
  (or, with ``noise``, the given one is used) and AnaCal adds it, measured through the PSF
  rotated by 90 degrees, which removes the noise bias of its response at the price of doubling
  the noise (AnaCal's standard practice). Without either nothing is added: right for noiseless
  or high-S/N stamps only. Measured (tests/test_anacal.py): one exponential at flux S/N ~ 20 on
  DES's grid (0.263"/pixel, Moffat FWHM 1.0") has m = -0.08 without the correction and 0 within
  0.01 with it; the peer columns of the benchmarks therefore always correct when metacal does.

Flags (bits of ``AnacalShapes.flags``): :data:`FLAG_NONFINITE` a non-finite output,
:data:`FLAG_NONPOSITIVE_DENOMINATOR` ``M00 + C0 <= 0`` (no usable flux: the ratio is meaningless).
Dropping flagged objects is a selection; it is harmless only while they are rare.

Cells with AnaCal's own detection (:func:`anacal_cell_catalogue`). AnaCal's ``task.Task`` runs the
whole chain on a (bands, H, W) image: each band is deconvolved by its PSF and re-smoothed by a
Gaussian of ``sigma_arcsec``; the bands are combined with AnaCal's inverse-variance weights
(``anacal.detector.band_weights``: 1 / the smoothed noise variance of each band, so bands of
different PSFs and noise are weighted by their actual noise after smoothing) into ONE image, on
which peaks are detected (smoothing ``sqrt(2) sigma_arcsec``) and every detection is fitted (a
Gaussian model per detection) and measured. Each quantity is a "quintuple number" carrying its
derivatives with respect to g1, g2 (and shifts), so

- ``w`` (AnaCal's ``wsel``) is a smooth detection x selection weight in [0, 1]: a product of
  smooth steps in the peak's S/N (``snr_peak_min``, width ``omega_f``), in the peak's excess over
  its neighbouring pixels (width ``omega_v``) and over the local background; AnaCal does not
  return detections of negligible weight;
- ``dw_dg1``, ``dw_dg2`` are that weight's analytic shear responses: the detection and selection
  responses, which metadetection gets from detecting on sheared images;
- ``e1``, ``e2`` (``fpfs_e1``/``fpfs_e2``) are the FPFS ellipticity (Gaussian-weighted moments of
  the smoothed image about the fitted centre, ``(Mxx - Myy, 2 Mxy) / (M0 + C0)``) with their
  analytic responses ``r11 = de1/dg1``, ``r12 = de1/dg2``, ``r21``, ``r22``; the fitted centre is
  itself a quintuple number, so its shear response propagates into them.

The population shear (:func:`anacal_population_shear`) is AnaCal's estimator

    g_hat_i = sum_n w_n e_i,n / sum_n (w_n r_ii,n + e_i,n dw_dgi,n),

summed over every kept detection of every catalogue: the shape, centroid, detection and selection
responses are all in the denominator, with no weight cut at all (a cut on ``w`` or on anything
else would be a selection whose response is not in it). ``we1 = w e1`` and ``rw1 = w r11 + e1
dw_dg1`` (same for component 2) are the per-detection terms of those sums.

Units. The thresholds are given in noise units and converted for AnaCal: ``omega_f`` and
``omega_v`` in units of the noise std of the combined detection image (``meta["std_det"]``),
``c0`` in units of the noise std of the combined FPFS flux moment ``m0`` (``meta["std_m0"]``,
computed as ``2 pi (sigma_arcsec / pixel_scale)^2 std_det``, which matches the scatter of ``m0``
on pure noise to a few per cent); the catalogue is then the same whatever the images' flux units
(electrons, nJy...). AnaCal is always called at its reference zero point
(``THRESHOLD_REF_MAG_ZERO``), where it rescales neither thresholds nor C0. Noise: AnaCal takes one
variance per band; a per-pixel variance map is reduced to its mean per band (AnaCal assumes
homogeneous noise within a cell). With ``rng`` given, a pure-noise image of the stated variance
(per pixel) is handed to AnaCal for its noise-bias correction, which doubles the variance AnaCal
works with (its thresholds then follow the doubled noise). Not usable with anacal 0.8.3 on
simulated multi-band cells (2026-12-07, a 100-pixel cell of the GalSim sheared field, 6 LSST
bands): the same cell and noise gave 32 or 40 detections on a process's first call and 47 after
(2 without the noise image), with sums of w e1 of 83 against 0.1 and of the response of 6e8;
scaling the noise image to unit variance did no better. So the fields benchmark's AnaCal column
does not correct its noise bias (the forced stamps' path above does, and is reproducible).

Geometry. Detection needs a margin of :func:`detection_margin` pixels (16 at 0.2"/pixel: the
reach of AnaCal's local-background rings, 3" + 1 pixel) on every side of the cell: detections are
only made in ``[margin, W - margin) x [margin, H - margin)``. ``owned`` is the half-open box
``(x0, x1, y0, y1)`` of the cell's pixel frame whose detections this cell keeps (ownership by the
detection peak, an integer pixel, AnaCal's own rule); it must lie inside that detectable region,
and neighbours in the margin still enter the fit of the owned objects. Positions: ``x_det``,
``y_det`` the detection peak and ``x``, ``y`` the fitted centre, 0-based pixels of the cell
(x = column, axis 1; y = row, axis 0), AnaCal's ``x1 / pixel_scale`` and ``x2 / pixel_scale``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from astropy.table import Table, vstack

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


def _check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """``images`` as float32 (N, H, W), or a ValueError naming ``what`` and the fault."""
    a = np.asarray(images)
    if a.ndim != 3:
        raise ValueError(f"{what} must be (N, H, W), got shape {a.shape}")
    if a.shape[0] == 0 or min(a.shape[1:]) < 8:
        raise ValueError(f"{what} must hold at least one stamp of >= 8x8 pixels, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contain non-finite values (NaN or inf)")
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
    noise: np.ndarray | None = None,
    npix: int = DEFAULT_NPIX,
) -> AnacalShapes:
    """FPFS ellipticities and analytic shear responses of ``images`` (N, H, W), forced at the known
    positions (default: each stamp's geometric centre), one band.

    psf: (H_psf, W_psf) image on the same pixel grid, centred on pixel (H_psf//2, W_psf//2)
        (normalised here). noise_variance: per-pixel variance of the images' noise (> 0; pass a
        tiny value for noiseless stamps). pixel_scale: arcsec per pixel. sigma_arcsec: FPFS kernel.
    c0: C0 in units of the m00 noise (see the module docstring). rng: when given, AnaCal's
    noise-bias correction with a drawn pure-noise stamp per object. noise: instead of rng, the
    pure-noise stamps (N, H, W) of that correction, of per-pixel variance ``noise_variance``
    (e.g. the metacal correction noise, so that both estimators correct with the same field).
    npix: even FFT stamp size.
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
    if noise is not None:
        if rng is not None:
            raise ValueError("give the correction noise either as rng or as noise, not both")
        noise = np.asarray(noise)
        if noise.shape != imgs.shape:
            raise ValueError(f"noise must be (N, H, W) = {imgs.shape} like the images, got "
                             f"{noise.shape}")
        noise = _check_images(noise, "noise")
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
        tiles = None
        if noise is not None:
            tiles = _tiles(noise[sl], anchors[sl], npix)
        elif rng is not None:
            draw = rng.normal(0.0, np.sqrt(noise_variance), size=(k, h, w)).astype(np.float32)
            tiles = _tiles(draw, anchors[sl], npix)
        det = np.zeros(k, dtype=[("y", "f8"), ("x", "f8")])
        det["y"] = np.arange(k) * npix + npix // 2 + frac[sl, 0]
        det["x"] = npix // 2 + frac[sl, 1]
        rows.append(fpfs.process_image(
            fpfs_config=config, pixel_scale=pixel_scale, noise_variance=float(noise_variance),
            mag_zero=mag_zero, gal_array=_tiles(imgs[sl], anchors[sl], npix), psf_array=psf_n,
            noise_array=tiles, detection=det))
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


# --------------------------------------------------------------------------------------------
# AnaCal with its own detection on whole multi-band cells
# --------------------------------------------------------------------------------------------

CELL_PSF_NPIX = 64
"""PSF stamps are zero-padded (or cropped) to this even size for ``task.Task`` (its stamp size)."""
FLAG_CELL_NONFINITE = 1
"""Bit of the ``flag`` column: a non-finite e, response or weight (left out of the shear sums)."""
CELL_COLUMNS = (
    "x", "y", "x_det", "y_det", "e1", "e2", "r11", "r12", "r21", "r22", "w", "dw_dg1", "dw_dg2",
    "we1", "we2", "rw1", "rw2", "m0", "flag")
"""Columns of :func:`anacal_cell_catalogue`, in order (see the module docstring)."""


def detection_margin(pixel_scale: float) -> int:
    """Pixels that AnaCal's detector needs on every side of a cell: its local-background rings
    reach 3 arcsec (``int(3 / pixel_scale) + 1``; 16 at 0.2 arcsec/pixel)."""
    return int(3.0 / pixel_scale) + 1


def _check_cell_images(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 3 or a.shape[0] == 0:
        raise ValueError(f"images must be (bands, H, W) with >= 1 band, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"images must be real numbers, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("images contain non-finite values (NaN or inf)")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_cell_variance(variance: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(bands,) or (bands, H, W) per-pixel variance -> (bands, H, W) map (finite, > 0)."""
    v = np.asarray(variance, dtype=np.float64)
    if v.ndim == 0 and shape[0] == 1:
        v = v.reshape(1)
    if v.shape == (shape[0],):
        v = np.broadcast_to(v[:, None, None], shape)
    elif v.shape != shape:
        raise ValueError(
            f"variance must be (bands,) = ({shape[0]},) or (bands, H, W) = {shape}, "
            f"got shape {v.shape}")
    if not np.isfinite(v).all() or not (v > 0).all():
        raise ValueError("variance must be finite and positive everywhere")
    return v


def _check_owned(owned: Sequence[int] | None, h: int, w: int, margin: int
                 ) -> tuple[int, int, int, int]:
    """The half-open box (x0, x1, y0, y1) kept; by default the whole detectable region."""
    if owned is None:
        return margin, w - margin, margin, h - margin
    box = tuple(owned)
    if len(box) != 4 or not all(float(b).is_integer() for b in box):
        raise ValueError(f"owned must be four integers (x0, x1, y0, y1), got {owned!r}")
    x0, x1, y0, y1 = (int(b) for b in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"owned must have x0 < x1 and y0 < y1, got {owned!r}")
    if x0 < margin or y0 < margin or x1 > w - margin or y1 > h - margin:
        raise ValueError(
            f"owned box {owned!r} reaches into the {margin}-pixel margin where AnaCal cannot "
            f"detect: it must lie within x in [{margin}, {w - margin}), y in [{margin}, "
            f"{h - margin}) for this {w}x{h} cell (make cells overlap by >= 2 * {margin})")
    return x0, x1, y0, y1


def _band_indices(n_bands: int, bands: Sequence[str] | None,
                  combine: Sequence[int | str] | None) -> list[int]:
    if bands is not None and len(bands) != n_bands:
        raise ValueError(f"bands names {tuple(bands)} do not match the {n_bands} image bands")
    if combine is None:
        return list(range(n_bands))
    out = []
    for b in combine:
        if isinstance(b, str):
            if bands is None or b not in bands:
                raise ValueError(f"band {b!r} is not among bands {bands}")
            out.append(list(bands).index(b))
        elif isinstance(b, (int, np.integer)) and 0 <= int(b) < n_bands:
            out.append(int(b))
        else:
            raise ValueError(f"combine entry {b!r} is not a band name or index < {n_bands}")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"combine must list distinct bands, got {combine!r}")
    return out


def _noise_scales(psfs: np.ndarray, variance: Sequence[float], pixel_scale: float,
                  sigma_arcsec: float) -> tuple[float, float]:
    """(std of AnaCal's combined detection image, std of its FPFS ``m0``) for these per-band
    variances, with AnaCal's own inverse-variance band weights."""
    det = _anacal().detector
    sigma_det = sigma_arcsec * np.sqrt(2.0)
    var = [float(v) for v in variance]
    weights = det.band_weights(pixel_scale, sigma_det, psfs, var)
    std_det = float(np.sqrt(det.coadd_smoothed_variance(pixel_scale, sigma_det, psfs, var,
                                                        weights)))
    # m0 is the smoothed image times 2 pi (sigma / pixel)^2: checked on pure noise to ~3%.
    return std_det, 2.0 * np.pi * (sigma_arcsec / pixel_scale) ** 2 * std_det


def anacal_cell_catalogue(
    images: np.ndarray,
    variance: np.ndarray,
    psfs: np.ndarray,
    pixel_scale: float,
    *,
    bands: Sequence[str] | None = None,
    combine: Sequence[int | str] | None = None,
    owned: Sequence[int] | None = None,
    sigma_arcsec: float = 0.52,
    snr_peak_min: float = 10.0,
    omega_f: float = 3.0,
    omega_v: float = 0.5,
    c0: float = 4.0,
    num_epochs: int = 10,
    misfit_damping: float = 1.0,
    rng: np.random.Generator | None = None,
) -> Table:
    """Detect and measure every object of a multi-band cell with AnaCal (``anacal.task.Task``).

    images: (bands, H, W) sky-subtracted flux per pixel (any unit, e.g. electrons), noisy.
    variance: (bands,) or (bands, H, W) per-pixel noise variance (same units squared, > 0).
    psfs: (bands, S, S) effective PSF images (PSF x pixel) on the images' grid, centred on pixel
        (S//2, S//2) (normalised here). pixel_scale: arcsec per pixel.
    bands: optional band names (stored in the table's meta). combine: the bands (names or
        indices) that AnaCal combines for detection AND measurement; default all.
    owned: half-open (x0, x1, y0, y1) box of kept detections (by detection peak); default the
        whole detectable region (the cell less :func:`detection_margin` on each side).
    sigma_arcsec: FPFS/Gaussian kernel (detection at sqrt(2) sigma_arcsec). snr_peak_min: peak
        S/N of the detection threshold; omega_f, omega_v: widths of the detection weight's smooth
        steps, in units of the combined detection image's noise std; c0: FPFS C0 in units of the
        noise std of ``m0`` (module docstring). num_epochs: AnaCal's fitting iterations.
        misfit_damping: AnaCal's damping of fit steps by the model misfit; its default 1.0
        freezes the fitted centroid on the detection pixel at very high S/N (>~ 1000, where a
        Gaussian model's misfit dwarfs the noise), and the shapes are then measured about the
        pixel: no bias seen, but ~5x the pixel-phase scatter of +-g pairs on near-noiseless
        sims; 0 lets the fit converge there. rng: when given, AnaCal's noise-bias correction
        with a pure-noise image of ``variance`` (not reliable with anacal 0.8.3: module
        docstring).

    Returns one row per kept detection, columns :data:`CELL_COLUMNS` (module docstring); meta
    holds the settings and the noise scales used. Feed tables to :func:`anacal_population_shear`.
    """
    ana = _anacal()
    if not (np.isfinite(pixel_scale) and pixel_scale > 0):
        raise ValueError(f"pixel_scale must be positive (arcsec/pixel), got {pixel_scale}")
    if not (np.isfinite(sigma_arcsec) and pixel_scale <= sigma_arcsec < 3.0):
        raise ValueError(f"sigma_arcsec must lie in [pixel_scale, 3) arcsec, got {sigma_arcsec}")
    for name, value in (("snr_peak_min", snr_peak_min), ("omega_f", omega_f),
                        ("omega_v", omega_v)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, got {value}")
    if not (np.isfinite(c0) and c0 >= 0):
        raise ValueError(f"c0 must be >= 0, got {c0}")
    if int(num_epochs) != num_epochs or num_epochs < 0:
        raise ValueError(f"num_epochs must be a non-negative integer, got {num_epochs}")
    if not (np.isfinite(misfit_damping) and misfit_damping >= 0):
        raise ValueError(f"misfit_damping must be >= 0, got {misfit_damping}")
    imgs = _check_cell_images(images)
    n_bands, h, w = imgs.shape
    var_map = _check_cell_variance(variance, imgs.shape)
    p = np.asarray(psfs)
    if p.ndim != 3 or p.shape[0] != n_bands:
        raise ValueError(f"psfs must be (bands, S, S) with {n_bands} bands, got shape {p.shape}")
    use = _band_indices(n_bands, bands, combine)
    margin = detection_margin(pixel_scale)
    if min(h, w) < 2 * margin + 1:
        raise ValueError(f"the cell ({h}x{w}) is too small for AnaCal's {margin}-pixel margin")
    x0, x1, y0, y1 = _check_owned(owned, h, w, margin)

    psf_stack = np.stack([_check_psf(p[b], pixel_scale, sigma_arcsec, CELL_PSF_NPIX)
                          for b in use])
    var_band = var_map[use].reshape(len(use), -1).mean(axis=1)
    noise = None
    if rng is not None:
        noise = (rng.standard_normal((len(use), h, w)) * np.sqrt(var_map[use])).astype(np.float32)
    # AnaCal doubles the variance it works with when a noise image is added; so do the units.
    std_det, std_m0 = _noise_scales(psf_stack, var_band * (2.0 if noise is not None else 1.0),
                                    pixel_scale, sigma_arcsec)
    task = ana.task.Task(
        scale=pixel_scale, sigma_arcsec=sigma_arcsec, snr_peak_min=snr_peak_min,
        omega_f=omega_f * std_det, omega_v=omega_v * std_det, stamp_size=CELL_PSF_NPIX,
        num_epochs=int(num_epochs), misfit_damping=float(misfit_damping), fpfs_c0=c0 * std_m0,
        mag_zero=float(ana.task.THRESHOLD_REF_MAG_ZERO))
    cell = ana.geometry.cell((margin + w - margin) // 2, (margin + h - margin) // 2, 0, 0, w, h,
                             margin, margin, w - margin, h - margin, pixel_scale, 0)
    cat = task.process_image(np.ascontiguousarray(imgs[use]), psf_stack,
                             variance=[float(v) for v in var_band], cell_list=[cell],
                             noise_array=noise)
    out = _cell_table(cat, pixel_scale)
    xi, yi = np.rint(out["x_det"]).astype(int), np.rint(out["y_det"]).astype(int)
    out = out[(xi >= x0) & (xi < x1) & (yi >= y0) & (yi < y1)]
    out.meta.update({
        "pixel_scale": float(pixel_scale), "bands": None if bands is None else list(bands),
        "combined": [int(b) if bands is None else bands[b] for b in use],
        "owned": [x0, x1, y0, y1], "sigma_arcsec": float(sigma_arcsec),
        "snr_peak_min": float(snr_peak_min), "omega_f": float(omega_f),
        "omega_v": float(omega_v), "c0": float(c0), "std_det": std_det, "std_m0": std_m0,
        "num_epochs": int(num_epochs), "misfit_damping": float(misfit_damping),
        "noise_correction": noise is not None, "margin": margin})
    return out


def _cell_table(cat: np.ndarray, pixel_scale: float) -> Table:
    """AnaCal's structured catalogue -> :data:`CELL_COLUMNS` (positions in pixels)."""
    col = {name: np.asarray(cat[name], dtype=np.float64) for name in (
        "x1", "x2", "x1_det", "x2_det", "fpfs_e1", "fpfs_e2", "fpfs_de1_dg1", "fpfs_de1_dg2",
        "fpfs_de2_dg1", "fpfs_de2_dg2", "wsel", "dwsel_dg1", "dwsel_dg2", "fpfs_m0")}
    if "is_primary" in (cat.dtype.names or ()):
        keep = np.asarray(cat["is_primary"], dtype=bool)
        col = {k: v[keep] for k, v in col.items()}
    e1, e2, w = col["fpfs_e1"], col["fpfs_e2"], col["wsel"]
    t = Table()
    t["x"], t["y"] = col["x1"] / pixel_scale, col["x2"] / pixel_scale
    t["x_det"], t["y_det"] = col["x1_det"] / pixel_scale, col["x2_det"] / pixel_scale
    t["e1"], t["e2"] = e1, e2
    t["r11"], t["r12"] = col["fpfs_de1_dg1"], col["fpfs_de1_dg2"]
    t["r21"], t["r22"] = col["fpfs_de2_dg1"], col["fpfs_de2_dg2"]
    t["w"], t["dw_dg1"], t["dw_dg2"] = w, col["dwsel_dg1"], col["dwsel_dg2"]
    t["we1"], t["we2"] = w * e1, w * e2
    t["rw1"] = w * t["r11"] + e1 * t["dw_dg1"]
    t["rw2"] = w * t["r22"] + e2 * t["dw_dg2"]
    t["m0"] = col["fpfs_m0"]
    numbers = np.stack([np.asarray(t[c]) for c in CELL_COLUMNS[4:18]], axis=1)
    t["flag"] = np.where(np.isfinite(numbers).all(axis=1), 0, FLAG_CELL_NONFINITE).astype(
        np.int32)
    return t


def anacal_shear_sums(catalogues: Table | Iterable[Table]) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum w e (2,), sum (w R + e dw/dg) (2,), number of rows) over unflagged rows of one or
    several :func:`anacal_cell_catalogue` tables: the numerator and denominator of AnaCal's
    shear estimator, to combine across populations (e.g. +g/-g pairs) before dividing."""
    tables = [catalogues] if isinstance(catalogues, Table) else list(catalogues)
    if not tables:
        raise ValueError("no catalogue given")
    for tab in tables:
        missing = [c for c in ("we1", "we2", "rw1", "rw2", "flag") if c not in tab.colnames]
        if missing:
            raise ValueError(f"not an anacal_cell_catalogue table: missing columns {missing}")
    t = vstack([tab[["we1", "we2", "rw1", "rw2", "flag"]] for tab in tables],
               metadata_conflicts="silent")
    good = np.asarray(t["flag"]) == 0
    num = np.array([np.sum(t["we1"][good]), np.sum(t["we2"][good])], dtype=np.float64)
    den = np.array([np.sum(t["rw1"][good]), np.sum(t["rw2"][good])], dtype=np.float64)
    return num, den, int(good.sum())


def anacal_population_shear(catalogues: Table | Iterable[Table]) -> np.ndarray:
    """(2,) reduced-shear estimate of the population in ``catalogues`` (pixel frame), AnaCal's
    g_hat_i = sum(w e_i) / sum(w R_ii + e_i dw/dg_i) per component (module docstring).
    Raises ValueError when there is no detection or the summed response is not positive."""
    num, den, n = anacal_shear_sums(catalogues)
    if n == 0:
        raise ValueError("no unflagged detection in the catalogues")
    if not (den > 0).all():
        raise ValueError(f"the summed response {den} is not positive: no usable detections")
    return num / den
