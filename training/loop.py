"""The epoch loop shared by every stage: train, validate, keep the best, checkpoint.

Reproducibility: the networks are seeded from ``training.seed``; epoch ``k`` reseeds torch from
(seed, k, rank) (reparameterisation noise, dropout, the random views of
``training.dihedral_augmentation``) and the sampler draws its batch order from
(seed, k). A checkpoint written at the end of epoch ``k`` therefore holds everything the
following epochs depend on, and on CPU a resumed stage ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deblend.core.config import Config
from deblend.core.device import autocast, uses_mixed_precision
from deblend.core.runs import (
    DataIdentity,
    RunError,
    RunLayout,
    module_entry,
    save_checkpoint,
)
from simulation.dataset import StampData
from training.data import BlockBatchSampler, first_non_finite, kept_bytes, make_loader
from training.distributed import DistContext
from training.history import plot_history, write_history
from training.stages import Stage, drop_bands

POSTFIX_EVERY = 10
"""Batches between updates of the progress bar's running loss (each one syncs the device)."""


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch seed of one epoch of one process."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf
    epochs_without_improvement: int = 0
    stop_reason: str | None = None

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> "LoopState":
        return cls(payload["epoch"], list(payload["history"]), payload["best"]["epoch"],
                   payload["best"]["val_total"], payload["epochs_without_improvement"],
                   payload["stop_reason"])


class StageLoop:
    """Trains one :class:`training.stages.Stage` on a dataset for its epochs."""

    def __init__(self, task: Stage, config: Config, dataset: StampData, layout: RunLayout,
                 context: DistContext, device: torch.device, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.task, self.config, self.layout = task, config, layout
        self.data = DataIdentity.of(dataset)
        self.context, self.device = context, device
        self.progress = progress and context.is_main
        self.log = log if context.is_main else (lambda message: None)
        training = config.training
        self.epochs = task.epochs(training)
        self.max_grad_norm = task.max_grad_norm(training)
        self.amp = uses_mixed_precision(device, training.mixed_precision)

        common = dict(input_set=task.input_set, target=task.target,
                      batch_size=training.batch_size, seed=training.seed,
                      min_target_e=training.min_target_e,
                      fraction=task.sample_fraction(training), num_workers=training.num_workers,
                      pin_memory=device.type == "cuda", rank=context.rank,
                      world_size=context.world_size, latent_targets=task.latent_targets,
                      fill_unavailable=task.drops_bands)
        budget = int(training.normalized_cache_gib * 2 ** 30)
        self.train_loader = make_loader(dataset.root, split="train", cache_bytes=budget, **common)
        kept = kept_bytes(self.train_loader)
        self.val_loader = make_loader(dataset.root, split="validation",
                                      cache_bytes=budget - kept, **common)
        self.train_sampler: BlockBatchSampler = self.train_loader.sampler

        task.to(device)
        self.wrapped = context.wrap(task.model, device)
        self.trained = [p for p in task.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.trained, lr=task.learning_rate(training))

    # -- resume ---------------------------------------------------------------------------------
    def restore(self, payload: dict[str, Any]) -> LoopState:
        """Load weights and optimiser state from a checkpoint of this stage."""
        for name, module in self.task.saved_modules().items():
            module.load_state_dict(payload["modules"][name]["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        return LoopState.from_checkpoint(payload)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, state: LoopState) -> LoopState:
        """Train from ``state`` until the epochs are done or early stopping fires."""
        patience = self.config.training.early_stopping_patience
        while state.epoch < self.epochs and state.stop_reason != "early_stopping":
            started = time.perf_counter()
            epoch = state.epoch
            torch.manual_seed(epoch_seed(self.config.training.seed, epoch, self.context.rank))
            self.train_sampler.set_epoch(epoch)
            train, grad_norms = self.train_epoch(epoch)
            val = self.validate()
            self._check_finite(val[0], epoch, "validation")
            state.epoch = epoch + 1
            row: dict[str, Any] = {"epoch": state.epoch}
            row.update({f"train_{k}": v for k, v in zip(self.task.loss_names, train)})
            row.update({f"val_{k}": v for k, v in zip(self.task.loss_names, val)})
            row.update(grad_norms)
            row["seconds"] = round(time.perf_counter() - started, 3)
            state.history.append(row)
            improved = val[0] < state.best_val
            if improved:
                state.best_val, state.best_epoch = val[0], state.epoch
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            if patience is not None and state.epochs_without_improvement >= patience:
                state.stop_reason = "early_stopping"
            else:
                state.stop_reason = "epochs" if state.epoch >= self.epochs else None
            self._report(row, improved, state)
            if self.context.is_main:
                self._write(state, improved)
            self.context.barrier()
        return state

    def train_epoch(self, epoch: int) -> tuple[list[float], dict[str, float]]:
        """One pass over this process's training batches: mean loss terms over all processes,
        and the median and largest gradient norm before clipping (history columns)."""
        self.wrapped.train()
        bar = tqdm(total=self.train_sampler.num_samples(), unit="sample", leave=False,
                   disable=not self.progress,
                   desc=f"{self.task.name} epoch {epoch + 1}/{self.epochs}")
        sums = torch.zeros(len(self.task.loss_names) + 1, dtype=torch.float64, device=self.device)
        norms: list[torch.Tensor] = []
        with bar:
            for step, (x, y) in enumerate(self.train_loader, start=1):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.config.training.dihedral_augmentation:
                    x, y = self.task.augment(x, y)
                if self.task.drops_bands:
                    drop_bands(x, self.config.training.band_dropout)
                with autocast(self.device, self.amp):
                    terms = self.task.losses(self.wrapped, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                terms[0].backward()
                norms.append(self.clip_gradient())
                self.optimizer.step()
                n = x.shape[0]
                sums[:-1] += torch.stack([t.detach().double() for t in terms]) * n
                sums[-1] += n
                bar.update(n)
                if step % POSTFIX_EVERY == 0:
                    running = (sums[0] / sums[-1]).item()
                    self._check_finite(running, epoch, "train")
                    bar.set_postfix(loss=f"{running:.5g}")
        means = self._means(sums)
        self._check_finite(means[0], epoch, "train")
        norm = torch.stack(norms).float() if norms else torch.full((1,), math.nan)
        return means, {"grad_norm_median": norm.median().item(), "grad_norm_max": norm.max().item()}

    def clip_gradient(self) -> torch.Tensor:
        """The batch gradient's L2 norm over all trained parameters (0-dim, on the device),
        before it is clipped to ``max_grad_norm`` when the config asks; under DDP the
        gradient is already the processes' mean, so every process sees the same norm."""
        grads = [p.grad for p in self.trained if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.trained, self.max_grad_norm, norm)
        return norm.detach()

    @torch.no_grad()
    def validate(self) -> list[float]:
        """Mean loss terms on the validation split, eval mode (z = mu, no dropout)."""
        self.wrapped.eval()
        sums = torch.zeros(len(self.task.loss_names) + 1, dtype=torch.float64, device=self.device)
        for x, y in self.val_loader:
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.amp):
                terms = self.task.losses(self.task.model, x, y)
            sums[:-1] += torch.stack([t.double() for t in terms]) * x.shape[0]
            sums[-1] += x.shape[0]
        return self._means(sums)

    def _means(self, sums: torch.Tensor) -> list[float]:
        """Per-sample means over all processes of summed terms (last entry: the count)."""
        self.context.all_reduce_sum(sums)
        return (sums[:-1] / sums[-1].clamp(min=1)).tolist()

    def _check_finite(self, value: float, epoch: int, split: str) -> None:
        """A non-finite loss stops the stage: blamed on the data when the split holds
        non-finite values (named with the first sample), on the optimisation otherwise."""
        if math.isfinite(value):
            return
        loader = self.train_loader if split == "train" else self.val_loader
        bad = first_non_finite(loader.dataset, loader.sampler.indices)
        if bad is not None:
            raise RunError(f"{self.task.name}: the {split} loss is {value} in epoch {epoch + 1} "
                           f"because the data are not finite: {bad} in {loader.dataset.root}; "
                           f"regenerate the dataset")
        bound = self.task.grad_norm_key(self.config.training)
        raise RunError(f"{self.task.name}: the {split} loss became {value} in epoch {epoch + 1} "
                       f"on finite data; bound the gradient (training.{bound}, e.g. 10) or "
                       f"lower training.learning_rate, and train the stage again with --force")

    # -- output ---------------------------------------------------------------------------------
    def _report(self, row: dict[str, Any], improved: bool, state: LoopState) -> None:
        terms = ", ".join(f"{k} {row[f'train_{k}']:.5g}/{row[f'val_{k}']:.5g}"
                          for k in self.task.loss_names)
        note = " (best)" if improved else ""
        if state.stop_reason == "early_stopping":
            note += f"; no improvement for {state.epochs_without_improvement} epochs: stopping"
        message = (f"{self.task.name} epoch {row['epoch']}/{self.epochs} train/val: {terms} "
                   f"[{row['seconds']:.1f} s]{note}")
        if self.progress:
            tqdm.write(message)
        else:
            self.log(message)

    def payload(self, state: LoopState) -> dict[str, Any]:
        """Checkpoint contents (format: :mod:`deblend.core.runs`) after ``state.epoch``."""
        return {
            "stage": self.task.name,
            "epoch": state.epoch,
            "total_epochs": self.epochs,
            "finished": state.stop_reason is not None,
            "stop_reason": state.stop_reason,
            "modules": {name: module_entry(m) for name, m in self.task.saved_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "data": self.data.to_dict(),
            "parent": self.task.parent_record,
            "uses": self.task.used_records,
            "init": self.task.init,
            "history": state.history,
            "best": {"epoch": state.best_epoch, "val_total": state.best_val},
            "epochs_without_improvement": state.epochs_without_improvement,
        }

    def _write(self, state: LoopState, improved: bool) -> None:
        stage, layout = self.task.name, self.layout
        payload = self.payload(state)
        if improved:
            save_checkpoint(layout.best(stage), payload)
        save_checkpoint(layout.last(stage), payload)
        write_history(layout.history(stage), state.history, self.task.loss_names)
        plot_history(layout.plot(stage), state.history, self.task.loss_names,
                     f"{stage} ({self.data.survey}, {self.config.name})")


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (for the start-of-stage summary)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
