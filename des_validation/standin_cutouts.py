"""A DES-like stand-in with known truth: simulated DES scenes written as DES cutouts + catalog.

Real DES data cannot be fetched on machines without internet, so tests and the demo use scenes
drawn by :mod:`simulation` for the DES survey (g r i z Y, 0.2637" pixels, DES depth and PSFs,
the target at the centre with 0-2 fainter neighbours), written in every cutout form that
:mod:`des_validation.cutouts` reads, with an im3shape-like catalog carrying the truth shapes.

Layout of the output directory::

    catalog.fits / catalog.csv  im3shape-like: coadd_objects_id, ra, dec, e_1, e_2, snr_w,
                                error_flag, info_flag (-9999 for missing shapes)
    truth.fits                  per object: pixel- and sky-frame truth, WCS orientation, case
    mef/<id>.fits               one multi-extension FITS per object (EXTNAME = band)
    per_band/<id>_<band>.fits   one FITS per band
    cutouts.npz                 stacked form (images, ids, bands, pixel_scale, jacobian)
    README.txt

Truth: the catalog's (e_1, e_2) are the simulation's labels (uniform-weight moment distortion of
the clean, isolated target summed over r i z, pixel frame) taken to the sky frame through the WCS
written with the cutout (:func:`des_validation.frames.pixel_to_sky`) and expressed as im3shape
does, shear-like (|e| = (a - b)/(a + b)). Most cutouts are north up, east left (so sky e2 = -pixel
e2); every ``mirror_every``-th has east to the right (sky e2 = pixel e2), to exercise the frame
conversion. Pixel values are in DES coadd units (MAGZERO = 30), not electrons.

Deliberate defects, so that cuts and skips are exercised: rows with e = -9999 or NaN, non-zero
error_flag / info_flag (and natural snr_w <= 20); and five bad objects whose catalog rows pass
the cuts: a truncated FITS file, NaN pixels, a missing Y band, a cutout too small for the crop,
and a cutout whose id has no catalog row. The npz holds only the last two kinds (its stamps
share one shape and it has no files to truncate).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from deblend.core.atomic import atomic_output, write_text_atomic
from deblend.core.config import Config, SimulationConfig
from deblend.core.outputs import claim_directory, is_ours, replace_directory
from des_validation.cutouts import DES_BANDS, write_npz
from des_validation.frames import distortion_to_shear, local_jacobian, pixel_to_sky
from simulation.builder import SceneSource
from simulation.conditions import at_nominal_conditions

STANDIN_KIND = "des-standin"
"""The kind of output a stand-in directory is (:mod:`deblend.core.outputs`)."""
ID_OFFSET = 3_000_000_000
MAGZERO = 30.0
BAD_CASES = ("truncated", "nan_pixels", "missing_band", "too_small", "no_catalog_row")


@dataclass(frozen=True)
class StandinInfo:
    """Where the stand-in was written and what it holds."""

    root: Path
    n_objects: int
    ids: np.ndarray
    bad: dict[str, int]
    """case -> object id of each deliberately bad object"""
    catalog: Path
    mef_dir: Path
    per_band_dir: Path
    npz: Path


def standin_simulation(config: Config) -> SimulationConfig:
    """The simulation settings of the stand-in: the config's, forced to DES geometry, at DES's
    nominal conditions."""
    sim = at_nominal_conditions(config.simulation)
    changes = {"survey": "DES", "target_max_mag": config.des.standin_target_max_mag}
    if sim.survey != "DES":
        changes.update(label_bands=("r", "i", "z"), ref_band="i")
    return dataclasses.replace(sim, **changes)


def make_wcs(ra: float, dec: float, shape: tuple[int, int], pixel_scale: float,
             east_left: bool = True) -> WCS:
    """TAN WCS with the object (ra, dec) at the cutout centre; north up, east left or right."""
    height, width = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(width + 1) / 2.0, (height + 1) / 2.0]
    s = pixel_scale / 3600.0
    wcs.wcs.cd = [[-s if east_left else s, 0.0], [0.0, s]]
    return wcs


def _snr_w(clean: np.ndarray, sky: float) -> np.ndarray:
    """Matched-filter S/N of the noiseless target (N, H, W) over sky + galaxy Poisson noise."""
    clean = np.clip(clean.astype(np.float64), 0.0, None)
    return np.sqrt((clean ** 2 / (sky + clean)).sum(axis=(1, 2)))


def _band_header(band: str, wcs: WCS, object_id: int) -> fits.Header:
    header = wcs.to_header()
    header["EXTNAME"] = band
    header["FILTER"] = f"{band} DECam SDSS"
    header["MAGZERO"] = (MAGZERO, "AB zero point of the pixel values")
    header["BUNIT"] = "flux (MAGZERO 30)"
    header["OBJID"] = (object_id, "coadd_objects_id")
    return header


def _write_fits(path: Path, hdul: fits.HDUList) -> None:
    with atomic_output(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def _write_table(table: Table, path: Path, fmt: str) -> None:
    """Write ``table`` through :func:`atomic_output` (a full disk names ``path``)."""
    with atomic_output(path, suffix=".tmp" + path.suffix) as tmp:
        table.write(tmp, format=fmt, overwrite=True)


def standin_is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished stand-in (it is built aside and renamed when done)."""
    return is_ours(out, STANDIN_KIND)


def write_standin(out: str | Path, config: Config | None = None, n: int | None = None,
                  seed: int | None = None, stamp_pixels: int = 45, mirror_every: int = 5,
                  force: bool = False, log=print) -> StandinInfo:
    """Draw ``n`` DES-like scenes (+5 bad ones) and write the stand-in under ``out``.

    The directory is built as ``<out>.tmp`` and renamed at the end; an existing ``out`` is
    refused unless ``force``.
    """
    config = config or Config()
    n = config.des.n_standin if n is None else n
    seed = config.des.standin_seed if seed is None else seed
    if n < 1:
        raise ValueError("the stand-in needs at least one object")
    out = Path(out)
    claim_directory(out, STANDIN_KIND, force)
    sim = dataclasses.replace(standin_simulation(config), stamp_pixels=stamp_pixels)
    source = SceneSource(sim)
    bands = source.geometry.bands
    if tuple(bands) != DES_BANDS:
        raise ValueError(f"the stand-in needs DES bands {DES_BANDS}, got {bands}")
    pixel_scale = source.geometry.pixel_scale
    total = n + len(BAD_CASES)
    log(f"drawing {total} DES-like scenes ({' '.join(bands)}, {pixel_scale}\" pixels)")
    scenes, labels = source.draw(total, seed)

    # electrons -> DES coadd units (MAGZERO 30), per band, from the targets' magnitudes
    to_des = np.array([np.median(10 ** (0.4 * (MAGZERO - labels[f"mag_{b}"].astype(np.float64)))
                                 / labels[f"flux_{b}"]) for b in bands])
    images = scenes.blend.astype(np.float64) * to_des[None, :, None, None]
    sky = source.drawer(seed).sky_levels
    r = bands.index("r")
    snr = _snr_w(scenes.clean[:, r], sky[r])

    rng = np.random.default_rng(seed)
    ids = ID_OFFSET + np.arange(total, dtype=np.int64) * 7 + rng.integers(0, 7, total)
    ra = rng.uniform(60.0, 80.0, total)
    dec = rng.uniform(-60.0, -45.0, total)
    east_left = np.ones(total, bool)
    if mirror_every > 0:
        east_left[mirror_every - 1::mirror_every] = False
    shape = images.shape[-2:]
    wcses = [make_wcs(ra[k], dec[k], shape, pixel_scale, bool(east_left[k])) for k in range(total)]
    center = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    jac = np.stack([local_jacobian(w, *center) for w in wcses])
    e1_pix = labels["e1"].astype(np.float64)
    e2_pix = labels["e2"].astype(np.float64)
    e1_sky, e2_sky = pixel_to_sky(e1_pix, e2_pix, jac)
    g1_sky, g2_sky = distortion_to_shear(e1_sky, e2_sky)

    # catalog defects among the good objects (deterministic), never on the bad objects
    case = np.array([""] * total, dtype=object)
    good = np.arange(n)
    e_1, e_2 = g1_sky.copy(), g2_sky.copy()
    error_flag = np.zeros(total, np.int32)
    info_flag = np.zeros(total, np.int32)
    n_defect = max(1, n // 30)
    picks = rng.permutation(good)
    missing_e = picks[:n_defect]
    e_1[missing_e], e_2[missing_e] = -9999.0, -9999.0
    if n_defect > 1:
        e_2[missing_e[-1]] = np.nan
    error_flag[picks[n_defect:2 * n_defect]] = 1
    info_flag[picks[2 * n_defect:3 * n_defect]] = 2
    bad = {name: int(ids[n + k]) for k, name in enumerate(BAD_CASES)}
    snr_w = snr.copy()
    for k, name in enumerate(BAD_CASES):
        case[n + k] = name
        snr_w[n + k] = max(snr_w[n + k], 50.0)  # bad objects must reach the reader

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "mef").mkdir(parents=True)
    (tmp / "per_band").mkdir()
    for k in range(total):
        object_id = int(ids[k])
        planes = images[k].copy()
        wcs = wcses[k]
        keep_bands = list(bands)
        if case[k] == "nan_pixels":
            planes[r, 20:23, 20:23] = np.nan
        if case[k] == "missing_band":
            keep_bands.remove("Y")
        if case[k] == "too_small":
            planes = planes[:, 10:35, 10:35]
            wcs = make_wcs(ra[k], dec[k], planes.shape[-2:], pixel_scale, bool(east_left[k]))
        primary = fits.PrimaryHDU()
        primary.header["OBJID"] = (object_id, "coadd_objects_id")
        primary.header["COMMENT"] = "deblend DES-like stand-in (simulated; not DES data)"
        hdus = [primary]
        for b, band in enumerate(bands):
            if band not in keep_bands:
                continue
            header = _band_header(band, wcs, object_id)
            hdus.append(fits.ImageHDU(planes[b].astype(np.float32), header=header))
            single = fits.PrimaryHDU(planes[b].astype(np.float32), header=header)
            del single.header["EXTNAME"]
            _write_fits(tmp / "per_band" / f"{object_id}_{band}.fits", fits.HDUList([single]))
        _write_fits(tmp / "mef" / f"{object_id}.fits", fits.HDUList(hdus))
        if case[k] == "truncated":
            for path in (tmp / "mef" / f"{object_id}.fits", tmp / "per_band" / f"{object_id}_r.fits"):
                data = path.read_bytes()
                path.write_bytes(data[: len(data) - 4000])

    in_npz = np.array([c in ("", "nan_pixels", "no_catalog_row") for c in case])
    npz_images = images.copy()
    npz_images[case == "nan_pixels", r, 20:23, 20:23] = np.nan
    write_npz(tmp / "cutouts.npz", npz_images[in_npz], ids[in_npz], bands, pixel_scale,
              jacobian=jac[in_npz])

    in_catalog = case != "no_catalog_row"
    catalog = Table({
        "COADD_OBJECTS_ID": ids[in_catalog], "RA": ra[in_catalog], "DEC": dec[in_catalog],
        "E_1": e_1[in_catalog], "E_2": e_2[in_catalog], "SNR_W": snr_w[in_catalog],
        "ERROR_FLAG": error_flag[in_catalog], "INFO_FLAG": info_flag[in_catalog]})
    catalog.meta["COMMENT"] = "deblend DES-like stand-in: im3shape-like catalog (simulated)"
    _write_table(catalog, tmp / "catalog.fits", "fits")
    _write_table(catalog, tmp / "catalog.csv", "ascii.csv")
    truth = Table({
        "coadd_objects_id": ids, "case": np.array([c or "good" for c in case]),
        "e1_pixel": e1_pix, "e2_pixel": e2_pix, "e1_sky": e1_sky, "e2_sky": e2_sky,
        "g1_sky": g1_sky, "g2_sky": g2_sky, "east_left": east_left,
        "hsm_e1_pixel": labels["hsm_e1"], "hsm_e2_pixel": labels["hsm_e2"],
        "snr_w": snr, "mag_i": labels["mag_i"], "redshift": labels["redshift"],
        "n_galaxies": labels["n_galaxies"]})
    _write_table(truth, tmp / "truth.fits", "fits")
    write_text_atomic(tmp / "README.txt", _readme(n, seed, sim, bad, pixel_scale))
    replace_directory(tmp, out, STANDIN_KIND)
    log(f"wrote the stand-in ({n} objects + {len(BAD_CASES)} bad ones) to {out}")
    return StandinInfo(out, n, ids, bad, out / "catalog.fits", out / "mef", out / "per_band",
                       out / "cutouts.npz")


def _readme(n: int, seed: int, sim: SimulationConfig, bad: dict[str, int], scale: float) -> str:
    lines = [
        "DES-like stand-in written by des_validation.standin (SIMULATED, not DES data).",
        f"{n} objects drawn with seed {seed}: survey {sim.survey}, {scale}\" pixels, "
        f"{sim.stamp_pixels}x{sim.stamp_pixels} cutouts, targets {sim.ref_band} < "
        f"{sim.target_max_mag}, 0-{sim.max_neighbours} neighbours.",
        "catalog e_1/e_2: sky frame (x east, y north), shear-like |e|=(a-b)/(a+b); truth.fits "
        "holds the pixel-frame distortions they come from.",
        "Deliberately bad objects: " + ", ".join(f"{k} = {v}" for k, v in bad.items()),
    ]
    return "\n".join(lines) + "\n"
