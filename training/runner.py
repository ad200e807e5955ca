"""Running one stage in a run directory: find inputs, refuse what does not fit, train, resume.

``run_stage`` is what ``python -m deblend.train`` and the main job call; :func:`stage_status` is
the one answer to "is this stage done?". A stage refuses to start when its checkpoint already
exists (unless ``resume`` or ``force``), when its parent's result is missing or unfinished, or
when the data differ in bands, stamp size or normalisation from what the parent (or the
checkpoint being resumed) was trained on. What each stage trains is declared in
:mod:`training.stages`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from deblend.core.atomic import write_json_atomic
from deblend.core.config import Config, config_from_dict
from deblend.core.device import resolve_device
from deblend.core.outputs import mark, refuse_foreign
from deblend.core.runs import (
    RUN_FILE,
    DataIdentity,
    RunError,
    RunLayout,
    RunRecord,
    load_checkpoint,
    load_lineage,
    stored_config,
)
from simulation.dataset import open_dataset
from training.data import first_non_finite
from training.distributed import context_from_environment, process_group
from training.loop import LoopState, StageLoop, count_trainable
from training.stages import STAGES, Stage

RESUMABLE_CHANGES = frozenset({"epochs", "stage1_epochs", "stage2_epochs", "stage3_epochs",
                               "flow_epochs", "amortize_epochs", "amortized_map",
                               "num_workers", "normalized_cache_gib", "device",
                               "early_stopping_patience"})
"""training.* keys that may differ between a checkpoint and the config that resumes it
(``amortized_map`` changes stage3's parent, which the parent record then checks)."""


@dataclass
class StageResult:
    """What a call of :func:`run_stage` did."""

    stage: str
    state: LoopState
    task: Stage
    epochs_trained: int
    """Epochs run by this call (0 when the stage was already complete)."""


def resume_config(saved: Config, given: Config) -> Config:
    """``given``, after checking it trains like ``saved`` (only RESUMABLE_CHANGES may differ)."""
    saved_dict, given_dict = saved.to_dict(), given.to_dict()
    for section in ("model", "training"):
        for key, value in saved_dict[section].items():
            if section == "training" and key in RESUMABLE_CHANGES:
                continue
            if given_dict[section][key] != value:
                raise RunError(f"cannot resume: config key '{section}.{key}' is "
                               f"{given_dict[section][key]!r} but the checkpoint was trained with "
                               f"{value!r}; use the same value, or --force to start again")
    return given


def _existing_checkpoint(layout: RunLayout, stage: str, resume: bool, force: bool
                         ) -> dict[str, Any] | None:
    """The checkpoint to resume (``resume``), or None after checking that starting is allowed.

    A stage resumes from ``last.pt``, or from ``best.pt`` when ``last.pt`` was never written
    (both hold the whole state of their epoch; every epoch reseeds from its number)."""
    last, best = layout.last(stage), layout.best(stage)
    if resume:
        if last.is_file():
            return load_checkpoint(last)
        if best.is_file():
            return load_checkpoint(best)
        raise RunError(f"nothing to resume: {layout.stage_dir(stage)} holds no checkpoint (run "
                       f"{stage} without --resume to start it)")
    if (last.exists() or best.exists()) and not force:
        raise RunError(f"{stage} already has results in {layout.stage_dir(stage)}: pass "
                       f"--resume to continue it or --force to train it again from scratch")
    return None


def _inputs(layout: RunLayout, stage: type[Stage], checkpoint: dict[str, Any] | None,
            config: Config | None, data_dir: str | Path | None) -> tuple[Config, Path]:
    """Config and dataset of this call: given ones, else the resumed checkpoint's, else run.json's
    (a first stage needs ``data_dir`` when the run is new)."""
    if checkpoint is not None:
        saved = stored_config(checkpoint["config"], layout.stage_dir(stage.name))
        config = saved if config is None else resume_config(saved, config)
        if data_dir is None:
            data_dir = layout.read_run().data_path(layout.root)
        return config, Path(data_dir)
    if stage.parent is None and data_dir is not None and config is not None:
        # a first stage given its config and data needs nothing of run.json (which it rewrites):
        # an unreadable or invalid one does not stop it
        refuse_foreign(layout.root, TRAINING_KIND, legacy=lambda root: (root / RUN_FILE).exists())
        return config, Path(data_dir)
    if stage.parent is not None or layout.run_file.is_file():
        run = layout.read_run()
        return (config or stored_config(run.config, layout.run_file),
                Path(data_dir or run.data_path(layout.root)))
    if data_dir is None:
        raise ValueError(f"{stage.name} needs --data: the dataset directory to train on")
    refuse_foreign(layout.root, TRAINING_KIND)
    return config or config_from_dict({}), Path(data_dir)


def _check_data(loop: StageLoop, name: str, data_dir: Path, layout: RunLayout) -> None:
    """Read the splits ``loop`` trains and validates on once, before a forced stage's results
    are cleared or run.json repointed: unreadable shards or non-finite values fail here
    (naming the file or the sample), with the old results still in place."""
    for loader in (loop.train_loader, loop.val_loader):
        bad = first_non_finite(loader.dataset, loader.sampler.indices)
        if bad is not None:
            raise RunError(f"{name} cannot train on {data_dir}: {bad} is not finite; "
                           f"{layout.stage_dir(name)} is left as it was (regenerate the dataset)")


def _replaces_results(layout: RunLayout, stage: type[Stage]) -> bool:
    """Whether :func:`_prepare` would remove results of ``stage`` or rewrite run.json."""
    files = (layout.last(stage.name), layout.best(stage.name), layout.history(stage.name),
             layout.plot(stage.name))
    return any(path.exists() for path in files) or (
        stage.parent is None and layout.run_file.exists())


def _prepare(layout: RunLayout, stage: type[Stage], config: Config, data: DataIdentity) -> None:
    """Clear a forced stage's old files; a first stage (re)writes run.json."""
    for path in (layout.last(stage.name), layout.best(stage.name), layout.history(stage.name),
                 layout.plot(stage.name)):
        path.unlink(missing_ok=True)
    layout.stage_dir(stage.name).mkdir(parents=True, exist_ok=True)
    if stage.parent is None:
        mark(layout.root, TRAINING_KIND)
        record = RunRecord(config.to_dict(), data,
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json_atomic(layout.run_file, record.to_dict(layout.root))


def stage_class(name: str) -> type[Stage]:
    """The declaration of stage ``name`` (:data:`training.stages.STAGES`)."""
    if name not in STAGES:
        raise RunError(f"unknown stage '{name}' (one of {', '.join(STAGES)})")
    return STAGES[name]


def build_stage(stage: type[Stage], config: Config, layout: RunLayout,
                data: DataIdentity) -> Stage:
    """``stage``'s networks, seeded from ``training.seed`` and, for a stage with a parent, loaded
    from the run's finished parent (and the stages it :attr:`~Stage.uses`) after checking that
    ``data`` and the config suit them."""
    torch.manual_seed(config.training.seed)
    parent_name = stage.parent_of(config)
    if parent_name is None:
        return stage.build(config, data, None, None, {})
    parent, sha = load_lineage(layout, parent_name, needed_by=stage.name)[parent_name]
    DataIdentity.from_dict(parent["data"]).check_compatible(
        data, f"{parent_name} ({layout.best(parent_name)})")
    latent_dim = parent["modules"]["encoder"]["hparams"]["latent_dim"]
    if latent_dim != config.model.latent_dim:
        raise RunError(f"config key 'model.latent_dim' is {config.model.latent_dim} but "
                       f"{parent_name} in {layout.root} was trained with {latent_dim}")
    used = {name: load_lineage(layout, name, needed_by=stage.name)[name] for name in stage.uses}
    task = stage.build(config, data, parent, {"stage": parent_name, "sha256": sha},
                       {name: payload for name, (payload, _) in used.items()})
    task.used_records = [{"stage": name, "sha256": digest} for name, (_, digest) in used.items()]
    return task


StageStatus = Literal["done", "interrupted", "todo"]
TRAINING_KIND = "training run"
"""The kind of output a training-run directory is (:mod:`deblend.core.outputs`)."""


def stage_status(run_dir: str | Path, name: str) -> StageStatus:
    """"done" (finished, on its parent's current result, and :meth:`Stage.finish` done),
    "interrupted" (``--resume`` continues it) or "todo" (to train, from scratch)."""
    stage, layout = stage_class(name), RunLayout(Path(run_dir))
    try:
        payload, _ = load_lineage(layout, name, needed_by="the main job")[name]
    except RunError:
        payload = None
    if payload is not None:
        return "done" if stage.is_complete(payload) else "interrupted"
    last, best = layout.last(name), layout.best(name)
    try:
        if last.is_file():
            return "todo" if load_checkpoint(last)["finished"] else "interrupted"
        return "interrupted" if best.is_file() and load_checkpoint(best) else "todo"
    except RunError:  # an unreadable resume point: the stage is trained again
        return "todo"


def run_stage(name: str, run_dir: str | Path, *, data_dir: str | Path | None = None,
              config: Config | None = None, resume: bool = False, force: bool = False,
              device: str | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> StageResult:
    """Train stage ``name`` of the run in ``run_dir`` (see the module docstring for what it
    refuses), then run its :meth:`Stage.finish`.

    ``config``/``data_dir`` default to the resumed checkpoint's, else to ``run.json``'s (stages
    with a parent); ``device`` overrides ``training.device``. Under torchrun it trains with DDP.
    """
    stage = stage_class(name)
    if resume and force:
        raise ValueError("--resume and --force exclude each other")
    layout = RunLayout(Path(run_dir))
    checkpoint = _existing_checkpoint(layout, name, resume, force)
    config, data_dir = _inputs(layout, stage, checkpoint, config, data_dir)
    if not stage.enabled(config):
        raise RunError(f"{name} is off in this config (training.amortized_map: false): pass a "
                       f"--config that turns it on")
    dataset = open_dataset(data_dir)
    identity = DataIdentity.of(dataset)
    if checkpoint is not None and checkpoint["data"]["dataset_id"] != identity.dataset_id:
        raise RunError(f"cannot resume {name} on {data_dir}: the checkpoint was trained on "
                       f"{checkpoint['data']['path']} (dataset_id "
                       f"{checkpoint['data']['dataset_id']}), not dataset_id {identity.dataset_id}")
    context = context_from_environment()
    torch_device = resolve_device(device or config.training.device,
                                  context.local_rank if context.is_distributed else None)

    with process_group(context, torch_device):
        task = build_stage(stage, config, layout, identity)
        if checkpoint is not None and checkpoint["parent"] != task.parent_record:
            raise RunError(f"cannot resume {name}: {checkpoint['parent']['stage']} was "
                           f"re-trained since it started; train {name} again with --force")
        if checkpoint is not None and checkpoint.get("uses", []) != task.used_records:
            raise RunError(f"cannot resume {name}: one of {', '.join(stage.uses)} was "
                           f"re-trained since it started; train {name} again with --force")
        task.prepare(layout, dataset, str(torch_device), context, progress, log)
        loop = StageLoop(task, config, dataset, layout, context, torch_device, progress, log)
        state = loop.restore(checkpoint) if checkpoint is not None else LoopState()
        first_epoch = state.epoch
        if state.stop_reason == "early_stopping" or state.epoch >= loop.epochs:
            loop.log(f"{name} in {layout.root} is already complete after {state.epoch} epochs "
                     f"({state.stop_reason}); nothing to do")
        else:
            if checkpoint is None and context.is_main:
                if _replaces_results(layout, stage):
                    _check_data(loop, name, data_dir, layout)
                _prepare(layout, stage, config, identity)
            context.barrier()
            processes = f" x {context.world_size} processes" if context.is_distributed else ""
            loop.log(f"{name}: {count_trainable(task.model):,} trainable parameters, "
                     f"{len(loop.train_sampler.indices)} training / "
                     f"{len(loop.val_loader.sampler.indices)} validation samples, batch "
                     f"{config.training.batch_size}, epochs {state.epoch + 1}-{loop.epochs} on "
                     f"{torch_device}{processes}")
            state = loop.run(state)
            loop.log(f"{name} done: best validation loss {state.best_val:.5g} at epoch "
                     f"{state.best_epoch}; results in {layout.stage_dir(name)}")
        if context.is_main:
            task.finish(layout, dataset, str(torch_device), loop.log)
        context.barrier()
    return StageResult(name, state, task, state.epoch - first_epoch)
