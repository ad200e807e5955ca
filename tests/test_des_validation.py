"""DES validation: catalog cuts, cutout readers, frames, preparation, stand-in, end-to-end CLI."""

from __future__ import annotations

import json
from pathlib import Path

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from deblend.core.config import Config, DESConfig, config_from_dict
from deblend.core.normalization import NormalizationConstants, normalize, rescale
from deblend.core.shapes import hsm_shapes, moments_ellipticity
from deblend.core.stamps import cut_stamp
from des_validation.catalog import apply_cuts, read_catalog
from des_validation.cutouts import DES_BANDS, read_cutouts, write_npz
from des_validation.frames import (
    distortion_to_shear,
    local_jacobian,
    orientation,
    pixel_to_sky,
    shear_to_distortion,
    sky_to_pixel,
    standard_jacobian,
)
from des_validation.prepare import (
    apply_band_map,
    crop_fits,
    des_constants,
    map_bands,
    prepare_stamps,
    resample_image,
    stamp_from_cutout,
)
from des_validation.standin_cutouts import BAD_CASES, make_wcs, write_standin
from evaluation.results import DESValidationResult

LSST_BANDS = ("u", "g", "r", "i", "z", "y")
SCALE = 0.2637


# -- catalog -------------------------------------------------------------------------------------
def hand_table(with_flags: bool = True) -> Table:
    """12 rows with known cut failures; column names in mixed case."""
    e1 = [0.1, -9999, np.nan, 0.8, 0.2, 0.1, 0.3, -0.2, 0.05, 0.1, 0.2, 0.1]
    e2 = [0.1, -9999, 0.1, 0.7, 0.1, 0.2, -0.1, 0.1, 0.05, 0.1, 0.1, 0.1]
    snr = [50, 50, 50, 50, 10, 20, 30, 40, 25, 60, 70, 80]
    table = Table({"COADD_OBJECTS_ID": np.arange(100, 112), "Ra": np.linspace(60, 61, 12),
                   "DEC": np.linspace(-50, -49, 12), "E_1": e1, "e_2": e2, "SNR_W": snr})
    table["COADD_OBJECTS_ID"][11] = 110  # a duplicate id
    if with_flags:
        table["Error_Flag"] = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
        table["INFO_FLAG"] = [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]
    return table


def cut_counts(selection) -> dict[str, int | None]:
    return {c.name: (c.removed if c.applied else None) for c in selection.cuts}


@pytest.mark.parametrize("suffix", [".fits", ".csv"])
def test_catalog_cuts_counts_fits_and_csv(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cat{suffix}"
    hand_table().write(path, format="fits" if suffix == ".fits" else "ascii.csv")
    table = read_catalog(path)
    assert {"coadd_objects_id", "ra", "dec", "e_1", "e_2", "snr_w", "error_flag",
            "info_flag"} <= set(table.colnames)
    selection = apply_cuts(table, DESConfig())
    # -9999, NaN and |e| >= 1 (0.8, 0.7) are missing; snr 10 and 20 fail "> 20"
    assert cut_counts(selection) == {"valid_e": 3, "snr_w": 2, "error_flag": 1, "info_flag": 1,
                                     "duplicate_id": 1}
    assert selection.n_input == 12
    assert list(selection.table["coadd_objects_id"]) == [100, 108, 109, 110]


def test_catalog_cuts_follow_config_and_absent_flags(tmp_path: Path) -> None:
    path = tmp_path / "noflags.csv"
    hand_table(with_flags=False).write(path, format="ascii.csv")
    selection = apply_cuts(read_catalog(path), DESConfig(min_snr=30.0))
    counts = cut_counts(selection)
    assert counts["error_flag"] is None and counts["info_flag"] is None  # absent: not applied
    assert counts["snr_w"] == 4  # 10, 20, 25, 30 fail "> 30"
    assert "column absent" in selection.cuts[2].rule
    relaxed = apply_cuts(read_catalog(tmp_path / "noflags.csv"),
                         DESConfig(require_error_flag_zero=False))
    assert "disabled" in relaxed.cuts[2].rule


def test_catalog_errors_are_clear(tmp_path: Path) -> None:
    table = hand_table()
    table.remove_column("SNR_W")
    table.write(tmp_path / "bad.fits")
    with pytest.raises(ValueError, match="snr_w"):
        read_catalog(tmp_path / "bad.fits")
    (tmp_path / "junk.fits").write_bytes(b"not a fits file")
    with pytest.raises(ValueError, match="unreadable"):
        read_catalog(tmp_path / "junk.fits")
    with pytest.raises(FileNotFoundError):
        read_catalog(tmp_path / "absent.fits")


def test_des_config_section() -> None:
    config = config_from_dict({"des": {"u_strategy": "g_copy", "resample": False}})
    assert config.des.u_strategy == "g_copy" and not config.des.resample
    with pytest.raises(ValueError, match="des.u_strategy"):
        config_from_dict({"des": {"u_strategy": "guess"}})


# -- cutout readers --------------------------------------------------------------------------------
def band_image(k: int, shape=(40, 40)) -> np.ndarray:
    return np.full(shape, float(k + 1), np.float32)


def write_mef(path: Path, bands=DES_BANDS, key: str = "EXTNAME", shape=(40, 40)) -> None:
    wcs = make_wcs(70.0, -50.0, shape, SCALE)
    hdus = [fits.PrimaryHDU()]
    for k, band in enumerate(bands):
        header = wcs.to_header()
        if key == "EXTNAME":
            header["EXTNAME"] = band
        else:
            header["FILTER"] = f"{band} DECam SDSS c0001 4720.0 1520.0"
        hdus.append(fits.ImageHDU(band_image(k, shape), header=header))
    fits.HDUList(hdus).writeto(path)


def test_mef_reader_extname_filter_and_bad_files(tmp_path: Path) -> None:
    write_mef(tmp_path / "1.fits")
    write_mef(tmp_path / "2.fits", key="FILTER")
    write_mef(tmp_path / "3.fits", bands=("g", "r", "i", "z"))  # no Y
    write_mef(tmp_path / "4.fits")
    data = (tmp_path / "4.fits").read_bytes()
    (tmp_path / "4.fits").write_bytes(data[:-3000])  # truncated
    (tmp_path / "5.fits").write_bytes(b"garbage" * 100)
    write_mef(tmp_path / "6.fits")
    with fits.open(tmp_path / "6.fits", mode="update") as hdul:
        hdul[2].data[3, 3] = np.nan
    (tmp_path / "notes.fits").write_bytes(b"")
    result = read_cutouts(tmp_path)
    assert [c.object_id for c in result.cutouts] == [1, 2]
    for cutout in result.cutouts:
        assert cutout.bands == DES_BANDS
        assert cutout.images.shape == (5, 40, 40)
        assert np.allclose(cutout.images[:, 0, 0], [1, 2, 3, 4, 5])  # band order g r i z Y
        assert cutout.wcs is not None and abs(cutout.pixel_scale - SCALE) < 1e-6
    reasons = {s.object_id: s.reason for s in result.skipped}
    assert reasons[3] == "missing band Y"
    assert reasons[4].startswith("truncated FITS file")
    assert reasons[5].startswith("unreadable FITS file")
    assert reasons[6] == "NaN or infinite pixels in band r"
    assert "neither" in reasons[None]


def test_per_band_reader_and_truncated_band(tmp_path: Path) -> None:
    shape = (36, 36)
    wcs = make_wcs(70.0, -50.0, shape, SCALE)
    for object_id in (11, 12, 13):
        for k, band in enumerate(DES_BANDS):
            if object_id == 13 and band == "z":
                continue
            fits.PrimaryHDU(band_image(k, shape), header=wcs.to_header()).writeto(
                tmp_path / f"{object_id}_{band}.fits")
    data = (tmp_path / "12_i.fits").read_bytes()
    (tmp_path / "12_i.fits").write_bytes(data[:3500])
    result = read_cutouts(tmp_path)
    assert result.format == "one FITS per band"
    assert [c.object_id for c in result.cutouts] == [11]
    assert np.allclose(result.cutouts[0].images[:, 5, 5], [1, 2, 3, 4, 5])
    reasons = {s.object_id: s.reason for s in result.skipped}
    assert reasons[12].startswith("truncated FITS file") and "12_i.fits" in \
        [s.source for s in result.skipped]
    assert reasons[13] == "missing band z"


def test_npz_reader_roundtrip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(size=(3, 5, 20, 20))
    images[1, 4, 0, 0] = np.nan
    jac = np.stack([standard_jacobian(SCALE)] * 3)
    write_npz(tmp_path / "c.npz", images, np.array([7, 8, 9]), DES_BANDS, SCALE, jacobian=jac)
    result = read_cutouts(tmp_path / "c.npz")
    assert [c.object_id for c in result.cutouts] == [7, 9]
    assert np.allclose(result.cutouts[1].images, images[2])
    assert np.allclose(result.cutouts[0].jacobian, jac[0])
    assert result.skipped[0].object_id == 8 and "band Y" in result.skipped[0].reason
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(ValueError, match="ids"):
        read_cutouts(tmp_path / "bad.npz")


# -- frames --------------------------------------------------------------------------------------
def wcs_with_cd(cd: np.ndarray, shape=(45, 45)) -> WCS:
    wcs = make_wcs(70.0, -50.0, shape, SCALE)
    wcs.wcs.cd = cd
    return wcs


def draw_sky_elongated(wcs: WCS, g_sky: tuple[float, float], shape=(45, 45)) -> np.ndarray:
    """An elliptical Gaussian whose *sky-frame* shear is ``g_sky``, drawn on the pixel grid of
    ``wcs`` (through GalSim's JacobianWCS built from the astropy WCS's local Jacobian)."""
    x0, y0 = (shape[1] - 1) / 2, (shape[0] - 1) / 2
    jac = local_jacobian(wcs, x0, y0) * 3600.0  # arcsec per pixel, (east, north) per (x, y)
    # GalSim's world (u, v) is taken here to be (east, north): the sky frame of im3shape
    gs_wcs = galsim.JacobianWCS(jac[0, 0], jac[0, 1], jac[1, 0], jac[1, 1])
    profile = galsim.Gaussian(sigma=1.0).shear(g1=g_sky[0], g2=g_sky[1])
    return profile.drawImage(nx=shape[1], ny=shape[0], wcs=gs_wcs, method="no_pixel").array


@pytest.mark.parametrize("east_left", [True, False])
def test_e2_flip_follows_wcs_handedness(east_left: bool) -> None:
    s = SCALE / 3600
    wcs = wcs_with_cd(np.array([[-s if east_left else s, 0.0], [0.0, s]]))
    jac = local_jacobian(wcs, 22.0, 22.0)
    assert orientation(jac) == f"north up, east {'left' if east_left else 'right'}"
    e_sky = (0.2, 0.3)
    e_pix = sky_to_pixel(*e_sky, jac)
    assert np.isclose(e_pix[0], 0.2)
    assert np.isclose(e_pix[1], -0.3 if east_left else 0.3)
    # physical check: an object elongated in the sky frame, drawn through the WCS and measured
    g_sky = (0.15, 0.25)
    image = draw_sky_elongated(wcs, g_sky)
    measured = moments_ellipticity(image)
    expected = sky_to_pixel(*shear_to_distortion(*g_sky), jac)
    assert np.allclose(measured, expected, atol=0.01)
    assert np.sign(measured[1]) == (-1 if east_left else 1)
    back = pixel_to_sky(*e_pix, jac)
    assert np.allclose(back, e_sky)


def test_rotated_wcs_rotates_ellipticity() -> None:
    s = SCALE / 3600
    angle = np.deg2rad(30.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    wcs = wcs_with_cd(np.diag([-s, s]) @ rot)
    jac = local_jacobian(wcs, 22.0, 22.0)
    image = draw_sky_elongated(wcs, (0.2, -0.1))
    assert np.allclose(moments_ellipticity(image),
                       sky_to_pixel(*shear_to_distortion(0.2, -0.1), jac), atol=0.01)
    assert np.isclose(np.hypot(*sky_to_pixel(0.3, 0.4, jac)), 0.5)


def test_shear_distortion_roundtrip() -> None:
    g = np.array([0.0, 0.1, 0.3, -0.5]), np.array([0.2, -0.1, 0.4, 0.1])
    e = shear_to_distortion(*g)
    assert np.allclose(distortion_to_shear(*e), g)
    # b/a = (1-g)/(1+g) and e = (a^2-b^2)/(a^2+b^2)
    q = (1 - 0.3) / (1 + 0.3)
    assert np.isclose(shear_to_distortion(0.3, 0.0)[0], (1 - q * q) / (1 + q * q))


# -- preparation ---------------------------------------------------------------------------------
def test_resampling_preserves_flux_and_ellipticity() -> None:
    psf = galsim.Gaussian(fwhm=0.9)
    profile = galsim.Convolve(galsim.Exponential(half_light_radius=0.7, flux=2500.0)
                              .shear(g1=0.25, g2=-0.15), psf)
    des = profile.drawImage(nx=45, ny=45, scale=SCALE).array
    resampled = resample_image(des, SCALE, 0.2, 45)
    direct = profile.drawImage(nx=45, ny=45, scale=0.2).array
    assert resampled.shape == (45, 45)
    assert abs(resampled.sum() / des.sum() - 1) < 0.005
    shapes = hsm_shapes(np.stack([resampled, direct]))
    assert np.allclose(shapes.e1[0], shapes.e1[1], atol=0.005)
    assert np.allclose(shapes.e2[0], shapes.e2[1], atol=0.005)
    assert np.argmax(resampled) == np.argmax(direct) == 22 * 45 + 22
    # an off-centre object is brought to the stamp centre
    shifted = profile.shift(3 * SCALE, -2 * SCALE).drawImage(nx=45, ny=45, scale=SCALE).array
    recentred = resample_image(shifted, SCALE, 0.2, 45, center=(25.0, 20.0))
    assert np.abs(recentred - resampled).max() < 1e-3 * resampled.max()


def test_a_crop_without_resampling_is_recentred_on_the_object() -> None:
    """``--no-resample``: the DES-pixel crop is moved by the object's sub-pixel offset, so a
    galaxy 0.37 and -0.29 pixels off a pixel centre comes out as the same galaxy drawn on the
    central pixel's centre (to 1e-3 of its peak; flux kept), where the crop around the nearest
    pixel misses by a tenth of the peak (0.099)."""
    profile = galsim.Convolve(galsim.Exponential(half_light_radius=0.7, flux=2500.0)
                              .shear(g1=0.25, g2=-0.15), galsim.Gaussian(fwhm=0.9))
    off = profile.drawImage(nx=61, ny=61, scale=SCALE, offset=(0.37, -0.29)).array
    centre = (30.37, 29.71)
    centred = profile.drawImage(nx=45, ny=45, scale=SCALE).array
    stamp = stamp_from_cutout(off[None], SCALE, SCALE, 45, centre, resample=False)[0]
    assert stamp.shape == (45, 45)
    assert np.abs(stamp - centred).max() < 1e-3 * centred.max()
    assert stamp.sum() == pytest.approx(centred.sum(), rel=1e-3)
    assert np.abs(cut_stamp(off, *centre, 45) - centred).max() > 0.05 * centred.max()


def test_crop_geometry() -> None:
    assert crop_fits((45, 45), (22, 22), SCALE, 0.2, 45, resample=True) is None
    assert crop_fits((45, 45), (22, 22), SCALE, SCALE, 45, resample=False) is None
    assert "too small" in crop_fits((30, 30), (14.5, 14.5), SCALE, 0.2, 45, resample=True)
    assert "too small" in crop_fits((45, 45), (24, 22), SCALE, SCALE, 45, resample=False)
    image = np.arange(50 * 50, dtype=float).reshape(50, 50)
    crop = cut_stamp(image, 24.6, 24.4, 45)
    assert crop.shape == (45, 45) and crop[22, 22] == image[24, 25]


def test_band_map_u_strategies_and_normalisation() -> None:
    mapping = map_bands(DES_BANDS, LSST_BANDS)
    assert mapping.sources == (None, "g", "r", "i", "z", "Y") and mapping.filled == ("u",)
    rng = np.random.default_rng(1)
    des = rng.uniform(0.5, 2.0, size=(4, 5, 8, 8))
    zeros = apply_band_map(des, DES_BANDS, mapping, "zeros")
    assert np.all(zeros[:, 0] == 0) and np.allclose(zeros[:, 5], des[:, 4])
    assert np.allclose(apply_band_map(des, DES_BANDS, mapping, "g_copy")[:, 0], des[:, 0])
    assert np.allclose(apply_band_map(des, DES_BANDS, mapping, "g_extrapolate", 0.1)[:, 0],
                       0.1 * des[:, 0])
    with pytest.raises(ValueError, match="u strategy"):
        apply_band_map(des, DES_BANDS, mapping, "invent")
    training = NormalizationConstants(LSST_BANDS, (400.0, 6000.0, 20000.0, 20000.0, 15000.0,
                                                   9000.0))
    images = apply_band_map(des, DES_BANDS, mapping, "g_extrapolate", 0.1)
    constants = des_constants(images, mapping, training)
    maxima = images.max(axis=(2, 3)).mean(axis=0)
    assert np.allclose(constants.max_values[1:], maxima[1:])
    assert np.isclose(constants.max_values[0], maxima[1] * 400.0 / 6000.0)
    # feeding rescaled raw images to a model normalising with ``training`` is the same as
    # normalising the originals with the DES constants
    rescaled = rescale(images, constants, training)
    assert np.allclose(normalize(rescaled, training), normalize(images, constants))
    # and rescaling back inverts it (the reconstruction's way back to DES units)
    assert np.allclose(rescale(rescaled, training, constants), images)


def test_prepare_stamps_skips_small_cutouts(tmp_path: Path) -> None:
    write_mef(tmp_path / "1.fits", shape=(45, 45))
    write_mef(tmp_path / "2.fits", shape=(25, 25))
    cutouts = read_cutouts(tmp_path).cutouts
    prepared = prepare_stamps(cutouts, [(22.0, 22.0), (12.0, 12.0)], 0.2, 45, resample=True)
    assert list(prepared.ids) == [1] and prepared.stamps.shape == (1, 5, 45, 45)
    assert prepared.skipped[0].object_id == 2 and "too small" in prepared.skipped[0].reason


# -- stand-in and end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("des") / "standin"
    config = Config().replace("des", n_standin=30, standin_seed=5)
    return write_standin(root, config, log=lambda _: None)


def test_standin_layout_and_truth_frames(standin) -> None:
    root = standin.root
    assert (root / "catalog.fits").is_file() and (root / "catalog.csv").is_file()
    assert len(list((root / "mef").glob("*.fits"))) == 35
    assert len(list((root / "per_band").glob("*.fits"))) == 35 * 5 - 1  # one lacks Y
    catalog = read_catalog(root / "catalog.fits")
    assert standin.bad["no_catalog_row"] not in set(catalog["coadd_objects_id"])
    assert (catalog["e_1"] == -9999).any() and (catalog["error_flag"] != 0).any()
    truth = Table.read(root / "truth.fits")
    assert set(truth["east_left"]) == {True, False}
    # catalog (sky, shear-like) -> distortion -> pixel frame through each cutout's WCS gives
    # back the simulation's pixel-frame labels, for both handedness
    found = read_cutouts(root / "mef")
    by_id = {c.object_id: c for c in found.cutouts}
    rows = {int(i): k for k, i in enumerate(catalog["coadd_objects_id"])}
    checked = {True: 0, False: 0}
    for t in truth:
        object_id = int(t["coadd_objects_id"])
        if object_id not in by_id or object_id not in rows:
            continue
        k = rows[object_id]
        if catalog["e_1"][k] == -9999 or not np.isfinite(catalog["e_2"][k]):
            continue
        jac = local_jacobian(by_id[object_id].wcs, 22.0, 22.0)
        e_pix = sky_to_pixel(*shear_to_distortion(catalog["e_1"][k], catalog["e_2"][k]), jac)
        assert np.allclose(e_pix, (t["e1_pixel"], t["e2_pixel"]), atol=1e-4)
        assert np.isclose(t["e2_sky"], -t["e2_pixel"] if t["east_left"] else t["e2_pixel"])
        checked[bool(t["east_left"])] += 1
    assert checked[True] > 5 and checked[False] > 0
    with pytest.raises(FileExistsError):
        write_standin(root, Config(), n=3, log=lambda _: None)


def run_validate(args: list[str], capsys) -> tuple[int, str]:
    from des_validation.validate import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_validate_cli_end_to_end(standin, trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "val"
    args = ["--run", str(trained_run), "--catalog", str(standin.catalog),
            "--cutouts", str(standin.mef_dir), "--out", str(out)]
    code, text = run_validate(args, capsys)
    assert code == 0, text
    for name in ("des_scatter.png", "des_delta_e.png", "des_distributions.png",
                 "des_pixel_distributions.png", "des_gallery.png"):
        assert (out / name).stat().st_size > 1000, name
    metrics = json.loads((out / "metrics.json").read_text())
    typed = DESValidationResult.read(out)  # the typed result reads back losslessly
    assert typed.to_dict() == metrics and typed.estimators["regressor"].stats.n_valid > 10
    for name in ("regressor", "recon_moments"):
        stats = metrics["estimators"][name]
        for comp in ("e1", "e2"):
            assert isinstance(stats[comp]["slope"], float)
            assert isinstance(stats[comp]["rmse"], float) and stats[comp]["rmse"] >= 0
    # the no-deblending baseline (HSM on the DES stamp) follows the truth in both components:
    # the sky -> pixel conversion is right for both WCS handedness of the stand-in
    for comp in ("e1", "e2"):
        assert metrics["estimators"]["des_hsm"][comp]["slope"] > 0.6
    assert set(metrics["orientation"]) == {"north up, east left", "north up, east right"}
    skipped = {s["id"]: s["reason"] for s in metrics["skipped"]}
    bad = standin.bad
    assert skipped[bad["truncated"]].startswith("truncated FITS file")
    assert skipped[bad["nan_pixels"]].startswith("NaN or infinite pixels")
    assert skipped[bad["missing_band"]] == "missing band Y"
    assert skipped[bad["too_small"]].startswith("cutout too small for the crop")
    assert skipped[bad["no_catalog_row"]] == "id without a catalog row"
    assert metrics["counts"]["skipped"] == len(BAD_CASES)
    assert metrics["counts"]["validated"] > 10
    assert {c["name"] for c in metrics["cuts"] if c["removed"] > 0} >= {"valid_e", "error_flag",
                                                                       "info_flag"}
    report = (out / "report.md").read_text()
    assert "id without a catalog row" in report and "truncated FITS file" in report
    assert "north up, east right" in report
    assert (out / "skipped.csv").read_text().count("\n") == len(BAD_CASES) + 1
    # never overwritten without --force
    code, text = run_validate(args, capsys)
    assert code == 2 and "--force" in text


def test_validate_with_no_object_left_reports_it_without_a_traceback(standin, trained_run: Path,
                                                                     tmp_path: Path,
                                                                     capsys) -> None:
    """An empty result set (no object survives the cuts) is a report saying so, exit 1."""
    out = tmp_path / "val_empty"
    code, text = run_validate(["--run", str(trained_run), "--catalog", str(standin.catalog),
                               "--cutouts", str(standin.mef_dir), "--out", str(out),
                               "--min-snr", "1e9"], capsys)
    assert code == 1 and "Traceback" not in text, text
    assert (out / "metrics.json").is_file(), text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["validated"] == 0 and metrics["counts"]["after_cuts"] == 0
    assert "no object is left to validate" in (out / "report.md").read_text()


def test_validate_links_the_real_frames_it_measured(standin, trained_run: Path,
                                                   tmp_path: Path, capsys) -> None:
    """--real-frames (des.real_frames): the real DECam frames are measured into out/real and
    linked from the report; a directory that is not there is a note, not a failure."""
    frames = Path(__file__).resolve().parents[2] / "shared" / "data" / "des_decam"
    if not frames.is_dir():
        pytest.skip(f"DES frames missing: {frames}")
    common = ["--run", str(trained_run), "--catalog", str(standin.catalog),
              "--cutouts", str(standin.mef_dir), "--min-snr", "1e9"]
    out = tmp_path / "val_real"
    code, text = run_validate([*common, "--out", str(out), "--real-frames", str(frames)], capsys)
    assert code == 1 and "Traceback" not in text, text  # no stand-in object: exit 1
    report = (out / "report.md").read_text()
    assert "## Real DES pixels" in report and "(real/real_des.png)" in report
    assert (out / "real" / "real_des.png").stat().st_size > 1000
    assert (out / "real" / "catalogue.fits").is_file()
    real = DESValidationResult.read(out).real_pixels
    assert real["bands_present"] == ["g", "r", "z"] and real["noshear_detections"] >= 1
    out = tmp_path / "val_no_real"
    code, text = run_validate([*common, "--out", str(out), "--real-frames",
                               str(tmp_path / "absent")], capsys)
    report = (out / "report.md").read_text()
    assert "are not there" in report and "## Real DES pixels" not in report


def test_validate_npz_options(standin, trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "val_npz"
    csv_catalog = standin.root / "catalog.csv"
    code, text = run_validate(["--run", str(trained_run), "--catalog", str(csv_catalog),
                               "--cutouts", str(standin.npz), "--out", str(out),
                               "--u-strategy", "g_extrapolate", "--no-resample",
                               "--normalization", "training"], capsys)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert settings["u_strategy"] == "g_extrapolate" and settings["u_over_g"] > 0
    assert not settings["resample"] and settings["normalization"] == "training"
    assert metrics["normalization"]["constants"] == metrics["normalization"]["training"]
    assert {s["reason"] for s in metrics["skipped"]} == {"NaN or infinite pixels in band r",
                                                         "id without a catalog row"}
    assert (out / "des_pixel_distributions.png").stat().st_size > 1000


def test_validate_bad_arguments_fail_cleanly(standin, trained_run: Path, tmp_path: Path,
                                             capsys) -> None:
    code, text = run_validate(["--run", str(trained_run), "--catalog", str(tmp_path / "no.fits"),
                               "--cutouts", str(standin.mef_dir), "--out",
                               str(tmp_path / "x")], capsys)
    assert code == 2 and "catalog not found" in text and "Traceback" not in text
    assert not (tmp_path / "x").exists()
