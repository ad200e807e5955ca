"""Where a training run keeps its files.

A run directory ``R`` holds the three stages of one model::

    R/run.json              written by stage1: the config, the dataset (path, dataset_id, survey,
                            bands, stamp size, pixel scale) and its normalisation constants
    R/stage1/last.pt        checkpoint at the end of the latest finished epoch (the resume point)
    R/stage1/best.pt        checkpoint of the epoch of lowest validation loss (used downstream)
    R/stage1/history.csv    per-epoch losses, train_* and val_* columns
    R/stage1/loss.png       plot of history.csv
    R/stage2/...            same files
    R/stage3/...            same files

What each stage's checkpoint holds (see :mod:`training.checkpoints` for the format):

* stage1: ``encoder`` + ``decoder`` (the VAE trained on noisy isolated -> clean isolated);
* stage2: ``encoder`` trained on noisy blends against the frozen stage1 decoder; records the
  SHA-256 of the ``stage1/best.pt`` it used;
* stage3: ``regressor`` trained on mu of the frozen stage2 encoder; records ``stage2/best.pt``.

:meth:`deblend.Deblender.from_run` assembles the stage2 encoder, the stage1 decoder and the
stage3 regressor, after checking that each stage was trained on the checkpoints now in the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("stage1", "stage2", "stage3")
PREVIOUS_STAGE = {"stage2": "stage1", "stage3": "stage2"}
RUN_FILE = "run.json"


class RunError(ValueError):
    """A run directory lacks a stage, or its stages do not fit together or with the data."""


def check_stage(stage: str) -> str:
    """``stage`` if it names a stage, a clear error otherwise."""
    if stage not in STAGES:
        raise RunError(f"unknown stage '{stage}' (one of {', '.join(STAGES)})")
    return stage


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    def stage_dir(self, stage: str) -> Path:
        return self.root / check_stage(stage)

    def last(self, stage: str) -> Path:
        return self.stage_dir(stage) / "last.pt"

    def best(self, stage: str) -> Path:
        return self.stage_dir(stage) / "best.pt"

    def history(self, stage: str) -> Path:
        return self.stage_dir(stage) / "history.csv"

    def plot(self, stage: str) -> Path:
        return self.stage_dir(stage) / "loss.png"

    def read_run(self) -> dict[str, Any]:
        """Contents of ``run.json`` (written by stage1)."""
        if not self.run_file.is_file():
            raise RunError(f"{self.root} is not a training run: no {RUN_FILE} "
                           f"(run `python -m deblend.train stage1 --run {self.root} ...` first)")
        try:
            return json.loads(self.run_file.read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.run_file} is corrupt: {exc}") from exc
