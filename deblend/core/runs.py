"""The run format: where a training run keeps its files, its one checkpoint format, its lineage.

A run directory ``R`` holds the stages of one model (``training.stages`` declares them)::

    R/run.json              written by the first stage: the config, the dataset (path relative
                            to R where it can be, dataset_id, survey, bands, stamp size, pixel
                            scale) and its normalisation constants
    R/<stage>/last.pt       checkpoint at the end of the latest finished epoch (the resume point)
    R/<stage>/best.pt       checkpoint of the epoch of lowest validation loss (used downstream)
    R/<stage>/history.csv   per-epoch losses, train_* and val_* columns
    R/<stage>/loss.png      plot of history.csv

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    format_version   CHECKPOINT_VERSION
    stage            the stage's name ("stage1", "stage2", "stage3", ...)
    epoch            number of finished epochs
    total_epochs     epochs the config asked for
    finished         True once the stage needs no more epochs
    stop_reason      None, "epochs" or "early_stopping"
    modules          {name: {"class": "Encoder"|"Decoder"|"Regressor"|"LatentFlow", "hparams": {...},
                             "state_dict": {...}}}  -- the weights this stage trained
    optimizer        Adam state_dict
    config           Config.to_dict() the stage ran with
    data             DataIdentity.to_dict()
    parent           None, or {"stage", "sha256"} of the parent stage's best.pt it was built on
    uses             [{"stage", "sha256"}] of the other stages' best.pt it read (the amortize
                     stage reads stage1's decoder and the flow)
    init             how the trained modules started ("random", or stage2's training.stage2_init)
    history          list of per-epoch rows (see training.history)
    best             {"epoch", "val_total"} of the best epoch so far
    epochs_without_improvement   for early stopping
    response         stage3's best.pt only, added after training: the regressor's response on
                     the calibration split (training.calibration, deblend.core.response)

The lineage of a stage is the chain of ``parent`` records from its ``best.pt`` back to a stage
without a parent; :func:`load_lineage` follows it and refuses a chain whose parent, or a stage
one of them ``uses``, was re-trained after it (the recorded SHA-256 no longer matches). No RNG
state is stored: every epoch reseeds from (training.seed, epoch, rank), so a resumed stage
reproduces the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deblend.core.atomic import write_bytes_atomic, write_json_atomic
from deblend.core.config import Config, ConfigError, config_from_dict, load_config
from deblend.core.flow import LatentFlow
from deblend.core.networks import Decoder, Encoder, Regressor
from deblend.core.normalization import NormalizationConstants

CHECKPOINT_VERSION = 1
RUN_FILE = "run.json"
MODULE_CLASSES: dict[str, type[nn.Module]] = {
    "Encoder": Encoder, "Decoder": Decoder, "Regressor": Regressor, "LatentFlow": LatentFlow}


class RunError(ValueError):
    """A run directory lacks a stage, or its stages do not fit together or with the data."""


# -- layout ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def last(self, stage: str) -> Path:
        return self.stage_dir(stage) / "last.pt"

    def best(self, stage: str) -> Path:
        return self.stage_dir(stage) / "best.pt"

    def history(self, stage: str) -> Path:
        return self.stage_dir(stage) / "history.csv"

    def plot(self, stage: str) -> Path:
        return self.stage_dir(stage) / "loss.png"

    def read_run(self) -> RunRecord:
        """``run.json`` (written by the first stage); an unreadable one is rebuilt from the
        first stage's checkpoint, which holds the same config and data identity."""
        if not self.run_file.is_file():
            raise RunError(f"{self.root} is not a training run: no {RUN_FILE} "
                           f"(run `python -m deblend.train stage1 --run {self.root} ...` first)")
        try:
            return RunRecord.from_dict(json.loads(self.run_file.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            record = self._record_from_first_stage()
            if record is None:
                raise RunError(f"{self.run_file} is unreadable ({exc}) and no finished first "
                               f"stage holds its content: train the first stage again with "
                               f"--force") from exc
            write_json_atomic(self.run_file, record.to_dict(self.root))
            return record

    def _record_from_first_stage(self) -> RunRecord | None:
        """The run record kept in the ``best.pt`` of the stage without a parent, if readable."""
        for best in sorted(self.root.glob("*/best.pt")):
            try:
                payload = load_checkpoint(best)
            except RunError:
                continue
            if payload.get("parent") is None:
                return RunRecord(payload["config"], DataIdentity.from_dict(payload["data"]),
                                 f"rebuilt from {best.relative_to(self.root)}")
        return None


# -- what a model remembers of its data ------------------------------------------------------------
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
    target_psf_fwhm: tuple[float, ...] | None = None
    """FWHM (arcsec) per band of the round Gaussian PSF the images were homogenised to
    (``simulation.target_psf_fwhm``); None: the survey's PSFs."""

    @classmethod
    def of(cls, data: Any) -> "DataIdentity":
        """The identity of an opened dataset (``simulation.dataset.StampData``, or anything with
        these fields and a ``root`` directory)."""
        return cls(str(Path(data.root).resolve()), data.dataset_id, data.survey, data.bands,
                   data.stamp_pixels, data.pixel_scale, data.normalization,
                   getattr(data, "target_psf_fwhm", None))

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``target_psf_fwhm`` only when set, so identities written before it keep
        their form."""
        extra = ({} if self.target_psf_fwhm is None
                 else {"target_psf_fwhm": list(self.target_psf_fwhm)})
        return {"path": self.path, "dataset_id": self.dataset_id, "survey": self.survey,
                "bands": list(self.bands), "stamp_pixels": self.stamp_pixels,
                "pixel_scale": self.pixel_scale, "normalization": self.normalization.to_dict(),
                **extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataIdentity":
        target = d.get("target_psf_fwhm")
        return cls(d["path"], d["dataset_id"], d["survey"], tuple(d["bands"]),
                   int(d["stamp_pixels"]), float(d["pixel_scale"]),
                   NormalizationConstants.from_dict(d["normalization"]),
                   None if target is None else tuple(float(v) for v in target))

    def check_compatible(self, other: "DataIdentity", what: str) -> None:
        """Refuse ``other`` unless bands, stamp size and normalisation equal this identity's.

        ``what`` names what this identity belongs to, e.g. "stage1 (R/stage1/best.pt)".
        """
        problems = []
        if self.bands != other.bands:
            problems.append(f"bands {' '.join(other.bands)} instead of {' '.join(self.bands)}")
        if self.stamp_pixels != other.stamp_pixels:
            problems.append(f"{other.stamp_pixels}-pixel stamps instead of {self.stamp_pixels}")
        if self.target_psf_fwhm != other.target_psf_fwhm:
            problems.append(f"images at target PSF {other.target_psf_fwhm} instead of "
                            f"{self.target_psf_fwhm} (simulation.target_psf_fwhm)")
        if not problems and not self.normalization.matches(other.normalization):
            problems.append(f"normalisation constants {_fmt(other.normalization)} instead of "
                            f"{_fmt(self.normalization)}")
        if problems:
            raise RunError(f"the data at {other.path} has {'; '.join(problems)}: {what} was "
                           f"trained on {self.path}, use that dataset or one of the same kind")


def _fmt(constants: NormalizationConstants) -> str:
    values = ", ".join(f"{v:.4g}" for v in constants.max_values)
    scaled = "; per-stamp flux scales" if constants.stamp_scale else ""
    return f"(beta {constants.beta:g}; {values}{scaled})"


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: the config a run was started with and its dataset.

    The dataset path is stored relative to the run directory when the dataset lies beside or
    under it (so a run directory can be moved together with its data), absolute otherwise.
    """

    config: dict[str, Any]
    data: DataIdentity
    created: str

    def data_path(self, run_root: Path) -> Path:
        """The dataset directory, resolved against ``run_root`` when stored relative."""
        return Path(run_root) / self.data.path

    def to_dict(self, run_root: Path) -> dict[str, Any]:
        data = self.data.to_dict()
        data["path"] = _relative_if_possible(Path(self.data.path), Path(run_root))
        return {"format_version": 1, "created": self.created, "config": self.config,
                "data": data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        return cls(d["config"], DataIdentity.from_dict(d["data"]), d.get("created", ""))


def _relative_if_possible(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (with ``..``) when they share a parent directory."""
    try:
        return os.path.relpath(path.resolve(), Path(root).resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


# -- networks in a checkpoint ----------------------------------------------------------------------
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


# -- checkpoint files ------------------------------------------------------------------------------
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` so that ``path`` is always the previous file or the whole new one.

    It is serialised in memory first: torch's own writer turns a full disk into an internal
    RuntimeError, a plain write into the OSError (ENOSPC) that names the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_VERSION, **payload}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


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


# -- lineage ---------------------------------------------------------------------------------------
def load_finished(layout: RunLayout, stage: str, needed_by: str) -> tuple[dict[str, Any], str]:
    """``best.pt`` of a finished ``stage`` and its SHA-256; a clear error when there is none."""
    best, last = layout.best(stage), layout.last(stage)
    if not best.is_file():
        raise RunError(f"{needed_by} needs the {stage} result, but {best} does not exist: run "
                       f"`python -m deblend.train {stage} --run {layout.root} ...` first")
    finish = f"finish it with `python -m deblend.train {stage} --run {layout.root} --resume`"
    if not last.is_file():  # e.g. the disk filled up between best.pt and last.pt
        raise RunError(f"{needed_by} needs a finished {stage}, but {stage} in {layout.root} has "
                       f"no {last.name}, so whether it finished is unknown: {finish}")
    state = load_checkpoint(last)
    if not state["finished"]:
        raise RunError(f"{needed_by} needs a finished {stage}, but {stage} in {layout.root} "
                       f"stopped after epoch {state['epoch']} of {state['total_epochs']}: "
                       f"{finish}")
    return load_checkpoint(best), file_sha256(best)


def load_lineage(layout: RunLayout, stage: str, needed_by: str
                 ) -> dict[str, tuple[dict[str, Any], str]]:
    """(``best.pt`` payload, SHA-256) of ``stage`` and of every ancestor, ``stage`` first.

    Each stage must be finished, and each recorded parent (and ``uses``) SHA-256 must be that of
    the ``best.pt`` now in the run (else that stage was re-trained after its child).
    """
    lineage: dict[str, tuple[dict[str, Any], str]] = {}
    child: str | None = None
    while stage is not None:
        if stage in lineage:
            raise RunError(f"the stages of {layout.root} name each other as parents")
        payload, sha = load_finished(layout, stage, needed_by)
        if child is not None:
            recorded = lineage[child][0]["parent"]["sha256"]
            if recorded != sha:
                raise RunError(f"{child} in {layout.root} was trained on another {stage} result "
                               f"than the one now in {layout.best(stage)} ({stage} was "
                               f"re-trained since): train {child} again with --force")
        for record in payload.get("uses") or []:
            used = layout.best(record["stage"])
            if not used.is_file() or file_sha256(used) != record["sha256"]:
                raise RunError(f"{stage} in {layout.root} was trained with another "
                               f"{record['stage']} result than the one now in {used} "
                               f"({record['stage']} was re-trained or removed since): train "
                               f"{stage} again with --force")
        lineage[stage] = (payload, sha)
        child, stage = stage, (payload.get("parent") or {}).get("stage")
    return lineage


def lineage_identity(layout: RunLayout, stage: str) -> str:
    """A short id of ``stage``'s ``best.pt`` and its ancestors' (what a result cache remembers)."""
    digests = [sha for _, sha in load_lineage(layout, stage, needed_by="a cache key").values()]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:20]


def stored_config(data: Any, where: Path) -> Config:
    """The config a run stored in ``where`` (run.json, a checkpoint), validated; a RunError
    naming the file when it is not a valid config (e.g. of another version of deblend)."""
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise RunError(f"{where} holds an invalid config ({exc}): pass a --config, or train "
                       f"the first stage again with --force") from None


def run_config(run_root: str | Path, config_path: str | Path | None = None) -> Config:
    """The config at ``config_path`` when given, else the one the run was started with."""
    if config_path is not None:
        return load_config(config_path)
    layout = RunLayout(Path(run_root))
    return stored_config(layout.read_run().config, layout.run_file)
