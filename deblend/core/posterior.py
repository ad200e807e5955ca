"""Latent posteriors around the MAP: the Laplace approximation, and what it implies for e.

At the MAP latent z* of a source (:mod:`deblend.core.map_fit`) the posterior is approximated by
N(z*, P^-1), with the precision

    P = J^T W J + H_prior,

J = d(stamp pixels)/dz the decoder's Jacobian at z* (electrons per latent unit, by forward-mode
autodiff), W the pixels' inverse noise variance (the likelihood's), and H_prior = -d^2 log p/dz^2
(the identity for N(0, I); the flow's, by double backward). J^T W J is the Gauss-Newton part of
the likelihood's curvature: positive semi-definite, and exact for a decoder that is linear near
z*. The approximation is per source (block-diagonal in the sources of a scene: the coupling
of overlapping sources through shared pixels is left out, which narrows the intervals of
heavily blended pairs). A flow's Hessian need not be positive: eigenvalues of P below
:data:`MIN_EIGENVALUE` are raised to it.

Cost: J needs D forward-mode passes of the decoder (D = 32: about 32 decoder evaluations per
source), then sampling is an eigendecomposition of each D x D precision. Samples of z are
pushed through the regressor (and optionally the decoder's moments) to give e with intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MIN_EIGENVALUE = 1e-3
"""Floor on the eigenvalues of the Laplace precision (per latent unit squared)."""
INTERVALS = (0.68, 0.95)
"""Central credible intervals reported for every ellipticity component."""


def decoder_jacobian(stamps_of: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """(M, P, D) Jacobian of the flattened stamps of M latents (M, D) -> (M, ...) by forward-mode
    autodiff (one batched pass per latent axis)."""
    def single(v: Tensor) -> Tensor:
        return stamps_of(v[None])[0].reshape(-1)
    return torch.func.vmap(torch.func.jacfwd(single))(z)


def prior_hessian(log_prior: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """(M, D, D) -d^2 log p / dz^2 at each of M latents (double backward; D backward passes)."""
    z = z.detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(log_prior(z).sum(), z, create_graph=True)[0]
    rows = [torch.autograd.grad(grad[:, d].sum(), z, retain_graph=True)[0]
            for d in range(z.shape[1])]
    hessian = -torch.stack(rows, dim=1)
    return 0.5 * (hessian + hessian.transpose(1, 2))


def laplace_precision(jacobian: Tensor, inverse_variance: Tensor, prior_precision: Tensor
                      ) -> Tensor:
    """(M, D, D) precision J^T W J + H_prior from (M, P, D) Jacobians, (M, P) pixel weights and
    (M, D, D) prior precisions, made positive definite (eigenvalues >= MIN_EIGENVALUE).
    Non-finite derivatives (a saturated decoder pixel) count as zero curvature."""
    jacobian = torch.nan_to_num(jacobian, nan=0.0, posinf=0.0, neginf=0.0)
    prior_precision = torch.nan_to_num(prior_precision, nan=0.0, posinf=0.0, neginf=0.0)
    weighted = jacobian * inverse_variance[..., None]
    precision = jacobian.transpose(1, 2) @ weighted + prior_precision
    precision = 0.5 * (precision + precision.transpose(1, 2))
    values, vectors = torch.linalg.eigh(precision)
    values = values.clamp(min=MIN_EIGENVALUE)
    return (vectors * values[:, None, :]) @ vectors.transpose(1, 2)


def laplace_samples(z_map: Tensor, precision: Tensor, n: int,
                    generator: torch.Generator | None = None) -> Tensor:
    """(n, M, D) draws from N(z_map, precision^-1): z_map + V diag(lambda^-1/2) eps with
    precision = V diag(lambda) V^T (an eigendecomposition, robust to the huge dynamic range of
    a bright source's curvature; eigenvalues below MIN_EIGENVALUE are raised to it)."""
    values, vectors = torch.linalg.eigh(0.5 * (precision + precision.transpose(1, 2)))
    scales = values.clamp(min=MIN_EIGENVALUE).rsqrt()
    eps = torch.randn((n, *z_map.shape), generator=generator, dtype=z_map.dtype,
                      device=z_map.device if generator is None else generator.device)
    eps = eps.to(z_map.device)
    steps = torch.einsum("mij,nmj->nmi", vectors, eps * scales)
    return z_map + steps


@dataclass(frozen=True)
class EllipticityPosterior:
    """Posterior summaries of (e1, e2) per source, from samples; float32 numpy."""

    mean: np.ndarray
    """(M, 2) posterior mean."""
    std: np.ndarray
    """(M, 2) posterior standard deviation."""
    intervals: dict[float, np.ndarray]
    """{0.68: (M, 2, 2), 0.95: (M, 2, 2)}: [lower, upper] of each component's central interval."""

    @classmethod
    def from_samples(cls, samples: np.ndarray) -> EllipticityPosterior:
        """From (n, M, 2) samples."""
        samples = np.asarray(samples, np.float64)
        intervals = {}
        for level in INTERVALS:
            tail = 50.0 * (1.0 - level)
            low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
            intervals[level] = np.stack([low, high], axis=-1).astype(np.float32)
        return cls(samples.mean(axis=0).astype(np.float32),
                   samples.std(axis=0, ddof=1).astype(np.float32), intervals)

    def coverage(self, truth: np.ndarray) -> dict[float, np.ndarray]:
        """{level: (2,) fraction of sources whose true (M, 2) component lies in its interval}."""
        truth = np.asarray(truth)
        return {level: ((truth >= bounds[..., 0]) & (truth <= bounds[..., 1])).mean(axis=0)
                for level, bounds in self.intervals.items()}
