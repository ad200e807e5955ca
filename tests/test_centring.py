"""Detection-centred training stamps (simulation.centring) and the comparison of models trained
on either kind of stamp (evaluation.centring, python -m benchmarks.centring)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from deblend.core.config import config_from_dict, load_config
from simulation.centring import CANVAS_MARGIN, crop_around, detection_offsets

BANDS = ("u", "g", "r", "i", "z", "y")


def blob_canvas(dx: int, dy: int, size: int = 53, flux: float = 4e4, seed: int = 0
                ) -> np.ndarray:
    """(1, 6, size, size) noisy canvas with a round Gaussian galaxy (sigma 2 px) at
    (centre + dx, centre + dy), sky variance 100 per pixel."""
    axis = np.arange(size) - (size - 1) / 2
    profile = np.exp(-0.5 * ((axis[None, :] - dx) ** 2 + (axis[:, None] - dy) ** 2) / 4.0)
    image = flux * profile / profile.sum()
    noise = np.random.default_rng(seed).normal(0.0, 10.0, (1, 6, size, size))
    return image[None, None] + noise


def test_detection_offsets_find_a_galaxy_off_the_canvas_centre() -> None:
    canvases = np.concatenate([blob_canvas(2, -1), blob_canvas(0, 0, seed=1),
                               blob_canvas(0, 0, flux=0.0, seed=2)])
    offsets, detected = detection_offsets(canvases, np.full(6, 100.0), BANDS)
    assert offsets.tolist() == [[2, -1], [0, 0], [0, 0]]
    assert detected.tolist() == [True, True, False]


def test_detection_offsets_ignore_a_detection_beyond_the_match_radius() -> None:
    offsets, detected = detection_offsets(blob_canvas(8, 0), np.full(6, 100.0), BANDS)
    assert offsets.tolist() == [[0, 0]] and not detected[0]


def test_crop_around_cuts_the_offset_stamp_and_refuses_one_outside_the_canvas() -> None:
    canvas = np.arange(2 * 9 * 9, dtype=float).reshape(2, 1, 9, 9)
    stamps = crop_around(canvas, np.array([[1, -2], [0, 0]]), 5)
    assert np.array_equal(stamps[0, 0], canvas[0, 0, 0:5, 3:8])
    assert np.array_equal(stamps[1, 0], canvas[1, 0, 2:7, 2:7])
    with pytest.raises(ValueError, match="out of its 9-pixel canvas"):
        crop_around(canvas, np.array([[3, 0], [0, 0]]), 5)


def test_detection_centred_scenes_are_the_truth_scenes_cut_around_the_detection() -> None:
    from simulation.builder import SceneSource

    close = {"catalog_rows": 3000, "min_neighbours": 2, "max_neighbours": 2,
             "neighbour_shift": [0.8, 1.4], "n_samples": 48, "seed": 3}
    truth = SceneSource(config_from_dict({"simulation": close}).simulation)
    detected = SceneSource(config_from_dict(
        {"simulation": {**close, "stamp_centre": "detection"}}).simulation)
    _, truth_labels = truth.draw(48, 11)
    scenes, labels = detected.draw(48, 11)
    assert scenes.blend.shape == (48, 6, 45, 45) and scenes.clean.shape == (48, 6, 45, 45)
    offsets = np.stack([labels["centre_dx"], labels["centre_dy"]], axis=1).astype(int)
    assert np.abs(offsets).max() <= CANVAS_MARGIN
    assert (np.abs(offsets).max(axis=1) > 0).any(), "close neighbours must move some stamps"
    assert labels["detected"].mean() > 0.8
    # the same galaxies: labels of the clean target agree with the truth-centred draw
    np.testing.assert_allclose(labels["e1"], truth_labels["e1"], atol=2e-3)
    np.testing.assert_allclose(labels["mag_i"], truth_labels["mag_i"])
    # the target sits at -offset from the stamp centre
    clean = scenes.clean[:, 3].astype(np.float64)
    axis = np.arange(45) - 22
    total = clean.sum(axis=(1, 2))
    x = (clean.sum(axis=1) * axis).sum(axis=1) / total
    y = (clean.sum(axis=2) * axis).sum(axis=1) / total
    np.testing.assert_allclose(x, -offsets[:, 0], atol=0.1)
    np.testing.assert_allclose(y, -offsets[:, 1], atol=0.1)


def test_stamp_centre_truth_keeps_the_plan_identity_of_older_datasets() -> None:
    from simulation.builder import plan_simulation

    sim = config_from_dict({"simulation": {}}).simulation
    assert sim.stamp_centre == "truth" and "stamp_centre" not in plan_simulation(sim)
    detection = config_from_dict({"simulation": {"stamp_centre": "detection"}}).simulation
    assert plan_simulation(detection)["stamp_centre"] == "detection"
    with pytest.raises(ValueError, match="stamp_centre"):
        config_from_dict({"simulation": {"stamp_centre": "peak"}})


@pytest.mark.slow
def test_centring_comparison_of_a_run_on_both_kinds_of_stamps(trained_run: Path,
                                                             tiny_config: Path,
                                                             tiny_dataset: Path,
                                                             tmp_path: Path, capsys) -> None:
    from benchmarks.centring import main
    from simulation.builder import build_dataset

    config = yaml.safe_load(tiny_config.read_text())
    config["simulation"]["stamp_centre"] = "detection"
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(config))
    detection = tmp_path / "data"
    build_dataset(load_config(path).simulation, detection, progress=False, log=lambda _: None)
    out = tmp_path / "centring.json"
    assert main(["--run", f"tiny={trained_run}", "--data", f"truth={tiny_dataset}",
                 "--data", f"detection={detection}", "--views", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | detection | moved |" in printed
    result = json.loads(out.read_text())
    rows = {(r["data"], r["subset"]): r for r in result["rows"]}
    assert len(rows) == 6
    for data in ("truth", "detection"):
        assert rows[(data, "moved")]["n"] + rows[(data, "unmoved")]["n"] == rows[(data, "all")]["n"]
        assert math.isfinite(rows[(data, "all")]["rmse_e1"])
    assert main(["--run", f"tiny={trained_run}", "--data", f"truth={tiny_dataset}"]) == 2
