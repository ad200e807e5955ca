"""``deblend measure``: a metadetection shape catalogue of survey FITS images.

:func:`measure_survey` reads and validates the images (:mod:`deblend.core.survey_input`), cuts
them into cells (:func:`deblend.core.cells.tile`), runs :meth:`Deblender.measure_cells` on each
(cell ``k`` with seed ``seed + k``), caches each cell's table under ``<out>.cells/`` as it
finishes, then merges them, adds ``ra``/``dec`` and writes the catalogue. Cells run on
``jobs`` processes (forked, each with the model loaded once; CPU models only).

Resuming. A cached cell (``cell-XXXXX.fits``, written aside and renamed) holds the key of what
made it: the cell's pixels, variance and PSFs, its place, the seed, views, settings and the
model's weights. An interrupted command run again reuses the cells with the same key; a cell
made with other inputs or settings, or unreadable, is measured again (with a message naming
it). The output itself is never replaced without ``force``.

The catalogue (FITS binary table, extension ``MDET``): one row per kept detection per metacal
image (``mdet_step``: noshear 1p 1m 2p 2m); ``x``, ``y`` parent-image pixels, 0-based, x =
column; ``ra``, ``dec`` degrees (ICRS or whatever the image's WCS says, from its 0-based
pixels); ``snr`` Gaussian-aperture S/N of the detection image; ``flags`` (bits in the header,
:data:`deblend.core.metadetect.FLAGS`); ``deblend_e1``, ``deblend_e2`` the raw regressor
(distortion, pixel frame); ``flux_<band>`` the reconstruction's flux and ``forced_flux_<band>``
the reconstructions fitted to the pixels (:mod:`deblend.core.photometry`), in model units (one
unit = the header's ``ZPMOD_<band>`` AB magnitude), and ``r11 r12 r21 r22`` per-object
response, all on noshear rows only (NaN elsewhere); ``cell`` the owning cell. Population
shear: :func:`population_shear_of`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from tqdm import tqdm

from deblend.core.arguments import NON_NEGATIVE_INT, require_positive_int
from deblend.core.atomic import atomic_output
from deblend.core.cell_measure import ESTIMATOR
from deblend.core.cells import CellImage, Tile, tile
from deblend.core.chunk_cache import chunk_key
from deblend.core.inference import VIEW_COUNTS, Deblender
from deblend.core.metadetect import (
    DEBLEND_CONTRAST,
    FLAGS,
    WALK_VIEWS,
    MetadetectSettings,
    metadetect_shear,
)
from deblend.core.metacal import DEFAULT_DELTA, MetacalOperator, reconvolution_sigmas
from deblend.core.outputs import mark, refuse_foreign
from deblend.core.survey_input import SurveyImage, SurveyInputs, read_survey
from deblend.core.workers import require_cpu, run_tasks, shared

CELLS_KIND = "measure-cells"
"""Marker of the cell cache directory ``<out>.cells``."""
CACHE_VERSION = 3
"""Bumped when a cached cell's table changes (2: ``forced_flux_<band>``; 3: ``size_ratio``)."""
COLUMN_NOTES = (
    "mdet_step: metacal image of the row (noshear 1p 1m 2p 2m); one row per kept detection",
    "x, y: detection centroid, parent-image pixels, 0-based, x = column (axis 1)",
    "ra, dec: degrees, the image WCS at (x, y) (0-based pixels)",
    "snr: Gaussian-aperture (sigma 2 px) S/N of the detection image",
    "size_ratio: (hsm sigma / PSF's)^2 - 1 on the detection image (stars ~0); all rows",
    "flags: bits FLAG<n> below; rows with flags == 0 enter the shear",
    "deblend_e1, deblend_e2: raw regressor, distortion, pixel frame (not sky)",
    "flux_<band>: reconstruction flux, model units (1 unit = ZPMOD_<band> AB mag); noshear",
    "forced_flux_<band>: the reconstructions fitted to the pixels jointly, same units; noshear",
    "r11 r12 r21 r22: per-object metacal response of deblend_e; noshear rows, else NaN",
    "cell: index of the cell (row by row, CELLPIX wide) that owns the detection",
    "population shear: g = R^-1 <e>_noshear, R_ij = (<e_i>_{+j} - <e_i>_{-j}) / (2 MDETDLTA)",
)

# -- the model -----------------------------------------------------------------------------------
def load_model(model_or_run: Any, device: str, jobs: int) -> Deblender:
    """A Deblender from a run directory (on the CPU when ``jobs`` > 1), or the one given."""
    if isinstance(model_or_run, Deblender):
        require_cpu(jobs, model_or_run.device)
        return model_or_run
    return Deblender.from_run(model_or_run, device="cpu" if jobs > 1 else device)


def model_identity(model: Deblender) -> str:
    """A short hash of the model's weights, response and data identity."""
    digest = hashlib.sha256(repr(model.data.to_dict()).encode())
    for module in (model.encoder, model.decoder, model.regressor):
        if module is not None:
            for name, value in module.state_dict().items():
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    if model.response is not None:
        digest.update(repr(model.response.to_dict()).encode())
    return digest.hexdigest()[:20]


def model_zero_points(model: Deblender) -> dict[str, float]:
    """The model's zero points (AB magnitude of one model unit) when its run stores them;
    training runs do not yet, so this is usually empty."""
    return dict(getattr(model.data, "zero_points", None) or {})


# -- cells and their cache -----------------------------------------------------------------------
def cell_image(survey: SurveyImage, where: Tile) -> CellImage:
    """The CellImage of one tile, with the PSF at the centre of its owned square."""
    x0, x1, y0, y1 = where.owned
    psfs = survey.psfs_at((x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0)
    return CellImage(where.cut(survey.images), where.cut(survey.variance), psfs,
                     origin=(where.read[0], where.read[2]), owned=where.owned_in_cell())


def cell_key(cell: CellImage, where: Tile, common: dict[str, Any]) -> str:
    """What a cached cell depends on: its arrays, its place and the run's ``common`` settings."""
    digest = hashlib.sha256()
    for array in (cell.images, cell.variance, cell.psfs):
        digest.update(np.ascontiguousarray(array, np.float64).tobytes())
    return chunk_key({**common, "arrays": digest.hexdigest(), "read": where.read,
                      "owned": where.owned, "index": where.index, "version": CACHE_VERSION})


def cell_path(cells_dir: Path, index: int) -> Path:
    return cells_dir / f"cell-{index:05d}.fits"


def read_cached(path: Path, key: str, log: Callable[[str], None]) -> Table | None:
    """The cached table at ``path`` made with ``key``; None (with a message) otherwise."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = Table.read(path, format="fits", character_as_bytes=False)
        rows = int(table.meta["NROWS"])
    except Exception as exc:  # a damaged file fails in astropy in many ways
        log(f"cached cell {path} is unreadable ({type(exc).__name__}): measuring it again")
        return None
    if table.meta.get("CELLKEY") != key or rows != len(table):
        log(f"cached cell {path} was made with other inputs or settings: measuring it again")
        return None
    table.meta.clear()
    return table


def write_cached(path: Path, key: str, table: Table) -> None:
    """Cache one cell's table atomically, with its key."""
    table = table.copy(copy_data=False)
    table.meta.clear()
    table.meta.update({"CELLKEY": key, "NROWS": len(table)})
    with atomic_output(path, suffix=".tmp.fits") as tmp:
        table.write(tmp, format="fits")


# -- measuring -----------------------------------------------------------------------------------
def _measure(cell: CellImage, settings: MetadetectSettings, seed: int, views: int,
             per_object: bool) -> Table:
    """One cell's metadetection catalogue with the shared model."""
    return shared().measure_cells([cell], settings, seed=seed, views=views,
                                  per_object=per_object)


def run_cells(model: Deblender, todo: list[tuple[Tile, CellImage, str]], cells_dir: Path,
              settings: MetadetectSettings, seed: int, views: int, per_object: bool,
              jobs: int, bar: tqdm) -> None:
    """Measure ``todo`` (tile, cell, key) on ``jobs`` processes
    (:func:`deblend.core.workers.run_tasks`), caching each as it ends."""
    def cache(index: int, table: Table) -> None:
        where, _, key = todo[index]
        write_cached(cell_path(cells_dir, where.index), key, table)
        bar.update()

    run_tasks(_measure, [(cell, settings, seed + where.index, views, per_object)
                         for where, cell, _ in todo], jobs, cache, shared=model)


# -- the catalogue -------------------------------------------------------------------------------
def merge_cells(tables: list[Table], tiles: list[Tile], survey: SurveyImage) -> Table:
    """The cells' tables as one catalogue with ``cell``, ``ra``, ``dec``; each row checked to
    lie in its cell's owned square (so no object is counted twice)."""
    parts = []
    for where, table in zip(tiles, tables):
        table = table.copy()
        table["cell"] = np.full(len(table), where.index, np.int32)
        x0, x1, y0, y1 = where.owned
        ix = np.floor(np.asarray(table["x"], np.float64) + 0.5)
        iy = np.floor(np.asarray(table["y"], np.float64) + 0.5)
        if not ((ix >= x0) & (ix < x1) & (iy >= y0) & (iy < y1)).all():
            raise RuntimeError(f"cell {where.index} returned detections outside its owned "
                               f"square {where.owned}: the ownership rule is broken")
        parts.append(table)
    catalogue = vstack(parts, metadata_conflicts="silent")
    catalogue["mdet_step"] = np.asarray(catalogue["mdet_step"], dtype="U7")
    ra, dec = survey.wcs.all_pix2world(np.asarray(catalogue["x"], np.float64),
                                       np.asarray(catalogue["y"], np.float64), 0)
    catalogue["ra"], catalogue["dec"] = ra, dec
    first = ["mdet_step", "cell", "x", "y", "ra", "dec", "snr", "flags"]
    catalogue = catalogue[first + [c for c in catalogue.colnames if c not in first]]
    for name, unit in (("x", "pix"), ("y", "pix"), ("ra", "deg"), ("dec", "deg")):
        catalogue[name].unit = unit
    return catalogue


def catalogue_header(survey: SurveyImage, settings: MetadetectSettings,
                     info: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(keyword, value, comment) cards documenting the catalogue (module docstring)."""
    cards: list[tuple[str, Any, str]] = [
        ("ESTIMATR", ESTIMATOR, "ellipticity columns: <ESTIMATR>_e1, _e2"),
        ("ECONVENT", "distortion, pixel frame", "e convention: (a2-b2)/(a2+b2), x = column"),
        ("MDETDLTA", settings.delta, "metacal shear step delta"),
        ("BANDS", " ".join(survey.bands), "the model's bands, in order"),
        ("PIXSCALE", survey.pixel_scale, "arcsec per pixel (image WCS)"),
        ("MISSING", " ".join(survey.missing), "bands filled with zeros, infinite variance"),
        ("PSFAT", survey.psf_at, "where PSFEx models are drawn (cell or centre)"),
        ("RESAMPLD", survey.resampled, "bands resampled onto the model's pixel grid"),
    ]
    cards += [(k.upper()[:8], v, c) for k, (v, c) in info.items()]
    for band, (zp_image, zp_model) in survey.zeropoints.items():
        cards.append((f"ZPIMG_{band.upper()}", zp_image, f"image zero point, band {band}"))
        cards.append((f"ZPMOD_{band.upper()}", zp_model, f"model zero point, band {band}"))
    for bit, meaning in FLAGS.items():
        cards.append((f"FLAG{bit}", meaning, ""))
    for key, value in asdict(settings).items():
        if isinstance(value, tuple):  # six floats to 5 digits fit one 80-character card
            value = " ".join(f"{v:.5g}" if isinstance(v, float) else str(v) for v in value)
        cards.append(("HIERARCH MDET " + key.upper(), value, ""))
    return cards


def write_catalogue(catalogue: Table, path: Path, cards: list[tuple[str, Any, str]],
                    survey: SurveyImage) -> None:
    """Write the catalogue as FITS extension MDET, atomically."""
    hdu = fits.table_to_hdu(catalogue)
    hdu.name = "MDET"
    for key, value, comment in cards:
        hdu.header[key] = (value, comment)
    for note in COLUMN_NOTES:
        hdu.header.add_comment(note)
    for band, where in survey.sources.items():
        hdu.header.add_comment(f"image {band}: {where}")
    with atomic_output(path, suffix=".tmp.fits") as tmp:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp)


def check_output(out: Path, force: bool) -> Path:
    """The cell cache directory of ``out``; refuses an existing ``out`` without ``force`` and
    a foreign cache directory."""
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; give the catalogue's file name")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    cells_dir = out.with_name(out.name + ".cells")
    refuse_foreign(cells_dir, CELLS_KIND)
    return cells_dir


def measure_survey(model_or_run: Any, inputs: SurveyInputs | SurveyImage, out_path: str | Path,
                   *, cell: int = 200, margin: int = 40, jobs: int = 1, progress: bool = True,
                   resume: bool = True, seed: int = 0, views: int = WALK_VIEWS,
                   force: bool = False,
                   per_object: bool = True, settings: MetadetectSettings | None = None,
                   target_fwhm: float | Sequence[float] | None = None,
                   hold_sky_plane: bool | None = None,
                   deblend_contrast: float | None = None, recentre: bool = True,
                   min_size_ratio: float | None = None, device: str = "auto",
                   log: Callable[[str], None] = print) -> Path:
    """Measure a survey image (module docstring) and write its catalogue to ``out_path``.

    ``model_or_run``: a Deblender or a training run directory. ``cell``, ``margin``: pixels
    (the margin at least half the model's stamp). ``resume=False`` measures every cell again.
    ``per_object=False`` leaves out the per-object response columns (``r11``...), whose dense
    per-stamp metacal operator takes about a minute to build on a CPU for each set of PSFs
    (each cell, with a PSFEx model drawn per cell). ``target_fwhm`` (arcsec, one for every
    band or one per band; ignored with ``settings``): the round Gaussian metacal reconvolves
    every band to, by default the model's (:meth:`Deblender.target_fwhm`), else each band's
    narrowest; one narrower than a cell's PSF allows is refused before anything is written.
    ``hold_sky_plane`` (ignored with ``settings``): hold each cell's fitted sky plane out of
    metacal's shear (:attr:`MetadetectSettings.hold_sky_plane`), by default as the run's
    ``metacal.hold_sky_plane`` says. ``deblend_contrast`` (ignored with ``settings``): SEP's
    deblending contrast in [0, 1] (lower splits fainter neighbours off a bright object), by
    default :data:`~deblend.core.metadetect.DEBLEND_CONTRAST`. ``recentre`` (ignored with
    ``settings``): :attr:`MetadetectSettings.recentre`, stamps recentred on their detections.
    ``min_size_ratio`` (ignored with ``settings``): the size cut
    (:attr:`MetadetectSettings.min_size_ratio`; None: none, the ``size_ratio`` column all the
    same).
    Everything is validated before anything is written. Returns the catalogue's path.
    """
    cell = require_positive_int(cell, "cell")
    margin = NON_NEGATIVE_INT.require(margin, "margin")
    jobs = require_positive_int(jobs, "jobs")
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    out = Path(out_path)
    cells_dir = check_output(out, force)
    model = load_model(model_or_run, device, jobs)
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {views!r}")
    if margin < model.stamp_pixels // 2:
        raise ValueError(f"margin must be at least {model.stamp_pixels // 2} pixels (half the "
                         f"model's {model.stamp_pixels}-pixel stamp), got {margin}")
    if hold_sky_plane is None:
        hold_sky_plane = model.metacal_hold_sky_plane
    if deblend_contrast is None:
        deblend_contrast = DEBLEND_CONTRAST
    settings = settings or MetadetectSettings(stamp_pixels=model.stamp_pixels,
                                              target_sigma=model.target_sigma(target_fwhm),
                                              hold_sky_plane=hold_sky_plane,
                                              deblend_contrast=deblend_contrast,
                                              recentre=recentre, min_size_ratio=min_size_ratio)
    survey = inputs if isinstance(inputs, SurveyImage) else read_survey(
        inputs, model.bands, model.data.pixel_scale, model_zeropoints=model_zero_points(model),
        psfex_pixels=model.stamp_pixels)
    if survey.bands != model.bands:
        raise ValueError(f"the survey image has bands {' '.join(survey.bands)}, the model "
                         f"{' '.join(model.bands)}")
    for note in survey.notes:
        log(note)
    tiles = tile(survey.shape, cell, margin)
    common = {"model": model_identity(model), "settings": repr(settings), "seed": seed,
              "views": views, "per_object": per_object}
    cells = [(where, cell_image(survey, where)) for where in tiles]
    keyed = [(where, image, cell_key(image, where, common)) for where, image in cells]
    if settings.target_sigma is not None:  # a too-narrow target is refused before writing
        for psfs in {MetacalOperator.digest(image.psfs): image.psfs for _, image in cells}.values():
            reconvolution_sigmas(psfs, settings.delta, settings.target_sigma)

    cells_dir.mkdir(parents=True, exist_ok=True)  # everything is validated: writing starts
    mark(cells_dir, CELLS_KIND)
    tables: dict[int, Table] = {}
    if resume:
        for where, _, key in keyed:
            cached = read_cached(cell_path(cells_dir, where.index), key, log)
            if cached is not None:
                tables[where.index] = cached
        if tables:
            log(f"reusing {len(tables)} of {len(tiles)} measured cells from {cells_dir}")
    todo = [item for item in keyed if item[0].index not in tables]
    with tqdm(total=len(tiles), initial=len(tiles) - len(todo), desc="measuring cells",
              unit="cell", disable=not progress) as bar:
        run_cells(model, todo, cells_dir, settings, seed, views, per_object, jobs, bar)
    for where, _, key in todo:
        table = read_cached(cell_path(cells_dir, where.index), key, log)
        if table is None:
            raise RuntimeError(f"cell {where.index} was measured but its table "
                               f"{cell_path(cells_dir, where.index)} cannot be read back")
        tables[where.index] = table
    catalogue = merge_cells([tables[w.index] for w in tiles], tiles, survey)
    info = {"CELLPIX": (cell, "cell size, pixels"), "MARGIN": (margin, "cell margin, pixels"),
            "NCELLS": (len(tiles), "cells"), "SEED": (seed, "cell k uses seed SEED + k"),
            "VIEWS": (views, "symmetric views of the regressor"),
            "OBJRESP": (per_object, "per-object response columns r11..r22 present"),
            "MODELID": (common["model"], "hash of the model's weights")}
    if not isinstance(model_or_run, Deblender):
        info["RUN"] = (str(model_or_run), "training run")
    write_catalogue(catalogue, out, catalogue_header(survey, settings, info), survey)
    log(f"wrote {len(catalogue)} rows ({int((catalogue['mdet_step'] == 'noshear').sum())} "
        f"noshear detections, {len(tiles)} cells) to {out}")
    return out


def population_shear_of(catalogue: Table | str | Path, delta: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(g_hat (2,), R (2, 2)) of a catalogue written by :func:`measure_survey` (a Table or its
    path): :func:`deblend.core.metadetect.metadetect_shear` of the ``deblend`` estimator over
    the rows with ``flags == 0``; ``delta`` defaults to the header's MDETDLTA."""
    table = catalogue if isinstance(catalogue, Table) else Table.read(
        catalogue, hdu="MDET", character_as_bytes=False)
    if delta is None:
        delta = float(table.meta.get("MDETDLTA", DEFAULT_DELTA))
    return metadetect_shear(table, ESTIMATOR, delta)
