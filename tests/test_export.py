"""The inference-only export of a run, and the packaged weights that ``measure`` defaults to."""

from __future__ import annotations

import numpy as np
import pytest

from deblend.core.export import export_inference
from deblend.core.inference import Deblender
from deblend.core.runs import RunError, RunLayout, load_checkpoint, save_checkpoint


def test_export_gives_the_same_deblender_and_keeps_the_lineage(trained_run, tmp_path):
    from deblend.__main__ import main

    out = tmp_path / "export"
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0
    original, copy = (Deblender.from_run(p, device="cpu") for p in (trained_run, out))
    stamps = np.random.default_rng(0).normal(0, 30, (3, 6, 45, 45)).astype(np.float32)
    a, b = original.predict(stamps), copy.predict(stamps)
    np.testing.assert_array_equal(a.ellipticity, b.ellipticity)
    np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    assert copy.flow is not None
    payload = load_checkpoint(RunLayout(out).best("stage1"))
    assert "optimizer" not in payload and payload["finished"]
    size = sum(f.stat().st_size for f in out.rglob("best.pt"))
    assert size < 0.6 * sum(f.stat().st_size for f in trained_run.rglob("best.pt"))
    # the rewritten lineage is checked like any other: tampering with a parent is refused
    best = RunLayout(out).best("stage2")
    save_checkpoint(best, {**load_checkpoint(best), "epoch": -1})
    with pytest.raises(RunError):
        Deblender.from_run(out, device="cpu")
    with pytest.raises(FileExistsError):
        export_inference(trained_run, out)


def test_the_packaged_weights_load_and_measure():
    """The shipped quick-job networks load through their lineage (amortize encoder, flow,
    calibrated regressor) and measure LSST stamps."""
    from deblend.__main__ import PACKAGED_WEIGHTS

    model = Deblender.from_run(PACKAGED_WEIGHTS, device="cpu")
    assert model.bands == ("u", "g", "r", "i", "z", "y") and model.stamp_pixels == 45
    assert model.flow is not None and model.response is not None
    stamps = np.random.default_rng(1).normal(0, 30, (2, 6, 45, 45)).astype(np.float32)
    assert np.isfinite(model.predict(stamps, views=1).ellipticity).all()
