"""``python -m deblend measure``: survey FITS images in, a metadetection catalogue out.

A six-band 140x140 LSST-pixel field of GalSim galaxies is written as multi-extension FITS
images, weights, a mask (over NaN pixels) and PSF images; the command's catalogue must equal
:meth:`Deblender.measure_cells` on the same arrays, resume from its cached cells (recomputing a
damaged one), refuse to overwrite, and refuse every kind of bad input with exit status 2, one
``error:`` line naming the problem and no file written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from deblend.__main__ import main
from deblend.core.cells import CellImage
from deblend.core.metadetect import FLAGS, WALK_VIEWS
from deblend.core.survey_input import SurveyInputs, read_survey
from deblend.core.survey_measure import population_shear_of

BANDS = ("u", "g", "r", "i", "z", "y")
SCALE = 0.2
SIZE = 140
PSF_PIXELS = 25
ZP = 30.0
SKY_SIGMA = 20.0
RA0, DEC0 = 150.0, 2.0
PSF = galsim.Moffat(beta=3.5, fwhm=0.75)
MASKED = (slice(100, 108), slice(20, 30))
"""Rows, columns of the mask's bad square; the image holds NaN in part of it."""


def wcs_header(crpix: float = (SIZE + 1) / 2.0, scale: float = SCALE) -> fits.Header:
    header = fits.Header()
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": RA0, "CRVAL2": DEC0,
                   "CRPIX1": crpix, "CRPIX2": (SIZE + 1) / 2.0, "CUNIT1": "deg",
                   "CUNIT2": "deg", "CD1_1": -scale / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
                   "CD2_2": scale / 3600})
    return header


def field() -> dict[str, np.ndarray]:
    """The field's arrays in model units: image (with NaN under the mask), variance, mask,
    PSF images."""
    rng = np.random.default_rng(3)
    image = galsim.ImageD(SIZE, SIZE, scale=SCALE)
    positions = [(40.0, 45.0), (52.0, 50.0), (95.0, 90.0), (70.0, 112.0), (110.0, 35.0)]
    cube = np.zeros((len(BANDS), SIZE, SIZE))
    for b in range(len(BANDS)):
        image.setZero()
        for k, (x, y) in enumerate(positions):
            galaxy = galsim.Exponential(half_light_radius=0.5, flux=6e4 * (1 + b / 3))
            galsim.Convolve(galaxy.shear(e1=0.2 * np.cos(k), e2=0.2 * np.sin(k)), PSF).drawImage(
                image=image, add_to_image=True, offset=(x - (SIZE - 1) / 2, y - (SIZE - 1) / 2))
        cube[b] = image.array
    cube += rng.normal(0, SKY_SIGMA, cube.shape)
    mask = np.zeros((SIZE, SIZE), np.int32)
    mask[MASKED] = 4
    cube[:, 102:105, 22:26] = np.nan
    psf = PSF.drawImage(nx=PSF_PIXELS, ny=PSF_PIXELS, scale=SCALE).array
    return {"image": cube, "variance": np.full(cube.shape, SKY_SIGMA ** 2), "mask": mask,
            "psf": np.stack([psf] * len(BANDS))}


def write_mef(path: Path, planes: dict[str, np.ndarray], header: fits.Header | None = None,
              per_band: dict[str, dict] | None = None) -> Path:
    """A multi-extension FITS file with one image HDU per band (EXTNAME = band)."""
    hdus = [fits.PrimaryHDU()]
    for band, data in planes.items():
        hdu = fits.ImageHDU(data, header=header.copy() if header is not None else None,
                            name=band)
        hdu.header["EXTNAME"] = band
        for key, value in (per_band or {}).get(band, {}).items():
            hdu.header[key] = value
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path)
    return path


def write_inputs(root: Path, data: dict[str, np.ndarray], zp: float = ZP) -> dict[str, Path]:
    """Images (MAGZERO ``zp``, values scaled from model units accordingly), weights, mask and
    PSFs as multi-extension files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    factor = 10 ** (0.4 * (ZP - zp))  # model units per image unit
    header = wcs_header()
    header["MAGZERO"] = zp
    return {
        "image": write_mef(root / "image.fits", {b: data["image"][k] / factor
                                                 for k, b in enumerate(BANDS)}, header),
        "weight": write_mef(root / "weight.fits", {b: factor ** 2 / data["variance"][k]
                                                   for k, b in enumerate(BANDS)}, header),
        "mask": write_mef(root / "mask.fits", {b: data["mask"] for b in BANDS}, header),
        "psf": write_mef(root / "psf.fits", {b: data["psf"][k] for k, b in enumerate(BANDS)}),
    }


def arguments(run: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["measure", "--run", str(run), "--out", str(out), "--no-progress",
            "--no-object-response"]
    for kind in ("image", "weight", "mask", "psf"):
        if kind in files:
            args += [f"--{kind}", str(files[kind])]
    for band in BANDS:
        args += ["--zeropoint-model", f"{band}={ZP}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return field()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("survey"), data)


@pytest.fixture(scope="module")
def model(trained_run):
    from deblend.core.inference import Deblender

    return Deblender.from_run(trained_run)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_catalogue_equals_measure_cells_on_the_same_arrays(trained_run, model, data, inputs,
                                                           tmp_path, capsys):
    out = tmp_path / "catalogue.fits"
    assert main(arguments(trained_run, inputs, out)) == 0
    catalogue = Table.read(out, hdu="MDET", character_as_bytes=False)
    masked = ~np.isfinite(data["image"]) | (data["mask"] != 0)[None]
    cell = CellImage(np.where(masked, 0.0, data["image"]),
                     np.where(masked, np.inf, data["variance"]), data["psf"])
    direct = model.measure_cells([cell], seed=0, per_object=False)  # both at WALK_VIEWS
    assert len(catalogue) == len(direct) and (direct["mdet_step"] == "noshear").sum() >= 3
    for name in direct.colnames:
        np.testing.assert_array_equal(np.asarray(catalogue[name]), np.asarray(direct[name]),
                                      err_msg=name)
    # ra, dec from the TAN WCS near its tangent point: east left (CD1_1 < 0), north up
    noshear = catalogue[catalogue["mdet_step"] == "noshear"]
    dx, dy = noshear["x"] - (SIZE - 1) / 2, noshear["y"] - (SIZE - 1) / 2
    np.testing.assert_allclose(noshear["ra"], RA0 - dx * SCALE / 3600 / np.cos(np.radians(DEC0)),
                               atol=2e-7)
    np.testing.assert_allclose(noshear["dec"], DEC0 + dy * SCALE / 3600, atol=2e-7)
    header = fits.getheader(out, "MDET")
    assert all(header[f"FLAG{bit}"] == meaning for bit, meaning in FLAGS.items())
    assert header["ZPMOD_I"] == ZP and header["ESTIMATR"] == "deblend"
    assert header["VIEWS"] == WALK_VIEWS == 2
    assert header["TUNIT" + str(catalogue.colnames.index("ra") + 1)] == "deg"
    if (catalogue["flags"] == 0).sum() and all(
            ((catalogue["mdet_step"] == s) & (catalogue["flags"] == 0)).any()
            for s in ("noshear", "1p", "1m", "2p", "2m")):
        g, response = population_shear_of(out)
        assert g.shape == (2,) and response.shape == (2, 2)

    # refusal to overwrite: exit 2, the file untouched
    before = out.read_bytes()
    capsys.readouterr()
    assert main(arguments(trained_run, inputs, out)) == 2
    assert "already exists" in one_error_line(capsys) and out.read_bytes() == before


def test_resume_reuses_cells_and_recomputes_a_damaged_one(trained_run, inputs, tmp_path,
                                                          capsys):
    out = tmp_path / "tiled.fits"
    tiled = ["--cell", "70", "--margin", "25", "--jobs", "2"]
    assert main(arguments(trained_run, inputs, out, *tiled)) == 0
    first = Table.read(out, hdu="MDET", character_as_bytes=False)
    assert set(first["cell"]) <= {0, 1, 2, 3} and len(set(first["cell"])) >= 2
    cells = sorted((tmp_path / "tiled.fits.cells").glob("cell-*.fits"))
    assert [c.name for c in cells] == [f"cell-{k:05d}.fits" for k in range(4)]
    damaged = cells[1]
    damaged.write_bytes(damaged.read_bytes()[:3000])
    mtimes = {c: c.stat().st_mtime_ns for c in cells if c != damaged}
    capsys.readouterr()
    assert main(arguments(trained_run, inputs, out, *tiled[:4], "--force")) == 0
    said = capsys.readouterr()
    assert f"cached cell {damaged} is unreadable" in said.out
    assert "reusing 3 of 4 measured cells" in said.out
    assert all(c.stat().st_mtime_ns == t for c, t in mtimes.items())
    again = Table.read(out, hdu="MDET", character_as_bytes=False)
    for name in first.colnames:  # the recomputed cell ran in this process, the first in a
        # worker (--jobs 2): float32 networks under other thread counts round differently
        if np.asarray(first[name]).dtype.kind == "f":
            np.testing.assert_allclose(np.asarray(again[name]), np.asarray(first[name]),
                                       rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(first[name]))
    # another seed: no cached cell is reused
    assert main(arguments(trained_run, inputs, out, *tiled, "--seed", "5", "--force")) == 0
    said = capsys.readouterr().out
    assert said.count("was made with other inputs or settings") == 4 and "reusing" not in said
    assert fits.getheader(out, "MDET")["SEED"] == 5


def test_zero_points_scale_images_and_variance(data, tmp_path):
    """An image at MAGZERO 28.5 holds 10**(0.4*1.5) fewer units per model unit; read with
    the model's zero point 30 it gives back the model-unit arrays; --zeropoint overrides."""
    files = write_inputs(tmp_path / "zp", data, zp=28.5)
    survey = read_survey(SurveyInputs(files["image"], files["weight"], files["psf"],
                                      files["mask"], model_zeropoints={b: ZP for b in BANDS}),
                         BANDS, SCALE)
    masked = ~np.isfinite(data["image"]) | (data["mask"] != 0)[None]
    np.testing.assert_allclose(survey.images, np.where(masked, 0.0, data["image"]), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(survey.variance[~masked], SKY_SIGMA ** 2, rtol=1e-6)
    assert np.isinf(survey.variance[masked]).all()
    assert survey.zeropoints["g"] == (28.5, ZP)
    override = read_survey(SurveyInputs(files["image"], files["weight"], files["psf"],
                                        files["mask"], zeropoints={"g": 29.5},
                                        model_zeropoints={b: ZP for b in BANDS}), BANDS, SCALE)
    np.testing.assert_allclose(override.images[1], survey.images[1] * 10 ** (0.4 * -1.0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(override.images[2], survey.images[2], rtol=1e-12)


def test_per_band_files_missing_band_and_psfex(data, tmp_path):
    """BAND=FILE inputs; --missing-band u fills u with zeros and infinite variance; a PSFEx
    file is drawn on the image's pixel grid and normalised."""
    header = wcs_header()
    header["MAGZERO"] = ZP
    images, weights, psfs = {}, {}, {}
    for k, band in enumerate(BANDS[1:], start=1):
        images[band] = tmp_path / f"image_{band}.fits"
        fits.PrimaryHDU(np.nan_to_num(data["image"][k]), header=header).writeto(images[band])
        weights[band] = tmp_path / f"weight_{band}.fits"
        fits.PrimaryHDU(1 / data["variance"][k], header=header).writeto(weights[band])
        psfs[band] = tmp_path / f"psf_{band}.fits"
        fits.PrimaryHDU(data["psf"][k] * 7.0).writeto(psfs[band])
    basis = galsim.Gaussian(fwhm=0.8).drawImage(nx=21, ny=21, scale=SCALE).array
    psfs["i"] = write_psfex(tmp_path / "i.psf", basis)
    zps = {b: ZP for b in BANDS}
    with pytest.raises(ValueError, match="--missing-band u"):
        read_survey(SurveyInputs(images, weights, psfs, model_zeropoints=zps), BANDS, SCALE)
    survey = read_survey(SurveyInputs(images, weights, psfs, model_zeropoints=zps,
                                      missing_bands=("u",)), BANDS, SCALE, psfex_pixels=25)
    assert survey.missing == ("u",) and "band u is missing" in survey.notes[0]
    assert (survey.images[0] == 0).all() and np.isinf(survey.variance[0]).all()
    np.testing.assert_allclose(survey.images[3], np.nan_to_num(data["image"][3]), rtol=1e-6)
    psf = survey.psfs_at(30.0, 40.0)
    assert psf.shape == (6, 25, 25) and survey.psf_varies
    np.testing.assert_allclose(psf.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(psf[1], data["psf"][1] / data["psf"][1].sum(), rtol=1e-6)
    np.testing.assert_allclose(psf[3], np.pad(basis / basis.sum(), 2), atol=2e-4)


def write_psfex(path: Path, basis: np.ndarray) -> Path:
    """A PSFEx file of degree 0 (the same PSF everywhere), sampled on the image's pixels."""
    column = fits.Column(name="PSF_MASK", format=f"{basis.size}E",
                         dim=f"({basis.shape[1]}, {basis.shape[0]}, 1)",
                         array=basis[None, None].astype(np.float32))
    hdu = fits.BinTableHDU.from_columns([column], name="PSF_DATA")
    hdu.header.update({"POLNAXIS": 2, "POLGRP1": 1, "POLNAME1": "X_IMAGE", "POLZERO1": 70.0,
                       "POLSCAL1": 140.0, "POLGRP2": 1, "POLNAME2": "Y_IMAGE",
                       "POLZERO2": 70.0, "POLSCAL2": 140.0, "POLNGRP": 1, "POLDEG1": 0,
                       "PSF_SAMP": 1.0, "PSFNAXIS": 3, "PSFAXIS1": basis.shape[1],
                       "PSFAXIS2": basis.shape[0], "PSFAXIS3": 1})
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return path


def _rewrite(files: dict[str, Path], kind: str, change) -> None:
    """Apply ``change(hdus)`` to the multi-extension file of ``kind`` and write it back."""
    with fits.open(files[kind], memmap=False) as hdus:
        hdus = fits.HDUList([hdu.copy() for hdu in hdus])
    change(hdus)
    hdus.writeto(files[kind], overwrite=True)


def _truncate(files: dict[str, Path]) -> None:
    files["weight"].write_bytes(files["weight"].read_bytes()[:20000])


BAD_INPUTS = {
    "missing HDU": (lambda f: _rewrite(f, "image", lambda h: h.pop(1)), "EXTNAME u"),
    "even PSF": (lambda f: _rewrite(f, "psf", lambda h: setattr(h[3], "data", np.ones((24, 24)))),
                 "odd square"),
    "non-square PSF": (lambda f: _rewrite(f, "psf", lambda h: setattr(h[2], "data",
                                                                      np.ones((25, 23)))),
                       "odd square"),
    "weight all zeros": (lambda f: _rewrite(f, "weight", lambda h: h[4].data.__imul__(0)),
                         "zero (or masked) everywhere"),
    "weight shape": (lambda f: _rewrite(f, "weight", lambda h: setattr(h[2], "data",
                                                                       h[2].data[:-3])),
                     "shape"),
    "mismatched WCS": (lambda f: _rewrite(f, "image", lambda h: h[3].header.update(
        CRPIX1=h[3].header["CRPIX1"] + 0.5)), "WCS of"),
    "unmasked NaN": (lambda f: _rewrite(f, "image", lambda h: h[5].data.__setitem__(
        (10, 12), np.nan)), "NaN or infinite pixels"),
    "truncated FITS": (_truncate, "corrupt or truncated"),
    "pixel scale": (lambda f: [_rewrite(f, "image", lambda h, k=k: h[k].header.update(
        CD1_1=-0.263 / 3600, CD2_2=0.263 / 3600)) for k in range(1, 7)], "pixel scale"),
    "no MAGZERO": (lambda f: _rewrite(f, "image", lambda h: h[2].header.remove("MAGZERO")),
                   "--zeropoint g="),
    "missing file": (lambda f: f["psf"].unlink(), "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(case, trained_run, inputs, tmp_path,
                                                          capsys):
    files = {k: Path(tmp_path / p.name) for k, p in inputs.items()}
    for kind, path in inputs.items():
        files[kind].write_bytes(path.read_bytes())
    spoil, expected = BAD_INPUTS[case]
    spoil(files)
    out = tmp_path / "out" / "catalogue.fits"
    capsys.readouterr()
    assert main(arguments(trained_run, files, out)) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--zeropoint", "q=30"], "band q is not one of the model's bands"),
    (["--missing-band", "g"], "the images have band g"),
    (["--margin", "5"], "margin must be at least 22"),
])
def test_bad_arguments_fail_with_one_line(extra, expected, trained_run, inputs, tmp_path,
                                          capsys):
    out = tmp_path / "catalogue.fits"
    assert main(arguments(trained_run, inputs, out, *extra)) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "catalogue.fits.cells").exists()


def test_model_zero_point_is_required(trained_run, inputs, tmp_path, capsys):
    out = tmp_path / "catalogue.fits"
    args = arguments(trained_run, inputs, out)
    where = args.index(f"r={ZP}")
    del args[where - 1:where + 1]
    assert main(args) == 2
    assert "--zeropoint-model r=VALUE" in one_error_line(capsys)
    assert not out.exists()


def test_the_run_s_metacal_target_reaches_the_catalogue(trained_run, inputs, tmp_path, capsys):
    """A run whose config sets metacal.target_psf_fwhm and metacal.hold_sky_plane is measured
    at that round Gaussian, holding the sky plane, by default (its header says so);
    --target-psf-fwhm and --no-hold-sky-plane override them, and a target narrower than the
    PSF allows is refused with one line, nothing written."""
    from deblend.core.metacal import target_sigmas

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    stored = json.loads((run / "run.json").read_text())
    stored["config"]["metacal"]["target_psf_fwhm"] = 1.9
    stored["config"]["metacal"]["hold_sky_plane"] = True
    (run / "run.json").write_text(json.dumps(stored))

    def header_sigma(out: Path) -> list[float]:
        card = fits.getheader(out, "MDET")["HIERARCH MDET TARGET_SIGMA"]
        return [float(v) for v in card.split()]

    def header_held(out: Path) -> bool:
        return fits.getheader(out, "MDET")["HIERARCH MDET HOLD_SKY_PLANE"]

    out = tmp_path / "run_target.fits"
    assert main(arguments(run, inputs, out)) == 0
    assert header_sigma(out) == pytest.approx(target_sigmas(1.9, len(BANDS), SCALE), rel=1e-4)
    assert header_held(out) is True
    given = tmp_path / "given_target.fits"
    assert main(arguments(run, inputs, given, "--target-psf-fwhm", "2.2",
                          "--no-hold-sky-plane")) == 0
    assert header_sigma(given) == pytest.approx(target_sigmas(2.2, len(BANDS), SCALE), rel=1e-4)
    assert header_held(given) is False
    assert not np.array_equal(Table.read(out, hdu="MDET")["deblend_e1"],
                              Table.read(given, hdu="MDET")["deblend_e1"])
    capsys.readouterr()
    narrow = tmp_path / "narrow.fits"
    assert main(arguments(run, inputs, narrow, "--target-psf-fwhm", "0.3")) == 2
    assert "narrower than this PSF allows" in one_error_line(capsys)
    assert not narrow.exists()
    assert main(arguments(run, inputs, narrow, "--target-psf-fwhm", "2", "2")) == 2
    assert "2 target sigmas for 6 bands" in one_error_line(capsys)


def test_the_deblending_contrast_is_used_recorded_and_checked(trained_run, inputs, tmp_path,
                                                              capsys):
    """--deblend-contrast reaches SEP: at 1 (no deblending) the two touching galaxies of the
    field (13 pixels apart, equal flux) are one detection on every metacal image, split at the
    default 0.005; the header records the contrast; one outside [0, 1] is refused before
    anything is written."""
    def noshear(out: Path) -> int:
        catalogue = Table.read(out, hdu="MDET")
        return int(np.sum(catalogue["mdet_step"] == "noshear"))

    default, merged = tmp_path / "default.fits", tmp_path / "merged.fits"
    assert main(arguments(trained_run, inputs, default)) == 0
    assert main(arguments(trained_run, inputs, merged, "--deblend-contrast", "1")) == 0
    assert noshear(merged) == noshear(default) - 1
    assert fits.getheader(default, "MDET")["HIERARCH MDET DEBLEND_CONTRAST"] == 0.005
    assert fits.getheader(merged, "MDET")["HIERARCH MDET DEBLEND_CONTRAST"] == 1.0
    capsys.readouterr()
    for bad in ("2", "nan", "-0.1"):
        wrong = tmp_path / f"wrong{bad}.fits"
        with pytest.raises(SystemExit) as stop:
            main(arguments(trained_run, inputs, wrong, "--deblend-contrast", bad))
        assert stop.value.code == 2
        assert "--deblend-contrast: must be a number in [0, 1]" in capsys.readouterr().err
        assert not wrong.exists() and not wrong.with_name(wrong.name + ".cells").exists()


def test_the_deblending_contrast_help_states_the_walks_default(capsys) -> None:
    """Both entry points' help give metadetect.DEBLEND_CONTRAST as the default, from the
    constant itself (a changed constant changes the help)."""
    import argparse

    from deblend.core.arguments import add_deblend_contrast
    from deblend.core.metadetect import DEBLEND_CONTRAST
    from des_validation.real import main as real_main

    parser = argparse.ArgumentParser()
    add_deblend_contrast(parser, 0.02)
    assert "(default 0.02;" in " ".join(parser.format_help().split())
    for entry in (lambda: main(["measure", "--help"]), lambda: real_main(["--help"])):
        with pytest.raises(SystemExit):
            entry()
        assert f"(default {DEBLEND_CONTRAST:g};" in " ".join(capsys.readouterr().out.split())


def test_a_size_cut_flags_exactly_the_small_rows(trained_run, inputs, tmp_path, capsys):
    """``--min-size-ratio R`` (R the median size_ratio of a run without it): the header records
    R; a row is flagged SMALL (16) exactly where its size_ratio is below R or not measured, on
    every metacal image; every row has its size_ratio; a value that is not a number is a usage
    error."""
    plain = tmp_path / "plain.fits"
    assert main(arguments(trained_run, inputs, plain)) == 0
    cut = float(np.nanmedian(Table.read(plain, hdu="MDET")["size_ratio"]))  # half the rows
    out = tmp_path / "cut.fits"
    assert main(arguments(trained_run, inputs, out, "--min-size-ratio", str(cut))) == 0
    catalogue = Table.read(out, hdu="MDET", character_as_bytes=False)
    assert fits.getheader(out, "MDET")["HIERARCH MDET MIN_SIZE_RATIO"] == pytest.approx(cut)
    size = np.asarray(catalogue["size_ratio"])
    small = (np.asarray(catalogue["flags"]) & 16) != 0
    np.testing.assert_array_equal(small, ~(size >= cut))
    assert small.any() and not small.all() and np.isfinite(size).mean() > 0.9
    with pytest.raises(SystemExit):
        main(arguments(trained_run, inputs, tmp_path / "x.fits", "--min-size-ratio", "nan"))
    assert "finite number" in capsys.readouterr().err
