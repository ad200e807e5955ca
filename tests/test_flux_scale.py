"""Per-stamp flux scales (``simulation.norm_flux_scale``) and bright targets
(``simulation.bright``): the normalisation, the sampling, and a tiny run trained with both
(simulation, stage1-3, flow, amortised MAP) through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from astropy.table import Table

from conftest import TINY_CONFIG
from deblend.core.config import BrightTargetsConfig, ConfigError
from deblend.core.inference import Deblender
from deblend.core.normalization import (
    NormalizationConstants,
    denormalize,
    flux_scales,
    normalize,
)
from deblend.core.symmetry import N_VIEWS, image_from_view, image_view
from simulation.dataset import open_dataset
from simulation.sampling import CentralTargetSampling, brighten_target

BANDS = ("g", "r", "z")
CONSTANTS = NormalizationConstants(BANDS, (10.0, 20.0, 40.0), 2.5, stamp_scale=True)
PLAIN = NormalizationConstants(BANDS, (10.0, 20.0, 40.0), 2.5)


def gaussian_stamps(peaks: np.ndarray, size: int = 15, sigma: float = 2.0) -> np.ndarray:
    """(N, 3, size, size) round Gaussians of peak ``peaks`` (N, 3) at the centre."""
    y, x = np.mgrid[:size, :size] - size // 2
    profile = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return (np.asarray(peaks, np.float64)[:, :, None, None] * profile).astype(np.float32)


def test_the_flux_scale_is_the_smoothed_peak_over_the_constants_and_one_below_them() -> None:
    stamps = gaussian_stamps([[1.0, 1.0, 1.0], [500.0, 100.0, 40.0], [5.0, 5.0, 4000.0]])
    box = np.array([stamps[1, b, 6:9, 6:9].mean() for b in range(3)]) / np.array([10, 20, 40])
    scales = flux_scales(stamps, CONSTANTS)
    assert scales[0] == 1.0
    assert scales[1] == pytest.approx(box.max(), rel=1e-6) and box.argmax() == 0
    assert scales[2] > 50
    assert (flux_scales(stamps, PLAIN) == 1.0).all()
    # the same in every symmetric view, so every view of a stamp is scaled alike
    views = np.stack([image_view(torch.from_numpy(stamps), v).numpy() for v in range(N_VIEWS)])
    for view in views:
        np.testing.assert_allclose(flux_scales(view, CONSTANTS), scales, rtol=1e-12)
    # a band marked missing is left out, a non-finite pixel in a present band is refused
    available = np.array([[True] * 3, [False, True, True], [True, True, False]])
    np.testing.assert_allclose(flux_scales(stamps, CONSTANTS, available)[1:], [box[1], 1.0],
                               rtol=1e-6)
    stamps[1, 0, 0, 0] = np.nan
    assert np.isfinite(flux_scales(stamps, CONSTANTS, available)).all()
    with pytest.raises(ValueError, match="non-finite"):
        flux_scales(stamps, CONSTANTS)


def test_scaled_normalisation_is_inverted_with_the_same_scales_and_refused_without() -> None:
    stamps = gaussian_stamps([[1.0, 2.0, 3.0], [800.0, 900.0, 4000.0]]).astype(np.float64)
    scales = flux_scales(stamps, CONSTANTS)
    x = normalize(stamps, CONSTANTS)  # each stamp's own scale by default
    np.testing.assert_array_equal(x, normalize(stamps, CONSTANTS, scales))
    # the bright stamp is no longer flattened by tanh: its peak stays below 0.96
    assert normalize(stamps, PLAIN)[1].max() > 0.9999 and x[1].max() < 0.96
    np.testing.assert_array_equal(x[0], normalize(stamps, PLAIN)[0])  # s = 1: the plain one
    np.testing.assert_allclose(denormalize(x, CONSTANTS, scales), stamps, rtol=1e-9, atol=1e-9)
    tensor = torch.from_numpy(x)
    np.testing.assert_allclose(denormalize(tensor, CONSTANTS, torch.from_numpy(scales)).numpy(),
                               stamps, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="flux scale"):
        denormalize(x, CONSTANTS)
    with pytest.raises(ValueError, match="flux scale"):
        normalize(torch.from_numpy(stamps), CONSTANTS)  # a tensor's scale is never guessed
    with pytest.raises(ValueError, match="one per stamp"):
        denormalize(x, CONSTANTS, scales[:1])
    # the plain constants ignore a scale: what they did before, bit for bit
    np.testing.assert_array_equal(denormalize(x, PLAIN, scales), denormalize(x, PLAIN))


def test_constants_keep_their_scaling_through_json_and_older_constants_read_without() -> None:
    assert NormalizationConstants.from_dict(CONSTANTS.to_dict()) == CONSTANTS
    assert "stamp_scale" not in PLAIN.to_dict()  # written as before
    assert NormalizationConstants.from_dict(PLAIN.to_dict()) == PLAIN
    assert not CONSTANTS.matches(PLAIN) and CONSTANTS.matches(CONSTANTS)


def catalog_rows(n: int) -> Table:
    rng = np.random.default_rng(1)
    mags = rng.uniform(22.0, 25.0, n)
    table = Table({f"{b}_ab": mags + k * 0.3 for k, b in enumerate("ugrizy")})
    for name, value in (("a_d", 0.5), ("b_d", 0.3), ("a_b", 0.2), ("b_b", 0.15),
                        ("pa_disk", 10.0), ("pa_bulge", 10.0)):
        table[name] = np.full(n, value)
    return table


def test_a_brightened_target_keeps_its_colours_and_grows_with_its_luminosity() -> None:
    scene = catalog_rows(3)
    before = scene.copy()
    brighten_target(scene, "i_ab", 17.0, 0.3)
    dm = before["i_ab"][0] - 17.0
    assert scene["i_ab"][0] == pytest.approx(17.0)
    for band in "ugrizy":
        assert scene[f"{band}_ab"][0] == pytest.approx(before[f"{band}_ab"][0] - dm)
    for name in ("a_d", "b_d", "a_b", "b_b"):
        assert scene[name][0] == pytest.approx(before[name][0] * 10 ** (0.12 * dm))
    assert all((scene[c][1:] == before[c][1:]).all() for c in scene.colnames)  # neighbours kept
    fainter = scene.copy()
    brighten_target(fainter, "i_ab", 20.0, 0.3)  # already brighter than that: left as it is
    assert all((fainter[c] == scene[c]).all() for c in scene.colnames)


def test_bright_targets_come_from_their_own_stream_and_leave_the_other_scenes_alone() -> None:
    table = catalog_rows(400)
    common = dict(stamp_size=9.0, max_neighbours=2, target_max_mag=25.3, seed=3)
    plain = CentralTargetSampling(**common)
    bright = CentralTargetSampling(**common, bright=BrightTargetsConfig(fraction=0.5,
                                                                         mag=(16.0, 18.0)))
    brightened = 0
    for _ in range(40):
        a, b = plain(table), bright(table)
        assert len(a) == len(b) and (a["ra"] == b["ra"]).all()
        assert all((a[c][1:] == b[c][1:]).all() for c in a.colnames)
        if b["i_ab"][0] != a["i_ab"][0]:
            brightened += 1
            assert 16.0 <= b["i_ab"][0] <= 18.0 and b["a_d"][0] > a["a_d"][0]
    assert 10 <= brightened <= 30


def test_bright_config_ranges_are_checked() -> None:
    for bad in ({"fraction": 0.0}, {"mag": (21.0, 16.0)}, {"size_slope": -0.1}):
        with pytest.raises(ConfigError, match="simulation.bright"):
            BrightTargetsConfig(**bad)


SCALED = {**TINY_CONFIG,
          "simulation": {**TINY_CONFIG["simulation"], "norm_flux_scale": True,
                         "bright": {"fraction": 0.3, "mag": [17.0, 20.0]}},
          "training": {**TINY_CONFIG["training"], "epochs": 2, "amortized_map": True}}


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory: pytest.TempPathFactory, sample_catalog: Path
               ) -> tuple[Path, Path]:
    """(run, dataset): a tiny run with per-stamp flux scales and bright targets, every stage."""
    from deblend.core.config import load_config
    from deblend.train import main
    from simulation.builder import build_dataset

    root = tmp_path_factory.mktemp("scaled")
    config, run, data = root / "scaled.yaml", root / "run", root / "data"
    config.write_text(yaml.safe_dump(SCALED))
    build_dataset(load_config(config).simulation, data, progress=False, log=lambda _: None)
    common = ["--run", str(run), "--no-progress"]
    assert main(["stage1", "--config", str(config), "--data", str(data), *common]) == 0
    for stage in ("stage2", "flow", "amortize", "stage3"):
        assert main([stage, *common]) == 0
    return run, data


def test_the_dataset_stores_scaled_constants_and_bright_targets(scaled_run) -> None:
    _, root = scaled_run
    data = open_dataset(root)
    assert data.normalization.stamp_scale
    assert data.meta["simulation"]["bright"]["fraction"] == 0.3
    blends = data.images("blend", data.split_indices("train"))
    scales = flux_scales(blends, data.normalization)
    assert (scales == 1.0).mean() > 0.3 and (scales > 10).sum() >= 5


def test_training_targets_are_normalised_with_their_inputs_scale(scaled_run) -> None:
    from training.data import BatchReader

    _, root = scaled_run
    data = open_dataset(root)
    indices = data.split_indices("train")[:64]
    reader = BatchReader(root, "blend", "clean")
    inputs, targets = reader[indices]
    scales = flux_scales(data.images("blend", indices), data.normalization)
    assert (scales > 1).any()
    np.testing.assert_allclose(targets.numpy(), normalize(
        data.images("clean", indices), data.normalization, scales), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(inputs.numpy(), normalize(
        data.images("blend", indices), data.normalization), rtol=1e-6, atol=1e-7)
    kept = BatchReader(root, "blend", "clean", cached=indices)
    for _ in range(2):  # kept ones are those read
        again = kept[indices]
        np.testing.assert_array_equal(again[1].numpy(), targets.numpy())


def test_a_brighter_copy_of_a_bright_stamp_is_reconstructed_brighter_by_as_much(scaled_run
                                                                                ) -> None:
    """Above the constants a stamp and ten times it normalise alike, so the networks give the
    same latents and the reconstruction scales with the input: the flux is not saturated."""
    run, root = scaled_run
    model = Deblender.from_run(run, device="cpu")
    data = open_dataset(root)
    blends = data.images("blend", data.split_indices("validation"))
    bright = blends[flux_scales(blends, model.normalization) > 2][:4]
    assert len(bright) >= 1
    one, ten = model.predict(bright), model.predict(10 * bright)
    np.testing.assert_allclose(ten.mu, one.mu, atol=2e-4)
    np.testing.assert_allclose(ten.reconstruction, 10 * one.reconstruction, rtol=2e-3,
                               atol=2e-3 * np.abs(10 * one.reconstruction).max())
    np.testing.assert_allclose(ten.ellipticity, one.ellipticity, atol=2e-4)


def test_map_decodes_each_source_at_the_scale_of_its_stamp(scaled_run) -> None:
    """With no step, a MAP source is the decoding of the encoder's latent of its stamp, at that
    stamp's flux scale: the single-view reconstruction that predict gives of it."""
    run, root = scaled_run
    model = Deblender.from_run(run, device="cpu")
    data = open_dataset(root)
    blends = data.images("blend", data.split_indices("validation"))
    bright = blends[flux_scales(blends, model.normalization) > 2][:3]
    positions = [np.array([[22.0, 22.0]])] * len(bright)
    start = model.map_deblend(bright, positions, prior="normal", steps=0, posterior_samples=4)
    viewed = np.stack([image_view(torch.from_numpy(b), v).numpy()
                       for b, v in zip(bright, start.view)])
    expected = model.predict(viewed, views=1, reconstruction_views=1).reconstruction
    back = np.stack([image_from_view(torch.from_numpy(e), int(v)).numpy()
                     for e, v in zip(expected, start.view)])
    np.testing.assert_allclose(start.reconstruction, back, rtol=1e-4,
                               atol=1e-4 * np.abs(back).max())
    assert np.isfinite(start.posterior.mean).all()
    fitted = model.map_deblend(bright, positions, prior="flow", steps=5)
    assert (fitted.objective[1] <= fitted.objective[0]).all()
    empty = model.map_deblend(bright, [np.zeros((0, 2))] * len(bright), prior="normal", steps=2)
    assert empty.latent.shape == (0, model.latent_dim) and not empty.model.any()
