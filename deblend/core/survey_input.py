"""Survey images in: FITS planes of each band, validated and converted to the model's units.

What is read (:class:`SurveyInputs`), for each band the model has:

- **image**, **weight** (inverse variance, 0 = no data) and optionally **mask** (nonzero = bad)
  planes, either one multi-extension FITS file per kind with one image HDU per band (EXTNAME =
  the band's name, e.g. ``i``; matched exactly, else ignoring case) or one file per band (its
  first HDU holding a 2-D image);
- a **PSF** per band, the same two layouts: an image (odd square, any normalisation: it is
  normalised here; the *effective* PSF, pixel included) or a PSFEx file (recognised by its
  ``PSF_MASK`` table, read with ``galsim.des.DES_PSFEx`` in image coordinates and drawn at a
  position on the image's own pixel grid, ``method="no_pixel"`` since PSFEx models hold the
  pixel);
- the **WCS** of each band's image header (astropy.wcs); all bands must share one pixel grid
  and its pixel scale must be the model's (both within :data:`WCS_TOLERANCE_PIXELS` and
  :data:`PIXEL_SCALE_TOLERANCE`), unless ``resample`` is on: each band is then resampled onto
  the model's pixel scale over the first band's image, PSF included
  (:mod:`deblend.core.resample`), so that bands from other exposures, CCDs or surveys can be
  measured together.

Sky. The images should be sky-subtracted. For single-epoch frames that are not, ``skies``
gives the survey's own sky model of every band, subtracted pixel by pixel: a sky image or a
legacypipe SplineSky table (:mod:`deblend.core.sky_model`); without one, ``subtract_sky``
subtracts each band's sigma-clipped median of its unmasked pixels (astropy.stats), a constant,
which a large galaxy filling the frame pulls up (by 0.6-0.8 sky sigma on the real DECam
cut-outs). Not both.

Units. Pixel values are multiplied by ``10**(0.4 * (zp_model - zp_image))`` (variance by its
square): ``zp_image`` is the header's ``MAGZERO`` (the band's HDU, else the file's primary
header) unless ``zeropoints`` gives it; ``zp_model`` is the AB magnitude of one model unit
(one electron of the model's simulated survey), from the model when it stores it, else from
``model_zeropoints`` (training runs do not store zero points yet, so give it).

Masking. A pixel is masked where the mask is nonzero or the weight is 0: it gets image 0 and
infinite variance (:class:`~deblend.core.cells.CellImage`'s convention). NaN pixels are fine
there; anywhere else a non-finite image or weight, or a negative weight, is refused.

A band the model has and the images lack is refused, unless it is named in ``missing_bands``:
it is then filled with zeros and infinite variance (and the first present band's PSF); the
networks see it as missing (zeros), and metadetection flags no detection for it (a band
missing from a whole cell is not a masked pixel).

Every problem is a ValueError naming the file, HDU, band or argument. Conventions: arrays are
(bands, H, W) in the model's band order, pixel (x, y) = column x, row y, 0-based; FITS and
PSFEx positions are 1-based and converted here.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import galsim
import galsim.des
import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from deblend.core.resample import BandResampler, OutputGrid, galsim_wcs
from deblend.core.sky_model import is_spline_sky, spline_sky

WCS_TOLERANCE_PIXELS = 0.01
"""Largest offset (pixels) between two bands' WCS at the image corners and centre."""
PIXEL_SCALE_TOLERANCE = 0.005
"""Largest relative difference between the image's and the model's pixel scale."""
PSF_AT = ("cell", "centre")
"""Where a PSFEx model is drawn: at each cell's centre, or once at the image centre."""
ZEROPOINT_KEYWORD = "MAGZERO"
_BAND = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")

Layout = Union[Path, dict[str, Path]]
"""One multi-extension FITS file (EXTNAME = band), or one FITS file per band."""


# -- command-line values -------------------------------------------------------------------------
def band_path_arg(text: str) -> tuple[str | None, str]:
    """argparse type of ``[BAND=]PATH``: (band, path), band None for a multi-extension file."""
    band, sep, path = text.partition("=")
    if sep and _BAND.match(band):
        if not path:
            raise argparse.ArgumentTypeError(f"no file after '{band}=' in {text!r}")
        return band, path
    return None, text


def band_float_arg(text: str) -> tuple[str, float]:
    """argparse type of ``BAND=VALUE`` with a finite number VALUE."""
    band, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not _BAND.match(band) or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be BAND=NUMBER (e.g. i=30.0), got {text!r}")
    return band, number


# -- what the user named -------------------------------------------------------------------------
def _layout(value: Any, option: str) -> Layout:
    """A :data:`Layout` from a path, a {band: path} mapping or (band | None, path) pairs."""
    if isinstance(value, (str, Path)):
        return Path(value)
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    if not pairs:
        raise ValueError(f"{option}: no file given")
    if len(pairs) == 1 and pairs[0][0] is None:
        return Path(pairs[0][1])
    out: dict[str, Path] = {}
    for band, path in pairs:
        if band is None:
            raise ValueError(f"{option}: give either one multi-extension file or BAND=FILE for "
                             f"every band, not both ({path})")
        if band in out:
            raise ValueError(f"{option}: band {band} is given twice ({out[band]}, {path})")
        out[band] = Path(path)
    return out


def _optional_layout(value: Any, option: str) -> Layout | None:
    """:func:`_layout` of an optional kind of file: None when nothing is given."""
    if value is None or (not isinstance(value, (str, Path)) and not list(value)):
        return None
    return _layout(value, option)


def _band_values(value: Any, option: str) -> dict[str, float]:
    """{band: number} from a mapping or (band, number) pairs; a band given twice is refused."""
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value or ())
    out: dict[str, float] = {}
    for band, number in pairs:
        if band in out:
            raise ValueError(f"{option}: band {band} is given twice")
        out[band] = float(number)
    return out


@dataclass(frozen=True)
class SurveyInputs:
    """The files and numbers of one survey image (module docstring). ``images``, ``weights``,
    ``masks`` and ``psfs`` are each a multi-extension FITS path or {band: path} (or the
    command line's (band | None, path) pairs); ``zeropoints`` override the images' MAGZERO;
    ``model_zeropoints`` give the model's; ``missing_bands`` are filled with zeros and infinite
    variance; ``psf_at`` is where PSFEx models are drawn (:data:`PSF_AT`); ``resample`` puts
    every band on the model's pixel grid; ``subtract_sky`` removes a constant sky per band;
    ``skies`` (the same layouts) the survey's sky model of every band."""

    images: Any
    weights: Any
    psfs: Any
    masks: Any = None
    zeropoints: Any = field(default_factory=dict)
    model_zeropoints: Any = field(default_factory=dict)
    missing_bands: tuple[str, ...] = ()
    psf_at: str = "cell"
    resample: bool = False
    subtract_sky: bool = False
    skies: Any = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "images", _layout(self.images, "--image"))
        set_(self, "weights", _layout(self.weights, "--weight"))
        set_(self, "psfs", _layout(self.psfs, "--psf"))
        set_(self, "masks", _optional_layout(self.masks, "--mask"))
        set_(self, "skies", _optional_layout(self.skies, "--sky"))
        if self.skies is not None and self.subtract_sky:
            raise ValueError("--sky and --subtract-sky: give the survey's sky model or ask for "
                             "a constant sky, not both")
        set_(self, "zeropoints", _band_values(self.zeropoints, "--zeropoint"))
        set_(self, "model_zeropoints", _band_values(self.model_zeropoints, "--zeropoint-model"))
        set_(self, "missing_bands", tuple(self.missing_bands or ()))
        if self.psf_at not in PSF_AT:
            raise ValueError(f"psf_at must be one of {' '.join(PSF_AT)}, got {self.psf_at!r}")


# -- FITS planes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """One band's 2-D array read from a FITS file, its header, and where it came from."""

    data: np.ndarray
    header: fits.Header
    primary: fits.Header
    where: str
    """``path[EXTNAME]`` or ``path[HDU n]``: how messages name it."""


def read_hdus(path: Path, what: str) -> list[tuple[fits.Header, Any, str]]:
    """(header, data, label) of every HDU of a FITS file, read in full; a ValueError naming the
    file when it is missing, corrupt or truncated."""
    if not Path(path).is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdus:
                out = []
                for n, hdu in enumerate(hdus):
                    name = str(hdu.header.get("EXTNAME", "")).strip()
                    out.append((hdu.header.copy(), hdu.data if hdu.data is None else
                                hdu.data.copy(), f"{path}[{name or f'HDU {n}'}]"))
                return out
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError... on bad files
        raise ValueError(f"cannot read {what} file {path} (corrupt or truncated FITS?): "
                         f"{type(exc).__name__}: {exc}") from exc


def _is_image(data: Any) -> bool:
    return isinstance(data, np.ndarray) and data.dtype.names is None and data.ndim == 2


def _band_plane(hdus: list[tuple[fits.Header, Any, str]], band: str, path: Path, what: str
                ) -> Plane | None:
    """The image HDU of ``band`` (EXTNAME) in a multi-extension file, or None."""
    images = [(h, d, w) for h, d, w in hdus if _is_image(d)]
    for same in (lambda name: name == band, lambda name: name.lower() == band.lower()):
        found = [(h, d, w) for h, d, w in images if same(str(h.get("EXTNAME", "")).strip())]
        if len(found) > 1:
            raise ValueError(f"{what} file {path} has {len(found)} image HDUs named {band}")
        if found:
            return Plane(found[0][1], found[0][0], hdus[0][0], found[0][2])
    return None


def _first_plane(hdus: list[tuple[fits.Header, Any, str]], path: Path, what: str) -> Plane:
    """The first 2-D image HDU of a single-band file."""
    for header, data, where in hdus:
        if _is_image(data):
            return Plane(data, header, hdus[0][0], where)
    raise ValueError(f"{what} file {path} holds no 2-D image HDU")


def read_planes(layout: Layout, bands: Sequence[str], what: str) -> dict[str, Plane]:
    """The plane of each of ``bands`` present in ``layout`` (absent bands are left out: the
    caller decides whether that is allowed)."""
    if isinstance(layout, Path):
        hdus = read_hdus(layout, what)
        planes = {b: _band_plane(hdus, b, layout, what) for b in bands}
        return {b: p for b, p in planes.items() if p is not None}
    return {b: _first_plane(read_hdus(layout[b], what), layout[b], what)
            for b in bands if b in layout}


def _hdu_names(layout: Layout) -> str:
    """The EXTNAMEs of a multi-extension file's image HDUs (for messages)."""
    names = [str(h.get("EXTNAME", "")).strip() for h, d, _ in read_hdus(layout, "image")
             if _is_image(d)] if isinstance(layout, Path) else sorted(layout)
    return " ".join(n for n in names if n) or "none"


# -- PSFs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PsfSource:
    """One band's PSF: a normalised odd square image, or a PSFEx model drawn where asked."""

    where: str
    image: np.ndarray | None = None
    psfex: Any = None
    pixels: int = 0

    def at(self, x: float, y: float) -> np.ndarray:
        """The unit-sum effective PSF image at parent pixel (x, y) (0-based)."""
        if self.image is not None:
            return self.image
        profile = self.psfex.getPSF(galsim.PositionD(x + 1.0, y + 1.0))
        array = profile.drawImage(nx=self.pixels, ny=self.pixels, scale=1.0,
                                  method="no_pixel").array.astype(np.float64)
        total = array.sum()
        if not np.isfinite(array).all() or total <= 0:
            raise ValueError(f"the PSFEx model {self.where} draws a non-finite or non-positive "
                             f"PSF at pixel ({x:.1f}, {y:.1f})")
        return array / total


@dataclass(frozen=True)
class ResampledPsf:
    """A band's PSF on the model's grid: its :class:`PsfSource` drawn at the input pixel under
    the output pixel asked for, then resampled like the band's image."""

    source: PsfSource
    band: BandResampler
    pixels: int

    @property
    def where(self) -> str:
        return self.source.where

    @property
    def psfex(self) -> Any:
        return self.source.psfex

    def at(self, x: float, y: float) -> np.ndarray:
        """The unit-sum effective PSF on the model's grid at output pixel (x, y) (0-based)."""
        native_x, native_y = self.band.native_position(x, y)
        return self.band.psf(self.source.at(float(native_x), float(native_y)), self.pixels)


def check_psf_image(data: np.ndarray, where: str, shape: tuple[int, int]) -> np.ndarray:
    """A PSF image as float64 with unit sum; ValueError naming ``where`` unless it is an odd
    square no larger than the image of ``shape``, finite, with a positive sum."""
    array = np.asarray(data, np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] % 2 == 0:
        raise ValueError(f"PSF {where} must be an odd square image (centred on its central "
                         f"pixel), got shape {array.shape}")
    if array.shape[0] > min(shape):
        raise ValueError(f"PSF {where} is {array.shape[0]} pixels wide, larger than the "
                         f"{shape[0]}x{shape[1]} image")
    if not np.isfinite(array).all() or array.sum() <= 0:
        raise ValueError(f"PSF {where} has non-finite pixels or a non-positive sum")
    return array / array.sum()


PSFEX_KEYWORDS = ("POLNAXIS", "POLNAME1", "POLNAME2", "POLZERO1", "POLZERO2", "POLSCAL1",
                  "POLSCAL2", "POLNGRP", "POLGRP1", "POLGRP2", "POLDEG1", "PSFNAXIS", "PSFAXIS1",
                  "PSFAXIS2", "PSFAXIS3", "PSF_SAMP")
"""The header keywords of a PSFEx model that ``galsim.des.DES_PSFEx`` reads."""


def _is_psfex(data: Any) -> bool:
    """A PSFEx table: PSFEx's own (column PSF_MASK) or legacypipe's merged one (psf_mask)."""
    return isinstance(data, fits.FITS_rec) and "psf_mask" in [n.lower() for n in data.names]


def psfex_hdu(header: fits.Header, data: fits.FITS_rec, where: str) -> fits.BinTableHDU:
    """A PSFEx model as the table HDU ``galsim.des.DES_PSFEx`` reads: PSFEx's own as it is;
    legacypipe's merged layout (one row per CCD, the keywords as lower-case columns, as the
    DECam community-pipeline products of legacypipe carry) rebuilt with its keywords in the
    header. A merged table of several CCDs is refused (give the CCD's own row)."""
    if "PSF_MASK" in data.names and "POLNAXIS" in header:
        return fits.BinTableHDU(data, header)
    names = {n.lower(): n for n in data.names}
    missing = [k for k in PSFEX_KEYWORDS if k.lower() not in names]
    if missing:
        raise ValueError(f"PSFEx file {where} has no {missing[0]} (neither keyword nor column)")
    if len(data) != 1:
        raise ValueError(f"PSFEx file {where} holds {len(data)} models (one per CCD): write the "
                         f"row of the image's CCD to a file of its own")
    basis = np.asarray(data[names["psf_mask"]][0], np.float32)
    column = fits.Column(name="PSF_MASK", format=f"{basis.size}E",
                         dim="(" + ",".join(str(n) for n in basis.shape[::-1]) + ")",
                         array=basis[np.newaxis])
    hdu = fits.BinTableHDU.from_columns([column])
    for key in PSFEX_KEYWORDS:
        value = data[names[key.lower()]][0]
        hdu.header[key] = value.strip() if isinstance(value, str) else value.item()
    return hdu


def _psfex(header: fits.Header, data: fits.FITS_rec, where: str, pixels: int) -> PsfSource:
    hdu = psfex_hdu(header, data, where)
    try:
        model = galsim.des.DES_PSFEx(hdu)
    except Exception as exc:  # galsim raises OSError, KeyError... on malformed files
        raise ValueError(f"cannot read the PSFEx file {where}: {type(exc).__name__}: "
                         f"{exc}") from exc
    return PsfSource(where, psfex=model, pixels=pixels)


def _band_model(layout: Layout, band: str, what: str, option: str, kind: str,
                is_table: Callable[[Any], bool]
                ) -> tuple[Path, tuple[fits.Header, Any] | None, Plane | None] | None:
    """A per-band model that is either a table (a PSFEx model, a SplineSky: ``is_table``) or
    an image plane: (path, (header, table) or None, plane or None) of ``band``, None when the
    layout has no file for it. A table in a multi-extension file is refused (tables are one
    per band, ``option`` BAND=FILE)."""
    path = layout if isinstance(layout, Path) else layout.get(band)
    if path is None:
        return None
    hdus = read_hdus(path, what)
    tables = [(h, d) for h, d, _ in hdus if is_table(d)]
    if tables:
        if isinstance(layout, Path):
            raise ValueError(f"{option}: {path} is a {kind}; give one per band ({option} "
                             f"{band}={path})")
        return path, tables[0], None
    plane = _band_plane(hdus, band, path, what) if isinstance(layout, Path) else \
        _first_plane(hdus, path, what)
    return path, None, plane


def read_psf(layout: Layout, band: str, shape: tuple[int, int], psfex_pixels: int
             ) -> PsfSource | None:
    """The PSF of ``band`` (None when the layout lacks it)."""
    found = _band_model(layout, band, "PSF", "--psf", "PSFEx file", _is_psfex)
    if found is None:
        return None
    path, table, plane = found
    if table is not None:
        return _psfex(*table, f"{path} (band {band})", psfex_pixels)
    if plane is None:
        return None
    return PsfSource(plane.where, image=check_psf_image(plane.data, plane.where, shape))


def read_sky(layout: Layout, band: str, image: Plane) -> tuple[np.ndarray, str]:
    """(H, W) sky of ``band`` in image units from its sky model (module docstring) and where it
    came from; a ValueError when the layout lacks the band, or the model does not fit the
    image."""
    found = _band_model(layout, band, "sky", "--sky", "SplineSky table", is_spline_sky)
    if found is None:
        raise ValueError(f"no sky model for band {band}: give --sky {band}=FILE")
    path, table, plane = found
    if table is not None:
        return spline_sky(table[1], image.data.shape, f"{path}"), f"{path} (SplineSky)"
    if plane is None:
        raise ValueError(f"no sky model for band {band}: {path} has no image HDU with EXTNAME "
                         f"{band}")
    sky = np.asarray(plane.data, np.float64)
    if sky.shape != image.data.shape:
        raise ValueError(f"sky {plane.where} has shape {sky.shape}, its image {image.where} "
                         f"{image.data.shape}")
    if not np.isfinite(sky).all():
        raise ValueError(f"sky {plane.where} has non-finite pixels")
    return sky, plane.where


def _resampled_psf_pixels(psf: PsfSource, band: BandResampler, shape: tuple[int, int],
                          psfex_pixels: int) -> int:
    """Odd width of a resampled PSF image: a PSFEx model's ``psfex_pixels``; an image's width
    carried to the output scale, no wider than the output image."""
    if psf.image is None:
        return psfex_pixels
    width = psf.image.shape[0] * float(np.sqrt(1.0 / band.area_ratio))
    limit = min(shape) if min(shape) % 2 else min(shape) - 1
    return min(limit, int(np.ceil(width)) // 2 * 2 + 1)


def pad_square(image: np.ndarray, size: int) -> np.ndarray:
    """An odd square ``image`` zero-padded to odd ``size``, centre kept."""
    pad = (size - image.shape[0]) // 2
    return np.pad(image, pad) if pad else image


# -- the validated survey image ------------------------------------------------------------------
@dataclass(frozen=True)
class SurveyImage:
    """A survey image in the model's units and band order (module docstring)."""

    bands: tuple[str, ...]
    images: np.ndarray
    """(bands, H, W) float64, model units, 0 where masked."""
    variance: np.ndarray
    """(bands, H, W) float64, model units squared, inf where masked."""
    wcs: WCS
    """The celestial WCS of the images (all bands share it)."""
    psf_sources: tuple[PsfSource | ResampledPsf | None, ...]
    """Per band; None for a missing band (it borrows the first present band's PSF)."""
    zeropoints: dict[str, tuple[float, float]]
    """{band: (image zero point, model zero point)} of the present bands."""
    missing: tuple[str, ...]
    sources: dict[str, str]
    """{band: where its image came from}."""
    pixel_scale: float
    """arcsec per pixel, measured from the WCS."""
    resampled: bool = False
    """Whether the bands were resampled onto the model's grid (``images`` then hold the
    resampled pixels; ``wcs`` is the output grid's)."""
    psf_at: str = "cell"
    notes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def psf_varies(self) -> bool:
        """Whether the PSF is drawn anew for each cell (a PSFEx model, ``psf_at="cell"``)."""
        return self.psf_at == "cell" and any(s is not None and s.psfex is not None
                                             for s in self.psf_sources)

    def psfs_at(self, x: float, y: float) -> np.ndarray:
        """(bands, S, S) unit-sum PSF images at parent pixel (x, y) (0-based); the image
        centre when ``psf_at`` is "centre"; each zero-padded to the largest."""
        if self.psf_at == "centre":
            x, y = (self.shape[1] - 1) / 2.0, (self.shape[0] - 1) / 2.0
        drawn = [None if s is None else s.at(x, y) for s in self.psf_sources]
        first = next(d for d in drawn if d is not None)
        drawn = [first if d is None else d for d in drawn]
        size = max(d.shape[0] for d in drawn)
        return np.stack([pad_square(d, size) for d in drawn])


def _wcs_of(plane: Plane) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(plane.header, naxis=2)
        except Exception as exc:  # astropy.wcs raises several types on malformed headers
            raise ValueError(f"the WCS of {plane.where} is unreadable: {exc}") from exc
    if not wcs.has_celestial:
        raise ValueError(f"{plane.where} has no celestial WCS (CTYPE1/2, CRVAL, CRPIX, CD)")
    return wcs.celestial


def check_same_grid(reference: WCS, ref_where: str, other: WCS, where: str,
                    shape: tuple[int, int]) -> None:
    """Refuse ``other`` unless it maps the corners and centre of an image of ``shape`` to the
    same sky positions as ``reference``, within :data:`WCS_TOLERANCE_PIXELS`."""
    height, width = shape
    x = np.array([0, width - 1, 0, width - 1, (width - 1) / 2])
    y = np.array([0, 0, height - 1, height - 1, (height - 1) / 2])
    ra, dec = reference.all_pix2world(x, y, 0)
    x2, y2 = other.all_world2pix(ra, dec, 0)
    offset = float(np.nanmax(np.hypot(x2 - x, y2 - y)))
    if not np.isfinite(offset) or offset > WCS_TOLERANCE_PIXELS:
        def describe(w: WCS) -> str:
            def fmt(values: np.ndarray) -> str:
                return "(" + ", ".join(f"{float(v):.10g}" for v in np.ravel(values)) + ")"
            return (f"CRVAL {fmt(w.wcs.crval)}, CRPIX {fmt(w.wcs.crpix)}, "
                    f"CD {fmt(w.pixel_scale_matrix)}")
        raise ValueError(f"the WCS of {where} ({describe(other)}) differs from that of "
                         f"{ref_where} ({describe(reference)}) by {offset:.3g} pixels: all "
                         f"bands must share one pixel grid (or pass --resample)")


def pixel_scale_of(wcs: WCS, where: str, model_scale: float) -> float:
    """The WCS's pixel scale (arcsec), refused unless square and equal to ``model_scale``."""
    scales = proj_plane_pixel_scales(wcs) * 3600.0
    scale = float(np.mean(scales))
    if abs(scales[0] / scales[1] - 1) > PIXEL_SCALE_TOLERANCE or \
            abs(scale / model_scale - 1) > PIXEL_SCALE_TOLERANCE:
        raise ValueError(f"the pixel scale of {where} is {scales[0]:.5g} x {scales[1]:.5g} "
                         f"arcsec, the model's is {model_scale:.5g} arcsec: pass --resample "
                         f"to resample it onto the model's pixel scale")
    return scale


def image_zeropoint(band: str, plane: Plane, given: Mapping[str, float]) -> float:
    """The image's zero point: ``given`` (--zeropoint), else MAGZERO of the HDU or primary."""
    if band in given:
        return float(given[band])
    for header in (plane.header, plane.primary):
        if ZEROPOINT_KEYWORD in header:
            value = header[ZEROPOINT_KEYWORD]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise ValueError(f"{ZEROPOINT_KEYWORD} of {plane.where} is not a finite "
                                 f"number: {value!r}")
            return float(value)
    raise ValueError(f"no zero point for band {band}: {plane.where} has no "
                     f"{ZEROPOINT_KEYWORD} keyword; pass --zeropoint {band}=VALUE")


def masked_planes(image: Plane, weight: Plane, mask: Plane | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, weight, masked) float64/bool arrays of one band, validated (module docstring)."""
    data = np.asarray(image.data, np.float64)
    w = np.asarray(weight.data, np.float64)
    if w.shape != data.shape:
        raise ValueError(f"weight {weight.where} has shape {w.shape}, its image {image.where} "
                         f"{data.shape}")
    masked = w == 0
    if mask is not None:
        m = np.asarray(mask.data)
        if m.shape != data.shape:
            raise ValueError(f"mask {mask.where} has shape {m.shape}, its image {image.where} "
                             f"{data.shape}")
        masked |= m != 0  # NaN counts as nonzero: masked
    bad_weight = ~masked & ~(np.isfinite(w) & (w > 0))
    if bad_weight.any():
        y, x = np.argwhere(bad_weight)[0]
        raise ValueError(f"weight {weight.where} has {int(bad_weight.sum())} negative or "
                         f"non-finite unmasked pixels (first at x={x}, y={y})")
    if masked.all():
        raise ValueError(f"weight {weight.where} is zero (or masked) everywhere: no pixel of "
                         f"{image.where} can be measured")
    bad = ~masked & ~np.isfinite(data)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise ValueError(f"image {image.where} has {int(bad.sum())} NaN or infinite pixels "
                         f"that are not masked (first at x={x}, y={y}): give them weight 0 or "
                         f"a nonzero mask")
    return data, w, masked


def _check_bands(inputs: SurveyInputs, bands: tuple[str, ...]) -> None:
    """Band names the arguments give must be the model's."""
    for option, names in (("--zeropoint", inputs.zeropoints), ("--zeropoint-model",
                          inputs.model_zeropoints), ("--missing-band", inputs.missing_bands)):
        unknown = [b for b in names if b not in bands]
        if unknown:
            raise ValueError(f"{option}: band {unknown[0]} is not one of the model's bands "
                             f"({' '.join(bands)})")


def read_survey(inputs: SurveyInputs, bands: Sequence[str], pixel_scale: float, *,
                model_zeropoints: Mapping[str, float] | None = None, psfex_pixels: int = 45
                ) -> SurveyImage:
    """Read and validate a survey image for a model of ``bands`` and ``pixel_scale`` (arcsec);
    ``model_zeropoints`` (the model's own, when it stores them) come before the inputs'.
    PSFEx models are drawn on ``psfex_pixels`` squares. ValueError on any problem."""
    bands = tuple(bands)
    _check_bands(inputs, bands)
    images = read_planes(inputs.images, bands, "image")
    absent = [b for b in bands if b not in images]
    refused = [b for b in absent if b not in inputs.missing_bands]
    if refused:
        where = (f"{inputs.images} has no image HDU with EXTNAME {refused[0]} (image HDUs: "
                 f"{_hdu_names(inputs.images)})" if isinstance(inputs.images, Path) else
                 f"no --image {refused[0]}=FILE is given")
        raise ValueError(f"the model needs band(s) {' '.join(refused)}: {where}; pass "
                         f"--missing-band {refused[0]} to fill it with zeros and infinite "
                         f"variance")
    given = [b for b in inputs.missing_bands if b in images]
    if given:
        raise ValueError(f"--missing-band {given[0]}: the images have band {given[0]}")
    present = [b for b in bands if b in images]
    if not present:
        raise ValueError("no band of the model is among the images")
    weights = read_planes(inputs.weights, present, "weight")
    masks = {} if inputs.masks is None else read_planes(inputs.masks, present, "mask")
    for band in present:
        for kind, planes, layout in (("weight", weights, inputs.weights),
                                     ("mask", masks, inputs.masks)):
            if layout is not None and band not in planes:
                raise ValueError(f"no {kind} plane for band {band}: " + (
                    f"{layout} has no image HDU with EXTNAME {band}" if isinstance(layout, Path)
                    else f"give --{kind} {band}=FILE"))
    first = images[present[0]]
    native_shape = first.data.shape
    reference = _wcs_of(first)
    grid = None
    if inputs.resample:
        grid = OutputGrid.over(first.header, native_shape, pixel_scale, first.where)
        reference, scale, shape = grid.wcs, pixel_scale, grid.shape
    else:
        scale, shape = pixel_scale_of(reference, first.where, pixel_scale), native_shape
    model_zp = {**inputs.model_zeropoints, **dict(model_zeropoints or {})}
    cube = np.zeros((len(bands),) + shape)
    variance = np.full((len(bands),) + shape, np.inf)
    zeropoints, psf_sources, sources = {}, [], {}
    notes = []
    for k, band in enumerate(bands):
        if band not in images:
            psf_sources.append(None)
            continue
        plane = images[band]
        if grid is None and plane.data.shape != shape:
            raise ValueError(f"image {plane.where} has shape {plane.data.shape}, image "
                             f"{first.where} {shape}: all bands must share one pixel grid "
                             f"(or pass --resample)")
        if grid is None and band != present[0]:
            check_same_grid(reference, first.where, _wcs_of(plane), plane.where, shape)
        data, weight, masked = masked_planes(plane, weights[band], masks.get(band))
        if inputs.skies is not None:
            sky, where = read_sky(inputs.skies, band, plane)
            data = data - sky
            notes.append(f"band {band}: the sky model {where} was subtracted (mean "
                         f"{np.mean(sky[~masked]):.6g}, from {sky.min():.6g} to "
                         f"{sky.max():.6g} image units)")
        elif inputs.subtract_sky:
            _, sky, _ = sigma_clipped_stats(data[~masked])
            data = data - sky
            notes.append(f"band {band}: a sky of {sky:.6g} (image units, sigma-clipped median) "
                         f"was subtracted")
        zp_image = image_zeropoint(band, plane, inputs.zeropoints)
        if band not in model_zp:
            raise ValueError(f"the model's zero point of band {band} is unknown (training runs "
                             f"do not store it): pass --zeropoint-model {band}=VALUE, the AB "
                             f"magnitude of one model unit (electron)")
        factor = 10.0 ** (0.4 * (model_zp[band] - zp_image))
        band_image = np.where(masked, 0.0, data * factor)
        band_variance = factor ** 2 / np.where(masked, 1.0, weight)
        psf: PsfSource | ResampledPsf | None = read_psf(inputs.psfs, band, plane.data.shape,
                                                        psfex_pixels)
        if psf is None:
            raise ValueError(f"no PSF for band {band}: " + (
                f"{inputs.psfs} has no image HDU with EXTNAME {band}" if isinstance(
                    inputs.psfs, Path) else f"give --psf {band}=FILE"))
        if grid is None:
            cube[k] = band_image
            variance[k] = np.where(masked, np.inf, band_variance)
        else:
            resampler = BandResampler(galsim_wcs(plane.header, plane.where), plane.data.shape,
                                      grid, plane.where)
            out_masked = resampler.masked(masked)
            cube[k] = np.where(out_masked, 0.0, resampler.draw(band_image))
            variance[k] = resampler.variance(band_variance, masked)
            psf = ResampledPsf(psf, resampler, _resampled_psf_pixels(psf, resampler, shape,
                                                                     psfex_pixels))
            if out_masked.all():
                raise ValueError(f"image {plane.where} does not overlap the output grid of "
                                 f"{first.where}")
        psf.at((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)  # a PSFEx model that cannot draw
        zeropoints[band] = (zp_image, float(model_zp[band]))
        psf_sources.append(psf)
        sources[band] = plane.where
    notes += [f"band {b} is missing: filled with zeros and infinite variance (the networks see "
              f"it as missing; no detection is flagged for it)" for b in absent]
    if grid is not None:
        notes.append(f"every band was resampled onto {shape[1]}x{shape[0]} pixels of "
                     f"{scale:.5g} arcsec over {first.where} (quintic, GalSim)")
    return SurveyImage(bands, cube, variance, reference, tuple(psf_sources), zeropoints,
                       tuple(absent), sources, scale, grid is not None, inputs.psf_at,
                       tuple(notes))
