"""The three training stages, their checkpoints, refusals and resume (tiny data, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deblend import Deblender
from deblend.core.config import Config, config_from_dict, load_config
from deblend.core.networks import FlooredSigmoid
from deblend.core.runs import (
    DataIdentity,
    RunLayout,
    build_module,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from deblend.train import main
from simulation.dataset import open_dataset
from tests.conftest import TINY_CONFIG, TINY_EPOCHS
from training.data import BatchReader, BlockBatchSampler, kept_bytes, make_loader, select_indices
from training.history import history_columns, read_history
from training.runner import run_stage
from training.stages import STAGES, drop_bands

TRAINED = ("stage1", "stage2", "stage3", "flow")
"""The stages of the tiny run (amortize is off in its config: tests/test_amortize.py)."""

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, **training) -> Path:
    config = {**TINY_CONFIG, "training": {**TINY_CONFIG["training"], **training}}
    path.write_text(yaml.safe_dump(config))
    return path


def copy_stages(run: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    """A copy of ``run`` holding only ``stages``."""
    dest.mkdir(parents=True)
    shutil.copy(run / "run.json", dest / "run.json")
    for stage in stages:
        shutil.copytree(run / stage, dest / stage)
    return dest


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    modules = load_checkpoint(checkpoint)["modules"]
    return {f"{m}.{k}": v for m, entry in modules.items() for k, v in entry["state_dict"].items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- data ---------------------------------------------------------------------------------------
def test_sampler_blocks_cover_each_index_once_and_depend_on_the_epoch() -> None:
    indices = np.arange(100, 203)
    sampler = BlockBatchSampler(indices, 16, shuffle=True, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        blocks = list(sampler)
        assert all(1 <= len(b) <= 16 for b in blocks)
        flat = np.concatenate(blocks)
        assert sorted(flat.tolist()) == indices.tolist()
        # consecutive inside a block, except where the rotation wraps around
        assert sum(int(np.sum(np.diff(b) != 1)) for b in blocks) <= 1
        orders.append(flat)
    assert not np.array_equal(orders[0], orders[1])
    assert np.array_equal(orders[0], orders[2])


def test_sampler_shards_are_disjoint_and_equal_for_ddp() -> None:
    indices = np.arange(90)
    shards = [BlockBatchSampler(indices, 8, shuffle=True, seed=0, rank=r, world_size=3,
                                equal_shards=True) for r in range(3)]
    blocks = [list(s) for s in shards]
    assert len({len(b) for b in blocks}) == 1
    seen = np.concatenate([np.concatenate(b) for b in blocks])
    assert len(seen) == len(set(seen.tolist()))


def test_reader_normalises_with_the_dataset_constants(tiny_dataset: Path) -> None:
    from deblend.core.normalization import normalize

    data = open_dataset(tiny_dataset)
    indices = np.arange(60, 70)  # crosses the boundary of the first two shards
    x, y = BatchReader(tiny_dataset, "blend", "clean")[indices]
    assert x.shape == y.shape == (10, 6, 45, 45) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), normalize(data.images("blend", indices),
                                                    data.normalization), rtol=1e-6)
    _, e = BatchReader(tiny_dataset, "blend", "ellipticity")[indices]
    labels = data.labels()
    np.testing.assert_allclose(e.numpy(), np.stack([labels["e1"], labels["e2"]], 1)[indices],
                               rtol=1e-6)


def test_kept_normalised_images_are_the_ones_read_and_are_never_shared(
        tiny_dataset: Path) -> None:
    indices = np.arange(0, 128)
    plain = BatchReader(tiny_dataset, "blend", "clean")
    kept = BatchReader(tiny_dataset, "blend", "clean", cached=indices)
    batch = np.arange(50, 80)  # crosses a shard boundary
    for _ in range(2):  # first read normalises and keeps, second copies from memory
        x, y = kept[batch]
        x_ref, y_ref = plain[batch]
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        x.zero_()  # the loop augments batches in place: that must not reach what is kept
        y.fill_(2.0)
    assert kept._normalized["blend"].filled.sum() == len(batch)
    other = np.array([3, 90, 4])  # partly kept: read again, unordered rows stay in order
    assert torch.equal(kept[other][0], plain[other][0])
    with pytest.raises(ValueError, match="outside the kept"):
        kept[np.array([5, 140])]


def test_a_loader_keeps_normalised_images_only_within_its_budget(tiny_dataset: Path) -> None:
    common = dict(input_set="noisy", target="clean", split="train", batch_size=16)
    n = len(select_indices(open_dataset(tiny_dataset), "train", 0.0))
    need = n * 2 * 6 * 45 * 45 * 4  # two image sets (noisy, clean), float32
    assert kept_bytes(make_loader(tiny_dataset, cache_bytes=need, **common)) == need
    assert kept_bytes(make_loader(tiny_dataset, cache_bytes=need - 1, **common)) == 0
    assert kept_bytes(make_loader(tiny_dataset, **common)) == 0


def test_keeping_normalised_images_trains_the_same_weights(trained_run: Path, tiny_dataset: Path,
                                                            tmp_path: Path) -> None:
    """The tiny run kept its normalised images (default budget); reading them every epoch
    gives bit-identical stage1 weights."""
    run = tmp_path / "run"
    config = load_config(write_config(tmp_path / "c.yaml", normalized_cache_gib=0.0))
    run_stage("stage1", run, config=config, data_dir=tiny_dataset, progress=False,
              log=lambda _: None)
    assert_same_weights(weights(RunLayout(trained_run).last("stage1")),
                        weights(RunLayout(run).last("stage1")))


def test_min_target_e_cut(tiny_dataset: Path) -> None:
    data = open_dataset(tiny_dataset)
    e = data.labels()["e"]
    kept = select_indices(data, "train", 0.1)
    assert 0 < len(kept) < len(data.split_indices("train"))
    assert np.all(e[kept] > 0.1)
    assert np.array_equal(select_indices(data, "validation", 0.0), data.split_indices("validation"))


# -- a whole run --------------------------------------------------------------------------------
def test_each_stage_writes_its_files_and_its_loss_falls(trained_run: Path) -> None:
    layout = RunLayout(trained_run)
    assert layout.run_file.is_file()
    assert not layout.stage_dir("amortize").exists()  # off in the tiny config
    for stage in TRAINED:
        for path in (layout.last(stage), layout.best(stage), layout.history(stage),
                     layout.plot(stage)):
            assert path.is_file(), path
        assert layout.plot(stage).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = read_history(layout.history(stage))
        assert [r["epoch"] for r in rows] == list(range(1, TINY_EPOCHS + 1))
        assert rows[-1]["train_total"] < rows[0]["train_total"], (stage, rows)
        best = load_checkpoint(layout.best(stage))
        assert best["epoch"] == min(rows, key=lambda r: r["val_total"])["epoch"]
    stage1_columns = history_columns(("total", "reconstruction", "kl"))
    assert list(read_history(layout.history("stage1"))[0]) == stage1_columns


def test_every_stage_clips_its_gradient_only_when_asked(trained_run: Path,
                                                        tmp_path: Path) -> None:
    """``training.max_grad_norm`` (stage2 here): a bound never reached trains bit for bit as
    unclipped, a tiny one changes what it learns; the history holds each epoch's median and
    largest gradient norm before clipping."""
    def retrained(name: str, max_norm: float) -> Path:
        run = copy_stages(trained_run, tmp_path / name, ("stage1",))
        config = load_config(write_config(tmp_path / f"{name}.yaml", max_grad_norm=max_norm))
        run_stage("stage2", run, config=config, progress=False, log=lambda _: None)
        return run

    unclipped = RunLayout(trained_run)
    loose, tight = RunLayout(retrained("loose", 1e12)), RunLayout(retrained("tight", 1e-9))
    assert_same_weights(weights(loose.last("stage2")), weights(unclipped.last("stage2")))
    tight_weights, reference = weights(tight.last("stage2")), weights(unclipped.last("stage2"))
    assert not all(torch.equal(tight_weights[k], reference[k]) for k in reference)
    rows = read_history(unclipped.history("stage2"))
    assert all(0 < r["grad_norm_median"] <= r["grad_norm_max"] < np.inf for r in rows), rows
    assert ([r["grad_norm_max"] for r in read_history(loose.history("stage2"))]
            == [r["grad_norm_max"] for r in rows])
    # the norms recorded are those before clipping, not the bound
    assert read_history(tight.history("stage2"))[-1]["grad_norm_median"] > 1e-3


def test_checkpoints_hold_what_later_stages_need(trained_run: Path, tiny_dataset: Path) -> None:
    layout = RunLayout(trained_run)
    data = open_dataset(tiny_dataset)
    expected_modules = {"stage1": {"encoder", "decoder"}, "stage2": {"encoder"},
                        "stage3": {"regressor"}, "flow": {"flow"}}
    for stage in TRAINED:
        last = load_checkpoint(layout.last(stage))
        assert last["stage"] == stage and last["finished"] and last["epoch"] == TINY_EPOCHS
        assert set(last["modules"]) == expected_modules[stage]
        assert last["optimizer"]["state"], "optimiser state missing"
        assert config_from_dict(last["config"]).training.batch_size == 16
        identity = DataIdentity.from_dict(last["data"])
        assert identity.dataset_id == data.dataset_id
        assert identity.normalization.matches(data.normalization)
    assert load_checkpoint(layout.last("stage1"))["parent"] is None
    for stage, parent in (("stage2", "stage1"), ("stage3", "stage2"), ("flow", "stage1")):
        assert load_checkpoint(layout.best(stage))["parent"] == {
            "stage": parent, "sha256": file_sha256(layout.best(parent))}
        assert load_checkpoint(layout.best(stage))["uses"] == []
    assert load_checkpoint(layout.best("stage2"))["init"] == "stage1"
    # the decoder records its configured output layer, and the Deblender rebuilds it
    decoder = load_checkpoint(layout.best("stage1"))["modules"]["decoder"]
    assert decoder["hparams"]["output"] == Config().model.decoder_output == "floored_sigmoid"
    assert isinstance(list(Deblender.from_run(trained_run, device="cpu").decoder.deconv)[-1],
                      FlooredSigmoid)


def test_frozen_parts_stay_frozen(trained_run: Path, tmp_path: Path) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    layout = RunLayout(run)
    stage1 = load_checkpoint(layout.best("stage1"))["modules"]

    result = run_stage("stage2", run, progress=False, log=lambda _: None)
    decoder = result.task.frozen["decoder"]
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, stage1["decoder"]["state_dict"][key]), key
    trained = load_checkpoint(layout.best("stage2"))["modules"]["encoder"]["state_dict"]
    assert any(not torch.equal(v, stage1["encoder"]["state_dict"][k]) for k, v in trained.items())

    result = run_stage("stage3", run, progress=False, log=lambda _: None)
    encoder = result.task.frozen["encoder"]
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_stage2_from_scratch(trained_run: Path, tmp_path: Path, tiny_config: Path) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    config = load_config(tiny_config).replace("training", stage2_init="scratch", stage2_epochs=1)
    result = run_stage("stage2", run, config=config, progress=False, log=lambda _: None)
    assert result.epochs_trained == 1
    payload = load_checkpoint(RunLayout(run).best("stage2"))
    assert payload["init"] == "scratch"


# -- refusals -----------------------------------------------------------------------------------
def test_existing_results_are_not_overwritten(trained_run: Path, capsys) -> None:
    before = file_sha256(RunLayout(trained_run).last("stage2"))
    assert main(["stage2", "--run", str(trained_run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert file_sha256(RunLayout(trained_run).last("stage2")) == before
    # a finished stage resumed with the same config has nothing to do
    assert main(["stage3", "--run", str(trained_run), "--resume", "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_missing_previous_stage_is_refused(trained_run: Path, tmp_path: Path, capsys) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    assert main(["stage3", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "stage2" in err and "best.pt" in err
    assert main(["stage2", "--run", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "stage1" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"stamp_pixels": 41}, "41-pixel stamps"),
    ({"seed": 5}, "normalisation constants"),
])
def test_incompatible_data_is_refused(trained_run: Path, tmp_path: Path, sample_catalog: Path,
                                      change: dict, message: str, capsys) -> None:
    from simulation.builder import build_dataset

    sim = {**TINY_CONFIG["simulation"], "n_samples": 16, "shard_size": 16, **change}
    other = tmp_path / "other"
    build_dataset(config_from_dict({"simulation": sim}).simulation, other, progress=False,
                  log=lambda _: None)
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    assert main(["stage2", "--run", str(run), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "stage1" in err
    assert not RunLayout(run).last("stage2").exists()


def test_resume_refuses_a_changed_config(trained_run: Path, tmp_path: Path, capsys) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    config = write_config(tmp_path / "c.yaml", batch_size=8)
    assert main(["stage1", "--run", str(run), "--config", str(config), "--resume",
                 "--no-progress"]) == 2
    assert "training.batch_size" in capsys.readouterr().err
    assert main(["stage2", "--run", str(run), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1


def test_rebuilt_modules_match(trained_run: Path) -> None:
    entry = load_checkpoint(RunLayout(trained_run).best("stage3"))["modules"]["regressor"]
    regressor = build_module(entry)
    assert not regressor.training
    assert regressor(torch.zeros(3, regressor.latent_dim)).shape == (3, 2)


# -- resume -------------------------------------------------------------------------------------
KILL_IN_EPOCH_2 = """
import os, signal, sys
import training.loop as loop

original = loop.StageLoop.train_epoch

def train_epoch(self, epoch):
    if epoch == 1:
        step, calls = self.optimizer.step, []
        def step_then_die(*args, **kwargs):
            out = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        self.optimizer.step = step_then_die
    return original(self, epoch)

loop.StageLoop.train_epoch = train_epoch
from deblend.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_and_resume_equals_uninterrupted(trained_run: Path, tiny_dataset: Path,
                                              tmp_path: Path) -> None:
    """SIGKILL in the middle of epoch 2, then --resume: the same weights as 2 epochs straight."""
    config = write_config(tmp_path / "c.yaml", epochs=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def train(run: Path, *extra: str, script: str | None = None) -> int:
        args = ["stage1", "--run", str(run), "--config", str(config), "--data",
                str(tiny_dataset), "--no-progress", *extra]
        command = ([sys.executable, "-c", script] if script else
                   [sys.executable, "-m", "deblend.train"]) + args
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True).returncode

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(straight) == 0
    assert train(killed, script=KILL_IN_EPOCH_2) == -9
    assert load_checkpoint(RunLayout(killed).last("stage1"))["epoch"] == 1
    assert train(killed, "--resume") == 0
    layout_a, layout_b = RunLayout(straight), RunLayout(killed)
    assert_same_weights(weights(layout_a.last("stage1")), weights(layout_b.last("stage1")))
    assert_same_weights(weights(layout_a.best("stage1")), weights(layout_b.best("stage1")))
    rows_a = read_history(layout_a.history("stage1"))
    rows_b = read_history(layout_b.history("stage1"))
    assert [r["val_total"] for r in rows_a] == [r["val_total"] for r in rows_b]


def test_resume_continues_to_more_epochs(trained_run: Path, tmp_path: Path) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1", "stage2", "stage3"))
    config = load_config(write_config(tmp_path / "c.yaml", stage3_epochs=TINY_EPOCHS + 1))
    result = run_stage("stage3", run, config=config, resume=True, progress=False,
                       log=lambda _: None)
    assert result.epochs_trained == 1
    assert load_checkpoint(RunLayout(run).last("stage3"))["epoch"] == TINY_EPOCHS + 1
    assert len(read_history(RunLayout(run).history("stage3"))) == TINY_EPOCHS + 1


def test_stage1_retrained_makes_later_stages_stale(trained_run: Path, tmp_path: Path,
                                                   capsys) -> None:
    run = copy_stages(trained_run, tmp_path / "run", ("stage1", "stage2"))
    config = write_config(tmp_path / "c.yaml", epochs=1)
    assert main(["stage1", "--run", str(run), "--config", str(config), "--force",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stage3", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "re-trained" in err and "stage2" in err


def test_early_stopping_keeps_the_best_epoch(trained_run: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    import training.loop as loop

    losses = iter([[3.0, 3.0, 0.0], [2.0, 2.0, 0.0], [2.5, 2.5, 0.0], [2.2, 2.2, 0.0],
                   [1.0, 1.0, 0.0]])
    monkeypatch.setattr(loop.StageLoop, "validate", lambda self: next(losses))
    config = load_config(write_config(tmp_path / "c.yaml", epochs=5, early_stopping_patience=2))
    run = copy_stages(trained_run, tmp_path / "run", ("stage1",))
    result = run_stage("stage2", run, config=config, progress=False, log=lambda _: None)
    assert result.epochs_trained == 4 and result.state.stop_reason == "early_stopping"
    layout = RunLayout(run)
    assert load_checkpoint(layout.best("stage2"))["epoch"] == 2
    last = load_checkpoint(layout.last("stage2"))
    assert last["epoch"] == 4 and last["finished"]
    again = run_stage("stage2", run, config=config, resume=True, progress=False, log=lambda _: None)
    assert again.epochs_trained == 0


def test_device_choice() -> None:
    from deblend.core.device import autocast, resolve_device, uses_mixed_precision

    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert not uses_mixed_precision(cpu, True)
    with autocast(cpu, True):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_each_stage_declares_its_data_parent_epochs_and_last_step():
    from deblend.core.config import Config

    names = list(STAGES)
    configs = [Config(), Config().replace("training", amortized_map=True)]
    for name, stage in STAGES.items():
        assert stage.name == name
        for config in configs:
            parent = stage.parent_of(config)
            assert parent is None or names.index(parent) < names.index(name)
        assert all(names.index(used) < names.index(name) for used in stage.uses)
    assert [[n for n in names if STAGES[n].enabled(c)] for c in configs] == [
        ["stage1", "stage2", "flow", "stage3"], names]
    assert [STAGES["stage3"].parent_of(c) for c in configs] == ["stage2", "amortize"]
    training = Config().replace("training", epochs=7, stage2_epochs=3, amortize_epochs=2,
                                stage1_learning_rate=2e-3, amortize_learning_rate=3e-4,
                                amortize_fraction=0.25).training
    assert [STAGES[n].epochs(training) for n in names] == [7, 3, 7, 2, 7]
    assert [STAGES[n].learning_rate(training) for n in names] == [2e-3, 1e-4, 1e-4, 3e-4, 1e-4]
    assert [STAGES[n].sample_fraction(training) for n in names] == [1, 1, 1, 0.25, 1]
    assert [(s.input_set, s.target) for s in STAGES.values()] == [
        ("noisy", "clean"), ("blend", "clean"), ("noisy", "ellipticity"), ("blend", "map_latent"),
        ("blend", "ellipticity")]
    assert STAGES["flow"].parent == "stage1"
    assert STAGES["stage1"].is_complete({}) and not STAGES["stage3"].is_complete({})
    assert STAGES["stage3"].is_complete({"response": {"status": "uncalibrated"}})



def test_band_dropout_zeroes_one_band_of_the_chosen_samples() -> None:
    x = torch.rand(400, 6, 9, 9) + 0.1
    state = torch.get_rng_state()
    assert torch.equal(drop_bands(x.clone(), 0.0), x)
    assert torch.equal(torch.get_rng_state(), state)  # 0: no draw (the quick job's oracle)
    dropped = drop_bands(x.clone(), 1.0)
    zero_bands = (dropped == 0).all(dim=(2, 3))
    assert (zero_bands.sum(dim=1) == 1).all()  # exactly one band of every sample
    assert torch.equal(dropped[~zero_bands], x[~zero_bands])  # the others untouched
    assert len(set(zero_bands.float().argmax(dim=1).tolist())) == 6  # every band gets its turn
    some = (drop_bands(x.clone(), 0.3) == 0).all(dim=(2, 3)).any(dim=1).float().mean()
    assert 0.2 < float(some) < 0.4
    with pytest.raises(ValueError, match="training.band_dropout"):
        config_from_dict({"training": {"band_dropout": 1.5}})
