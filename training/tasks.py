"""What each of the three training stages (SPEC 5) trains, freezes and minimises.

* stage1: the VAE (encoder + decoder); noisy isolated -> clean isolated; beta-VAE loss.
* stage2: a new encoder (from the stage1 encoder, or from scratch with
  ``training.stage2_init: scratch``) under the stage1 decoder, frozen; noisy blend -> clean
  isolated; beta-VAE loss.
* stage3: the regressor on mu of the stage2 encoder, frozen; noisy blend -> label (e1, e2); MSE.

Frozen modules have ``requires_grad=False`` and stay in eval mode, so they never change.
Images are normalised (SPEC 3); reconstruction losses are therefore in normalised units.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from deblend.config import Config
from deblend.losses import beta_vae_loss, regression_loss
from deblend.networks import VAE, Decoder, Encoder, NetworkShape, Regressor
from training.checkpoints import DataIdentity, build_module
from training.lineage import load_lineage
from training.run_layout import PREVIOUS_STAGE, RunError, RunLayout

VAE_TERMS = ("total", "reconstruction", "kl")


class StageTask(ABC):
    """One stage: the module it trains, the modules it freezes, its data and its loss."""

    stage: str
    """Also names the data the stage reads (training.data.STAGE_DATA)."""
    loss_names: tuple[str, ...]
    """Names of the terms :meth:`losses` returns, the total first."""

    def __init__(self, model: nn.Module, frozen: dict[str, nn.Module],
                 parent: dict[str, Any] | None, init: str) -> None:
        self.model = model
        self.frozen = frozen
        self.parent = parent
        """{"stage", "sha256"} of the parent best.pt, None for stage1."""
        self.init = init
        for module in frozen.values():
            module.requires_grad_(False).eval()

    @abstractmethod
    def saved_modules(self) -> dict[str, nn.Module]:
        """The trained networks, by checkpoint name."""

    @abstractmethod
    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Loss terms (0-dim) of a batch; ``model`` is :attr:`model` or its DDP wrapper."""

    def to(self, device: torch.device) -> "StageTask":
        self.model.to(device)
        for module in self.frozen.values():
            module.to(device)
        return self


class VAEStage(StageTask):
    stage, loss_names = "stage1", VAE_TERMS

    def __init__(self, vae: VAE, beta_kl: float) -> None:
        super().__init__(vae, {}, None, "random")
        self.beta_kl = beta_kl

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.model.encoder, "decoder": self.model.decoder}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        out = model(x)
        return tuple(beta_vae_loss(y, out.x_hat, out.mu, out.logvar, self.beta_kl))


class DeblendStage(StageTask):
    stage, loss_names = "stage2", VAE_TERMS

    def __init__(self, encoder: Encoder, decoder: Decoder, beta_kl: float,
                 parent: dict[str, Any], init: str) -> None:
        super().__init__(encoder, {"decoder": decoder}, parent, init)
        self.beta_kl = beta_kl

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        mu, logvar = model(x)
        z = self.model.sample(mu, logvar)
        x_hat = self.frozen["decoder"](z)
        return tuple(beta_vae_loss(y, x_hat, mu, logvar, self.beta_kl))


class RegressionStage(StageTask):
    stage, loss_names = "stage3", ("total",)

    def __init__(self, regressor: Regressor, encoder: Encoder, parent: dict[str, Any]) -> None:
        super().__init__(regressor, {"encoder": encoder}, parent, "random")

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"regressor": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            mu, _ = self.frozen["encoder"](x)
        return (regression_loss(model(mu), y),)


def build_task(stage: str, config: Config, layout: RunLayout, data: DataIdentity) -> StageTask:
    """The task of ``stage``, its networks seeded from ``training.seed`` and, for stage2/3,
    loaded from the run's previous stage after checking that ``data`` suits them."""
    training, model = config.training, config.model
    torch.manual_seed(training.seed)
    if stage == "stage1":
        shape = NetworkShape(len(data.bands), data.stamp_pixels, model.latent_dim)
        return VAEStage(shape.build_vae(), training.beta_kl)

    parent_stage = PREVIOUS_STAGE[stage]
    parent, sha = load_lineage(layout, parent_stage, needed_by=stage)[parent_stage]
    DataIdentity.from_dict(parent["data"]).check_compatible(
        data, f"{parent_stage} ({layout.best(parent_stage)})")
    encoder_entry = parent["modules"]["encoder"]
    latent_dim = encoder_entry["hparams"]["latent_dim"]
    if latent_dim != model.latent_dim:
        raise RunError(f"config key 'model.latent_dim' is {model.latent_dim} but {parent_stage} "
                       f"in {layout.root} was trained with {latent_dim}")
    record = {"stage": parent_stage, "sha256": sha}
    if stage == "stage2":
        decoder = build_module(parent["modules"]["decoder"])
        if training.stage2_init == "stage1":
            encoder = build_module(encoder_entry)
        else:
            encoder = Encoder(**encoder_entry["hparams"])
        return DeblendStage(encoder, decoder, training.beta_kl, record, training.stage2_init)
    regressor = Regressor(latent_dim, model.regressor_hidden, model.regressor_dropout)
    return RegressionStage(regressor, build_module(encoder_entry), record)
