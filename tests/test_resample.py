"""Resampling survey images onto the model's pixel grid (deblend.core.resample), with GalSim."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deblend.core.resample import BandResampler, OutputGrid, galsim_wcs, resample_to_scale


def tan_header(shape: tuple[int, int], scale: float, *, crval=(150.0, 2.0),
               rotation_deg: float = 0.0, crpix_shift=(0.0, 0.0)) -> fits.Header:
    """A TAN header: ``scale`` arcsec pixels, east left, rotated by ``rotation_deg``."""
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    cd = np.array([[-c, s], [s, c]]) * scale / 3600.0
    return fits.Header({"NAXIS": 2, "NAXIS1": shape[1], "NAXIS2": shape[0],
                        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                        "CRPIX1": (shape[1] + 1) / 2.0 + crpix_shift[0],
                        "CRPIX2": (shape[0] + 1) / 2.0 + crpix_shift[1],
                        "CRVAL1": crval[0], "CRVAL2": crval[1], "CD1_1": cd[0, 0],
                        "CD1_2": cd[0, 1], "CD2_1": cd[1, 0], "CD2_2": cd[1, 1]})


def adaptive_moments(image: np.ndarray, scale: float) -> np.ndarray:
    """(sigma in arcsec, e1, e2) of galsim.hsm's adaptive moments."""
    result = galsim.hsm.FindAdaptiveMom(galsim.Image(image, scale=scale))
    shape = result.observed_shape
    return np.array([result.moments_sigma * scale, shape.e1, shape.e2])


GALAXY = galsim.Convolve(
    galsim.Sersic(1.5, half_light_radius=0.6, flux=1e4).shear(e1=0.3, e2=-0.2)
    .shift(0.05, -0.03), galsim.Moffat(beta=3.0, fwhm=0.7))


def test_a_galaxy_resampled_from_hsc_to_lsst_pixels_keeps_its_flux_and_moments() -> None:
    """0.168" -> 0.2": flux, adaptive size and e within 1e-3 of the same galaxy drawn directly
    on the 0.2" grid (with the 0.168" pixel response, which the resampled image carries)."""
    native = GALAXY.drawImage(nx=181, ny=181, scale=0.168).array
    resampled = resample_to_scale(native, 0.168, 0.2)
    assert resampled.shape == (152, 152)
    truth = galsim.Convolve(GALAXY, galsim.Pixel(0.168)).drawImage(
        nx=152, ny=152, scale=0.2, method="no_pixel").array
    assert resampled.sum() == pytest.approx(native.sum(), rel=1e-3)
    got, want = adaptive_moments(resampled, 0.2), adaptive_moments(truth, 0.2)
    assert got[0] == pytest.approx(want[0], rel=1e-3)
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-3)


def test_the_output_grid_wcs_is_the_reference_wcs_at_the_mapped_pixels() -> None:
    shape = (101, 97)
    header = tan_header(shape, 0.263, rotation_deg=23.0, crpix_shift=(-300.0, 120.0))
    grid = OutputGrid.over(header, shape, 0.2, "ref")
    s = 0.2 / 0.263
    assert grid.shape == (round(101 / s), round(97 / s))
    reference = WCS(header)
    out = np.array([[0.0, 0.0], [grid.shape[1] - 1.0, 17.0], [40.5, grid.shape[0] - 1.0]])
    centre_out = (np.array(grid.shape[::-1]) - 1) / 2.0
    centre_ref = (np.array(shape[::-1]) - 1) / 2.0
    ref_pixels = centre_ref + (out - centre_out) * s
    np.testing.assert_allclose(grid.wcs.all_pix2world(out, 0),
                               reference.all_pix2world(ref_pixels, 0), atol=1e-9)
    band = BandResampler(galsim_wcs(header, "ref"), shape, grid, "ref")
    np.testing.assert_allclose(band.native_position(out[:, 0], out[:, 1]).T, ref_pixels,
                               atol=1e-4)


def test_a_star_lands_where_its_sky_position_says_in_every_band() -> None:
    """Two bands on different grids (pixel scale, rotation, pointing): a point source at one
    sky position is drawn in each; after resampling both peak at the output pixel the output
    WCS gives for that position, and the resampled PSF matches the resampled star."""
    psf = galsim.Moffat(beta=3.0, fwhm=0.9)
    star_radec = (150.0003, 2.0002)
    grids = {"g": tan_header((101, 101), 0.263),
             "z": tan_header((95, 105), 0.27, rotation_deg=90.0, crval=(150.0001, 1.99995))}
    grid = OutputGrid.over(grids["g"], (101, 101), 0.2, "g")
    want = np.array(grid.wcs.all_world2pix([star_radec], 0)[0])
    for name, header in grids.items():
        shape = (header["NAXIS2"], header["NAXIS1"])
        wcs = galsim_wcs(header, name)
        star_pixel = np.array(WCS(header).all_world2pix([star_radec], 0)[0])
        centre = (np.array(shape[::-1]) - 1) / 2.0
        local = wcs.local(galsim.PositionD(*(centre + 1)))
        image = galsim.Image(shape[1], shape[0], wcs=local)
        psf.drawImage(image, offset=tuple(star_pixel - centre))
        band = BandResampler(wcs, shape, grid, name)
        out = band.draw(image.array)
        assert out.sum() == pytest.approx(image.array.sum(), rel=2e-3), name
        moments = galsim.hsm.FindAdaptiveMom(galsim.Image(out))
        got = np.array([moments.moments_centroid.x - 1, moments.moments_centroid.y - 1])
        np.testing.assert_allclose(got, want, atol=0.02, err_msg=name)
        native_psf = psf.drawImage(nx=25, ny=25, wcs=local).array
        resampled_psf = band.psf(native_psf / native_psf.sum(), 31)
        x, y = np.rint(want).astype(int)
        cut = out[y - 15:y + 16, x - 15:x + 16] / out.sum()
        np.testing.assert_allclose(adaptive_moments(resampled_psf, 1.0),
                                   adaptive_moments(cut, 1.0), rtol=3e-3, atol=2e-3,
                                   err_msg=name)


def test_masked_pixels_and_edges_are_masked_on_the_output_and_change_nothing() -> None:
    shape = (80, 80)
    header = tan_header(shape, 0.263)
    grid = OutputGrid.over(header, shape, 0.2, "band")
    band = BandResampler(galsim_wcs(header, "band"), shape, grid, "band")
    rng = np.random.default_rng(1)
    image = rng.normal(0.0, 1.0, shape)
    masked = np.zeros(shape, bool)
    masked[40, 30] = True
    variance = np.ones(shape)
    garbage = image.copy()
    garbage[masked] = 1e6
    out_mask = band.masked(masked)
    clean = np.where(masked, 0.0, image)
    a = band.draw(clean)
    b = band.draw(np.where(masked, 0.0, garbage))
    assert np.array_equal(a, b)
    # the masked pixel reaches the output pixels whose kernel reads it, and only a few
    x, y = band.native_position(*np.indices(grid.shape)[::-1])
    near = (np.abs(x - 30) < 2.5) & (np.abs(y - 40) < 2.5)
    assert out_mask[near].all()
    assert out_mask[(np.abs(x - 30) > 4) & (np.abs(y - 40) > 4) & (x > 4) & (y > 4)
                    & (x < 75) & (y < 75)].sum() == 0
    # the frame: no data where the kernel runs off the image
    assert out_mask[0].all() and out_mask[:, -1].all()
    var = band.variance(variance, masked)
    assert np.isinf(var[out_mask]).all() and np.isfinite(var[~out_mask]).all()


def test_the_variance_map_follows_resampled_white_noise() -> None:
    """Unit white noise on 0.263" pixels, resampled to 0.2": the variance map's interior value
    equals the resampled noise's measured variance (another realisation) to a few percent."""
    shape = (150, 150)
    header = tan_header(shape, 0.263)
    grid = OutputGrid.over(header, shape, 0.2, "band")
    band = BandResampler(galsim_wcs(header, "band"), shape, grid, "band")
    variance = band.variance(np.full(shape, 4.0), np.zeros(shape, bool))
    noise = band.draw(np.random.default_rng(7).normal(0.0, 2.0, shape))
    inside = np.isfinite(variance)
    assert np.median(variance[inside]) == pytest.approx(np.var(noise[inside]), rel=0.05)
    # fewer counts per smaller pixel: the variance per pixel falls by more than the area ratio
    assert np.median(variance[inside]) < 4.0 * (0.2 / 0.263) ** 2


def test_images_too_distorted_for_one_affine_wcs_are_refused() -> None:
    """A TPV distortion whose quadratic term moves the corners by ~1 pixel."""
    header = tan_header((101, 101), 0.263)
    header["CTYPE1"], header["CTYPE2"] = "RA---TPV", "DEC--TPV"
    for axis in (1, 2):  # identity up to second order
        header.update({f"PV{axis}_{k}": float(k == 1) for k in range(7)})
    header["PV1_4"] = header["PV1_6"] = 10.0  # x^2 + y^2 (GalSim needs the last term set)
    with pytest.raises(ValueError, match="smaller tiles"):
        OutputGrid.over(header, (101, 101), 0.2, "distorted")
    header["PV1_4"] = header["PV1_6"] = 0.01  # a mild distortion is fine
    OutputGrid.over(header, (101, 101), 0.2, "distorted")
