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
* stage3: the regressor on mu of the stage2 encoder (of the amortize encoder with
  ``training.amortized_map``), frozen, and on the stamp's weighted moments with
  ``model.regressor_moments``; noisy blend -> label (e1, e2); MSE; then its response on
  the calibration split (:mod:`training.calibration`).
* flow: the latent prior of the MAP deblender (:mod:`deblend.core.flow`), a normalising flow on
  the stage1 encoder's latent means of the noisy isolated galaxies, frozen encoder; negative
  log-likelihood per latent dimension (nats), logged next to that of the N(0, I) prior the VAE
  was trained with.
* amortize (only with ``training.amortized_map``): a new encoder, from the stage2 encoder, that
  outputs the flow-MAP latent of the blend's target (:mod:`training.map_targets`, fitted once
  before the first epoch with the stage2 encoder, the stage1 decoder and the flow); noisy blend
  -> MAP latent; squared latent distance, logged next to the stage2 encoder's.

Frozen modules have ``requires_grad=False`` and stay in eval mode, so they never change.
Images are normalised (SPEC 3); reconstruction losses are therefore in normalised units.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from deblend.core.config import Config, TrainingConfig
from deblend.core.flow import LatentFlow, standard_normal_log_prob
from deblend.core.inference import Deblender
from deblend.core.losses import beta_vae_loss, regression_loss
from deblend.core.networks import VAE, Decoder, Encoder, Regressor
from deblend.core.runs import DataIdentity, RunLayout, build_module, lineage_identity
from deblend.core.symmetry import random_views
from simulation.dataset import StampData
from training.calibration import calibrate_regressor
from training.data import select_indices
from training.distributed import DistContext
from training.map_targets import LatentTargets, fit_map_targets

VAE_TERMS = ("total", "reconstruction", "kl")


class Stage(ABC):
    """One training stage: its data, its networks, its loss, its epochs and its last step.

    An instance holds the networks of one run of the stage: :attr:`model` (trained) and
    :attr:`frozen`; :meth:`build` makes it from the config and the parent's ``best.pt``.
    """

    name: ClassVar[str]
    parent: ClassVar[str | None]
    """The stage whose ``best.pt`` this one builds on (None: the first stage); see
    :meth:`parent_of`."""
    uses: ClassVar[tuple[str, ...]] = ()
    """Other finished stages whose ``best.pt`` this one reads: recorded by SHA-256 in its
    checkpoint (``uses``), so that re-training one of them makes this stage out of date."""
    input_set: ClassVar[str]
    """Image set fed to the networks: "noisy" (isolated) or "blend" (simulation.dataset)."""
    target: ClassVar[str]
    """What the loss compares with: "clean" images or the "ellipticity" labels (e1, e2)."""
    loss_names: ClassVar[tuple[str, ...]]
    """Names of the terms :meth:`losses` returns, the total first."""
    drops_bands: ClassVar[bool] = True
    """Whether ``training.band_dropout`` applies to its inputs (:func:`drop_bands`), and the
    bands a dataset drawn under ``simulation.conditions`` marks unavailable are filled as
    inference fills them (0)."""

    def __init__(self, model: nn.Module, frozen: dict[str, nn.Module],
                 parent_record: dict[str, Any] | None, init: str) -> None:
        self.model = model
        self.frozen = frozen
        self.parent_record = parent_record
        """{"stage", "sha256"} of the parent best.pt, None for a first stage."""
        self.init = init
        self.used_records: list[dict[str, str]] = []
        """{"stage", "sha256"} of each stage of :attr:`uses` (set by the runner's build)."""
        self.latent_targets: LatentTargets | None = None
        """The targets of ``target="map_latent"`` (set by :meth:`prepare`)."""
        for module in frozen.values():
            module.requires_grad_(False).eval()

    @classmethod
    @abstractmethod
    def build(cls, config: Config, data: DataIdentity, parent: dict[str, Any] | None,
              parent_record: dict[str, Any] | None, used: dict[str, dict[str, Any]]
              ) -> "Stage":
        """The stage's networks: new ones seeded by the caller, or the parent's (``parent`` is
        its ``best.pt`` payload, already checked to suit ``data``; ``used`` the payloads of
        :attr:`uses`)."""

    @classmethod
    def parent_of(cls, config: Config) -> str | None:
        """The parent stage under ``config`` (:attr:`parent` unless the config chooses)."""
        return cls.parent

    @classmethod
    def enabled(cls, config: Config) -> bool:
        """Whether ``config`` trains this stage."""
        return True

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

    @classmethod
    def grad_norm_key(cls, training: TrainingConfig) -> str:
        """The ``training`` key that bounds this stage's gradient: ``<name>_max_grad_norm``
        when the config has one, else ``max_grad_norm``."""
        specific = f"{cls.name}_max_grad_norm"
        return specific if hasattr(training, specific) else "max_grad_norm"

    @classmethod
    def max_grad_norm(cls, training: TrainingConfig) -> float | None:
        """``training.<name>_max_grad_norm`` when there is one and it is set, else
        ``training.max_grad_norm`` (None: unclipped)."""
        specific = getattr(training, cls.grad_norm_key(training))
        return training.max_grad_norm if specific is None else specific

    @classmethod
    def sample_fraction(cls, training: TrainingConfig) -> float:
        """``training.<name>_fraction`` when there is one: the fraction of each split the stage
        trains on (:func:`training.data.select_indices`), else 1."""
        return getattr(training, f"{cls.name}_fraction", 1.0)

    @classmethod
    def learning_rate(cls, training: TrainingConfig) -> float:
        """``training.<name>_learning_rate`` when there is one and it is set, else
        ``training.learning_rate``."""
        specific = getattr(training, f"{cls.name}_learning_rate", None)
        return training.learning_rate if specific is None else specific

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample in a random one of the stamp's 8 views; image targets and (e1, e2) labels
        follow exactly (:func:`deblend.core.symmetry.random_views`), moved in place: ``x``
        and ``y`` are a batch fresh from the loader."""
        return random_views(x, y, targets_are_images=self.target == "clean", in_place=True)

    def prepare(self, layout: RunLayout, dataset: StampData, device: str,
                context: DistContext, progress: bool, log: Callable[[str], None]) -> None:
        """What the stage computes before its first epoch (nothing by default), called in every
        process; it must resume when interrupted, as a resumed stage repeats it."""

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


def drop_bands(x: Tensor, probability: float) -> Tensor:
    """``x`` (N, bands, H, W), normalised, with one band (uniformly chosen) of each sample set
    to 0 with ``probability``, in place: a band missing as inference fills it. Draws from the
    torch RNG (seeded per epoch by the loop) only when ``probability`` > 0."""
    if probability <= 0:
        return x
    n, n_bands = x.shape[:2]
    hit = torch.rand(n, device=x.device) < probability
    band = torch.randint(n_bands, (n,), device=x.device)
    x[hit, band[hit]] = 0.0
    return x


class VAEStage(Stage):
    name, parent, input_set, target, loss_names = "stage1", None, "noisy", "clean", VAE_TERMS

    def __init__(self, vae: VAE, beta_kl: float) -> None:
        super().__init__(vae, {}, None, "random")
        self.beta_kl = beta_kl

    @classmethod
    def build(cls, config, data, parent, parent_record, used) -> "VAEStage":
        return cls(VAE(len(data.bands), data.stamp_pixels, config.model.latent_dim,
                       config.model.decoder_output, config.model.availability_input),
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
    def build(cls, config, data, parent, parent_record, used) -> "DeblendStage":
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
    def parent_of(cls, config: Config) -> str | None:
        return AmortizeStage.name if AmortizeStage.enabled(config) else cls.parent

    @classmethod
    def build(cls, config, data, parent, parent_record, used) -> "RegressionStage":
        encoder_entry = parent["modules"]["encoder"]
        model = config.model
        regressor = Regressor(encoder_entry["hparams"]["latent_dim"], model.regressor_hidden,
                              model.regressor_dropout, model.regressor_moments)
        return cls(regressor, build_module(encoder_entry), parent_record)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"regressor": self.model}

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            mu, _ = self.frozen["encoder"](x)
            features = self.model.stamp_features(x)
        return (regression_loss(model(mu, features), y),)

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
    drops_bands = False  # the prior of complete galaxies

    def __init__(self, flow: LatentFlow, encoder: Encoder,
                 parent_record: dict[str, Any]) -> None:
        super().__init__(flow, {"encoder": encoder}, parent_record, "random")

    @classmethod
    def build(cls, config, data, parent, parent_record, used) -> "FlowStage":
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


class AmortizeStage(Stage):
    """Amortised MAP: an encoder trained to output the flow-MAP latent of its input's target.

    The targets (:mod:`training.map_targets`) are fitted by :meth:`prepare` with the parent
    stage2 encoder, the stage1 decoder and the flow; the encoder starts from stage2's. Each blend
    is shown in the view its target was fitted in, so there is no random-view augmentation (a
    latent has no known transformation under the views). Only mu is trained: the encoder's
    sigma head stays stage2's. Loss terms, squared latent distance
    to the target summed over dimensions: ``total`` (trained) and ``stage2`` (the stage2
    encoder's, only logged: the gain over the encoder it replaces)."""

    name, parent, input_set, target, loss_names = ("amortize", "stage2", "blend", "map_latent",
                                                   ("total", "stage2"))
    uses = ("stage1", "flow")
    # its targets are the MAP latents of the complete blends; with a band missing from the input
    # (band dropout, a dataset's unavailable bands) it learns the complete galaxy's latent from
    # what is there, as inference asks of it

    def __init__(self, encoder: Encoder, frozen: dict[str, nn.Module], config: Config,
                 data: DataIdentity, parent_record: dict[str, Any]) -> None:
        super().__init__(encoder, frozen, parent_record, "stage2")
        self.config, self.data = config, data

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.training.amortized_map

    @classmethod
    def build(cls, config, data, parent, parent_record, used) -> "AmortizeStage":
        encoder_entry = parent["modules"]["encoder"]
        frozen = {"stage2_encoder": build_module(encoder_entry),
                  "decoder": build_module(used["stage1"]["modules"]["decoder"]),
                  "flow": build_module(used["flow"]["modules"]["flow"])}
        encoder = build_module(encoder_entry)
        # the loss reads mu only: sigma stays stage2's (and DDP needs every trained parameter
        # to get a gradient)
        encoder.fc_logvar.requires_grad_(False)
        return cls(encoder, frozen, config, data, parent_record)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.model}

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """No augmentation: each blend is already in its target's view."""
        return x, y

    def prepare(self, layout: RunLayout, dataset: StampData, device: str,
                context: DistContext, progress: bool, log: Callable[[str], None]) -> None:
        """Fit (or read back) the MAP targets of the training and validation blends; under DDP
        each process fits its share of the chunks, then every process reads them all."""
        config = self.config
        indices = np.concatenate([select_indices(dataset, split, config.training.min_target_e,
                                                 self.sample_fraction(config.training))
                                  for split in ("train", "validation")])
        model = Deblender(self.frozen["stage2_encoder"], self.frozen["decoder"], None,
                          self.data, device, flow=self.frozen["flow"])
        identity = {"stage2": lineage_identity(layout, "stage2"),
                    "uses": [record["sha256"] for record in self.used_records]}
        fit = partial(fit_map_targets, model, dataset, indices, config.map,
                      layout.stage_dir(self.name) / "map_targets", identity,
                      chunk=config.training.amortize_chunk,
                      progress=progress and context.is_main,
                      log=log if context.is_main else (lambda message: None))
        if context.is_distributed:
            fit(share=(context.rank, context.world_size))
            context.barrier()
        self.latent_targets = fit()
        self.latent_targets.check_fitted(indices)

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        mu, _ = model(x)
        with torch.no_grad():
            base, _ = self.frozen["stage2_encoder"](x)
        return ((mu.float() - y).pow(2).sum(1).mean(), (base.float() - y).pow(2).sum(1).mean())


STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (VAEStage, DeblendStage, FlowStage,
                                                            AmortizeStage, RegressionStage)}
"""Every stage, by name, in training order (each after its parent under any config)."""
