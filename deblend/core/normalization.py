"""Per-band stamp normalisation (SPEC section 3).

    x_b = tanh( asinh( beta * x_raw_b / M_b ) ),      x_raw_b = sinh( atanh(x_b) ) * M_b / beta

with M_b = <max(x_raw_b)> the mean over images of each image's maximum pixel in band b, computed
once on a training split and stored with the data and every trained model. Raw units are those of
the images (electrons for BTK stamps). Works on numpy arrays and torch tensors of shape
(..., bands, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_BETA = 2.5
# Largest |x| kept before atanh, so that denormalising a network output of exactly +-1 stays finite.
_ATANH_LIMIT = 1.0 - 1e-7


@dataclass(frozen=True)
class NormalizationConstants:
    """Per-band ``<max>`` constants (raw units) and the beta they go with."""

    bands: tuple[str, ...]
    max_values: tuple[float, ...]
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if len(self.bands) != len(self.max_values):
            raise ValueError(f"{len(self.bands)} bands but {len(self.max_values)} max values")
        bad = [b for b, m in zip(self.bands, self.max_values) if not (np.isfinite(m) and m > 0)]
        if bad:
            raise ValueError(f"normalisation constant of band '{bad[0]}' is not a positive number")

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"beta": ..., "bands": [...], "max": [...]}."""
        return {"beta": self.beta, "bands": list(self.bands), "max": list(self.max_values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormalizationConstants":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["bands"]), tuple(float(v) for v in data["max"]), float(data["beta"]))

    def matches(self, other: "NormalizationConstants", rtol: float = 1e-6) -> bool:
        """Same bands, beta and constants (to ``rtol``)."""
        return (self.bands == other.bands and np.isclose(self.beta, other.beta)
                and np.allclose(self.max_values, other.max_values, rtol=rtol, atol=0))


def _scale(x: Any, constants: NormalizationConstants) -> Any:
    n_bands = len(constants.bands)
    if x.shape[-3] != n_bands:
        raise ValueError(f"images have {x.shape[-3]} bands, normalisation expects {n_bands}")
    values = np.asarray(constants.max_values, dtype=np.float64) / constants.beta
    if hasattr(x, "new_tensor"):
        return x.new_tensor(values).reshape(n_bands, 1, 1)
    return values.reshape(n_bands, 1, 1).astype(x.dtype if x.dtype.kind == "f" else np.float64)


def normalize(x_raw: Any, constants: NormalizationConstants) -> Any:
    """Raw-flux stamps (..., bands, H, W) -> normalised values in (-1, 1)."""
    scale = _scale(x_raw, constants)
    if hasattr(x_raw, "new_tensor"):
        return (x_raw / scale).asinh().tanh()
    out = np.divide(x_raw, scale)  # one array, transformed in place
    np.arcsinh(out, out=out)
    return np.tanh(out, out=out)


def denormalize(x: Any, constants: NormalizationConstants) -> Any:
    """Normalised stamps (..., bands, H, W) -> raw flux; the exact inverse of :func:`normalize`."""
    scale = _scale(x, constants)
    if hasattr(x, "new_tensor"):
        out = x.clamp(-_ATANH_LIMIT, _ATANH_LIMIT)
        if out.is_inference():  # under torch.inference_mode: one tensor, transformed in place
            return out.atanh_().sinh_().mul_(scale)
        return out.atanh().sinh() * scale  # autograd, forward AD (MAP) need the out-of-place ops
    return np.sinh(np.arctanh(np.clip(x, -_ATANH_LIMIT, _ATANH_LIMIT))) * scale


class MaxAccumulator:
    """Streams images through and keeps the running mean of each image's per-band maximum."""

    def __init__(self, bands: tuple[str, ...]) -> None:
        self.bands = tuple(bands)
        self._sum = np.zeros(len(bands), np.float64)
        self._count = 0

    def add(self, images: np.ndarray) -> None:
        """Add a batch of raw images (N, bands, H, W)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != len(self.bands):
            raise ValueError(f"expected (N, {len(self.bands)}, H, W) images, got {images.shape}")
        self._sum += images.max(axis=(2, 3)).sum(axis=0)
        self._count += images.shape[0]

    def constants(self, beta: float = DEFAULT_BETA) -> NormalizationConstants:
        """The per-band ``<max>`` so far."""
        if self._count == 0:
            raise ValueError("no images were seen: cannot compute normalisation constants")
        return NormalizationConstants(self.bands, tuple(self._sum / self._count), beta)


def rescale(images: np.ndarray, source: NormalizationConstants,
            target: NormalizationConstants) -> np.ndarray:
    """Raw (N, bands, H, W) images whose normalisation with ``target``'s constants equals the
    normalisation of ``images`` with ``source``'s: x <max>_target beta_source /
    (<max>_source beta_target) per band. Swapping ``source`` and ``target`` inverts it."""
    factor = np.asarray(target.max_values) / np.asarray(source.max_values)
    factor *= source.beta / target.beta
    return images * factor.reshape(1, -1, 1, 1)
