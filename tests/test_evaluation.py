"""Evaluation metrics on hand-made cases, and the report end to end on the tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import galsim
import numpy as np
import pytest

from evaluation.ellipticity import (
    breakdown,
    ellipticity_stats,
    fit_line,
    magnitude_bin_labels,
    magnitude_bins,
)
from evaluation.estimators import (
    hsm_estimator,
    label_image,
    measure_estimators,
    moments_estimator,
)
from evaluation.metrics import (
    cosine_similarity,
    flux_size_residuals,
    relative_residual,
    robust_summary,
    ssim_per_band,
)
from evaluation.plots import sigma_contour_levels
from evaluation.report_io import fmt, jsonable, markdown_table, replace_section, section

BANDS = ("u", "g", "r", "i", "z", "y")
LABEL_BANDS = ("r", "i", "z")


def _galaxies(n: int = 3, size: int = 45, seed: int = 0) -> np.ndarray:
    """Raw-like images (n, 6, size, size) of round-ish Gaussian blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    out = np.zeros((n, len(BANDS), size, size))
    for i in range(n):
        sx, sy = rng.uniform(1.5, 4.0, 2)
        blob = np.exp(-0.5 * (((x - size // 2) / sx) ** 2 + ((y - size // 2) / sy) ** 2))
        out[i] = blob * rng.uniform(100, 1000, len(BANDS))[:, None, None]
    return out


# -- image fidelity ------------------------------------------------------------------------------
def test_identical_images_give_ssim_and_cosine_one() -> None:
    images = np.tanh(np.arcsinh(_galaxies() / 300.0))  # normalised-like values in [0, 1)
    assert np.allclose(ssim_per_band(images, images), 1.0)
    assert np.allclose(cosine_similarity(images, images), 1.0)


def test_cosine_is_scale_invariant_and_ssim_is_not() -> None:
    images = np.tanh(np.arcsinh(_galaxies() / 300.0))
    assert np.allclose(cosine_similarity(0.5 * images, images), 1.0)
    assert np.all(ssim_per_band(0.5 * images, images) < 0.999)
    other = np.roll(images, 10, axis=-1)
    assert np.all(cosine_similarity(other, images) < 0.9)


def test_cosine_of_empty_image_is_nan() -> None:
    images = _galaxies(2)
    zero = images.copy()
    zero[1] = 0
    result = cosine_similarity(zero, images)
    assert np.isfinite(result[0]) and np.isnan(result[1])


def test_flux_and_size_residuals() -> None:
    truth = _galaxies(4)
    same = flux_size_residuals(truth, truth)
    assert np.allclose(same["flux"], 0) and np.allclose(same["size"], 0)
    brighter = flux_size_residuals(1.1 * truth, truth)
    assert np.allclose(brighter["flux"], 0.1) and np.allclose(brighter["size"], 0, atol=1e-12)
    assert np.isnan(relative_residual(np.array([1.0]), np.array([0.0])))[0]
    summary = robust_summary(np.array([1.0, 2.0, 3.0, np.nan]))
    assert summary["median"] == 2.0 and summary["n"] == 3
    assert summary["nmad"] == pytest.approx(1.4826)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_per_band(np.zeros((1, 6, 45, 45)), np.zeros((1, 6, 44, 44)))


# -- estimators ---------------------------------------------------------------------------------
@pytest.mark.parametrize("g1, g2", [(0.3, -0.2), (-0.15, 0.0), (0.05, 0.25)])
def test_sheared_profile_recovers_its_distortion(g1: float, g2: float) -> None:
    """An exponential sheared by g, drawn large without PSF: e = 2g / (1 + |g|^2)."""
    profile = galsim.Exponential(half_light_radius=4.0).shear(g1=g1, g2=g2)
    image = profile.drawImage(nx=181, ny=181, scale=1.0, method="no_pixel").array
    stack = np.zeros((1, len(BANDS)) + image.shape)
    for b, weight in zip(range(len(BANDS)), (0.1, 0.5, 1.0, 1.2, 0.8, 0.6)):
        stack[0, b] = weight * image
    expected = galsim.Shear(g1=g1, g2=g2)
    e1, e2 = moments_estimator(stack, BANDS, LABEL_BANDS)
    assert e1[0] == pytest.approx(expected.e1, abs=2e-3)
    assert e2[0] == pytest.approx(expected.e2, abs=2e-3)
    h1, h2 = hsm_estimator(stack, BANDS, LABEL_BANDS)
    assert h1[0] == pytest.approx(expected.e1, abs=1e-2)
    assert h2[0] == pytest.approx(expected.e2, abs=1e-2)


def test_label_image_sums_the_label_bands() -> None:
    images = _galaxies(2)
    summed = label_image(images, BANDS, LABEL_BANDS)
    assert np.allclose(summed, images[:, 2:5].sum(axis=1))
    with pytest.raises(ValueError, match="label band 'q'"):
        label_image(images, BANDS, ("q",))


def test_measure_estimators_keys() -> None:
    images = _galaxies(4)
    out = measure_estimators(bands=BANDS, label_bands=LABEL_BANDS, reconstruction_raw=images,
                             regressor_e=np.zeros((4, 2)), blend_raw=images, noisy_raw=images,
                             clean_raw=images, references=True)
    assert set(out) == {"regressor", "recon_moments", "recon_hsm", "blend_moments", "blend_hsm",
                        "noisy_moments", "noisy_hsm", "truth_moments", "truth_hsm"}
    assert np.allclose(out["recon_moments"][0], out["truth_moments"][0])


# -- ellipticity statistics ---------------------------------------------------------------------
def test_fit_line_recovers_slope_and_intercept() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.6, 0.6, 2000)
    y = 0.8 * x + 0.01 + rng.normal(0, 0.02, x.size)
    fit = fit_line(x, y)
    assert fit["slope"] == pytest.approx(0.8, abs=4 * fit["slope_err"])
    assert fit["intercept"] == pytest.approx(0.01, abs=4 * fit["intercept_err"])
    assert np.isnan(fit_line(np.array([1.0, 2.0]), np.array([1.0, 2.0]))["slope"])


def test_ellipticity_stats_on_a_round_biased_estimator() -> None:
    rng = np.random.default_rng(2)
    e1, e2 = rng.uniform(-0.5, 0.5, (2, 500))
    stats = ellipticity_stats(e1, e2, 0.7 * e1, 0.7 * e2)
    assert stats.e1.slope == pytest.approx(0.7)
    assert stats.e2.intercept == pytest.approx(0.0, abs=1e-12)
    assert stats.e.mean_ratio == pytest.approx(0.7)
    assert stats.e1.rmse == pytest.approx(np.sqrt(np.mean((0.3 * e1) ** 2)))
    perfect = ellipticity_stats(e1, e2, e1, e2)
    assert perfect.e1.rmse == 0 and perfect.e.mean_ratio == pytest.approx(1.0)
    with_nan = ellipticity_stats(e1, e2, np.where(np.arange(500) < 10, np.nan, e1), e2)
    assert with_nan.n_valid == 490 and with_nan.n == 500


def test_breakdown_groups() -> None:
    rng = np.random.default_rng(3)
    n = 300
    e1, e2 = rng.uniform(-0.5, 0.5, (2, n))
    n_gal = rng.integers(1, 4, n)
    mags = rng.uniform(20, 25.3, n)
    result = breakdown(e1, e2, e1, e2, n_gal, mags, (22.0, 23.0, 24.0))
    assert set(result.by_n_galaxies) == {"1", "2", "3"}
    assert list(result.by_magnitude) == ["< 22", "22-23", "23-24", ">= 24"]
    assert sum(s.n for s in result.by_magnitude.values()) == n
    assert magnitude_bin_labels([]) == ["all"]
    assert list(magnitude_bins(np.array([21.0, 22.0, 25.0]), [22.0, 24.0])) == [0, 1, 2]
    with pytest.raises(ValueError, match="increase"):
        magnitude_bins(np.zeros(2), [23.0, 22.0])


def test_contour_levels_enclose_the_fractions() -> None:
    density = np.linspace(0.0, 1.0, 10001)
    levels = sigma_contour_levels(density)
    for level, fraction in zip(levels, (0.6827, 0.9545, 0.9973)):
        assert np.mean(density >= level) == pytest.approx(fraction, abs=1e-3)


# -- output helpers ----------------------------------------------------------------------------
def test_report_io_helpers() -> None:
    assert jsonable({"a": np.float32(np.nan), "b": (np.int64(2), np.array([1.5]))}) == \
        {"a": None, "b": [2, [1.5]]}
    assert fmt(None) == fmt(float("nan")) == "–"
    assert fmt(0.12345, 2, signed=True) == "+0.12"
    text = section("a", "first") + section("b", "second")
    replaced = replace_section(text, "b", "new")
    assert "first" in replaced and "new" in replaced and "second" not in replaced
    assert "extra" in replace_section(text, "c", "extra")
    assert markdown_table(["x", "y"], [[1, 2]]).splitlines()[1] == "| :--- | ---: |"


# -- end to end ---------------------------------------------------------------------------------
EXPECTED_FIGURES = ("fig12_gallery.png", "fig13_fidelity.png", "fig14_ellipticity_scatter.png",
                    "fig15_delta_e.png", "fig16_e_distributions.png", "fig_flux_size.png",
                    "fig_breakdown.png")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, trained_run: Path,
               tiny_dataset: Path) -> Path:
    from evaluation.report import main

    out = tmp_path_factory.mktemp("report") / "evaluation"
    assert main(["--run", str(trained_run), "--data", str(tiny_dataset), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_report_end_to_end(report_dir: Path) -> None:
    for name in EXPECTED_FIGURES:
        path = report_dir / name
        assert path.is_file() and path.stat().st_size > 1000, name
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for key in ("meta", "conventions", "fidelity", "flux_size", "ellipticity", "figures"):
        assert key in metrics
    assert set(metrics["fidelity"]) == {"t1", "t2"}
    for stage in ("t1", "t2"):
        fid = metrics["fidelity"][stage]
        assert 0 < fid["ssim_mean"] <= 1 and -1 <= fid["cosine_mean"] <= 1
        assert set(fid["ssim_per_band"]) == set(BANDS)
    assert metrics["conventions"]["ssim_data_range"] == 1.0
    ell = metrics["ellipticity"]
    for name in ("regressor", "recon_moments", "recon_hsm", "blend_moments", "noisy_moments"):
        stats = ell[name]["all"]
        assert {"e1", "e2", "e"} <= set(stats)
        assert {"slope", "intercept", "rmse"} <= set(stats["e1"])
        assert "mean_ratio" in stats["e"]
        assert ell[name]["by_n_galaxies"] and ell[name]["by_magnitude"]
    assert metrics["meta"]["n_evaluated"] == metrics["meta"]["n_validation"] == 32
    report = (report_dir / "report.md").read_text()
    for name in EXPECTED_FIGURES:
        assert f"]({name})" in report
    assert "data_range = 1" in report
    assert f"{metrics['fidelity']['t2']['ssim_mean']:.3f}" in report


def test_metrics_json_reads_back_as_the_typed_result(report_dir: Path) -> None:
    from evaluation.results import EvaluationResult

    plain = json.loads((report_dir / "metrics.json").read_text())
    result = EvaluationResult.read(report_dir)
    assert result.to_dict() == plain  # lossless: every number and key survives the round trip
    assert result.ellipticity["recon_hsm"].vs_hsm_truth is not None
    assert result.ellipticity["regressor"].vs_hsm_truth is None
    broken = dict(plain, fidelity={"t1": {"ssim_mean": "high"}})
    with pytest.raises(ValueError, match="not a valid EvaluationResult"):
        EvaluationResult.from_dict(broken)


def test_report_refuses_to_overwrite(report_dir: Path, trained_run: Path,
                                     tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    from evaluation.report import main

    code = main(["--run", str(trained_run), "--data", str(tiny_dataset), "--out",
                 str(report_dir), "--no-progress"])
    assert code == 2
    assert "--force" in capsys.readouterr().err


def synthetic_shear_result() -> dict:
    """A shear result (its metrics.json form) measured on synthetic twin populations."""
    from deblend.core.config import Config
    from evaluation.shear_calibration import shear_result
    from evaluation.shear_fit import ShearPopulation

    rng = np.random.default_rng(0)
    populations = []
    for g1, g2 in ((-0.02, 0.0), (0.0, 0.0), (0.02, 0.0), (0.0, -0.02), (0.0, 0.02)):
        noise = rng.normal(0, 0.01, (2, 8))
        truth = (0.7 * g1 + noise[0], 0.7 * g2 + noise[1])
        populations.append(ShearPopulation(g1, g2, {
            "truth_moments": truth, "regressor": (1.1 * truth[0], 1.1 * truth[1])}))
    return shear_result(populations, Config()).to_dict()


def test_report_force_keeps_a_shear_result(report_dir: Path, trained_run: Path,
                                           tiny_dataset: Path, tmp_path: Path) -> None:
    from evaluation.report import main
    from evaluation.report_io import read_metrics, write_metrics

    out = tmp_path / "copy"
    shutil.copytree(report_dir, out)
    metrics = read_metrics(out)
    shear = synthetic_shear_result()
    metrics["shear"] = shear
    write_metrics(out, metrics)
    # max-samples keeps this quick; the shear entry must survive the forced re-run
    assert main(["--run", str(trained_run), "--data", str(tiny_dataset), "--out", str(out),
                 "--max-samples", "8", "--force", "--no-progress"]) == 0
    metrics = read_metrics(out)
    assert metrics["shear"] == shear and metrics["meta"]["n_evaluated"] == 8
    report = (out / "report.md").read_text()
    assert "## 5. Shear calibration" in report and "Not run yet" not in report
    m1 = shear["calibration"]["g1"]["estimators"]["regressor"]["m"]
    assert m1 == pytest.approx(0.1) and f"{m1:+.4f}" in report
