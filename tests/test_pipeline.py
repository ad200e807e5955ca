"""The main job end to end on a tiny config: every step, index.md, resume, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deblend.pipeline import STEPS, run_pipeline
from training.runner import stage_status

DES_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "des_decam"


@pytest.fixture(scope="module")
def tiny_job_config(tmp_path_factory, sample_catalog):
    config = {
        "name": "tiny-job",
        "simulation": {"catalog": str(sample_catalog), "n_samples": 96, "shard_size": 48,
                       "btk_batch_size": 16, "val_fraction": 0.25},
        "training": {"batch_size": 16, "epochs": 2, "learning_rate": 1e-3, "device": "cpu",
                     "amortized_map": True},
        "evaluation": {"gallery_size": 4, "mag_edges": [23.0]},
        "shear": {"n_scenes": 8, "chunk_scenes": 8, "bootstrap": 20},
        # a 4-pixel margin: the six-band operator of the default 10 costs twice the time
        "metacal": {"populations": ["btk"], "neighbours": [True], "n_scenes": 4,
                    "chunk_scenes": 4, "bootstrap": 10, "views": 1, "margin_pixels": 4},
        "map": {"enabled": True, "n_blends": 4, "steps": 3, "posterior_samples": 4,
                "batch_size": 4},
        "dense_fields": {"n_fields": 1, "field_arcsec": 16.0, "min_galaxies": 2,
                         "max_galaxies": 3},
        "fields": {"populations": ["galsim"], "n_fields": 1, "field_pixels": 100, "cell": 50},
        "des": {"n_standin": 12, "real_frames": str(DES_FRAMES)},
    }
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_job_config):
    out = tmp_path_factory.mktemp("jobrun") / "run"
    messages: list[str] = []
    headline = run_pipeline(tiny_job_config, out, jobs=1, progress=False, log=messages.append)
    return out, headline, messages


def test_every_step_runs_and_index_links_existing_files(finished_job):
    out, headline, messages = finished_job
    for step in STEPS[:-1]:
        assert f"[{step}] running" in messages
    index = (out / "index.md").read_text()
    links = [part.split(")")[0] for part in index.split("](")[1:]]
    assert links and all((out / link).is_file() for link in links), links
    assert any(link.endswith(".png") for link in links)
    assert set(headline["fidelity"]) == {"t1", "t2"}
    assert {"regressor", "recon_moments"} <= set(headline["slopes"])
    assert {"regressor", "recon_moments"} <= set(headline["shear"])
    assert "regressor" in headline["des_standin"]
    metacal = headline["metacal_shear"]["variants"]["btk_blended"]["estimators"]
    assert {"regressor", "anacal", "blend_hsm"} <= set(metacal)
    assert "Shear bias against the applied shear" in index
    fields = headline["fields"]["results"]["galsim"]
    assert {"deblend", "deblend_object", "hsm", "anacal"} <= set(fields)
    assert "fields/cell.png" in index and "metadetection on sheared fields" in index
    saved = json.loads((out / "headline.json").read_text())
    assert saved["slopes"]["regressor"]["e1"]["slope"] == headline["slopes"]["regressor"]["e1"]["slope"]
    for stage in ("stage1", "stage2", "flow", "amortize", "stage3"):
        assert stage_status(out / "train", stage) == "done"
    stage3 = torch.load(out / "train" / "stage3" / "best.pt", weights_only=True)
    assert stage3["parent"]["stage"] == "amortize"
    map_methods = headline["map_deblending"]["blends"]
    assert {"encoder", "map_normal", "map_flow"} <= set(map_methods)
    assert "map_deblending/report.md" in index
    if DES_FRAMES.is_dir():  # des.real_frames: the real DECam frames, linked from the report
        assert "des_validation/real/real_des.png" in index
        assert "## Real DES pixels" in (out / "des_validation" / "report.md").read_text()


def test_rerun_skips_complete_steps(finished_job, tiny_job_config):
    out, _, _ = finished_job
    messages: list[str] = []
    run_pipeline(tiny_job_config, out, jobs=1, progress=False, log=messages.append)
    for step in STEPS[:-1]:
        assert f"[{step}] complete, skipped" in messages


def test_interrupted_stage_is_resumed_and_later_steps_rerun(finished_job, tiny_job_config,
                                                            tmp_path):
    import shutil

    out, _, _ = finished_job
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "train" / "stage3")
    shutil.rmtree(copy / "des_validation")
    messages: list[str] = []
    run_pipeline(tiny_job_config, copy, jobs=1, progress=False, log=messages.append)
    assert "[simulate] complete, skipped" in messages and "[stage2] complete, skipped" in messages
    assert "[stage3] running" in messages and "[des_validation] running" in messages


def test_stage3_stopped_before_its_calibration_is_resumed(finished_job, tiny_job_config,
                                                         tmp_path):
    import shutil

    from deblend.core.runs import RunLayout, load_checkpoint, save_checkpoint

    out, _, _ = finished_job
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    best = RunLayout(copy / "train").best("stage3")
    stored = load_checkpoint(best)["response"]
    payload = load_checkpoint(best)
    del payload["response"]
    save_checkpoint(best, payload)
    assert stage_status(copy / "train", "stage3") == "interrupted"
    messages: list[str] = []
    run_pipeline(tiny_job_config, copy, jobs=1, progress=False, log=messages.append)
    assert "[stage2] complete, skipped" in messages and "[stage3] running" in messages
    assert load_checkpoint(best)["response"] == stored
    assert stage_status(copy / "train", "stage3") == "done"


def test_another_config_is_refused(finished_job, tiny_job_config, tmp_path):
    out, _, _ = finished_job
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(tiny_job_config.read_text())
    data["training"]["epochs"] = 3
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(FileExistsError, match="another config"):
        run_pipeline(other, out, progress=False, log=lambda _: None)
