"""The regressor's stamp moments (deblend.core.stamp_moments, model.regressor_moments): the
features' geometry, the regressor that reads them, and a tiny run trained and used with them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deblend import Deblender
from deblend.core.config import load_config
from deblend.core.networks import Regressor
from deblend.core.normalization import normalize
from deblend.core.runs import RunLayout, build_module, load_checkpoint
from deblend.core.stamp_moments import FEATURES_PER_SCALE, stamp_moments
from deblend.core.symmetry import N_VIEWS, ellipticity_in_view, image_view
from simulation.dataset import open_dataset
from tests.conftest import TINY_CONFIG
from training.runner import run_stage

SCALES = (2.0, 4.0, 8.0)


def gaussian(size: int = 45, sx: float = 3.0, sy: float = 3.0, shift: float = 0.0) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.exp(-((x - shift) ** 2) / (2 * sx ** 2) - y ** 2 / (2 * sy ** 2))


def per_scale(features: torch.Tensor) -> torch.Tensor:
    return features.reshape(features.shape[0], -1, FEATURES_PER_SCALE)


def test_moments_of_round_and_elongated_galaxies() -> None:
    """A round Gaussian has no distortion at any scale; one elongated along x (pixel frame,
    x along a row) has F+ > 0 and Fx = 0, along y F+ < 0; the features sum over bands."""
    stamps = torch.stack([gaussian(), gaussian(sx=4.0), gaussian(sy=4.0)])[:, None]
    f = per_scale(stamp_moments(stamps.repeat(1, 2, 1, 1), SCALES))
    assert f.shape == (3, len(SCALES), FEATURES_PER_SCALE)
    assert torch.allclose(f[0, :, [1, 2, 4, 5]], torch.zeros(len(SCALES), 4, dtype=f.dtype), atol=1e-12)
    assert (f[1, :, 1] > 0).all() and (f[1, :, 4] > 0).all()
    assert (f[2, :, 1] < 0).all() and (f[2, :, 4] < 0).all()
    assert torch.allclose(f[1:, :, 2], torch.zeros(2, len(SCALES), dtype=f.dtype), atol=1e-12)
    single = per_scale(stamp_moments(stamps, SCALES))
    assert torch.allclose(f[:, :, :4], 2 * single[:, :, :4])  # linear, summed over bands
    assert stamp_moments(stamps, ()).shape == (3, 0)


def test_moments_transform_like_the_ellipticity_in_every_view() -> None:
    """Under the stamp's 8 symmetric views, (F+, Fx) and the ratios map as (e1, e2) do and the
    level and size stay: the regressor's view average keeps its meaning."""
    rng = np.random.default_rng(1)
    stamps = torch.from_numpy(rng.normal(size=(4, 3, 45, 45))) + gaussian(sx=5.0, shift=2.0)
    f = per_scale(stamp_moments(stamps, SCALES))
    for view in range(N_VIEWS):
        g = per_scale(stamp_moments(image_view(stamps, view), SCALES))
        for pair in ((1, 2), (4, 5)):
            back = ellipticity_in_view(g[..., list(pair)], view)
            assert torch.allclose(back, f[..., list(pair)], atol=1e-10), view
        assert torch.allclose(g[..., [0, 3]], f[..., [0, 3]], atol=1e-10), view


def test_moment_scales_and_stamps_are_checked() -> None:
    with pytest.raises(ValueError, match="finite and > 0"):
        Regressor(8, moment_scales=(2.0, 0.0))
    with pytest.raises(ValueError, match="finite and > 0"):
        Regressor(8, moment_scales=(float("inf"),))
    with pytest.raises(ValueError, match=r"\(N, bands, S, S\)"):
        stamp_moments(torch.zeros(2, 45, 45), SCALES)


def test_a_regressor_that_reads_moments_needs_them_and_keeps_its_checkpoint_form() -> None:
    torch.manual_seed(0)
    plain, reading = Regressor(8), Regressor(8, moment_scales=SCALES)
    assert not plain.reads_stamps and reading.reads_stamps
    assert "moment_scales" not in plain.hparams()  # checkpoints written before keep their form
    assert reading.hparams()["moment_scales"] == list(SCALES)
    assert reading.net[0].in_features == 8 + FEATURES_PER_SCALE * len(SCALES)
    mu, stamps = torch.randn(5, 8), torch.randn(5, 2, 45, 45)
    with pytest.raises(ValueError, match="stamp_features"):
        reading(mu)
    with pytest.raises(ValueError, match="shape"):
        reading(mu, torch.randn(5, 3))
    with pytest.raises(ValueError, match="feature rows"):
        reading(mu, reading.stamp_features(stamps[:4]))
    reading.eval()
    out = reading(mu, reading.stamp_features(stamps))
    assert out.shape == (5, 2)
    # the output depends on the stamp, not only on mu
    other = reading(mu, reading.stamp_features(stamps + gaussian(sx=6.0).float()))
    assert not torch.allclose(out, other)


def test_config_checks_the_moment_scales(tmp_path: Path) -> None:
    from pydantic import ValidationError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {"regressor_moments": [2.0, -1.0]}}))
    with pytest.raises((ValueError, ValidationError), match="regressor_moments"):
        load_config(path)


@pytest.fixture(scope="module")
def moments_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's stage1 and stage2 with a stage3 whose regressor reads the moments."""
    run = tmp_path_factory.mktemp("moments") / "run"
    run.mkdir()
    shutil.copy(trained_run / "run.json", run / "run.json")
    for stage in ("stage1", "stage2"):
        shutil.copytree(trained_run / stage, run / stage)
    path = run.parent / "moments.yaml"
    path.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {"regressor_moments": list(SCALES)}}))
    run_stage("stage3", run, config=load_config(path), progress=False, log=lambda _: None)
    return run


def test_stage3_trains_a_moment_regressor_and_the_deblender_uses_it(
        moments_run: Path, tiny_dataset: Path) -> None:
    """The checkpoint holds the scales, the response step ran, ``predict`` reads each
    view's own moments (its one-view output is the regressor on mu and the stamp's features)."""
    entry = load_checkpoint(RunLayout(moments_run).best("stage3"))
    assert entry["modules"]["regressor"]["hparams"]["moment_scales"] == list(SCALES)
    assert "status" in entry["response"]  # stage3's last step ran (the tiny run stays
    # uncalibrated: 5 epochs do not teach it the ellipticity)
    model = Deblender.from_run(moments_run, device="cpu")
    assert model.regressor is not None and model.regressor.reads_stamps
    data = open_dataset(tiny_dataset)
    blends = data.images("blend", data.split_indices("validation")[:8])
    one = model.predict(blends, views=1, reconstruct=False)
    x = torch.from_numpy(normalize(blends, model.normalization))
    with torch.no_grad():
        expected = model.regressor(torch.from_numpy(one.mu), model.regressor.stamp_features(x))
    raw = one.ellipticity if one.ellipticity_raw is None else one.ellipticity_raw
    np.testing.assert_allclose(raw, expected.numpy(), rtol=1e-5, atol=1e-6)
    eight = model.predict(blends, reconstruct=False)
    assert np.isfinite(eight.ellipticity).all() and eight.ellipticity.shape == (8, 2)
    rebuilt = build_module(entry["modules"]["regressor"])
    assert rebuilt.moment_scales == SCALES


def test_map_deblending_reads_each_sources_stamp_moments(moments_run: Path,
                                                         tiny_dataset: Path) -> None:
    """MAP's ellipticities and Laplace samples come from the moment regressor too (the
    features of each source's blend stamp, as in training), with no source as well."""
    from deblend.core.detection import detect_sources, with_target

    model = Deblender.from_run(moments_run, device="cpu")
    data = open_dataset(tiny_dataset)
    blends = data.images("blend", data.split_indices("validation")[:3])
    positions = [with_target(p, (22, 22)) for p in detect_sources(blends, data.survey, data.bands)]
    out = model.map_deblend(blends, positions, prior="normal", steps=3, posterior_samples=5)
    n = sum(len(p) for p in positions)
    assert out.ellipticity.shape == (n, 2) and np.isfinite(out.ellipticity).all()
    assert out.posterior is not None
    empty = model.map_deblend(blends[:1], [np.zeros((0, 2))], prior="normal", steps=2,
                              posterior_samples=3)
    assert empty.ellipticity.shape == (0, 2)
