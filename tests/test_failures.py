"""Failure paths a new user hits: each gives one clear line naming the culprit and a non-zero
exit, leaves nothing a later step would trust, and loses nothing the user had."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import parser_refusal

ROOT = Path(__file__).resolve().parents[1]


def run_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command in a fresh process; a hang (the old failure mode) ends in TimeoutExpired."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=None)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("catalog", ["missing", "not FITS"])
def test_a_catalog_the_workers_cannot_read_fails_the_main_job_at_once(tmp_path, catalog):
    """A wrong catalog used to fail in every worker's initializer, respawned for ever
    (~1,000 tracebacks in 25 s, no exit). A missing file is now refused before the workers
    start; one they cannot read fails the first shard, with its message."""
    path = tmp_path / "OneDegSq.fit"
    if catalog == "not FITS":
        path.write_text("this is not a FITS table\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"simulation": {
        "catalog": str(path), "n_samples": 64, "shard_size": 32}}))
    result = run_command(["deblend", "run", "--config", str(config), "--out",
                          str(tmp_path / "run"), "--jobs", "2", "--no-progress"], ROOT)
    assert result.returncode == 2, result.stderr
    errors = [line for line in error_lines(result) if line.startswith("error:")]
    assert len(errors) == 1 and "OneDegSq.fit" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "data" / "metadata.json").exists()


def _config(name: str):
    from deblend.core.config import config_from_dict

    return config_from_dict({"name": name})


def test_force_never_removes_a_directory_that_is_not_a_run(tmp_path):
    """--force used to rmtree any --out holding a config.yaml of something else."""
    from deblend.pipeline import RunPaths, claim_run_directory

    project = tmp_path / "my_project"
    project.mkdir()
    (project / "config.yaml").write_text("telescope: hubble\n")
    (project / "thesis.tex").write_text("years of work\n")
    with pytest.raises(FileExistsError, match="not a deblend run"):
        claim_run_directory(RunPaths(project), None, _config("a"), force=True)
    assert (project / "thesis.tex").read_text() == "years of work\n"
    assert (project / "config.yaml").read_text() == "telescope: hubble\n"


def test_force_restarts_a_run_but_keeps_what_the_user_put_there(tmp_path):
    from deblend.core.outputs import is_ours
    from deblend.pipeline import RUN_KIND, RunPaths, claim_run_directory

    paths = RunPaths(tmp_path / "run")
    claim_run_directory(paths, None, _config("a"), force=False)
    assert is_ours(paths.root, RUN_KIND)
    for directory in (paths.data, paths.train / "stage1", paths.evaluation):
        directory.mkdir(parents=True)
        (directory / "file").write_text("old")
    (paths.root / "notes.txt").write_text("mine")
    claim_run_directory(paths, None, _config("a"), force=False)  # same config: resume
    assert (paths.train / "stage1" / "file").is_file()
    with pytest.raises(FileExistsError, match="another config"):
        claim_run_directory(paths, None, _config("b"), force=False)
    claim_run_directory(paths, None, _config("b"), force=True)
    assert not paths.data.exists() and not paths.train.exists() and not paths.evaluation.exists()
    assert (paths.root / "notes.txt").read_text() == "mine"
    assert "name: b" in paths.config.read_text()


def test_a_run_recorded_before_a_key_was_added_resumes_at_its_default(tmp_path):
    """Every key added to the config (at a default that keeps the science) made the main job
    refuse the runs recorded before it as 'started with another config'."""
    import yaml

    from deblend.pipeline import RunPaths, claim_run_directory

    paths = RunPaths(tmp_path / "run")
    claim_run_directory(paths, None, _config("a"), force=False)
    recorded = yaml.safe_load(paths.config.read_text())
    del recorded["model"]["availability_input"], recorded["training"]["flow_max_grad_norm"]
    del recorded["training"]["max_grad_norm"], recorded["metacal"]["hold_sky_plane"]
    paths.config.write_text(yaml.safe_dump(recorded))
    (paths.root / "data").mkdir()
    claim_run_directory(paths, None, _config("a"), force=False)  # resumes
    recorded["model"]["latent_dim"] = 16  # a recorded key of another value is still refused
    paths.config.write_text(yaml.safe_dump(recorded))
    with pytest.raises(FileExistsError, match="another config"):
        claim_run_directory(paths, None, _config("a"), force=False)


def test_a_run_that_lost_its_config_is_not_relabelled(tmp_path):
    """With RUN/config.yaml removed, a rerun with another config used to skip every step and
    relabel the old data and weights with the new config."""
    from deblend.pipeline import RunPaths, claim_run_directory

    paths = RunPaths(tmp_path / "run")
    claim_run_directory(paths, None, _config("a"), force=False)
    paths.train.mkdir()
    (paths.train / "run.json").write_text("{}")
    paths.config.unlink()
    with pytest.raises(FileExistsError, match="lost its config.yaml"):
        claim_run_directory(paths, None, _config("b"), force=False)
    assert (paths.train / "run.json").is_file()
    claim_run_directory(paths, None, _config("b"), force=True)
    assert not paths.train.exists()  # the old weights are gone, not relabelled


@pytest.mark.parametrize("split, sample", [("validation", -1), ("train", 3)])
def test_non_finite_data_stop_a_stage_naming_the_sample(tmp_path, tiny_dataset, tiny_config,
                                                        capsys, split, sample):
    """A NaN pixel in the validation split used to end stage1 'successfully' with no best.pt;
    in the training split it was blamed on the learning rate."""
    import shutil

    import h5py

    from deblend.train import main as train_main
    from simulation.dataset import open_dataset
    from training.runner import stage_status

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    dataset = open_dataset(data)
    index = int(dataset.split_indices(split)[sample])
    shard, position = dataset.locate(np.array([index]))
    path = data / "shards" / dataset.meta["shards"][int(shard[0])]["file"]
    with h5py.File(path, "r+") as handle:
        handle["noisy"][int(position[0]), 2, 22, 22] = np.nan
    run = tmp_path / "run"
    assert train_main(["stage1", "--config", str(tiny_config), "--data", str(data), "--run",
                       str(run), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"sample {index} (noisy images)" in err[0], err
    assert "not finite" in err[0] and "learning_rate" not in err[0]
    assert not (run / "stage1" / "best.pt").exists()
    assert stage_status(run, "stage1") == "todo"


def test_a_catalog_swapped_before_the_resume_is_refused(tmp_path, sample_catalog):
    """Shards from two catalogs used to be mixed in one dataset (the plan pinned the path)."""
    import shutil

    from astropy.table import Table

    from deblend.core.config import config_from_dict
    from simulation.builder import build_dataset
    from simulation.dataset import METADATA_FILE, DatasetError

    catalog = tmp_path / "catalog.fits"
    shutil.copy(sample_catalog, catalog)
    sim = config_from_dict({"simulation": {"catalog": str(catalog), "n_samples": 16,
                                           "shard_size": 8, "btk_batch_size": 8}}).simulation
    root = tmp_path / "data"
    quiet = {"progress": False, "log": lambda _: None}
    assert build_dataset(sim, root, shard=0, num_shards=2, **quiet) is None  # half done
    Table.read(sample_catalog)[::-1].write(catalog, overwrite=True)  # same path, new content
    with pytest.raises(DatasetError, match="catalog .*catalog.fits changed since"):
        build_dataset(sim, root, shard=1, num_shards=2, **quiet)
    assert not (root / METADATA_FILE).exists()
    shutil.copy(sample_catalog, catalog)  # the original back: the dataset resumes and finishes
    assert build_dataset(sim, root, shard=1, num_shards=2, **quiet) is not None


def test_catalog_rows_left_out_are_said(tmp_path, sample_catalog):
    """Half the catalog's rows used to be dropped for NaNs without a word."""
    from astropy.table import Table

    from deblend.core.config import config_from_dict
    from simulation.builder import build_dataset

    table = Table.read(sample_catalog)
    table["a_d"][::2] = np.nan
    catalog = tmp_path / "half_nan.fits"
    table.write(catalog)
    sim = config_from_dict({"simulation": {"catalog": str(catalog), "n_samples": 8,
                                           "shard_size": 8, "btk_batch_size": 8}}).simulation
    messages: list[str] = []
    build_dataset(sim, tmp_path / "data", progress=False, log=messages.append)
    said = [m for m in messages if "cannot be drawn" in m]
    assert len(said) == 1 and "half_nan.fits" in said[0], messages
    dropped = int(said[0].split(": ")[1].split(" of ")[0])
    assert dropped >= 50 and "of 100 rows" in said[0] and "NaN or infinite" in said[0]


def test_an_unexpected_error_is_one_line_unless_the_traceback_is_asked_for(tmp_path, capsys,
                                                                          monkeypatch):
    """A failing step used to print a traceback; it is one line naming the error's type."""
    from simulation import generate

    def broken(*args, **kwargs):
        raise RuntimeError("shard 3: something\nunforeseen")

    monkeypatch.setattr(generate, "build_dataset", broken)
    argv = ["--out", str(tmp_path / "data")]
    assert generate.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: RuntimeError: shard 3: something "
                                               "unforeseen"), err
    monkeypatch.setenv("DEBLEND_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="shard 3"):
        generate.main(argv)


def test_a_run_directory_can_be_moved_with_its_data(tmp_path):
    """run.json used to hold the dataset's absolute path: a moved run lost its data."""
    import json

    from deblend.core.normalization import NormalizationConstants
    from deblend.core.runs import DataIdentity, RunLayout, RunRecord

    data = DataIdentity(str(tmp_path / "RUN" / "data"), "abc", "LSST", ("i",), 45, 0.2,
                        NormalizationConstants(("i",), (100.0,)))
    layout = RunLayout(tmp_path / "RUN" / "train")
    layout.root.mkdir(parents=True)
    layout.run_file.write_text(json.dumps(RunRecord({}, data, "now").to_dict(layout.root)))
    assert json.loads(layout.run_file.read_text())["data"]["path"] == "../data"
    (tmp_path / "RUN").rename(tmp_path / "moved")
    moved = RunLayout(tmp_path / "moved" / "train")
    assert moved.read_run().data_path(moved.root).resolve() == tmp_path / "moved" / "data"


def test_a_catalog_with_text_in_a_number_column_names_file_and_column(tmp_path):
    from des_validation.catalog import read_catalog

    path = tmp_path / "im3shape.csv"
    path.write_text("coadd_objects_id,ra,dec,e_1,e_2,snr_w\n1,10.0,-5.0,0.1,0.2,30\n"
                    "2,10.1,-5.1,0.1,n/a?,25\n")
    with pytest.raises(ValueError, match=r"im3shape.csv: column 'e_2' must hold numbers, but "
                                         r"has 'n/a\?'"):
        read_catalog(path)


def test_a_truncated_shard_is_named(tmp_path, tiny_dataset):
    import shutil

    from simulation.dataset import DatasetError, open_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    dataset = open_dataset(data)
    shard = data / "shards" / dataset.meta["shards"][-1]["file"]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    last = np.array([dataset.n_samples - 1])
    with pytest.raises(DatasetError, match=rf"shard {re.escape(str(shard))} is (truncated or )?"
                                           rf"unreadable"):
        open_dataset(data).images("blend", last)


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_predict_refuses_a_batch_size_that_is_not_a_positive_integer(trained_run, batch_size):
    """predict(x, batch_size=-1) used to return uninitialised memory as results."""
    from deblend.core.inference import Deblender

    model = Deblender.from_run(trained_run, device="cpu")
    stamps = np.ones((3, len(model.bands), model.stamp_pixels, model.stamp_pixels), np.float32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.predict(stamps, batch_size=batch_size)
    assert model.predict(stamps, batch_size=2).reconstruction.shape == stamps.shape


@pytest.mark.parametrize("argv, culprit", [
    (["simulation.generate", "--jobs", "0"], "--jobs"),
    (["simulation.generate", "--n", "-5"], "--n"),
    (["des_validation.validate", "--run", "r", "--catalog", "c", "--cutouts", "x",
      "--pixel-scale", "-0.26"], "--pixel-scale"),
    (["des_validation.standin", "--out", "o", "--stamp", "0"], "--stamp"),
])
def test_zero_or_negative_sizes_are_refused_naming_the_argument(tmp_path, monkeypatch, capsys,
                                                                 argv, culprit):
    """Refused by the parser (exit status 2, the argument named), in the command's own ``main``
    run in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    stderr = parser_refusal(argv[0], argv[1:], capsys)
    assert f"argument {culprit}: must be" in stderr and "Traceback" not in stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("kind", ["des-standin", "des-validation"])
def test_force_replaces_only_deblend_output_directories(tmp_path, kind):
    """--force on the DES commands used to rmtree whatever --out named."""
    from deblend.core.outputs import MARKER, claim_directory, mark, replace_directory

    user = tmp_path / "papers"
    user.mkdir()
    (user / "draft.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=f"not a deblend {kind} directory"):
        claim_directory(user, kind, force=True)
    assert (user / "draft.tex").read_text() == "mine"
    out = tmp_path / "out"
    assert claim_directory(out, kind, force=False) is False  # absent: nothing to replace
    built = tmp_path / "out.tmp"
    built.mkdir()
    (built / "report.md").write_text("first")
    replace_directory(built, out, kind)
    assert (out / MARKER).read_text().strip() == kind and not built.exists()
    with pytest.raises(FileExistsError, match="pass --force"):
        claim_directory(out, kind, force=False)
    assert claim_directory(out, kind, force=True) is True
    other = "des-validation" if kind == "des-standin" else "des-standin"
    mark(tmp_path / "out", other)
    with pytest.raises(FileExistsError, match=f"not a deblend {kind} directory"):
        claim_directory(out, kind, force=True)  # another command's output is not this one's


def test_truncated_files_are_read_or_rebuilt(tmp_path, tiny_dataset, tiny_config, trained_run,
                                            capsys):
    """One rule for what deblend wrote and finds unreadable: a clear error naming the file, and
    --force (or the main job's resume) writes it anew; nothing stays stuck."""
    import json
    import shutil

    from deblend.core.config import load_config
    from deblend.core.runs import RunLayout
    from evaluation.report import main as report_main
    from simulation.builder import build_dataset
    from simulation.dataset import METADATA_FILE, dataset_is_complete, open_dataset
    from training.runner import stage_status

    # a report's metrics.json
    out = tmp_path / "evaluation"
    argv = ["--run", str(trained_run), "--data", str(tiny_dataset), "--out", str(out),
            "--max-samples", "8", "--no-progress"]
    assert report_main(argv) == 0
    (out / "metrics.json").write_text('{"meta": {"run": "trunc')
    assert report_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "metrics.json is unreadable" in err[0] and "--force" in err[0]
    assert report_main([*argv, "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["meta"]["n_evaluated"] == 8

    # a dataset's metadata.json
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    dataset_id = open_dataset(data).dataset_id
    metadata = data / METADATA_FILE
    metadata.write_text(metadata.read_text()[:100])
    assert not dataset_is_complete(data)
    build_dataset(load_config(tiny_config).simulation, data, progress=False, log=lambda _: None)
    assert dataset_is_complete(data) and open_dataset(data).dataset_id == dataset_id

    # a stage's resume point
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = RunLayout(run).last("stage3")
    last.write_bytes(last.read_bytes()[:1000])
    (RunLayout(run).best("stage3")).unlink()
    assert stage_status(run, "stage3") == "todo"  # trained again, not a crash


def test_a_binary_config_file_is_named(tmp_path):
    from deblend.core.config import ConfigError, load_config

    path = tmp_path / "quick.yaml"
    path.write_bytes(bytes(range(128, 256)) * 3)
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(path))} is not a text"):
        load_config(path)


def test_report_shear_and_dataset_never_write_into_a_foreign_directory(tmp_path, trained_run,
                                                                       tiny_dataset, capsys):
    """--force used to let the report overwrite report.md/metrics.json in any --out, and a
    dataset be generated into any non-empty directory."""
    from evaluation.report import main as report_main
    from evaluation.shear import main as shear_main
    from simulation.generate import main as generate_main

    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "report.md").write_text("my referee report")
    (papers / "metrics.json").write_text('{"h0": 73}')
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"simulation": {"n_samples": 8, "shard_size": 8}}))
    for main, argv in (
            (report_main, ["--run", str(trained_run), "--data", str(tiny_dataset), "--out",
                           str(papers), "--force", "--no-progress"]),
            (shear_main, ["--run", str(trained_run), "--config", str(config), "--out",
                          str(papers), "--force", "--no-progress"]),
            (generate_main, ["--config", str(config), "--out", str(papers), "--force",
                             "--no-progress"])):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and str(papers) in err[0] and "choose another --out" in err[0], err
    assert sorted(p.name for p in papers.iterdir()) == ["metrics.json", "report.md"]
    assert (papers / "report.md").read_text() == "my referee report"


def test_an_evaluation_directory_of_an_earlier_version_is_still_ours(tmp_path):
    from deblend.core.outputs import MARKER
    from evaluation.report_io import EVALUATION_KIND, claim_evaluation_directory

    out = tmp_path / "evaluation"
    out.mkdir()
    (out / "metrics.json").write_text('{"meta": {"run": "r"}, "fidelity": {}}')
    assert claim_evaluation_directory(out) is True
    assert (out / MARKER).read_text().strip() == EVALUATION_KIND
    assert claim_evaluation_directory(tmp_path / "new") is False


def test_disk_full_between_best_and_last_checkpoint_gives_one_consistent_advice(
        tmp_path, tiny_dataset, tiny_config, capsys, monkeypatch):
    """A disk that filled up after best.pt and before last.pt used to leave "nothing to
    resume" on --resume and "already has results: pass --resume" without it."""
    import errno

    from deblend.core.runs import RunLayout, load_checkpoint
    from deblend.train import main as train_main
    from training import loop
    from training.runner import stage_status

    run = tmp_path / "run"
    real_save = loop.save_checkpoint

    def disk_fills_at_last_pt(path, payload):
        if path.name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, payload)

    monkeypatch.setattr(loop, "save_checkpoint", disk_fills_at_last_pt)
    argv = ["stage1", "--config", str(tiny_config), "--data", str(tiny_dataset), "--run",
            str(run), "--no-progress"]
    assert train_main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    layout = RunLayout(run)
    assert layout.best("stage1").is_file() and not layout.last("stage1").is_file()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)  # space freed
    assert stage_status(run, "stage1") == "interrupted"
    assert train_main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_main([*argv, "--resume"]) == 0
    assert stage_status(run, "stage1") == "done"
    assert load_checkpoint(layout.last("stage1"))["epoch"] == load_checkpoint(
        layout.last("stage1"))["total_epochs"]


def test_an_unreadable_run_json_is_rebuilt_from_the_first_stage(tmp_path, trained_run):
    import json
    import shutil

    from deblend.core.runs import RunLayout, run_config
    from training.runner import stage_status

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    layout = RunLayout(run)
    before = json.loads(layout.run_file.read_text())
    layout.run_file.write_text(layout.run_file.read_text()[:50])
    assert run_config(run).to_dict() == before["config"]
    after = json.loads(layout.run_file.read_text())  # written anew
    assert after["config"] == before["config"]
    assert after["data"]["dataset_id"] == before["data"]["dataset_id"]
    assert layout.read_run().data_path(run).resolve() == (trained_run /
                                                          before["data"]["path"]).resolve()
    assert stage_status(run, "stage3") == "done"


def test_training_and_datasets_follow_the_same_directory_rule(tmp_path, tiny_dataset,
                                                              tiny_config, capsys):
    import shutil

    from deblend.core.config import load_config
    from deblend.core.outputs import MARKER
    from deblend.train import main as train_main
    from simulation.builder import DATASET_KIND, build_dataset

    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "thesis.tex").write_text("mine")
    assert train_main(["stage1", "--config", str(tiny_config), "--data", str(tiny_dataset),
                       "--run", str(papers), "--force", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not a deblend training run directory" in err[0], err
    assert sorted(p.name for p in papers.iterdir()) == ["thesis.tex"]
    # a dataset written before outputs were marked is recognised by its plan, and marked
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / MARKER).unlink()
    build_dataset(load_config(tiny_config).simulation, data, progress=False, log=lambda _: None,
                  force=True)
    assert (data / MARKER).read_text().strip() == DATASET_KIND
