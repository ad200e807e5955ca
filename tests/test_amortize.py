"""Amortised MAP: the ``amortize`` stage (training.stages.AmortizeStage) and its MAP targets
(training.map_targets), trained on the tiny run with ``training.amortized_map``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deblend.core.config import load_config
from deblend.core.normalization import normalize
from deblend.core.runs import RunError, RunLayout, load_checkpoint, load_lineage
from deblend.core.symmetry import image_view
from deblend.train import main
from simulation.dataset import open_dataset
from tests.conftest import TINY_CONFIG, TINY_EPOCHS
from training.data import BatchReader
from training.history import read_history
from training.runner import run_stage

MAP_STEPS = 15
AMORTIZED = {**TINY_CONFIG, "training": {**TINY_CONFIG["training"], "amortized_map": True,
                                         "amortize_learning_rate": 3e-4},
             "map": {"steps": MAP_STEPS}}


@pytest.fixture(scope="module")
def amortized(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run, config): the tiny run with amortize trained and stage3 trained again on it."""
    root = tmp_path_factory.mktemp("amortized")
    run, config = root / "run", root / "amortized.yaml"
    shutil.copytree(trained_run, run)
    config.write_text(yaml.safe_dump(AMORTIZED))
    common = ["--run", str(run), "--config", str(config), "--no-progress"]
    assert main(["amortize", *common]) == 0
    assert main(["stage3", "--force", *common]) == 0
    return run, config


def stage2_model(run: Path):
    from deblend import Deblender

    return Deblender.from_run(run, stage="stage2", device="cpu")


def test_amortize_is_refused_when_the_config_turns_it_off(trained_run: Path, tmp_path: Path,
                                                          capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["amortize", "--run", str(run), "--no-progress"]) == 2
    assert "training.amortized_map" in capsys.readouterr().err
    assert not (run / "amortize").exists()


def test_encoder_learns_the_map_latents_better_than_stage2(amortized: tuple[Path, Path]) -> None:
    run, _ = amortized
    rows = read_history(RunLayout(run).history("amortize"))
    assert len(rows) == TINY_EPOCHS
    best = min(rows, key=lambda row: row["val_total"])
    # squared latent distance to the MAP targets of held-out blends: the stage2 encoder it
    # started from (whose latents MAP moved: its distance is not 0) is logged beside it
    assert 0.05 < best["val_total"] < best["val_stage2"]
    payload = load_checkpoint(RunLayout(run).best("amortize"))
    assert payload["parent"]["stage"] == "stage2"
    assert [record["stage"] for record in payload["uses"]] == ["stage1", "flow"]
    assert payload["init"] == "stage2"


def test_targets_are_the_map_latents_of_each_blend_in_its_view(amortized: tuple[Path, Path]
                                                               ) -> None:
    run, config = amortized
    targets = np.load(run / "amortize" / "map_targets" / "chunk_00000.npz")
    data = open_dataset(load_checkpoint(RunLayout(run).best("amortize"))["data"]["path"])
    train = data.split_indices("train")
    # the views cycle through the chunk, each latent of its blend as seen in its view
    assert list(targets["view"][:10]) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    # the blends fitted in view 0, each fitted again on its own, give the cached latents
    model = stage2_model(run)
    centre = float(data.stamp_pixels // 2)
    from deblend.core.detection import detect_sources, with_target

    settings = load_config(config).map
    for position in range(0, 64, 8):
        blend = data.images("blend", train[position:position + 1])
        found = detect_sources(blend, data.survey, data.bands, settings.detection_band,
                               settings.detection_threshold, max_sources=settings.max_sources)
        out = model.map_deblend(blend, [with_target(found[0], (centre, centre))],
                                prior="flow", steps=MAP_STEPS,
                                learning_rate=settings.learning_rate)
        np.testing.assert_allclose(targets["latent"][position], out.latent[0], atol=1e-4)
    first = int(train[0])
    blend = data.images("blend", np.array([first]))
    # the reader shows each blend in its target's view
    from training.map_targets import LatentTargets

    latent = np.zeros((data.n_samples, model.latent_dim), np.float32)
    view = np.full(data.n_samples, 3)
    reader = BatchReader(data.root, "blend", "map_latent", LatentTargets(latent, view))
    x, y = reader[np.array([first])]
    expected = image_view(torch.from_numpy(normalize(blend, data.normalization)), 3)
    torch.testing.assert_close(x, expected)
    assert y.shape == (1, model.latent_dim)
    with pytest.raises(ValueError, match="latent_targets"):
        BatchReader(data.root, "blend", "map_latent")


def test_regressor_and_deblender_use_the_amortized_encoder(amortized: tuple[Path, Path]) -> None:
    from deblend import Deblender

    run, _ = amortized
    layout = RunLayout(run)
    assert load_checkpoint(layout.best("stage3"))["parent"]["stage"] == "amortize"
    assert list(load_lineage(layout, "stage3", needed_by="a test")) == [
        "stage3", "amortize", "stage2", "stage1"]
    model = Deblender.from_run(run, device="cpu")
    saved = load_checkpoint(layout.best("amortize"))["modules"]["encoder"]["state_dict"]
    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, saved[name])
    assert model.flow is not None and model.regressor is not None


def test_targets_resume_from_their_chunks_and_refit_a_corrupt_one(
        amortized: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = load_config(amortized[1]).replace("training", amortize_chunk=64)
    shutil.copytree(amortized[0], run)
    chunks = run / "amortize" / "map_targets"

    def train() -> str:
        messages: list[str] = []
        run_stage("amortize", run, config=config, force=True, progress=False,
                  log=messages.append)
        assert "MAP targets: 128/144 blends" in messages
        return next(m for m in messages if "fitted now" in m)

    # other chunks than the fixture's 500-blend one: every blend is fitted again
    assert "(144 fitted now, 0 from" in train()
    before = np.load(chunks / "chunk_00001.npz")["latent"]
    (chunks / "chunk_00001.npz").write_bytes(b"truncated by an interruption")
    assert "(64 fitted now, 80 from" in train()
    np.testing.assert_allclose(np.load(chunks / "chunk_00001.npz")["latent"], before, atol=1e-5)


def test_retrained_flow_makes_amortize_and_its_regressor_stale(amortized: tuple[Path, Path],
                                                               tmp_path: Path, capsys) -> None:
    run, config = tmp_path / "run", amortized[1]
    shutil.copytree(amortized[0], run)
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**AMORTIZED, "training": {**AMORTIZED["training"],
                                                             "flow_epochs": 1}}))
    assert main(["flow", "--run", str(run), "--config", str(one), "--force",
                 "--no-progress"]) == 0
    with pytest.raises(RunError, match="another flow result"):
        load_lineage(RunLayout(run), "stage3", needed_by="a test")
    capsys.readouterr()
    assert main(["amortize", "--run", str(run), "--config", str(config), "--resume",
                 "--no-progress"]) == 2
    assert "re-trained" in capsys.readouterr().err


def test_torchrun_processes_share_the_map_targets(amortized: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    shutil.copytree(amortized[0], run)
    shutil.rmtree(run / "amortize")
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**AMORTIZED, "training": {
        **AMORTIZED["training"], "amortize_epochs": 1, "amortize_chunk": 48}}))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "deblend.train", "amortize", "--config", str(config), "--run-dir", str(run),
         "--no-progress"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    # process 0 fitted chunks 0 and 2, process 1 chunk 1; then both read all three
    assert "MAP targets: 96 blends fitted by process 0 of 2" in result.stdout
    assert "MAP targets: 144 blends (0 fitted now, 144 from" in result.stdout
    chunks = sorted((run / "amortize" / "map_targets").glob("chunk_*.npz"))
    assert [c.name for c in chunks] == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    # the same targets as one process fitting one chunk (48 is a multiple of the 8 views). The
    # scenes are batched otherwise and summed on 1 thread instead of 2, so the last bits differ;
    # the tiny run's poor flow (log p near -1e21) can make that grow for an odd scene
    whole = np.load(amortized[0] / "amortize" / "map_targets" / "chunk_00000.npz")
    shared = np.concatenate([np.load(c)["latent"] for c in chunks])
    assert shared.shape == whole["latent"].shape
    same = np.isclose(shared, whole["latent"], atol=1e-4).all(axis=1)
    assert same.sum() >= len(same) - 2, np.flatnonzero(~same)
    assert load_checkpoint(RunLayout(run).last("amortize"))["finished"]


def test_fraction_fits_and_trains_on_the_first_part_of_each_split(
        amortized: tuple[Path, Path], tmp_path: Path) -> None:
    from training.data import make_loader

    run = tmp_path / "run"
    shutil.copytree(amortized[0], run)
    config = load_config(amortized[1]).replace("training", amortize_fraction=0.5,
                                               amortize_epochs=1)
    data = open_dataset(load_checkpoint(RunLayout(run).best("amortize"))["data"]["path"])
    train, validation = data.split_indices("train"), data.split_indices("validation")
    kept = -(-len(train) // 2) + -(-len(validation) // 2)
    messages: list[str] = []
    run_stage("amortize", run, config=config, force=True, progress=False, log=messages.append)
    assert f"MAP targets: {kept} blends ({kept} fitted now, 0 from" in " ".join(messages)
    targets = np.load(run / "amortize" / "map_targets" / "chunk_00000.npz")
    assert len(targets["latent"]) == kept
    # the loaders read the same first halves, and nothing else
    loader = make_loader(data.root, input_set="blend", target="clean", split="train",
                         batch_size=8, fraction=0.5)
    np.testing.assert_array_equal(np.sort(loader.sampler.indices), train[:-(-len(train) // 2)])
    # a run trained on one fraction is not resumed on another
    with pytest.raises(RunError, match="amortize_fraction"):
        run_stage("amortize", run, config=config.replace("training", amortize_fraction=1.0),
                  resume=True, progress=False, log=messages.append)
