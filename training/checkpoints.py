"""The one checkpoint format of deblend, written atomically.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    format_version   CHECKPOINT_VERSION
    stage            "stage1" | "stage2" | "stage3"
    epoch            number of finished epochs
    total_epochs     epochs the config asked for
    finished         True once the stage needs no more epochs
    stop_reason      None, "epochs" or "early_stopping"
    modules          {name: {"class": "Encoder"|"Decoder"|"Regressor", "hparams": {...},
                             "state_dict": {...}}}  -- the weights this stage trained
    optimizer        Adam state_dict
    config           Config.to_dict() the stage ran with
    data             DataIdentity.to_dict(): dataset path, dataset_id, bands, stamp size, pixel
                     scale and normalisation constants
    parent           None, or {"stage", "sha256"} of the previous stage's best.pt it was built on
    init             how the trained modules started: "random", or stage2's training.stage2_init
                     ("stage1": the stage1 encoder; "scratch")
    history          list of per-epoch rows (see training.history)
    best             {"epoch", "val_total"} of the best epoch so far
    epochs_without_improvement   for early stopping
    response         stage3's best.pt only, added after training: the regressor's response on
                     the calibration split (training.calibration, deblend.response)

No RNG state is stored: every epoch reseeds from (training.seed, epoch, rank), which makes a
resumed stage reproduce the uninterrupted one on CPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deblend.atomic import atomic_output
from deblend.networks import Decoder, Encoder, Regressor
from deblend.normalization import NormalizationConstants
from simulation.dataset import StampData
from training.run_layout import RunError

CHECKPOINT_VERSION = 1
MODULE_CLASSES: dict[str, type[nn.Module]] = {
    "Encoder": Encoder, "Decoder": Decoder, "Regressor": Regressor}


@dataclass(frozen=True)
class DataIdentity:
    """What a model remembers of the data it was trained on."""

    path: str
    dataset_id: str
    survey: str
    bands: tuple[str, ...]
    stamp_pixels: int
    pixel_scale: float
    """arcsec per pixel"""
    normalization: NormalizationConstants

    @classmethod
    def of(cls, data: StampData) -> "DataIdentity":
        return cls(str(Path(data.root).resolve()), data.dataset_id, data.survey, data.bands,
                   data.stamp_pixels, data.pixel_scale, data.normalization)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "dataset_id": self.dataset_id, "survey": self.survey,
                "bands": list(self.bands), "stamp_pixels": self.stamp_pixels,
                "pixel_scale": self.pixel_scale, "normalization": self.normalization.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataIdentity":
        return cls(d["path"], d["dataset_id"], d["survey"], tuple(d["bands"]),
                   int(d["stamp_pixels"]), float(d["pixel_scale"]),
                   NormalizationConstants.from_dict(d["normalization"]))

    def check_compatible(self, other: "DataIdentity", what: str) -> None:
        """Refuse ``other`` unless bands, stamp size and normalisation equal this identity's.

        ``what`` names what this identity belongs to, e.g. "stage1 (R/stage1/best.pt)".
        """
        problems = []
        if self.bands != other.bands:
            problems.append(f"bands {' '.join(other.bands)} instead of {' '.join(self.bands)}")
        if self.stamp_pixels != other.stamp_pixels:
            problems.append(f"{other.stamp_pixels}-pixel stamps instead of {self.stamp_pixels}")
        if not problems and not self.normalization.matches(other.normalization):
            problems.append(f"normalisation constants {_fmt(other.normalization)} instead of "
                            f"{_fmt(self.normalization)}")
        if problems:
            raise RunError(f"the data at {other.path} has {'; '.join(problems)}: {what} was "
                           f"trained on {self.path}, use that dataset or one of the same kind")


def _fmt(constants: NormalizationConstants) -> str:
    values = ", ".join(f"{v:.4g}" for v in constants.max_values)
    return f"(beta {constants.beta:g}; {values})"


def module_entry(module: nn.Module) -> dict[str, Any]:
    """How a network is stored: class name, constructor arguments and weights."""
    name = type(module).__name__
    if name not in MODULE_CLASSES:
        raise TypeError(f"cannot checkpoint a {name}")
    return {"class": name, "hparams": module.hparams(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}


def build_module(entry: dict[str, Any]) -> nn.Module:
    """Rebuild a network from :func:`module_entry` (on the CPU, in eval mode)."""
    module = MODULE_CLASSES[entry["class"]](**entry["hparams"])
    module.load_state_dict(entry["state_dict"])
    return module.eval()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` so that ``path`` is always the previous file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        torch.save({"format_version": CHECKPOINT_VERSION, **payload}, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; clear :class:`RunError` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise RunError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != CHECKPOINT_VERSION:
        raise RunError(f"{path} is not a deblend checkpoint of format {CHECKPOINT_VERSION}")
    return payload


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (the identity a later stage records of its parent)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
