"""Reading DES cutouts: multi-extension FITS, one FITS per band, or a stacked ``.npz``.

Formats (one object = one ``coadd_objects_id``; bands g r i z Y; pixel values and WCS read with
astropy):

1. **Multi-extension FITS**, ``<dir>/<id>.fits`` (``.fits.gz`` and ``.fits.fz`` too): one image
   HDU per band (an empty primary HDU is allowed). The band is the HDU's ``EXTNAME``, or else the
   first word of its ``FILTER`` keyword (DES writes e.g. ``FILTER = 'r DECam SDSS c0002 ...'``);
   matched case-insensitively.
2. **One FITS file per band**, ``<dir>/<id>_<band>.fits`` (e.g. ``123456_g.fits`` ...
   ``123456_Y.fits``), the image in the primary HDU or the first image HDU.
3. **Stacked npz**, ``<file>.npz`` with arrays ``images`` (N, bands, H, W) float, ``ids`` (N,)
   integer, ``bands`` (bands,) strings, ``pixel_scale`` (arcsec per pixel) and optionally
   ``jacobian`` (N, 2, 2): each cutout's local WCS Jacobian [[dE/dx, dE/dy], [dN/dx, dN/dy]] in
   degrees per pixel (see :mod:`des_validation.frames`; absent means north up, east left), and
   ``centers`` (N, 2): the object's 0-based pixel (x, y) (absent means the cutout centre).

All bands of a cutout must have the same shape. A FITS cutout's WCS is the celestial WCS of its
first band HDU that has one; its pixel scale comes from that WCS (else from ``--pixel-scale``).

Reading never raises for one bad object: an unreadable or truncated file, a missing band, NaN
pixels, or bands of different shapes give a :class:`Skip` with the reason, and the batch goes on.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from deblend.core.atomic import atomic_output

DES_BANDS = ("g", "r", "i", "z", "Y")
FITS_SUFFIXES = (".fits", ".fits.gz", ".fits.fz", ".fit")
_PER_BAND = re.compile(r"^(\d+)_([A-Za-z])\.(fits|fit)(\.gz|\.fz)?$")
_MEF = re.compile(r"^(\d+)\.(fits|fit)(\.gz|\.fz)?$")


@dataclass
class Cutout:
    """One object's images (bands, H, W) float64 in ``bands`` order, with its geometry."""

    object_id: int
    images: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    """arcsec per pixel"""
    source: str
    wcs: WCS | None = None
    jacobian: np.ndarray | None = None
    """Local WCS Jacobian (npz form); FITS cutouts compute it from :attr:`wcs`."""
    center: tuple[float, float] | None = None
    """Object's 0-based pixel (x, y) when known without a catalog (npz ``centers``)."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])  # type: ignore[return-value]


@dataclass(frozen=True)
class Skip:
    """An object left out, and why."""

    object_id: int | None
    source: str
    reason: str
    stage: str = "read"


@dataclass
class CutoutSet:
    """What a reader found: the good cutouts, the skipped objects, and notes for the report."""

    format: str
    cutouts: list[Cutout] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def canonical_band(name: str, bands: tuple[str, ...] = DES_BANDS) -> str | None:
    """The band of ``bands`` that ``name`` names (case-insensitive, first word), or None."""
    if not name:
        return None
    word = str(name).strip().split()[0] if str(name).strip() else ""
    for band in bands:
        if word.lower() == band.lower():
            return band
    return None


def read_cutouts(path: str | Path, bands: tuple[str, ...] = DES_BANDS,
                 pixel_scale: float | None = None) -> CutoutSet:
    """Read a cutout directory (MEF and/or per-band FITS) or a stacked ``.npz`` file.

    ``pixel_scale`` (arcsec) is used where a cutout has no celestial WCS.
    Raises only for a path that does not exist or an npz file that cannot be read at all.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(".npz"):
        return read_npz(path, bands)
    if path.is_dir():
        return read_directory(path, bands, pixel_scale)
    if path.exists():
        raise ValueError(f"--cutouts must be a directory of FITS files or an .npz file: {path}")
    raise FileNotFoundError(f"cutouts not found: {path}")


# -- FITS ----------------------------------------------------------------------------------------
class _BadFile(Exception):
    pass


def _open_fits(path: Path) -> list[tuple[fits.Header, np.ndarray | None]]:
    """Headers and 2-D data of every HDU of a file; _BadFile for unreadable/truncated files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                out = []
                for hdu in hdul:
                    data = getattr(hdu, "data", None) if hdu.is_image else None
                    if data is not None:
                        data = np.array(data, dtype=np.float64)
                    out.append((hdu.header.copy(), data))
        except Exception as exc:  # astropy raises many kinds for broken files
            if _truncated(caught):
                raise _BadFile(f"truncated FITS file: {_truncated(caught)}") from exc
            raise _BadFile(f"unreadable FITS file ({type(exc).__name__}: {exc})") from exc
    if _truncated(caught):
        raise _BadFile(f"truncated FITS file: {_truncated(caught)}")
    return out


def fits_problem(path: Path) -> str:
    """What makes ``path`` an unusable FITS file ("truncated FITS file: ...", "unreadable FITS
    file (...)"), or "" when every HDU reads whole."""
    try:
        _open_fits(path)
    except _BadFile as exc:
        return str(exc)
    return ""


def _truncated(caught: list[warnings.WarningMessage]) -> str:
    """astropy's 'File may have been truncated' message among caught warnings, or ''."""
    for warning in caught:
        text = str(warning.message)
        if "truncated" in text.lower():
            return text
    return ""


def _celestial_wcs(header: fits.Header) -> WCS | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header, naxis=2)
    except Exception:
        return None
    if not wcs.has_celestial:
        return None
    return wcs.celestial


def _wcs_pixel_scale(wcs: WCS) -> float:
    """Mean pixel scale (arcsec) of a celestial WCS."""
    scales = proj_plane_pixel_scales(wcs)  # degrees
    return float(np.sqrt(abs(scales[0] * scales[1])) * 3600.0)


def _assemble(object_id: int, planes: dict[str, np.ndarray], wcs: WCS | None, source: str,
              bands: tuple[str, ...], pixel_scale: float | None) -> Cutout | Skip:
    missing = [b for b in bands if b not in planes]
    if missing:
        return Skip(object_id, source, f"missing band {' '.join(missing)}")
    shapes = {planes[b].shape for b in bands}
    if len(shapes) > 1:
        return Skip(object_id, source, f"bands have different shapes {sorted(shapes)}")
    images = np.stack([planes[b] for b in bands])
    if images.ndim != 3:
        return Skip(object_id, source, f"images are not 2-D (shape {images.shape})")
    bad = [b for b, plane in zip(bands, images) if not np.all(np.isfinite(plane))]
    if bad:
        return Skip(object_id, source, f"NaN or infinite pixels in band {' '.join(bad)}")
    scale = _wcs_pixel_scale(wcs) if wcs is not None else pixel_scale
    if scale is None or not np.isfinite(scale) or scale <= 0:
        return Skip(object_id, source, "no celestial WCS and no --pixel-scale given")
    return Cutout(object_id, images, bands, float(scale), source, wcs=wcs)


def read_mef(path: Path, object_id: int, bands: tuple[str, ...] = DES_BANDS,
             pixel_scale: float | None = None) -> Cutout | Skip:
    """One multi-extension FITS cutout (one image HDU per band)."""
    try:
        hdus = _open_fits(path)
    except _BadFile as exc:
        return Skip(object_id, path.name, str(exc))
    planes: dict[str, np.ndarray] = {}
    wcs = None
    for header, data in hdus:
        if data is None or data.ndim != 2:
            continue
        band = canonical_band(header.get("EXTNAME", ""), bands) or \
            canonical_band(header.get("FILTER", ""), bands) or \
            canonical_band(header.get("BAND", ""), bands)
        if band is None:
            continue
        if band in planes:
            return Skip(object_id, path.name, f"band {band} appears twice")
        planes[band] = data
        if wcs is None:
            wcs = _celestial_wcs(header)
    return _assemble(object_id, planes, wcs, path.name, bands, pixel_scale)


def read_per_band(files: dict[str, Path], object_id: int, bands: tuple[str, ...] = DES_BANDS,
                  pixel_scale: float | None = None) -> Cutout | Skip:
    """One object stored as one FITS file per band: ``files`` maps band -> path."""
    source = f"{object_id}_<band>.fits"
    planes: dict[str, np.ndarray] = {}
    wcs = None
    for band in bands:
        if band not in files:
            continue
        try:
            hdus = _open_fits(files[band])
        except _BadFile as exc:
            return Skip(object_id, files[band].name, str(exc))
        image = next(((h, d) for h, d in hdus if d is not None and d.ndim == 2), None)
        if image is None:
            return Skip(object_id, files[band].name, "no 2-D image in the file")
        planes[band] = image[1]
        if wcs is None:
            wcs = _celestial_wcs(image[0])
    return _assemble(object_id, planes, wcs, source, bands, pixel_scale)


def read_directory(root: Path, bands: tuple[str, ...] = DES_BANDS,
                   pixel_scale: float | None = None) -> CutoutSet:
    """Every cutout of a directory, in id order; both FITS layouts may be mixed."""
    mef: dict[int, Path] = {}
    per_band: dict[int, dict[str, Path]] = {}
    result = CutoutSet(format="fits")
    for path in sorted(root.iterdir()):
        if not path.is_file() or not path.name.lower().endswith(FITS_SUFFIXES):
            continue
        if (match := _MEF.match(path.name)):
            mef[int(match.group(1))] = path
        elif (match := _PER_BAND.match(path.name)):
            band = canonical_band(match.group(2), bands)
            if band is None:
                result.notes.append(f"ignored {path.name}: band '{match.group(2)}' is not one of "
                                    f"{' '.join(bands)}")
                continue
            per_band.setdefault(int(match.group(1)), {})[band] = path
        else:
            result.skipped.append(Skip(None, path.name,
                                       "file name is neither <id>.fits nor <id>_<band>.fits"))
    both = sorted(set(mef) & set(per_band))
    if both:
        result.notes.append(f"{len(both)} ids have both a multi-extension file and per-band "
                            f"files; the multi-extension file was used")
    kinds = []
    if mef:
        kinds.append("multi-extension FITS")
    if set(per_band) - set(mef):
        kinds.append("one FITS per band")
    result.format = " + ".join(kinds) or "fits (none found)"
    for object_id in sorted(set(mef) | set(per_band)):
        if object_id in mef:
            item = read_mef(mef[object_id], object_id, bands, pixel_scale)
        else:
            item = read_per_band(per_band[object_id], object_id, bands, pixel_scale)
        (result.skipped if isinstance(item, Skip) else result.cutouts).append(item)
    return result


# -- npz -----------------------------------------------------------------------------------------
def read_npz(path: Path, bands: tuple[str, ...] = DES_BANDS) -> CutoutSet:
    """The stacked form: see the module docstring. Bad objects (NaN pixels) are skipped."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise ValueError(f"cutout file {path} is unreadable: {exc}") from exc
    for key in ("images", "ids", "bands", "pixel_scale"):
        if key not in arrays:
            raise ValueError(f"cutout file {path} lacks the array '{key}' "
                             f"(needs images, ids, bands, pixel_scale)")
    images = np.asarray(arrays["images"], dtype=np.float64)
    ids = np.asarray(arrays["ids"]).astype(np.int64)
    file_bands = [str(b) for b in np.asarray(arrays["bands"]).ravel()]
    scale = float(np.asarray(arrays["pixel_scale"]))
    if images.ndim != 4 or images.shape[0] != len(ids) or images.shape[1] != len(file_bands):
        raise ValueError(f"cutout file {path}: images {images.shape} do not match "
                         f"{len(ids)} ids and {len(file_bands)} bands")
    jacobians = arrays.get("jacobian")
    centers = arrays.get("centers")
    result = CutoutSet(format="stacked npz")
    index = {}
    for k, name in enumerate(file_bands):
        band = canonical_band(name, bands)
        if band is not None:
            index[band] = k
    missing = [b for b in bands if b not in index]
    if jacobians is None:
        result.notes.append("the npz has no 'jacobian': every cutout is taken as north up, "
                            "east left")
    for n, object_id in enumerate(ids):
        source = f"{path.name}[{n}]"
        if missing:
            result.skipped.append(Skip(int(object_id), source, f"missing band {' '.join(missing)}"))
            continue
        stack = images[n, [index[b] for b in bands]]
        bad = [b for b, plane in zip(bands, stack) if not np.all(np.isfinite(plane))]
        if bad:
            result.skipped.append(Skip(int(object_id), source,
                                       f"NaN or infinite pixels in band {' '.join(bad)}"))
            continue
        result.cutouts.append(Cutout(
            int(object_id), stack, bands, scale, source,
            jacobian=None if jacobians is None else np.asarray(jacobians[n], dtype=np.float64),
            center=None if centers is None else (float(centers[n][0]), float(centers[n][1]))))
    return result


def write_npz(path: Path, images: np.ndarray, ids: np.ndarray, bands: tuple[str, ...],
              pixel_scale: float, jacobian: np.ndarray | None = None,
              centers: np.ndarray | None = None) -> None:
    """Write the stacked form atomically (temp file, then rename)."""
    arrays = {"images": np.asarray(images, np.float32), "ids": np.asarray(ids, np.int64),
              "bands": np.array(bands, dtype="U8"), "pixel_scale": np.float64(pixel_scale)}
    if jacobian is not None:
        arrays["jacobian"] = np.asarray(jacobian, np.float64)
    if centers is not None:
        arrays["centers"] = np.asarray(centers, np.float64)
    with atomic_output(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
