"""Shared session fixtures: one tiny dataset and one tiny three-stage run for the whole suite.

* ``sample_catalog``: path of the 100 real CatSim rows (tests that need it skip without it).
* ``tiny_dataset``: a 160-sample LSST dataset (128 train / 32 validation, 3 shards) drawn
  from the sample catalog.
* ``tiny_config``: a YAML config (:data:`TINY_CONFIG`) that trains on it in seconds.
* ``trained_run``: a run directory with stage1, stage2, stage3 and flow trained on ``tiny_dataset``
  with ``tiny_config`` through the CLI (``python -m deblend.train``), :data:`TINY_EPOCHS` each.

``background_gradient`` is a stand-in estimator that reads the sky (sky-plane tests).

Treat the session fixtures as read-only: copy them before changing anything.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml

SAMPLE_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "catsim_sample_100.fits"
TINY_EPOCHS = 5
TINY_CONFIG = {
    "name": "tiny",
    "simulation": {"catalog": str(SAMPLE_CATALOG), "n_samples": 160, "shard_size": 64,
                   "btk_batch_size": 16, "val_fraction": 0.2, "seed": 0},
    "training": {"batch_size": 16, "epochs": TINY_EPOCHS, "learning_rate": 1e-3,
                 "beta_kl": 1e-3, "seed": 0, "num_workers": 0, "device": "cpu"},
}


def background_gradient(stamps: np.ndarray) -> np.ndarray:
    """A stand-in for an estimator that reads the sky: the first band's mean of the stamp's
    last column less its first (x) and of its last row less its first (y)."""
    first = stamps[:, 0]
    return np.stack([first[:, :, -1].mean(1) - first[:, :, 0].mean(1),
                     first[:, -1, :].mean(1) - first[:, 0, :].mean(1)], axis=1)


@pytest.fixture(scope="session")
def sample_catalog() -> Path:
    if not SAMPLE_CATALOG.is_file():
        pytest.skip(f"sample catalog missing: {SAMPLE_CATALOG}")
    return SAMPLE_CATALOG


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, sample_catalog: Path) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    from deblend.core.config import load_config
    from simulation.builder import build_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    build_dataset(load_config(tiny_config).simulation, root, progress=False, log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path,
                tiny_dataset: Path) -> Path:
    from deblend.train import main

    run = tmp_path_factory.mktemp("run") / "tiny"
    common = ["--run", str(run), "--no-progress"]
    assert main(["stage1", "--config", str(tiny_config), "--data", str(tiny_dataset), *common]) == 0
    assert main(["stage2", *common]) == 0
    assert main(["stage3", *common]) == 0
    assert main(["flow", *common]) == 0
    return run


def parser_refusal(module: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of ``module``'s ``main(args)``, which must stop with argparse's exit status
    2 (a refusal before any work)."""
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(args)
    assert stop.value.code == 2
    return capsys.readouterr().err
