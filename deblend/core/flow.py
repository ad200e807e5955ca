"""A learned prior on the latent space: a normalising flow built from pyro's transforms.

The stage1 VAE is trained with a N(0, I) prior, but the latent means of real galaxies do not
fill N(0, I): a MAP fit under N(0, I) pulls every galaxy towards the latent origin, a round
average galaxy. :class:`LatentFlow` is the density p_flow(z) of the latents of isolated galaxies
(fitted by the ``flow`` stage, :mod:`training.stages`), used as the prior of the MAP deblender
(:mod:`deblend.core.map_fit`).

The flow is z = T(u), u ~ N(0, I), with T a stack of ``layers`` coupling transforms of
``pyro.distributions.transforms`` (each followed by a fixed permutation of the latent axes,
seeded, so every axis is transformed), and a batch-norm transform on the data side that
standardises the latents. The density

    log p_flow(z) = log N(T^-1(z); 0, I) + log |det d T^-1 / d z|

is what the MAP deblender evaluates, at arbitrary points, thousands of times per scene. Hence
*coupling* layers: a coupling layer's inverse and its Jacobian are each one pass of its
conditioner network in either direction. Pyro's ``affine_autoregressive`` is an inverse
autoregressive flow (IAF): sampling is one pass but the density of an arbitrary z needs
``latent_dim`` sequential passes, which would make each MAP step 32x dearer; its inverse (a MAF)
has the opposite trade-off and no cheap sampling for the posterior. ``affine_coupling`` (RealNVP:
an affine map of half the axes conditioned on the other half) is the default;
``spline_coupling`` (neural rational-quadratic splines, identity outside +-``bound``) is more
expressive per layer.

Units: z is the encoder's latent mean (dimensionless), log-densities are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import Tensor, nn

TRANSFORMS = ("affine_coupling", "spline_coupling")
"""The coupling bijections a :class:`LatentFlow` may be built from."""
SPLINE_BINS = 8
SPLINE_BOUND = 5.0
"""Spline coupling: bins and the half-width (in standardised latent units) of the spline's
domain; outside it the transform is the identity."""


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) of (..., D) latents, summed over the last axis (nats)."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2.0 * math.pi))


class LatentFlow(nn.Module):
    """Normalising-flow density on (N, latent_dim) latents; constructor arguments are plain
    values so that a checkpoint can rebuild it (:func:`deblend.core.runs.build_module`)."""

    def __init__(self, latent_dim: int = 32, layers: int = 6, hidden: Sequence[int] = (128, 128),
                 transform: str = "affine_coupling", seed: int = 0) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown flow transform {transform!r} (one of {TRANSFORMS})")
        if latent_dim < 2:
            raise ValueError(f"a coupling flow needs latent_dim >= 2, got {latent_dim}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.latent_dim, self.layers = int(latent_dim), int(layers)
        self.hidden, self.transform, self.seed = [int(h) for h in hidden], transform, int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.couplings = nn.ModuleList()
        for index in range(self.layers):
            self.couplings.append(self._coupling())
            permutation = (torch.tensor([1, 0]) if self.latent_dim == 2 else
                           torch.randperm(self.latent_dim, generator=generator))
            self.register_buffer(f"permutation_{index}", permutation)
        self.standardize = T.BatchNorm(self.latent_dim)
        self.register_buffer("base_loc", torch.zeros(self.latent_dim))
        self.register_buffer("base_scale", torch.ones(self.latent_dim))

    def _coupling(self) -> nn.Module:
        split = self.latent_dim // 2
        if self.transform == "affine_coupling":
            return T.affine_coupling(self.latent_dim, hidden_dims=self.hidden, split_dim=split)
        return T.spline_coupling(self.latent_dim, split_dim=split, hidden_dims=self.hidden,
                                 count_bins=SPLINE_BINS, bound=SPLINE_BOUND)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (plain values) for checkpointing."""
        return {"latent_dim": self.latent_dim, "layers": self.layers, "hidden": list(self.hidden),
                "transform": self.transform, "seed": self.seed}

    def distribution(self) -> dist.TransformedDistribution:
        """p_flow as a pyro distribution over (latent_dim,) events (base to data: couplings and
        permutations, then the batch norm)."""
        transforms: list[Any] = []
        for index, coupling in enumerate(self.couplings):
            transforms += [coupling, T.Permute(getattr(self, f"permutation_{index}"))]
        transforms.append(self.standardize)
        # no argument validation: latents pushed to NaN by a diverging flow give a NaN
        # log-density, which training reports as a non-finite loss, not a support error
        base = dist.Normal(self.base_loc, self.base_scale, validate_args=False).to_event(1)
        return dist.TransformedDistribution(base, transforms, validate_args=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p_flow(z) (nats) of (..., latent_dim) latents, shape (...); differentiable in z.

        In training mode the batch norm standardises with the batch's own moments (and updates
        its running ones); in eval mode with the running moments, a fixed density."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"LatentFlow: expected latents of size {self.latent_dim}, got shape "
                             f"{tuple(z.shape)}")
        return self.distribution().log_prob(z)

    forward = log_prob

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """(n, latent_dim) draws from p_flow."""
        return self.distribution().sample((n,))
