"""The observing-conditions grid (issue 23): each row's condition is what it says it is, the
shear-pair defaults are untouched, and a tiny run of ``python -m benchmarks.conditions`` writes
its files and resumes from its cache."""

from __future__ import annotations

import json
from pathlib import Path

import galsim
import numpy as np
import pytest

from benchmarks.conditions import DEFAULT_COSMOS, main
from deblend.core.config import Config
from evaluation.conditions import (
    CONDITIONS,
    NOMINAL_YEARS,
    draw_condition,
    leakage,
    observe,
    reference_fwhm,
)
from evaluation.metacal_shear import Measured
from simulation.galsim_population import (
    GalSimPopulation,
    GalSimScene,
    PopulationSpec,
    real_galaxies,
)
from simulation.shear_pairs import (
    PSF_SCALE_RANGE,
    draw_noiseless_pairs,
    draw_shear_pairs,
    scale_exposure,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "deblend" / "weights" / "quick"
ROW = {c.name: c for c in CONDITIONS}
G = (0.02, 0.02)
HALF = 22.0


@pytest.fixture(scope="module")
def config() -> Config:
    return Config()


@pytest.fixture(scope="module")
def nominal(config):
    return draw_condition(ROW["nominal"], 2, 5, G, config, None)


def test_draw_shear_pairs_defaults_are_unchanged() -> None:
    plain = draw_shear_pairs("galsim", 2, 3, G, neighbours=True, psf_scale=1.1)
    explicit = draw_shear_pairs("galsim", 2, 3, G, neighbours=True, psf_scale=1.1,
                                psf_scale_range=PSF_SCALE_RANGE, psf_shear=(0.0, 0.0),
                                real_catalog=None)
    for name in ("plus", "minus", "correction_noise", "psfs", "sky_variance", "target_snr"):
        assert np.array_equal(getattr(plain, name), getattr(explicit, name)), name
    with pytest.raises(ValueError, match=r"psf_scale must be a number in \[0.9, 1.1\]"):
        draw_shear_pairs("galsim", 2, 3, G, neighbours=True, psf_scale=1.4)
    wide = draw_noiseless_pairs("galsim", 2, 3, G, neighbours=True, psf_scale=1.4,
                                psf_scale_range=(0.5, 2.0))
    assert wide.psfs.max() < plain.psfs.max()  # a wider PSF: a lower peak
    with pytest.raises(ValueError, match="options of the galsim population"):
        draw_noiseless_pairs("btk", 2, 3, G, neighbours=True, psf_shear=(0.05, 0.0))


@pytest.mark.parametrize("name, component", [("psf_g1", 0), ("psf_g2", 1), ("nominal", None)])
def test_psf_images_have_the_row_ellipticity(config, name, component) -> None:
    pairs = draw_condition(ROW[name], 2, 5, G, config, None)
    for psf in pairs.psfs:
        shape = galsim.hsm.FindAdaptiveMom(galsim.Image(psf, scale=0.2)).observed_shape
        g = np.array([shape.g1, shape.g2])
        expected = np.zeros(2)
        if component is not None:
            expected[component] = 0.05
        # the pixel (in the effective PSF) rounds it by ~3%
        np.testing.assert_allclose(g, expected, atol=0.003)
        others = [0, 1] if component is None else [1 - component]
        assert np.all(np.abs(g[others]) < 1e-5)


def test_galaxies_are_drawn_with_the_metacal_psf() -> None:
    """A point-like galaxy's image is the PSF image metacal is given (elliptical PSF too)."""
    pop = GalSimPopulation("LSST", 45, 1.3, PopulationSpec(), psf_shear=(0.0, 0.05))
    one = np.zeros(1)
    point = GalSimScene(ra=one, dec=one, hlr=one + 1e-3, bulge_fraction=one, e1=one, e2=one,
                        mags=np.full((1, len(pop.bands)), 20.0))
    blend, _ = pop.draw(point)
    image = blend / blend.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(image, pop.psf_images(), atol=1e-4 * pop.psf_images().max())


def test_fwhm_rows_set_the_r_band_fwhm(config) -> None:
    pairs = draw_condition(ROW["fwhm_1.2"], 2, 5, G, config, None)
    nominal = draw_condition(ROW["nominal"], 2, 5, G, config, None)
    assert 0.81 < reference_fwhm("LSST") < 0.83
    r = list(pairs.bands).index("r")
    fwhm = [galsim.Image(p[r], scale=0.2).calculateFWHM() for p in (pairs.psfs, nominal.psfs)]
    # effective PSFs (with the pixel): the ratio is close to 1.2 / 0.82, not equal
    assert 1.3 < fwhm[0] / fwhm[1] < 1.5


def test_depth_scales_signal_and_noise_as_the_exposure_time(nominal) -> None:
    deep = observe(nominal, ROW["nominal"], 5, G, HALF)
    shallow_truth = scale_exposure(nominal, ROW["depth_1yr"].years / NOMINAL_YEARS)
    shallow = observe(shallow_truth, ROW["depth_1yr"], 5, G, HALF)
    np.testing.assert_allclose(shallow.sky_variance, 0.1 * deep.sky_variance, rtol=1e-12)
    np.testing.assert_allclose(shallow_truth.plus_target, 0.1 * nominal.plus_target, rtol=1e-6)
    # same noise field: noise grows as sqrt(t), signal as t, so noise / signal as 1 / sqrt(t)
    noise_deep = deep.plus - nominal.plus_blend
    noise_shallow = shallow.plus - shallow_truth.plus_blend
    np.testing.assert_allclose(noise_shallow, np.sqrt(0.1) * noise_deep, rtol=1e-3,
                               atol=1e-3 * np.abs(noise_deep).max())
    np.testing.assert_allclose(shallow.target_snr, np.sqrt(0.1) * deep.target_snr, rtol=1e-5)


def test_missing_band_row_zeroes_exactly_that_band(nominal) -> None:
    full = observe(nominal, ROW["nominal"], 5, G, HALF)
    missing = observe(nominal, ROW["no_i"], 5, G, HALF)
    i = list(full.bands).index("i")
    for name in ("plus", "minus", "correction_noise"):
        a, b = getattr(full, name), getattr(missing, name)
        assert np.all(b[:, i] == 0) and np.any(a[:, i] != 0), name
        others = [k for k in range(len(full.bands)) if k != i]
        assert np.array_equal(a[:, others], b[:, others]), name


def test_sky_residual_is_a_constant_and_a_gradient_of_the_requested_level(nominal) -> None:
    full = observe(nominal, ROW["nominal"], 5, G, HALF)
    level = ROW["sky_0.3"].sky_residual
    shifted = observe(nominal, ROW["sky_0.3"], 5, G, HALF)
    residual = shifted.plus.astype(np.float64) - full.plus
    np.testing.assert_allclose(shifted.minus - full.minus, residual, atol=1e-3)
    sigma = np.sqrt(full.sky_variance)
    size = residual.shape[-1]
    y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2
    design = np.stack([np.ones(size * size), x.ravel(), y.ravel()], axis=1)
    for scene in residual:
        for b, band_residual in enumerate(scene):
            coef = np.linalg.lstsq(design, band_residual.ravel(), rcond=None)[0]
            np.testing.assert_allclose(coef[0], level * sigma[b], rtol=1e-4)
            np.testing.assert_allclose(np.hypot(*coef[1:]) * HALF, level * sigma[b], rtol=1e-4)
    assert np.array_equal(shifted.correction_noise, full.correction_noise)


def _measured(e: np.ndarray) -> Measured:
    n = len(e)
    kept = {k: np.ones(n, bool) for k in ("noshear", "1p", "1m", "2p", "2m")}
    return Measured(e, np.tile(np.eye(2), (n, 1, 1)), kept)


def test_leakage_recovers_an_injected_alpha() -> None:
    rng = np.random.default_rng(0)
    e_plus, e_minus = rng.normal(0, 0.3, (40, 2)), rng.normal(0, 0.3, (40, 2))
    reference = (_measured(e_plus), _measured(e_minus))
    shift = np.array([0.0, 0.1 * 0.05])  # alpha = 0.1 on e2 for g_psf2 = 0.05
    row = (_measured(e_plus + shift), _measured(e_minus + shift))
    alpha, error = leakage(row, reference, (0.0, 0.05), delta=0.01, n_bootstrap=20)
    assert alpha == pytest.approx(0.1, abs=1e-12)
    assert error == pytest.approx(0.0, abs=1e-12)  # paired: the shape noise cancels


@pytest.mark.skipif(not DEFAULT_COSMOS.is_file(), reason="COSMOS sample data not found")
def test_real_galaxies_keep_flux_and_rotate_with_their_twin() -> None:
    spec = PopulationSpec(min_neighbours=0, max_neighbours=0)
    pop = GalSimPopulation("LSST", 45, 1.0, spec, real_catalog=str(DEFAULT_COSMOS))
    scene, twin = pop.sample(2, 1, neighbours=False)
    assert scene.real_index is not None and np.isnan(scene.hlr).all()
    parametric = GalSimPopulation("LSST", 45, 1.0, spec).sample(2, 1, neighbours=False)[0]
    assert np.array_equal(scene.ra, parametric.ra)  # the same scenes, other profiles
    i = pop.bands.index("i")
    catalogue_mag = real_galaxies(str(DEFAULT_COSMOS)).mags[scene.real_index]
    assert np.all(scene.mags[:, i] >= np.maximum(parametric.mags[:, i], catalogue_mag - 1.0)
                  - 1e-12)
    image, _ = pop.draw(scene)
    turned, _ = pop.draw(twin)
    flux = pop.fluxes(scene)[0]
    # pedestal removed: the stamp holds the galaxy's flux, not a plateau's
    assert np.all(image.sum(axis=(1, 2)) > 0.9 * flux)
    assert np.all(image.sum(axis=(1, 2)) < 1.01 * flux)
    # the twin is the scene turned by +90 degrees: (x, y) -> (-y, x)
    np.testing.assert_allclose(turned, np.rot90(image, k=-1, axes=(1, 2)),
                               atol=2e-3 * image.max())


@pytest.mark.skipif(not DEFAULT_COSMOS.is_file(), reason="COSMOS sample data not found")
def test_the_held_out_row_draws_only_galaxies_training_never_draws() -> None:
    """Row ``cosmos_held_out`` draws the catalogue's odd rows, those a run trained with
    ``simulation.morphology.real_fraction`` never saw; a run that trained on the catalogue is
    measured on that row alone."""
    from deblend.core.config import config_from_dict
    from evaluation.conditions import CONDITIONS, select_rows, trains_on
    from simulation.galsim_population import real_galaxy_split

    spec = PopulationSpec(min_neighbours=2, max_neighbours=2)
    held_out = GalSimPopulation("LSST", 45, 1.0, spec, real_catalog=str(DEFAULT_COSMOS),
                                real_rows="held_out")
    rows = np.concatenate([s.real_index for s in held_out.sample(40, 3)])
    training, odd = real_galaxy_split(100)
    assert set(rows.tolist()) <= set(odd.tolist()) and len(set(rows.tolist())) > 25
    every = GalSimPopulation("LSST", 45, 1.0, spec, real_catalog=str(DEFAULT_COSMOS))
    assert np.isin(np.concatenate([s.real_index for s in every.sample(40, 3)]), training).any()

    trained = config_from_dict({"simulation": {"morphology": {
        "real_fraction": 0.3, "real_catalog": str(DEFAULT_COSMOS)}}})
    assert trains_on(trained, str(DEFAULT_COSMOS)) and not trains_on(Config(), str(DEFAULT_COSMOS))
    notes: list[str] = []
    names = [c.name for c in select_rows(None, str(DEFAULT_COSMOS), notes.append, CONDITIONS,
                                         trained_on_cosmos=True)]
    assert "cosmos_held_out" in names and "cosmos" not in names and "held-out" in notes[0]
    assert "cosmos" in [c.name for c in select_rows(None, str(DEFAULT_COSMOS), notes.append)]


def test_cli_tiny_run_writes_its_files_and_resumes(tmp_path, capsys) -> None:
    out, report = tmp_path / "grid", tmp_path / "grid.json"
    args = ["--run", str(RUN), "--n-scenes", "4", "--rows", "no_y", "--out", str(out),
            "--json", str(report), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "y band missing" in table and "|m| <= 0.003" in table
    for name in ("report.md", "metrics.json", "fig_conditions.png"):
        assert (out / name).is_file(), name
    result = json.loads(report.read_text())
    assert list(result["rows"]) == ["nominal", "no_y"]
    assert result["rows"]["no_y"]["n_scenes"] == 4
    assert "anacal" in result["rows"]["nominal"] and "anacal" not in result["rows"]["no_y"]
    nominal = result["rows"]["nominal"]
    bins = nominal["response_by_snr"]
    assert sum(b["scenes"] for b in bins) == 4 and all("anacal" in b for b in bins)
    mean = sum(b["scenes"] * b["regressor"] for b in bins) / 4
    assert mean == pytest.approx(0.5 * (nominal["regressor"]["R11"] + nominal["regressor"]["R22"]))
    assert "Mean metacal response (R11 + R22) / 2 by the target's S/N" in table
    assert "Mean metacal response" in (out / "report.md").read_text()
    assert "AnaCal's own with the same noise" in (out / "report.md").read_text()
    chunks = sorted(p.name for p in (out / "cache").iterdir())
    assert chunks == ["no_y_chunk0000.npz", "nominal_chunk0000.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    assert main(args) == 2  # an existing result is not replaced without --force
    assert main([*args, "--force"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == stamps  # cached
    assert json.loads(report.read_text())["rows"] == result["rows"]


def test_the_response_is_averaged_in_bins_of_the_target_snr() -> None:
    """Scenes at S/N 50 and 2,000 and 50,000 fall in their bins (the last open-ended), each
    bin's mean response is (R11 + R22) / 2 over the +g and -g stamps, and an estimator not
    measured on the row is left out."""
    from evaluation.conditions import response_by_snr

    def response(values):
        r = np.zeros((len(values), 2, 2))
        r[:, 0, 0], r[:, 1, 1] = values, np.asarray(values) + 0.2
        return r

    arrays = {"target_snr": np.array([50.0, 60.0, 2000.0, 5e4]),
              "plus.regressor.response": response([0.1, 0.3, 0.5, 0.7]),
              "minus.regressor.response": response([0.3, 0.5, 0.7, 0.9])}
    bins = response_by_snr(arrays)
    assert [b["snr"] for b in bins] == [[30.0, 100.0], [1000.0, 3000.0], [30000.0, None]]
    assert [b["scenes"] for b in bins] == [2, 1, 1]
    assert [b["regressor"] for b in bins] == pytest.approx([0.4, 0.7, 0.9])
    assert all("anacal" not in b for b in bins)


def test_cli_refuses_odd_or_tiny_sizes(capsys) -> None:
    for n in ("3", "2"):
        with pytest.raises(SystemExit):
            main(["--run", str(RUN), "--n-scenes", n])
    assert "even integer >= 4" in capsys.readouterr().err


def test_the_row_calibrated_rmse_is_the_noise_over_the_slope() -> None:
    """A regressor shrunk by 0.4 with noise 0.02 has a raw RMSE set by the shrinkage (0.18) and a
    row-calibrated one of 0.02 / 0.4 (a model trained on many skies has one stored response)."""
    from evaluation.conditions import row_calibrated_rmse

    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 0.3, (4000, 2))
    predicted = 0.4 * truth + rng.normal(0.0, 0.02, truth.shape)
    predicted[7] = np.nan  # a failed measurement is left out
    assert row_calibrated_rmse(predicted, truth) == pytest.approx(0.05, rel=0.05)
    assert np.sqrt(np.nanmean((predicted - truth) ** 2)) > 0.17


def test_the_shear_noise_is_the_spread_over_the_response() -> None:
    """e = R g_intrinsic-like spread 0.3 with R = 0.5 on both components: 0.6 per galaxy; rows a
    selection dropped and NaNs are left out."""
    from evaluation.conditions import shear_noise

    rng = np.random.default_rng(2)
    n = 4000
    e = rng.normal(0.0, 0.3, (n, 2))
    e[:10] = 5.0  # not kept: must not count
    e[10] = np.nan
    kept = np.ones(n, bool)
    kept[:10] = False
    arrays = {"plus.x.e": e, "plus.x.response": np.broadcast_to(np.diag([0.5, 0.5]), (n, 2, 2)),
              "plus.x.kept.noshear": kept}
    assert shear_noise(arrays, "x") == pytest.approx(0.6, rel=0.03)


def test_cli_metacal_target_psf_is_used_cached_apart_and_reported(tmp_path, capsys) -> None:
    """--target-psf-fwhm: another response than the rule's (a wider Gaussian), its own cache,
    said in the report; one narrower than the PSF allows fails with the key's name. Likewise
    --hold-sky-plane is recorded, said and not read from the plain measurement's cache."""
    base = ["--run", str(RUN), "--n-scenes", "4", "--rows", "nominal", "--no-progress",
            "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "rule")]) == 0
    assert main([*base, "--out", str(tmp_path / "wide"), "--target-psf-fwhm", "2.2"]) == 0
    rule, wide = (json.loads((tmp_path / d / "metrics.json").read_text())["conditions"]
                  for d in ("rule", "wide"))
    assert rule["target_psf_fwhm"] is None and wide["target_psf_fwhm"] == 2.2
    assert (wide["rows"]["nominal"]["regressor"]["R11"]
            != rule["rows"]["nominal"]["regressor"]["R11"])
    assert 'FWHM 2.2"' in (tmp_path / "wide" / "report.md").read_text()
    # metacal.hold_sky_plane: recorded, said, and cached apart from the plain measurement
    assert main([*base, "--out", str(tmp_path / "rule"), "--hold-sky-plane", "--force"]) == 0
    held = json.loads((tmp_path / "rule" / "metrics.json").read_text())["conditions"]
    assert held["hold_sky_plane"] is True and rule["hold_sky_plane"] is False
    assert "fitted sky plane" in (tmp_path / "rule" / "report.md").read_text()
    assert (held["rows"]["nominal"]["regressor"]["R11"]  # measured again, not the cached chunk
            != rule["rows"]["nominal"]["regressor"]["R11"])
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "narrow"), "--target-psf-fwhm", "0.9"]) != 0
    assert "metacal.target_psf_fwhm" in capsys.readouterr().err


def test_the_report_says_what_sky_the_model_was_trained_on() -> None:
    from deblend.core.config import config_from_dict
    from evaluation.conditions import NOMINAL_SKY, training_sky

    assert training_sky(Config()) == NOMINAL_SKY
    varied = config_from_dict({"simulation": {"conditions": {"depth_years": [2.0, 10.0]},
                                              "morphology": {"real_fraction": 0.3,
                                                             "real_catalog": "real.fits"}},
                               "model": {"availability_input": True}})
    words = training_sky(varied)
    assert "depth 2-10 years" in words and "knotty" in words and "availability" in words
    assert "30% from real HST images" in words


def test_a_des_run_gets_des_rows_and_des_depths() -> None:
    """The grid follows the run's survey: a missing-band row per DES band (Y included, no u),
    depth rows as fractions of DES's 6 years (1 year is 1/6 of the exposure, not 1/10)."""
    from evaluation.conditions import depth_factor, run_grid, select_rows

    des = Config().replace("simulation", survey="DES")
    grid = {c.name: c for c in run_grid(des)}
    assert [n for n in grid if n.startswith("no_")] == ["no_g", "no_r", "no_i", "no_z", "no_Y"]
    assert grid["nominal"].label == "DES nominal"
    assert depth_factor(grid["depth_1yr"], "DES") == pytest.approx(1 / 6)
    assert depth_factor(grid["depth_1yr"], "LSST") == pytest.approx(1 / 10)
    assert depth_factor(grid["nominal"], "DES") == 1.0
    assert [c.name for c in select_rows(["no_Y"], None, print, tuple(grid.values()))] == [
        "nominal", "no_Y"]
    with pytest.raises(ValueError, match="unknown rows"):
        select_rows(["no_u"], None, print, tuple(grid.values()))
