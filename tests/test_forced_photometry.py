"""The forced-photometry benchmark (evaluation.forced_photometry, benchmarks.photometry): the
catalogue's fluxes against simulated truth, through the walk a survey takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deblend.core.runs import run_config
from evaluation.forced_photometry import BLEND_RADIUS, photometry_summary, robust, run_photometry


def test_robust_summaries_of_a_normal_sample() -> None:
    values = np.random.default_rng(0).normal(0.1, 0.2, 20000)
    r = robust(np.append(values, [np.nan, np.inf]))
    assert r["n"] == 20000
    assert abs(r["median"] - 0.1) < 3 * r["error"] and abs(r["nmad"] - 0.2) < 0.01
    assert robust(np.array([np.nan]))["n"] == 0


def test_the_summary_splits_blended_galaxies_and_magnitudes() -> None:
    """Forced fluxes 10% high on isolated galaxies and 30% high on blended ones, the
    reconstruction's 5% low everywhere, come back as such per band, by blending and by bin."""
    n = 400
    rng = np.random.default_rng(1)
    truth = rng.uniform(100, 1000, (n, 2))
    neighbour = np.where(np.arange(n) % 4 == 0, 0.5 * BLEND_RADIUS, 3 * BLEND_RADIUS)
    forced = truth * np.where(neighbour[:, None] < BLEND_RADIUS, 1.3, 1.1)
    arrays = {"truth": truth, "forced_flux": forced, "flux": 0.95 * truth,
              "mag": np.linspace(20, 25, n), "neighbour": neighbour}
    summary = photometry_summary(arrays, ("r", "i"))
    assert summary["n_galaxies"] == n and summary["blended"] == n // 4
    for band in ("r", "i"):
        assert summary["forced_flux"][band]["isolated"]["median"] == pytest.approx(0.1)
        assert summary["forced_flux"][band]["blended"]["median"] == pytest.approx(0.3)
        assert summary["flux"][band]["all"]["median"] == pytest.approx(-0.05)
        assert [b["n"] for b in summary["forced_flux"][band]["by_mag"]] == [160, 80, 80, 80]


def test_the_benchmark_measures_fields_of_the_run_and_resumes(trained_run, tmp_path,
                                                               capsys) -> None:
    """Through the CLI on the tiny run: every matched galaxy has a positive truth flux and
    finite fluxes of both kinds, the report and metrics are written, and a second run reads its
    field sets from the cache (the same numbers, nothing measured again)."""
    from benchmarks.photometry import main

    out = tmp_path / "phot"
    args = ["--run", str(trained_run), "--out", str(out), "--n-fields", "1",
            "--field-pixels", "150", "--no-progress"]
    assert main(args) == 0
    assert "| i | forced |" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["forced_photometry"]
    assert metrics["n_galaxies"] > 0 and metrics["images"] == 2
    assert all(np.isfinite(metrics[k]["i"]["all"]["median"]) for k in ("flux", "forced_flux"))
    cached = sorted((out / "cache").glob("*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    arrays = dict(np.load(cached[0]))
    assert np.all(arrays["truth"] > 0) and np.isfinite(arrays["forced_flux"]).all()
    assert main(args) == 0
    assert cached[0].stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["forced_photometry"] == metrics


def test_forced_fluxes_of_the_packaged_model_scatter_less_than_its_reconstructions(tmp_path
                                                                                     ) -> None:
    """The packaged quick weights on 3 field sets of the independent GalSim population (138
    isolated galaxies matched): the forced fluxes' NMAD in g, r, i was 0.121 / 0.096 / 0.107
    against the reconstruction's 0.146 / 0.146 / 0.134 (seed 0; seed 1 alike), and their
    median within 3% of the truth in r and i. Bounds: a mean NMAD ratio below 0.9 and medians
    within 5%."""
    weights = Path(__file__).resolve().parents[1] / "deblend" / "weights" / "quick"
    config = run_config(weights, Path(__file__).resolve().parents[1] / "configs" / "quick.yaml")
    summary = run_photometry(weights, config, tmp_path / "phot", n_fields=3, seed=0,
                             progress=False)
    ratio = np.mean([summary["forced_flux"][b]["isolated"]["nmad"]
                     / summary["flux"][b]["isolated"]["nmad"] for b in ("g", "r", "i")])
    assert ratio < 0.9, ratio
    for band in ("r", "i"):
        assert abs(summary["forced_flux"][band]["isolated"]["median"]) < 0.05
