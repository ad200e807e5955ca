"""Real DES pixels (../shared/data/des_decam: three DECam frames g, r, z with weights, masks,
legacypipe PSFEx models and WCS) through the path a user takes: the survey reader with
resampling and sky subtraction, `deblend measure`'s catalogue, des_validation.real."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.ndimage import uniform_filter

from deblend import Deblender
from deblend.core.survey_input import read_psf, read_survey
from des_validation.real import main
from des_validation.real_pixels import find_frames, survey_inputs

DES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "des_decam"
WEIGHTS = Path(__file__).resolve().parents[1] / "deblend" / "weights" / "quick"
DES_WEIGHTS = WEIGHTS.parent / "des"
"""The DES model (``configs/des.yaml``, exported): bright targets and per-stamp flux scales."""


@pytest.fixture(scope="module")
def frames() -> dict[str, dict[str, Path]]:
    if not DES_DIR.is_dir():
        pytest.skip(f"DES frames missing: {DES_DIR}")
    return find_frames(DES_DIR)


@pytest.fixture(scope="module")
def model() -> Deblender:
    return Deblender.from_run(WEIGHTS, device="cpu")


def fwhm_pixels(psf: np.ndarray) -> float:
    """FWHM (pixels) of the Gaussian with the PSF's adaptive second moments (galsim.hsm)."""
    return 2.3548 * galsim.hsm.FindAdaptiveMom(galsim.Image(psf)).moments_sigma


def test_the_frames_of_each_band_are_found(frames) -> None:
    assert sorted(frames) == ["g", "r", "z"]
    assert frames["z"]["psf"].name == "c4d_131122_030338_ooi_z_ls9-S21-psfex.fits"
    assert frames["r"]["mask"].name == "c4d_141029_043420_ood_r_ls9.N26.fits"
    assert frames["g"]["sky"].name == "c4d_141029_043225_ooi_g_ls9-N26-splinesky.fits"


@pytest.mark.parametrize("band", ["g", "r", "z"])
def test_the_psfex_psf_has_the_fwhm_of_the_frame_header(frames, band) -> None:
    """The PSFEx model (legacypipe's merged layout) read as a user reads it, drawn at the
    frame's centre: its FWHM matches the frame's FWHM keyword (pixels; a seeing measured on
    stars by the community pipeline) to 15% (g 0.2%, r 11%, z 1.4% measured). A wrong
    sampling (PSF_SAMP) or basis order would miss by far more."""
    shape = fits.getdata(frames[band]["image"], 1).shape
    psf = read_psf({band: frames[band]["psf"]}, band, shape, 45)
    assert psf is not None and psf.psfex is not None
    header_fwhm = fits.getheader(frames[band]["image"], 1)["FWHM"]
    assert fwhm_pixels(psf.at((shape[1] - 1) / 2, (shape[0] - 1) / 2)) == pytest.approx(
        header_fwhm, rel=0.15)


def test_the_frames_are_read_onto_the_model_grid_with_their_psf(frames, model) -> None:
    survey = read_survey(survey_inputs(frames, model, {"g": 30.0, "r": 30.2, "z": 29.8}),
                         model.bands, model.data.pixel_scale, psfex_pixels=45)
    assert survey.resampled and survey.pixel_scale == 0.2
    assert survey.shape == (133, 133)  # 101 pixels of 0.2623" on 0.2" pixels
    assert survey.missing == ("u", "i", "y")
    for band in ("g", "r", "z"):
        k = survey.bands.index(band)
        # the resampled PSF has the native PSF's width in arcsec
        native = survey.psf_sources[k].source.at(50.0, 50.0)
        resampled = survey.psf_sources[k].at(66.0, 66.0)
        assert fwhm_pixels(resampled) * 0.2 == pytest.approx(fwhm_pixels(native) * 0.2623,
                                                             rel=0.02)


def test_the_frames_sky_models_leave_the_sky_at_zero_far_from_the_galaxy(frames, model) -> None:
    """The frames' own sky models (legacypipe SplineSky, fitted over the whole CCD) leave the
    resampled frames' pixels more than 14" from the bright galaxy at a median of +0.04 to +0.09
    noise sigma (its faint wings) in g, r and z; the cut-out's sigma-clipped median, which the
    galaxy filling the frame pulls up, leaves them at -0.45 to -0.67 (measured)."""
    inputs = survey_inputs(frames, model, {"g": 30.0, "r": 30.2, "z": 29.8})
    assert inputs.skies is not None and not inputs.subtract_sky
    for skies, low, high in ((inputs.skies, -0.2, 0.2), (None, -1.0, -0.3)):
        survey = read_survey(dataclasses.replace(inputs, skies=skies,
                                                 subtract_sky=skies is None),
                             model.bands, model.data.pixel_scale, psfex_pixels=45)
        k = survey.bands.index("r")
        cy, cx = np.unravel_index(np.argmax(uniform_filter(survey.images[k], 5)), survey.shape)
        yy, xx = np.mgrid[:survey.shape[0], :survey.shape[1]]
        far = np.hypot(xx - cx, yy - cy) > 70  # 0.2" pixels
        for band in ("g", "r", "z"):
            k = survey.bands.index(band)
            ok = far & np.isfinite(survey.variance[k])
            assert ok.sum() > 1500
            median = np.median(survey.images[k][ok] / np.sqrt(survey.variance[k][ok]))
            assert low < median < high, (band, skies is None, median)


def test_masked_pixels_of_a_real_frame_change_nothing(frames, model, tmp_path) -> None:
    """The g frame's 65 masked pixels (mask 5, weight 0) set to NaN and to 1e9: the resampled
    images and variances are identical, and the masked pixels' area has infinite variance."""
    def read(frames_used):
        return read_survey(survey_inputs(frames_used, model, {"g": 30.0, "r": 30.2, "z": 29.8}),
                           model.bands, model.data.pixel_scale, psfex_pixels=45)

    reference = read(frames)
    masked = fits.getdata(frames["g"]["mask"], 1) != 0
    assert masked.sum() == 65
    for garbage in (np.nan, 1e9):
        image = tmp_path / f"g_{garbage}.fits"
        shutil.copy(frames["g"]["image"], image)
        with fits.open(image, mode="update") as hdus:
            hdus[1].data[masked] = garbage
        changed = read({**frames, "g": {**frames["g"], "image": image}})
        assert np.array_equal(changed.images, reference.images)
        assert np.array_equal(changed.variance, reference.variance)
    k = reference.bands.index("g")
    ys, xs = np.argwhere(masked)[0]
    world = WCS(fits.getheader(frames["g"]["image"], 1)).all_pix2world([[xs, ys]], 0)
    x, y = np.rint(reference.wcs.all_world2pix(world, 0)[0]).astype(int)
    assert np.isinf(reference.variance[k, y, x])


@pytest.fixture(scope="module")
def real_run(frames, tmp_path_factory) -> Path:
    """``python -m des_validation.real`` on the frames with the packaged weights, once."""
    out = tmp_path_factory.mktemp("real_des") / "real"
    assert main(["--run", str(WEIGHTS), "--data", str(DES_DIR), "--out", str(out)]) == 0
    return out


def test_the_bright_galaxy_is_measured_where_the_sky_says(frames, real_run, capsys) -> None:
    """A catalogue, a figure and a report; the brightest detection's (ra, dec) is the sky
    position of the bright galaxy's peak in the native g frame (through resampling and two
    WCSs), to 0.3"; a second run is refused without --force, and a refused target keeps the
    earlier result."""
    out = real_run
    for name in ("catalogue.fits", "real_des.png", "real_des.md", "metrics.json"):
        assert (out / name).is_file(), name
    catalogue = Table.read(out / "catalogue.fits")
    rows = catalogue[catalogue["mdet_step"] == "noshear"]
    brightest = rows[np.argmax(rows["snr"])]
    native = fits.getdata(frames["g"]["image"], 1).astype(float)
    peak_y, peak_x = np.unravel_index(np.argmax(native), native.shape)
    window = native[peak_y - 2:peak_y + 3, peak_x - 2:peak_x + 3]
    window = window - window.min()
    ys, xs = np.mgrid[-2:3, -2:3]
    centroid = [peak_x + (xs * window).sum() / window.sum(),
                peak_y + (ys * window).sum() / window.sum()]
    ra, dec = WCS(fits.getheader(frames["g"]["image"], 1)).all_pix2world([centroid], 0)[0]
    offset = np.hypot((brightest["ra"] - ra) * np.cos(np.radians(dec)), brightest["dec"] - dec)
    assert offset * 3600 < 0.3
    assert "narrowest round Gaussian its PSF allows" in (out / "real_des.md").read_text()
    assert main(["--run", str(WEIGHTS), "--data", str(DES_DIR), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # a metacal target narrower than the frames' PSFs (FWHM 0.90-1.00") allows: refused, and
    # the earlier result is kept
    before = (out / "catalogue.fits").read_bytes()
    assert main(["--run", str(WEIGHTS), "--data", str(DES_DIR), "--out", str(out), "--force",
                 "--target-psf-fwhm", "0.8"]) == 2
    assert "narrower than this PSF allows" in capsys.readouterr().err
    assert (out / "catalogue.fits").read_bytes() == before


def test_a_low_deblending_contrast_splits_the_faint_pair_and_nothing_else(real_run,
                                                                           tmp_path) -> None:
    """At SEP's contrast 1e-5 the faint pair left of the bright galaxy, which at the default
    0.005 stays inside the bright galaxy's detection (with the frames' sky models its isophote
    reaches the pair; with a constant sky, which the galaxy pulls up, the pair was one detection
    of its own), is found as two (about 9 pixels apart); every detection of the default stays
    where it was (the bright galaxy's windowed centroid to 1e-3 pixels), its residual does not
    move, and the catalogue's header records the contrast."""
    out = tmp_path / "low"
    assert main(["--run", str(WEIGHTS), "--data", str(DES_DIR), "--out", str(out),
                 "--deblend-contrast", "1e-5"]) == 0

    def noshear(run: Path) -> Table:
        catalogue = Table.read(run / "catalogue.fits")
        return catalogue[catalogue["mdet_step"] == "noshear"]

    default, low = noshear(real_run), noshear(out)
    brightest = [rows[np.argmax(rows["snr"])] for rows in (default, low)]
    assert (brightest[1]["x"], brightest[1]["y"]) == pytest.approx(
        (brightest[0]["x"], brightest[0]["y"]), abs=1e-3)
    distance = np.hypot(np.subtract.outer(np.asarray(low["x"]), np.asarray(default["x"])),
                        np.subtract.outer(np.asarray(low["y"]), np.asarray(default["y"])))
    assert (distance.min(axis=0) < 0.1).all()  # every default detection is still there
    new = low[distance.min(axis=1) > 3.0]
    pair = new[np.asarray(new["x"]) < brightest[0]["x"] - 30]  # left of the bright galaxy
    assert len(pair) == 2
    assert 4 < np.hypot(*np.diff(np.stack([pair["x"], pair["y"]]), axis=1)) < 12
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (real_run, out)]
    chi = [m["brightest"]["residual_chi"] for m in metrics]
    assert chi[1]["rms"] == pytest.approx(chi[0]["rms"], rel=1e-3)
    header = fits.getheader(out / "catalogue.fits", "MDET")
    assert header["HIERARCH MDET DEBLEND_CONTRAST"] == 1e-5


@pytest.fixture(scope="module")
def des_real_run(frames, tmp_path_factory) -> Path:
    """``python -m des_validation.real`` on the frames with the packaged DES model, once."""
    out = tmp_path_factory.mktemp("real_des_model") / "real"
    assert main(["--run", str(DES_WEIGHTS), "--data", str(DES_DIR), "--out", str(out)]) == 0
    return out


def brightest_chi(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["brightest"]["residual_chi"]


@pytest.mark.xfail(strict=True, reason=(
    "known gap (README, 'Real DES pixels', 'Forced photometry' and 'Stamps recentred on their "
    "detections'): the DES model trained with bright, large targets and per-stamp flux scales, "
    "its stamp recentred on the detection and its fluxes fitted to the pixels, leaves 1.87 "
    "sigma (27.7 before the first two, 4.5 before the fit, 2.5 before the recentring; 1.85 "
    "under the cut-out's median sky): the networks cannot yet draw this galaxy's core (3-5 "
    "pixels: 2.5-3.4 sigma) and wings to the 2-5% its pixels' S/N of 30-110 asks, and its "
    "light reaches beyond the 45-pixel stamp"))
def test_the_bright_galaxy_residual_is_at_the_noise_level_away_from_its_core(des_real_run
                                                                           ) -> None:
    """The issue's check: image minus the pasted reconstructions, in units of the weights'
    noise, over the present bands' unmasked pixels 3 to 12 pixels from the brightest
    detection, has an rms within 1.5. Far from the galaxies the frames' noise alone gives an rms
    of 0.98-1.06 per band, and with their sky models subtracted the median there is within 0.1
    sigma of 0 (the test above), so 1.5 leaves room for the galaxy's faint outer light, not for
    a model error. Strict: the day the model passes, this test says so."""
    chi = brightest_chi(des_real_run)
    assert chi["pixels"] > 1000
    assert chi["rms"] < 1.5, chi


def test_the_des_model_reconstructs_the_bright_galaxy_that_saturated_the_models_before(
        des_real_run, real_run) -> None:
    """What bright targets, per-stamp flux scales, forced fluxes and recentred stamps bought:
    the DES model's residual 3-12 pixels from the bright galaxy measured 1.87 sigma, mean +0.07
    with the frames' sky models (1.85 and +0.10 with a constant sky; its stamp around the
    nearest pixel, a third of a pixel off the galaxy: 2.50 and -0.06;
    the reconstruction alone, 4.47 and +3.35: 13-19% too faint; the DES model trained without
    them: 27.7, +20.9); the LSST quick model, without them, leaves 30 on the same frames (39
    unfitted). Bounds with room for a retraining's scatter (4.57 unfitted for a second
    training), far below what a saturated model leaves; the fit leaves no mean."""
    chi, quick = brightest_chi(des_real_run), brightest_chi(real_run)
    assert chi["pixels"] > 1000
    assert chi["rms"] < 3.0 and abs(chi["mean"]) < 1.0, chi
    assert quick["rms"] > 20.0, quick
    metrics = json.loads((des_real_run / "metrics.json").read_text())
    assert metrics["bands_missing"] == ["i", "Y"] and metrics["unflagged_detections"] >= 1


def test_the_report_gives_the_residual_by_radius_of_the_test_ring(des_real_run) -> None:
    """The radial profile of the report and the figure's fourth panel: its annuli from 3 to 12
    pixels, pooled over g, r and z, are the ring of the test (the same pixels, the same rms),
    and the core is worse than the ring (measured 3.7-5.6 at 0-3 pixels)."""
    brightest = json.loads((des_real_run / "metrics.json").read_text())["brightest"]
    radial, chi = brightest["residual_by_radius"], brightest["residual_chi"]
    edges = radial["edges"]
    ring = [i for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])) if lo >= 3 and hi <= 12]
    assert [edges[i] for i in ring] == [3.0, 5.0, 8.0]
    bands = radial["bands"]
    assert sorted(bands) == ["g", "r", "z"]
    pixels = sum(bands[b]["pixels"][i] for b in "grz" for i in ring)
    squares = sum(bands[b]["pixels"][i] * bands[b]["rms"][i] ** 2 for b in "grz" for i in ring)
    assert pixels == chi["pixels"]
    assert np.sqrt(squares / pixels) == pytest.approx(chi["rms"], rel=1e-9)
    assert all(bands[b]["rms"][0] > chi["rms"] for b in "grz")
    assert "residual by radius" in (des_real_run / "real_des.md").read_text()


def measure_arguments(frames, out: Path, *extra: str) -> list[str]:
    args = ["measure", "--run", str(WEIGHTS), "--out", str(out), "--no-progress",
            "--no-object-response", "--psf-at", "centre"]
    for band in ("g", "r", "z"):
        for option, kind in (("--image", "image"), ("--weight", "weight"), ("--mask", "mask"),
                             ("--psf", "psf")):
            args += [option, f"{band}={frames[band][kind]}"]
    zp = {"u": 34.50, "g": 36.74, "r": 37.48, "i": 37.16, "z": 36.62, "y": 35.79}
    for band, value in zp.items():
        args += ["--zeropoint-model", f"{band}={value}"]
    for band, value in {"g": 30.0, "r": 30.2, "z": 29.8}.items():
        args += ["--zeropoint", f"{band}={value}"]
    return args + ["--missing-band", "u", "--missing-band", "i", "--missing-band", "y", *extra]


def test_deblend_measure_resamples_real_frames_only_when_asked(frames, tmp_path, capsys) -> None:
    from deblend.__main__ import main as deblend_main

    out = tmp_path / "catalogue.fits"
    assert deblend_main(measure_arguments(frames, out)) == 2
    assert "--resample" in capsys.readouterr().err and not out.exists()
    assert deblend_main(measure_arguments(frames, out, "--resample", "--subtract-sky")) == 0
    catalogue = Table.read(out)
    header = fits.getheader(out, "MDET")
    assert header["RESAMPLD"] is True and header["PIXSCALE"] == 0.2
    noshear = catalogue[catalogue["mdet_step"] == "noshear"]
    assert len(noshear) >= 1 and np.isfinite(noshear["ra"]).all()
    # forced fluxes: fitted where the frames have pixels, the reconstruction's where a band is
    # declared missing (no pixel to fit), never negative
    for band in ("u", "i", "y"):
        np.testing.assert_array_equal(noshear[f"forced_flux_{band}"], noshear[f"flux_{band}"])
    for band in ("g", "r", "z"):
        assert np.all(noshear[f"forced_flux_{band}"] >= 0)
        assert np.all(noshear[f"forced_flux_{band}"] != noshear[f"flux_{band}"])
    assert header["HIERARCH MDET RECENTRE"] is True


def test_deblend_measure_can_leave_the_stamps_on_their_nearest_pixels(frames, tmp_path) -> None:
    """``--no-recentre``: the same detections and positions (recentring moves stamps, not
    detections), the header says so, and the bright galaxy's ellipticity and fluxes differ (its
    stamp no longer moved by its sub-pixel offset)."""
    from deblend.__main__ import main as deblend_main

    def noshear(*extra: str) -> tuple[Table, fits.Header]:
        out = tmp_path / f"catalogue{len(extra)}.fits"
        assert deblend_main(measure_arguments(frames, out, "--resample", "--subtract-sky",
                                              *extra)) == 0
        catalogue = Table.read(out)
        return catalogue[catalogue["mdet_step"] == "noshear"], fits.getheader(out, "MDET")

    (on, header_on), (off, header_off) = noshear(), noshear("--no-recentre")
    assert header_on["HIERARCH MDET RECENTRE"] is True
    assert header_off["HIERARCH MDET RECENTRE"] is False
    np.testing.assert_array_equal(on["x"], off["x"])
    np.testing.assert_array_equal(on["y"], off["y"])
    bright = int(np.argmax(on["snr"]))
    assert on["deblend_e1"][bright] != off["deblend_e1"][bright]
    assert on["flux_r"][bright] != off["flux_r"][bright]


def test_deblend_measure_subtracts_the_frames_sky_models(frames, tmp_path, capsys) -> None:
    """``--sky BAND=FILE`` (legacypipe's SplineSky of each frame): subtracted pixel by pixel, as
    the log says; the bright galaxy keeps the light the cut-out's sigma-clipped median took
    (0.6-0.8 sky sigma per pixel), so its fitted fluxes rise in g, r and z (by 0.6%, 0.4% and
    0.1%: small against its own light, S/N 13,000); with
    ``--subtract-sky`` as well the command is refused and writes nothing."""
    from deblend.__main__ import main as deblend_main

    skies = [arg for band in ("g", "r", "z") for arg in ("--sky", f"{band}={frames[band]['sky']}")]
    out = {name: tmp_path / f"{name}.fits" for name in ("model", "constant", "both")}
    assert deblend_main(measure_arguments(frames, out["model"], "--resample", *skies)) == 0
    assert "(SplineSky) was subtracted" in capsys.readouterr().out
    assert deblend_main(measure_arguments(frames, out["constant"], "--resample",
                                          "--subtract-sky")) == 0
    assert deblend_main(measure_arguments(frames, out["both"], "--resample", "--subtract-sky",
                                          *skies)) == 2
    assert "not both" in capsys.readouterr().err and not out["both"].exists()
    bright = []
    for name in ("model", "constant"):
        catalogue = Table.read(out[name])
        noshear = catalogue[catalogue["mdet_step"] == "noshear"]
        bright.append(noshear[np.argmax(noshear["snr"])])
    for band in ("g", "r", "z"):
        assert bright[0][f"forced_flux_{band}"] > bright[1][f"forced_flux_{band}"], band
