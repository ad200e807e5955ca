"""Shear calibration: the fit on synthetic estimators, caching/resume, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from deblend.core.config import config_from_dict
from evaluation.shear_fit import (
    ShearPopulation,
    calibrate,
    estimates_from_arrays,
    estimates_to_arrays,
    fit_shear_bias,
    pair_means,
)

POPULATIONS = [(-0.02, 0.0), (0.0, 0.0), (0.02, 0.0), (0.0, -0.02), (0.0, 0.02)]


def _synthetic_populations(m: float, c: float, a_truth: float = 0.7, n_pairs: int = 1500,
                           noise: float = 0.03, seed: int = 0, shared: bool = True
                           ) -> list[ShearPopulation]:
    """Twin pairs with intrinsic shapes e_int / -e_int; truth = e_int + A_truth g (+ tiny noise);
    fake = (1 + m) * truth + c + noise."""
    rng = np.random.default_rng(seed)
    intrinsic = rng.normal(0, 0.25, (2, n_pairs))
    pops = []
    for g1, g2 in POPULATIONS:
        if not shared:
            intrinsic = rng.normal(0, 0.25, (2, n_pairs))
        truth, fake = [], []
        for comp, g in enumerate((g1, g2)):
            twins = np.stack([intrinsic[comp], -intrinsic[comp]], axis=1).ravel()
            t = twins + a_truth * g + rng.normal(0, 0.002, twins.size)
            truth.append(t)
            fake.append((1 + m) * t + c + rng.normal(0, noise, twins.size))
        pops.append(ShearPopulation(g1, g2, {"truth_moments": tuple(truth), "fake": tuple(fake)}))
    return pops


def test_fit_shear_bias_is_ordinary_least_squares() -> None:
    g = np.array([-0.02, 0.0, 0.02])
    e = np.repeat(0.6 * g + 0.001, 4).reshape(3, 4)
    a, c = fit_shear_bias(g, e.sum(axis=1), np.full(3, 4.0))
    assert a == pytest.approx(0.6) and c == pytest.approx(0.001)
    e[0, 0] = np.nan  # one estimate failed: left out of its population's sum and count
    sums, counts = np.nansum(e, axis=1), np.isfinite(e).sum(axis=1).astype(float)
    assert fit_shear_bias(g, sums, counts)[0] == pytest.approx(0.6)
    assert np.isnan(fit_shear_bias(np.zeros(3), np.ones(3), np.ones(3))[0])


def test_pair_means_keep_twins_together() -> None:
    assert np.allclose(pair_means(np.array([0.3, -0.1, 0.2, np.nan])), [0.1, np.nan],
                       equal_nan=True)
    with pytest.raises(ValueError, match="even"):
        pair_means(np.zeros(3))


@pytest.mark.parametrize("m, c, shared", [(0.05, 0.002, True), (-0.12, -0.003, False),
                                          (0.0, 0.0, True)])
def test_fake_estimator_m_and_c_are_recovered(m: float, c: float, shared: bool) -> None:
    pops = _synthetic_populations(m, c, shared=shared, seed=int(100 * abs(m)) + shared)
    result = calibrate(pops, n_bootstrap=300, seed=1, shared_galaxies=shared)
    for comp in ("g1", "g2"):
        fake = result.component(comp).estimators["fake"]
        truth = result.component(comp).estimators["truth_moments"]
        assert truth.m == 0.0 and truth.A == pytest.approx(0.7, abs=0.03)
        assert 0 < fake.m_err < 0.1 and 0 < fake.c_err < 0.01
        assert abs(fake.m - m) < 3.5 * fake.m_err, (comp, fake)
        assert abs(fake.c - c) < 3.5 * fake.c_err, (comp, fake)
        assert fake.n_pairs == 3 * 1500


def test_m_error_includes_the_correlated_truth_response() -> None:
    """An estimator equal to 1.1 x truth has m = 0.1 exactly in every replicate: zero error,
    which only holds when A and A_truth are resampled together."""
    pops = _synthetic_populations(0.0, 0.0, n_pairs=200, noise=0.0)
    for p in pops:
        t1, t2 = p.estimates["truth_moments"]
        p.estimates["scaled"] = (1.1 * t1, 1.1 * t2)
    result = calibrate(pops, n_bootstrap=100, seed=0)
    scaled = result.g1.estimators["scaled"]
    assert scaled.m == pytest.approx(0.1)
    assert scaled.m_err < 1e-10 < scaled.A_err


def test_calibrate_needs_two_shears_and_the_reference() -> None:
    pops = _synthetic_populations(0.0, 0.0, n_pairs=10)
    with pytest.raises(ValueError, match="reference"):
        calibrate(pops, reference="missing")
    with pytest.raises(ValueError, match="two distinct"):
        calibrate([pops[2], pops[3], pops[4]])  # g1 only at +0.02


def test_estimate_arrays_round_trip() -> None:
    est = {"a_b": (np.arange(4.0), np.ones(4)), "c": (np.zeros(4), np.zeros(4))}
    back = estimates_from_arrays(estimates_to_arrays(est))
    assert set(back) == set(est) and np.allclose(back["a_b"][0], est["a_b"][0])


# -- populations, cache and resume ---------------------------------------------------------------
def test_population_plan() -> None:
    from evaluation.shear_calibration import chunk_seed, chunk_sizes, shear_populations

    assert shear_populations((-0.02, 0.0, 0.02)) == POPULATIONS
    assert chunk_sizes(10, 4) == [4, 4, 2] and chunk_sizes(8, 5) == [4, 4]
    with pytest.raises(ValueError, match="even"):
        chunk_sizes(7, 4)
    assert chunk_seed(1, 0, (0.02, 0.0), True) == chunk_seed(1, 0, (0.0, 0.0), True)
    assert chunk_seed(1, 0, (0.02, 0.0), False) != chunk_seed(1, 0, (0.0, 0.0), False)


class _FakeSource:
    """Stands in for simulation.builder.SceneSource: random twin scenes, counts its draws."""

    draws = 0

    def __init__(self, sim) -> None:
        self.sim = sim
        self.geometry = SimpleNamespace(bands=("u", "g", "r", "i", "z", "y"))

    def draw(self, n, seed, progress=None):
        type(self).draws += 1
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:45, 0:45]
        blob = np.exp(-0.5 * (((x - 22) / 3.0) ** 2 + ((y - 22) / 2.0) ** 2))
        clean = np.repeat(blob[None, None], 6, axis=1) * rng.uniform(50, 500, (n, 6, 1, 1))
        noisy = clean + rng.normal(0, 1, clean.shape)
        if progress:
            progress(n)
        labels = {"twin": np.tile([0, 1], n // 2), "n_galaxies": np.ones(n, int),
                  "e1": np.zeros(n), "e2": np.zeros(n)}
        return SimpleNamespace(clean=clean, noisy=noisy, blend=noisy), labels


class _FakeModel:
    bands = ("u", "g", "r", "i", "z", "y")

    def predict(self, blend):
        from deblend.core.inference import Prediction

        latent = np.zeros((len(blend), 32), np.float32)
        return Prediction(np.clip(blend, 0, None), latent, latent, np.zeros((len(blend), 2)))


def test_populations_are_cached_and_resumed(tmp_path: Path, monkeypatch) -> None:
    from evaluation.shear_calibration import simulate_populations

    monkeypatch.setattr("evaluation.shear_calibration.SceneSource", _FakeSource)
    config = config_from_dict({"shear": {"n_scenes": 8, "chunk_scenes": 4, "bootstrap": 10}})
    cache = tmp_path / "cache"
    _FakeSource.draws = 0
    first = simulate_populations(config, _FakeModel(), cache, "model-a", progress=False,
                                 log=lambda _: None)
    assert _FakeSource.draws == 5 * 2 and len(list(cache.glob("*.npz"))) == 10
    # an interrupted run: one chunk missing -> only that chunk is drawn again
    sorted(cache.glob("*.npz"))[3].unlink()
    _FakeSource.draws = 0
    second = simulate_populations(config, _FakeModel(), cache, "model-a", progress=False,
                                  log=lambda _: None)
    assert _FakeSource.draws == 1
    for a, b in zip(first, second):
        assert (a.g1, a.g2) == (b.g1, b.g2)
        assert np.allclose(a.estimates["truth_moments"][0], b.estimates["truth_moments"][0])
    # another model invalidates the cache
    _FakeSource.draws = 0
    simulate_populations(config, _FakeModel(), cache, "model-b", progress=False,
                         log=lambda _: None)
    assert _FakeSource.draws == 10


# -- CLI end to end on the tiny run ---------------------------------------------------------------
def test_shear_cli_end_to_end(trained_run: Path, tiny_config: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    from evaluation.report_io import section
    from evaluation.shear import main

    config = yaml.safe_load(tiny_config.read_text())
    config["shear"] = {"n_scenes": 8, "chunk_scenes": 8, "bootstrap": 20,
                       "g_values": [-0.02, 0.0, 0.02]}
    config_path = tmp_path / "shear.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    out.mkdir()
    # an existing report: its other content must survive the merge
    (out / "metrics.json").write_text(json.dumps({"meta": {"keep": 1}}))
    (out / "report.md").write_text(section("header", "# existing report") +
                                   section("shear", "placeholder") + section("tail", "end"))

    args = ["--run", str(trained_run), "--config", str(config_path), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "A1" in printed and "m1" in printed and "truth moments" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"] == {"keep": 1}
    shear = metrics["shear"]
    assert shear["meta"]["n_scenes_per_population"] == 8
    assert shear["meta"]["n_populations"] == 5
    for comp in ("g1", "g2"):
        table = shear["calibration"][comp]["estimators"]
        assert {"regressor", "recon_moments", "recon_hsm", "blend_moments", "noisy_moments",
                "truth_moments"} <= set(table)
        assert table["truth_moments"]["m"] == 0.0 and table["truth_moments"]["A"] > 0
        assert {"A", "A_err", "c", "c_err", "m", "m_err"} <= set(table["regressor"])
        assert table["truth_hsm"]["m_vs"]["truth_hsm"]["m"] == 0.0
        assert "truth_hsm" in table["recon_hsm"]["m_vs"]
    report = (out / "report.md").read_text()
    assert "# existing report" in report and "end" in report and "placeholder" not in report
    assert "8 scenes" in report and "## 5. Shear calibration" in report
    assert (out / "fig_shear_response.png").stat().st_size > 1000
    assert len(list((out / "shear_cache").glob("*.npz"))) == 5

    # refuses to replace the result without --force; --force reuses the cache
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert "reused 5 cached chunk(s)" in capsys.readouterr().out
