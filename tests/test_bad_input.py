"""Bad input across the product: one clear line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from deblend.__main__ import main as run_main
from deblend.train import main as train_main
from des_validation.validate import main as validate_main
from evaluation.report import main as report_main
from simulation.dataset import PLAN_FILE
from simulation.generate import main as generate_main


def one_error_line(capsys) -> str:
    """The single ``error: ...`` line a failed command printed on stderr."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_sim(sample_catalog):
    return {"catalog": str(sample_catalog), "n_samples": 8, "shard_size": 8, "btk_batch_size": 8}


@pytest.mark.parametrize("command", ["generate", "run", "train"])
def test_unknown_config_key_is_named(tmp_path, capsys, tiny_sim, command):
    config = write_config(tmp_path / "c.yaml", {"simulation": {**tiny_sim, "n_sampels": 3}})
    argv = {"generate": lambda: generate_main(["--config", str(config), "--out",
                                               str(tmp_path / "d")]),
            "run": lambda: run_main(["run", "--config", str(config), "--out", str(tmp_path / "r")]),
            "train": lambda: train_main(["stage1", "--config", str(config), "--data",
                                         str(tmp_path / "d"), "--run", str(tmp_path / "t")])}
    assert argv[command]() == 2
    assert "simulation.n_sampels" in one_error_line(capsys)
    assert not (tmp_path / "d").exists() and not (tmp_path / "t" / "stage1").exists()


def test_malformed_config_value_is_named(tmp_path, capsys, tiny_sim):
    config = write_config(tmp_path / "c.yaml", {"simulation": tiny_sim,
                                                "training": {"batch_size": "big"}})
    assert generate_main(["--config", str(config), "--out", str(tmp_path / "d")]) == 2
    assert "training.batch_size" in one_error_line(capsys)


def test_unknown_survey_and_band(tmp_path, capsys, tiny_sim):
    survey = write_config(tmp_path / "s.yaml", {"simulation": {**tiny_sim, "survey": "HSC"}})
    assert generate_main(["--config", str(survey), "--out", str(tmp_path / "a")]) == 2
    assert "unknown survey 'HSC'" in one_error_line(capsys)
    band = write_config(tmp_path / "b.yaml", {"simulation": {**tiny_sim, "survey": "DES",
                                                             "label_bands": ["u", "g"]}})
    assert generate_main(["--config", str(band), "--out", str(tmp_path / "b")]) == 2
    assert "band 'u' is not a DES band" in one_error_line(capsys)
    assert not (tmp_path / "a" / "metadata.json").exists()


@pytest.fixture(scope="module")
def des_dataset(tmp_path_factory, sample_catalog):
    from deblend.core.config import config_from_dict
    from simulation.builder import build_dataset

    sim = config_from_dict({"simulation": {"catalog": str(sample_catalog), "survey": "DES",
                                           "n_samples": 8, "shard_size": 8,
                                           "btk_batch_size": 8}}).simulation
    root = tmp_path_factory.mktemp("des") / "data"
    build_dataset(sim, root, progress=False, log=lambda _: None)
    return root


def test_dataset_of_another_survey_is_refused(tmp_path, capsys, trained_run, des_dataset):
    out = tmp_path / "report"
    assert report_main(["--run", str(trained_run), "--data", str(des_dataset), "--out",
                        str(out), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "trained on bands u g r i z y" in line and "has g r i z Y" in line
    assert not (out / "metrics.json").exists()
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert train_main(["stage2", "--run", str(run), "--data", str(des_dataset), "--force",
                       "--no-progress"]) == 2
    assert "bands g r i z Y instead of u g r i z y" in one_error_line(capsys)


def test_run_with_a_missing_stage_is_refused(tmp_path, capsys, trained_run, tiny_dataset):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "stage3")
    assert report_main(["--run", str(run), "--data", str(tiny_dataset), "--out",
                        str(tmp_path / "rep"), "--no-progress"]) == 2
    assert "stage3" in one_error_line(capsys)
    assert train_main(["stage3", "--run", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "not a training run" in one_error_line(capsys)


def test_existing_outputs_need_force(tmp_path, capsys, trained_run, tiny_dataset, tiny_config):
    out = tmp_path / "rep"
    out.mkdir()
    earlier = '{"fidelity": {"t1": {"ssim_mean": 0.5}}}'
    (out / "metrics.json").write_text(earlier)
    (out / "report.md").write_text("# an earlier report\n")
    assert report_main(["--run", str(trained_run), "--data", str(tiny_dataset), "--out",
                        str(out), "--no-progress"]) == 2
    assert "--force" in one_error_line(capsys)
    assert (out / "metrics.json").read_text() == earlier
    assert train_main(["stage1", "--config", str(tiny_config), "--data", str(tiny_dataset),
                       "--run", str(trained_run), "--no-progress"]) == 2
    assert "--force" in one_error_line(capsys)
    taken = tmp_path / "des_out"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert validate_main(["--run", str(trained_run), "--catalog", str(tmp_path / "c.fits"),
                          "--cutouts", str(tmp_path), "--out", str(taken)]) == 2
    one_error_line(capsys)
    assert (taken / "keep.txt").read_text() == "mine"


def test_disk_full_while_writing_leaves_no_trusted_output(tmp_path, capsys, tiny_sim):
    config = write_config(tmp_path / "c.yaml", {"simulation": {**tiny_sim, "n_samples": 16}})
    out = tmp_path / "d"
    command = ["--config", str(config), "--out", str(out), "--no-progress"]
    # a cluster piece wrote shard 1; shard 0's temporary file then lands on a full disk
    assert generate_main(command + ["--shard", "1", "--num-shards", "2"]) == 0
    capsys.readouterr()
    (out / "shards" / "shard-00000.h5.tmp").symlink_to("/dev/full")
    assert generate_main(command) == 2
    line = one_error_line(capsys)
    assert "shard-00000.h5.tmp" in line or "No space left" in line, line
    assert not (out / "shards" / "shard-00000.h5").exists()
    assert not (out / "metadata.json").exists()
    # the failed temporary file is removed, so once space is back the same command resumes
    assert not (out / "shards" / "shard-00000.h5.tmp").exists()
    assert generate_main(["--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metadata.json").is_file() and (out / PLAN_FILE).is_file()


def test_read_only_location_is_one_clear_line(capsys, tiny_sim, tmp_path):
    config = write_config(tmp_path / "c.yaml", {"simulation": tiny_sim})
    assert generate_main(["--config", str(config), "--out", "/sys/deblend-test-data",
                          "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "/sys/deblend-test-data" in line or "not permitted" in line
