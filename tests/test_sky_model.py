"""A survey's sky model subtracted from its frames (deblend.core.sky_model, survey_input's
``skies``): legacypipe's SplineSky evaluated as legacypipe builds it, sky images, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from deblend.core.sky_model import evaluate_spline_sky, spline_sky
from deblend.core.survey_input import SurveyInputs, read_survey
from tests.test_measure import wcs_header, write_mef

DES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "des_decam"
G_SKY = DES_DIR / "c4d_141029_043225_ooi_g_ls9-N26-splinesky.fits"


@pytest.fixture(scope="module")
def g_sky() -> fits.FITS_rec:
    if not G_SKY.is_file():
        pytest.skip(f"DES frames missing: {DES_DIR}")
    return fits.getdata(G_SKY, 1)


def test_the_spline_passes_through_its_knots_columns_along_x(g_sky) -> None:
    """legacypipe's grid values are (rows along ygrid, columns along xgrid) of the whole CCD; the
    spline through them returns each knot's value at that knot (a swapped axis or a transposed
    grid would not: the grid is 17 x 9 and not symmetric) and is smooth between."""
    row = g_sky[0]
    values = np.asarray(row["gridvals"], np.float64)
    assert values.shape == (17, 9)
    sky = evaluate_spline_sky(row["xgrid"], row["ygrid"], values, int(row["order"]),
                              np.asarray(row["xgrid"], float), np.asarray(row["ygrid"], float),
                              "test")
    np.testing.assert_allclose(sky, values, rtol=0, atol=1e-6 * np.abs(values).max())
    mid = evaluate_spline_sky(row["xgrid"], row["ygrid"], values, 3, np.array([383.0]),
                              np.array([1151.0]), "test")  # between four knots
    assert values[4:6, 1:3].min() - 0.5 < mid[0, 0] < values[4:6, 1:3].max() + 0.5


def test_the_cut_out_is_evaluated_at_its_place_on_the_ccd(g_sky) -> None:
    """The cut-out's pixel (x, y) is CCD pixel (x + x0, y + y0); the g frame's sky there is
    146.10-146.19 counts, within 0.2 of the CCD's median sky (sky_med, legacypipe's own
    statistic), and 0.6 sky sigma below the cut-out's sigma-clipped median (150.16), which the
    bright galaxy pulls up."""
    sky = spline_sky(g_sky, (101, 101), "test")
    row = g_sky[0]
    assert sky.shape == (101, 101)
    corner = evaluate_spline_sky(row["xgrid"], row["ygrid"], row["gridvals"], 3,
                                 np.array([row["x0"] + 100.0]), np.array([row["y0"] + 0.0]),
                                 "test")
    assert sky[0, 100] == pytest.approx(corner[0, 0], abs=1e-9)
    assert abs(np.median(sky) - row["sky_med"]) < 0.2
    assert np.ptp(sky) < 0.2


def write_plane(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header)]).writeto(path)
    return path


def flat_frame(tmp_path: Path, sky: float) -> SurveyInputs:
    """One band, a flat sky plus one Gaussian, unit weights, an image PSF, TAN WCS at 0.2"."""
    header = wcs_header(crpix=20.0)
    header["MAGZERO"] = 30.0
    yy, xx = np.mgrid[:40, :40]
    image = sky + 100.0 * np.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / 8.0)
    psf = np.exp(-((np.mgrid[:11, :11] - 5.0) ** 2).sum(axis=0) / 4.0)
    return SurveyInputs({"i": write_plane(tmp_path / "image.fits", image, header)},
                        {"i": write_plane(tmp_path / "weight.fits", np.ones((40, 40)))},
                        {"i": write_plane(tmp_path / "psf.fits", psf)},
                        model_zeropoints={"i": 30.0})


def test_a_sky_image_is_subtracted_pixel_by_pixel(tmp_path) -> None:
    base = flat_frame(tmp_path, 50.0)
    plain = read_survey(base, ("i",), 0.2)
    gradient = 50.0 + np.linspace(-1, 1, 40)[None, :] * np.ones((40, 1))
    sky = write_plane(tmp_path / "sky.fits", gradient)
    with_sky = read_survey(SurveyInputs(base.images, base.weights, base.psfs,
                                        model_zeropoints={"i": 30.0}, skies={"i": sky}),
                           ("i",), 0.2)
    np.testing.assert_allclose(with_sky.images[0], plain.images[0] - gradient, atol=1e-9)
    assert any("sky model" in note and "sky.fits" in note for note in with_sky.notes)


@pytest.mark.parametrize("problem, message", [
    ("shape", "has shape"), ("nan", "non-finite"), ("absent", "no sky model for band i"),
    ("both", "not both"), ("columns", "lacks the SplineSky column"),
    ("one file of tables", "give one per band")])
def test_a_bad_sky_model_is_refused_by_name(tmp_path, problem, message) -> None:
    base = flat_frame(tmp_path, 50.0)
    sky: object = {"i": write_plane(tmp_path / "sky.fits", np.full((40, 40), 50.0))}
    subtract = False
    if problem == "shape":
        sky = {"i": write_plane(tmp_path / "small.fits", np.full((30, 40), 50.0))}
    elif problem == "nan":
        values = np.full((40, 40), 50.0)
        values[3, 4] = np.nan
        sky = {"i": write_plane(tmp_path / "nan.fits", values)}
    elif problem == "absent":
        sky = {"r": write_plane(tmp_path / "other.fits", np.full((40, 40), 50.0))}
    elif problem == "both":
        subtract = True
    elif problem in ("columns", "one file of tables"):
        table = fits.BinTableHDU.from_columns([
            fits.Column("gridvals", "4E", dim="(2,2)", array=np.ones((1, 2, 2)))])
        path = tmp_path / "splinesky.fits"
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
        sky = {"i": path} if problem == "columns" else path
    with pytest.raises(ValueError, match=message):
        read_survey(SurveyInputs(base.images, base.weights, base.psfs,
                                 model_zeropoints={"i": 30.0}, skies=sky,
                                 subtract_sky=subtract), ("i",), 0.2)


def test_one_multi_extension_sky_file_serves_every_band(tmp_path) -> None:
    """``--sky sky.fits`` with one image HDU per band (EXTNAME): each band gets its own plane;
    a band the file lacks is refused by name."""
    base = flat_frame(tmp_path, 50.0)
    plain = read_survey(base, ("i",), 0.2)
    sky = write_mef(tmp_path / "skies.fits", {"i": np.full((40, 40), 49.0),
                                              "r": np.full((40, 40), 7.0)})
    with_sky = read_survey(SurveyInputs(base.images, base.weights, base.psfs,
                                        model_zeropoints={"i": 30.0}, skies=sky), ("i",), 0.2)
    np.testing.assert_allclose(with_sky.images[0], plain.images[0] - 49.0, atol=1e-9)
    only_r = write_mef(tmp_path / "r_only.fits", {"r": np.zeros((40, 40))})
    with pytest.raises(ValueError, match="no image HDU with EXTNAME i"):
        read_survey(SurveyInputs(base.images, base.weights, base.psfs,
                                 model_zeropoints={"i": 30.0}, skies=only_r), ("i",), 0.2)
