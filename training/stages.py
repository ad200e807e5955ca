"""The training stages (SPEC 5), each declared whole in one class.

A stage says what it reads (``input_set`` in, ``target`` out, from the train/validation splits),
which stage it builds on (``parent``), what it trains and what it freezes (:meth:`Stage.build`),
its loss (:meth:`Stage.losses`), its epochs (``training.<name>_epochs``, else
``training.epochs``), its augmentation (the stamp's 8 symmetric views, targets following) and
what it does once trained (:meth:`Stage.finish`). Adding a stage is adding one class to
:data:`STAGES`; the loop (:mod:`training.loop`), the runner (:mod:`training.runner`) and the run
format (:mod:`deblend.core.runs`) are the same for all.

* stage1: the VAE (encoder + decoder); noisy isolated -> clean isolated; beta-VAE loss.
* stage2: a new encoder (from the stage1 encoder, or from scratch with
  ``training.stage2_init: scratch``) under the stage1 decoder, frozen; noisy blend -> clean
  isolated; beta-VAE loss.
* stage3: the regressor on mu of the stage2 encoder, frozen; noisy blend -> label (e1, e2); MSE;
  then its response on the calibration split (:mod:`training.calibration`).
* flow: the latent prior of the MAP deblender (:mod:`deblend.core.flow`), a normalising flow on
  the stage1 encoder's latent means of the noisy isolated galaxies, frozen encoder; negative
  log-likelihood per latent dimension (nats), logged next to that of the N(0, I) prior the VAE
  was trained with.

Frozen modules have ``requires_grad=False`` and stay in eval mode, so they never change.
Images are normalised (SPEC 3); reconstruction losses are therefore in normalised units.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from deblend.core.config import Config, TrainingConfig
from deblend.core.flow import LatentFlow, standard_normal_log_prob
from deblend.core.losses import beta_vae_loss, regression_loss
from deblend.core.networks import VAE, Decoder, Encoder, Regressor
from deblend.core.runs import DataIdentity, RunLayout, build_module
from deblend.core.symmetry import random_views
from simulation.dataset import StampData
from training.calibration import calibrate_regressor

VAE_TERMS = ("total", "reconstruction", "kl")


class Stage(ABC):
    """One training stage: its data, its networks, its loss, its epochs and its last step.

    An instance holds the networks of one run of the stage: :attr:`model` (trained) and
    :attr:`frozen`; :meth:`build` makes it from the config and the parent's ``best.pt``.
    """

    name: ClassVar[str]
    parent: ClassVar[str | None]
    """The stage whose ``best.pt`` this one builds on (None: the first stage)."""
    input_set: ClassVar[str]
    """Image set fed to the networks: "noisy" (isolated) or "blend" (simulation.dataset)."""
    target: ClassVar[str]
    """What the loss compares with: "clean" images or the "ellipticity" labels (e1, e2)."""
    loss_names: ClassVar[tuple[str, ...]]
    """Names of the terms :meth:`losses` returns, the total first."""

    def __init__(self, model: nn.Module, frozen: dict[str, nn.Module],
                 parent_record: dict[str, Any] | None, init: str) -> None:
        self.model = model
        self.frozen = frozen
        self.parent_record = parent_record
        """{"stage", "sha256"} of the parent best.pt, None for a first stage."""
        self.init = init
        for module in frozen.values():
            module.requires_grad_(False).eval()

    @classmethod
    @abstractmethod
    def build(cls, config: Config, data: DataIdentity, parent: dict[str, Any] | None,
              parent_record: dict[str, Any] | None) -> "Stage":
        """The stage's networks: new ones seeded by the caller, or the parent's (``parent`` is
        its ``best.pt`` payload, already checked to suit ``data``)."""

    @abstractmethod
    def saved_modules(self) -> dict[str, nn.Module]:
        """The trained networks, by checkpoint name."""

    @abstractmethod
    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Loss terms (0-dim) of a batch; ``model`` is :attr:`model` or its DDP wrapper."""

    @classmethod
    def epochs(cls, training: TrainingConfig) -> int:
        """``training.<name>_epochs`` when set, else ``training.epochs``."""
        specific = getattr(training, f"{cls.name}_epochs", None)
        return training.epochs if specific is None else specific

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample in a random one of the stamp's 8 views; image targets and (e1, e2) labels
        follow exactly (:func:`deblend.core.symmetry.random_views`)."""
        return random_views(x, y, targets_are_images=self.target == "clean")

    def finish(self, layout: RunLayout, dataset: StampData, device: str,
               log: Callable[[str], None]) -> None:
        """What the stage does once its epochs are done (nothing by default); it must be
        idempotent, as an interrupted run repeats it."""

    @classmethod
    def is_complete(cls, best: dict[str, Any]) -> bool:
        """Whether a finished stage's ``best.pt`` payload holds everything :meth:`finish` adds."""
        return True

    def to(self, device: torch.device) -> "Stage":
        self.model.to(device)
        for module in self.frozen.values():
            module.to(device)
        return self


class VAEStage(Stage):
    name, parent, input_set, target, loss_names = "stage1", None, "noisy", "clean", VAE_TERMS

    def __init__(self, vae: VAE, beta_kl: float) -> None:
        super().__init__(vae, {}, None, "random")
        self.beta_kl = beta_kl

    @classmethod
    def build(cls, config, data, parent, parent_record) -> "VAEStage":
        return cls(VAE(len(data.bands), data.stamp_pixels, config.model.latent_dim,
                       config.model.decoder_output),
                   config.training.beta_kl)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.model.encoder, "decoder": self.model.decoder}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        out = model(x)
        return tuple(beta_vae_loss(y, out.x_hat, out.mu, out.logvar, self.beta_kl))


class DeblendStage(Stage):
    name, parent, input_set, target, loss_names = "stage2", "stage1", "blend", "clean", VAE_TERMS

    def __init__(self, encoder: Encoder, decoder: Decoder, beta_kl: float,
                 parent_record: dict[str, Any], init: str) -> None:
        super().__init__(encoder, {"decoder": decoder}, parent_record, init)
        self.beta_kl = beta_kl

    @classmethod
    def build(cls, config, data, parent, parent_record) -> "DeblendStage":
        decoder = build_module(parent["modules"]["decoder"])
        encoder_entry = parent["modules"]["encoder"]
        if config.training.stage2_init == "stage1":
            encoder = build_module(encoder_entry)
        else:
            encoder = Encoder(**encoder_entry["hparams"])
        return cls(encoder, decoder, config.training.beta_kl, parent_record,
                   config.training.stage2_init)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        mu, logvar = model(x)
        z = self.model.sample(mu, logvar)
        x_hat = self.frozen["decoder"](z)
        return tuple(beta_vae_loss(y, x_hat, mu, logvar, self.beta_kl))


class RegressionStage(Stage):
    name, parent, input_set, target, loss_names = ("stage3", "stage2", "blend", "ellipticity",
                                                   ("total",))

    def __init__(self, regressor: Regressor, encoder: Encoder,
                 parent_record: dict[str, Any]) -> None:
        super().__init__(regressor, {"encoder": encoder}, parent_record, "random")

    @classmethod
    def build(cls, config, data, parent, parent_record) -> "RegressionStage":
        encoder_entry = parent["modules"]["encoder"]
        model = config.model
        regressor = Regressor(encoder_entry["hparams"]["latent_dim"], model.regressor_hidden,
                              model.regressor_dropout)
        return cls(regressor, build_module(encoder_entry), parent_record)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"regressor": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            mu, _ = self.frozen["encoder"](x)
        return (regression_loss(model(mu), y),)

    def finish(self, layout: RunLayout, dataset: StampData, device: str,
               log: Callable[[str], None]) -> None:
        """Measure the regressor's response on the calibration split (once)."""
        calibrate_regressor(layout, dataset, device, log)

    @classmethod
    def is_complete(cls, best: dict[str, Any]) -> bool:
        return "response" in best


class FlowStage(Stage):
    """The latent prior: p_flow fitted to mu of the stage1 encoder on noisy isolated galaxies.

    Its target set is unused (the labels, the cheapest to read). Loss terms per latent dimension
    (nats): ``total`` = -log p_flow(mu) / D, trained; ``normal`` = -log N(mu; 0, I) / D, only
    logged, so the validation curve shows the flow's held-out gain over the VAE's prior."""

    name, parent, input_set, target, loss_names = ("flow", "stage1", "noisy", "ellipticity",
                                                   ("total", "normal"))

    def __init__(self, flow: LatentFlow, encoder: Encoder,
                 parent_record: dict[str, Any]) -> None:
        super().__init__(flow, {"encoder": encoder}, parent_record, "random")

    @classmethod
    def build(cls, config, data, parent, parent_record) -> "FlowStage":
        encoder_entry = parent["modules"]["encoder"]
        model = config.model
        flow = LatentFlow(encoder_entry["hparams"]["latent_dim"], model.flow_layers,
                          model.flow_hidden, model.flow_transform, config.training.seed)
        return cls(flow, build_module(encoder_entry), parent_record)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"flow": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            mu, _ = self.frozen["encoder"](x)
            mu = mu.float()
        dim = mu.shape[1]
        return (-model(mu).mean() / dim, -standard_normal_log_prob(mu).mean() / dim)


STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (VAEStage, DeblendStage,
                                                            RegressionStage, FlowStage)}
"""Every stage, by name, in training order (each after its parent)."""
