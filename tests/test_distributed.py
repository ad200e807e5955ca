"""DDP smoke run: stage1 for one epoch with 2 CPU processes under torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from deblend import Deblender
from deblend.core.runs import RunLayout, load_checkpoint
from simulation.dataset import open_dataset
from tests.conftest import TINY_CONFIG
from training.history import read_history

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "training": {**TINY_CONFIG["training"],
                                                                   "epochs": 1}}))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "deblend.train", "stage1", "--config", str(config), "--data", str(tiny_dataset),
         "--run-dir", str(run), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    layout = RunLayout(run)
    last = load_checkpoint(layout.last("stage1"))
    assert last["epoch"] == 1 and last["finished"]
    assert not any("module." in key for key in last["modules"]["encoder"]["state_dict"])
    assert len(read_history(layout.history("stage1"))) == 1
    vae = Deblender.from_run(run, stage="stage1", device="cpu")
    stamps = open_dataset(tiny_dataset).images("noisy", [0, 1])
    assert np.all(np.isfinite(vae.predict(stamps).reconstruction))
