"""The regressor's response calibration: the fit, its inverse, and how stage3 stores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deblend import Deblender
from deblend.core.response import MIN_RESPONSE, Response, ResponseError, fit_response
from deblend.core.runs import RunLayout, load_checkpoint, save_checkpoint
from evaluation.ellipticity import fit_line
from simulation.dataset import open_dataset
from training.calibration import calibrate_regressor


def shrunk_estimator(n: int, matrix: np.ndarray, offset: np.ndarray, noise: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(e_raw, e_true): a linear, noisy, shrunk estimator of known response."""
    rng = np.random.default_rng(seed)
    e_true = rng.normal(0.0, 0.15, size=(n, 2))
    e_raw = e_true @ matrix.T + offset + rng.normal(0.0, noise, size=(n, 2))
    return e_raw, e_true


def test_fit_recovers_a_known_response_within_its_errors() -> None:
    matrix, offset = np.array([[0.64, 0.03], [-0.02, 0.71]]), np.array([-0.006, 0.002])
    e_raw, e_true = shrunk_estimator(20_000, matrix, offset, 0.05, seed=1)
    response = fit_response(e_raw, e_true)
    assert response.n == 20_000
    assert np.all(np.abs(response.matrix - matrix) < 4 * response.matrix_err)
    assert np.all(response.matrix_err < 0.005)
    assert np.allclose(response.offset, offset, atol=0.002)
    # the regressor's own error: the scatter about the response line
    np.testing.assert_allclose(response.scatter, [0.05, 0.05], rtol=0.03)


def test_calibrated_estimator_has_unit_slope_on_fresh_objects() -> None:
    matrix, offset = np.array([[0.6, 0.05], [0.0, 0.8]]), np.array([0.01, -0.02])
    response = fit_response(*shrunk_estimator(10_000, matrix, offset, 0.04, seed=2))
    e_raw, e_true = shrunk_estimator(10_000, matrix, offset, 0.04, seed=3)
    calibrated = response.calibrate(e_raw)
    assert calibrated.dtype == np.float32 and calibrated.shape == e_raw.shape
    for c in range(2):
        raw_slope = fit_line(e_true[:, c], e_raw[:, c])["slope"]
        line = fit_line(e_true[:, c], calibrated[:, c])
        assert raw_slope < 0.85
        assert line["slope"] == pytest.approx(1.0, abs=0.02)
        assert line["intercept"] == pytest.approx(0.0, abs=0.002)


def test_noise_free_response_inverts_exactly_and_round_trips() -> None:
    matrix, offset = np.array([[0.5, 0.1], [0.2, 0.7]]), np.array([0.03, -0.01])
    e_raw, e_true = shrunk_estimator(50, matrix, offset, 0.0, seed=4)
    response = fit_response(e_raw, e_true)
    assert np.allclose(response.calibrate(e_raw), e_true, atol=1e-6)
    again = Response.from_dict(response.to_dict())
    assert np.array_equal(again.calibrate(e_raw), response.calibrate(e_raw))
    assert np.array_equal(again.scatter, response.scatter)
    # a response stored before the scatter was measured still loads, without one
    older = {k: v for k, v in response.to_dict().items() if k != "scatter"}
    assert Response.from_dict(older).scatter is None


def test_unusable_responses_are_refused() -> None:
    e_raw, e_true = shrunk_estimator(500, np.diag([0.05, 0.7]), np.zeros(2), 0.01, seed=5)
    with pytest.raises(ResponseError, match=f"below {MIN_RESPONSE}"):
        fit_response(e_raw, e_true)
    with pytest.raises(ResponseError, match="at least 10"):
        fit_response(e_raw[:9], e_true[:9])
    with pytest.raises(ResponseError, match="no spread"):
        fit_response(e_raw, np.zeros_like(e_true))
    nan_rows = e_true.copy()
    nan_rows[:495] = np.nan
    with pytest.raises(ResponseError, match="5 objects"):
        fit_response(e_raw, nan_rows)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        fit_response(e_raw[:, :1], e_true[:, :1])


# -- stage3 stores it, the Deblender applies it ---------------------------------------------------


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_stage3_stores_the_fit_of_its_calibration_split(trained_run: Path,
                                                        tiny_dataset: Path) -> None:
    entry = load_checkpoint(RunLayout(trained_run).best("stage3"))["response"]
    data = open_dataset(tiny_dataset)
    indices = data.split_indices("calibration")
    assert indices.size == 16 and entry["status"] in ("calibrated", "uncalibrated")
    model = Deblender.from_run(trained_run, device="cpu")
    prediction = model.predict(data.images("blend", indices))
    raw = prediction.regressor_output
    truth = np.stack([data.labels()["e1"][indices], data.labels()["e2"][indices]], axis=1)
    try:
        expected = fit_response(raw, truth)
    except ResponseError as exc:  # a 5-epoch regressor may not have learned enough
        assert entry == {"status": "uncalibrated", "reason": str(exc)}
        assert model.response is None and prediction.ellipticity_raw is None
    else:
        assert entry["status"] == "calibrated" and entry["n"] == 16
        assert np.allclose(entry["matrix"], expected.matrix, atol=1e-5)
        assert np.allclose(prediction.ellipticity, expected.calibrate(raw), atol=1e-4)


def test_deblender_divides_the_stored_response_out(trained_run: Path, tiny_dataset: Path,
                                                   tmp_path: Path) -> None:
    run = copy_run(trained_run, tmp_path / "run")
    best = RunLayout(run).best("stage3")
    payload = load_checkpoint(best)
    response = Response(np.array([[0.5, 0.0], [0.1, 0.25]]), np.array([0.02, -0.01]),
                        np.full((2, 2), 0.01), 100)
    payload["response"] = {"status": "calibrated", **response.to_dict()}
    save_checkpoint(best, payload)
    data = open_dataset(tiny_dataset)
    images = data.images("blend", data.split_indices("validation"))
    prediction = Deblender.from_run(run, device="cpu").predict(images)
    raw = prediction.ellipticity_raw
    assert raw is not None and np.all(np.abs(raw) <= 1)
    expected = np.linalg.solve(response.matrix, (raw - response.offset).T).T
    assert np.allclose(prediction.ellipticity, expected, atol=1e-5)
    assert not np.allclose(prediction.ellipticity, raw)
    assert Deblender.from_run(run, stage="stage1", device="cpu").predict(images).ellipticity \
        is None


def test_a_missing_response_is_measured_again_on_resume(trained_run: Path, tmp_path: Path
                                                        ) -> None:
    from deblend.train import main

    run = copy_run(trained_run, tmp_path / "run")
    best = RunLayout(run).best("stage3")
    stored = load_checkpoint(best)["response"]
    payload = load_checkpoint(best)
    del payload["response"]
    save_checkpoint(best, payload)
    assert main(["stage3", "--run", str(run), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(best)["response"] == stored


def test_no_calibration_split_leaves_the_regressor_raw(trained_run: Path, tiny_dataset: Path,
                                                       tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_dir)
    meta_path = data_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["split"].pop("n_calibration")  # a dataset written before the calibration split
    meta_path.write_text(json.dumps(meta))
    data = open_dataset(data_dir)
    assert data.split_indices("calibration").size == 0
    assert data.split_indices("validation")[0] == meta["split"]["n_train"]
    run = copy_run(trained_run, tmp_path / "run")
    best = RunLayout(run).best("stage3")
    payload = load_checkpoint(best)
    del payload["response"]
    save_checkpoint(best, payload)
    messages: list[str] = []
    entry = calibrate_regressor(RunLayout(run), data, "cpu", messages.append)
    assert entry["status"] == "uncalibrated" and "no calibration split" in entry["reason"]
    assert "uncalibrated" in messages[0]
    assert Deblender.from_run(run, device="cpu").response is None
