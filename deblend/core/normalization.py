"""Per-band stamp normalisation (SPEC section 3).

    x_b = tanh( asinh( beta * x_raw_b / M_b ) ),      x_raw_b = sinh( atanh(x_b) ) * M_b / beta

with M_b = <max(x_raw_b)> the mean over images of each image's maximum pixel in band b, computed
once on a training split and stored with the data and every trained model. Raw units are those of
the images (electrons for BTK stamps). Works on numpy arrays and torch tensors of shape
(..., bands, H, W).

With ``stamp_scale`` (``simulation.norm_flux_scale``) every stamp is first divided by its own flux
scale s >= 1 and the network's output multiplied back by it:

    x_b = tanh( asinh( beta * x_raw_b / (s M_b) ) ),   s = max(1, max_b P_b / M_b)

where P_b is the stamp's largest 3 x 3 box mean in band b (robust to one noisy pixel) over the
bands it has. A stamp no brighter than the constants keeps s = 1 (the plain transform); a galaxy
whose peak is 250 times M_b (the bright real DES galaxy) is no longer flattened to 1 by tanh, so its
profile stays resolved. s is read from the network's *input* stamp, so it is known at inference;
a training target (the clean image) is normalised with its input's s, and a reconstruction is
denormalised with the s of the stamp it was read from (:func:`flux_scales`). s is the same in
every symmetric view of a stamp (the box mean and the maximum are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

DEFAULT_BETA = 2.5
# Largest |x| kept before atanh, so that denormalising a network output of exactly +-1 stays finite.
_ATANH_LIMIT = 1.0 - 1e-7


@dataclass(frozen=True)
class NormalizationConstants:
    """Per-band ``<max>`` constants (raw units) and the beta they go with."""

    bands: tuple[str, ...]
    max_values: tuple[float, ...]
    beta: float = DEFAULT_BETA
    stamp_scale: bool = False
    """Divide each stamp by its own flux scale first (module docstring, :func:`flux_scales`)."""

    def __post_init__(self) -> None:
        if len(self.bands) != len(self.max_values):
            raise ValueError(f"{len(self.bands)} bands but {len(self.max_values)} max values")
        bad = [b for b, m in zip(self.bands, self.max_values) if not (np.isfinite(m) and m > 0)]
        if bad:
            raise ValueError(f"normalisation constant of band '{bad[0]}' is not a positive number")

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"beta": ..., "bands": [...], "max": [...]} (and "stamp_scale": true when
        set, so that constants written before it read back the same)."""
        out = {"beta": self.beta, "bands": list(self.bands), "max": list(self.max_values)}
        if self.stamp_scale:
            out["stamp_scale"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormalizationConstants":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["bands"]), tuple(float(v) for v in data["max"]), float(data["beta"]),
                   bool(data.get("stamp_scale", False)))

    def matches(self, other: "NormalizationConstants", rtol: float = 1e-6) -> bool:
        """Same bands, beta, constants (to ``rtol``) and per-stamp scaling."""
        return (self.bands == other.bands and np.isclose(self.beta, other.beta)
                and self.stamp_scale == other.stamp_scale
                and np.allclose(self.max_values, other.max_values, rtol=rtol, atol=0))


def _check_bands(x: Any, constants: NormalizationConstants) -> int:
    n_bands = len(constants.bands)
    if x.ndim < 3 or x.shape[-3] != n_bands:
        raise ValueError(f"images have {x.shape[-3] if x.ndim >= 3 else 'no'} bands, "
                         f"normalisation expects {n_bands}")
    return n_bands


def flux_scales(x_raw: np.ndarray, constants: NormalizationConstants,
                available: np.ndarray | None = None) -> np.ndarray:
    """(N,) float64 flux scale s = max(1, max_b P_b / M_b) of raw stamps (N, bands, H, W), P_b
    the largest 3 x 3 box mean of band b, over the bands ``available`` (N, bands) marks present
    (all by default); ones when ``constants.stamp_scale`` is off. Non-finite pixels of a present
    band are refused (ValueError)."""
    x = np.asarray(x_raw)
    n_bands = _check_bands(x, constants)
    if x.ndim != 4:
        raise ValueError(f"flux scales need stamps (N, {n_bands}, H, W), got shape {x.shape}")
    if not constants.stamp_scale:
        return np.ones(len(x))
    peaks = uniform_filter(x.astype(np.float64), size=(1, 1, 3, 3), mode="constant").max(
        axis=(2, 3)) / np.asarray(constants.max_values)
    if available is not None:
        peaks = np.where(np.asarray(available, bool), peaks, -np.inf)
    if not np.isfinite(peaks[peaks != -np.inf]).all():
        raise ValueError("stamps hold non-finite pixels in a present band: no flux scale")
    return np.maximum(1.0, peaks.max(axis=1, initial=1.0))


def _scale(x: Any, constants: NormalizationConstants, stamp: Any = None) -> Any:
    """M_b / beta, times each stamp's flux scale ``stamp`` ((N,) for x of shape (N, bands, H, W))
    when given."""
    n_bands = _check_bands(x, constants)
    values = np.asarray(constants.max_values, dtype=np.float64) / constants.beta
    if hasattr(x, "new_tensor"):
        out = x.new_tensor(values).reshape(n_bands, 1, 1)
        if stamp is not None:
            stamp = (stamp.to(device=x.device, dtype=x.dtype) if hasattr(stamp, "new_tensor")
                     else x.new_tensor(np.asarray(stamp, np.float64)))
            out = out * stamp.reshape(-1, 1, 1, 1)
        return out
    out = values.reshape(n_bands, 1, 1)
    if stamp is not None:
        out = out * np.asarray(stamp, np.float64).reshape(-1, 1, 1, 1)
    return out.astype(x.dtype if x.dtype.kind == "f" else np.float64)


def _stamp_scale(x: Any, constants: NormalizationConstants, scale: Any, what: str) -> Any:
    """The per-stamp scale to use: None when the constants have none, else ``scale`` checked
    against the stamps' count (a ValueError when missing or of the wrong length)."""
    if not constants.stamp_scale:
        return None
    if scale is None:
        raise ValueError(f"{what} with per-stamp flux scales (normalization stamp_scale) needs "
                         f"each stamp's scale (normalization.flux_scales of its input stamp)")
    n = int(np.prod(x.shape[:-3]))
    if x.ndim != 4 or np.shape(scale) != (n,):
        raise ValueError(f"{what}: {np.shape(scale)} flux scales for stamps of shape "
                         f"{tuple(x.shape)} (one per stamp of (N, bands, H, W) stamps)")
    return scale


def normalize(x_raw: Any, constants: NormalizationConstants, scale: Any = None) -> Any:
    """Raw-flux stamps (..., bands, H, W) -> normalised values in (-1, 1). With per-stamp
    scaling (``constants.stamp_scale``) the stamps are (N, bands, H, W) and ``scale`` is each
    one's flux scale (default: its own, :func:`flux_scales`; a target passes its input's)."""
    if constants.stamp_scale and scale is None and not hasattr(x_raw, "new_tensor"):
        scale = flux_scales(x_raw, constants)
    scale = _scale(x_raw, constants, _stamp_scale(x_raw, constants, scale, "normalize"))
    if hasattr(x_raw, "new_tensor"):
        return (x_raw / scale).asinh().tanh()
    out = np.divide(x_raw, scale)  # one array, transformed in place
    np.arcsinh(out, out=out)
    return np.tanh(out, out=out)


def normalize_with_truth(recon: np.ndarray, truth: np.ndarray, constants: NormalizationConstants
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(recon, truth) raw stamps (N, bands, H, W) normalised alike for a comparison in the
    networks' space: both at the truth's flux scales (:func:`flux_scales`)."""
    scale = flux_scales(truth, constants)
    return normalize(recon, constants, scale), normalize(truth, constants, scale)


def denormalize(x: Any, constants: NormalizationConstants, scale: Any = None) -> Any:
    """Normalised stamps (..., bands, H, W) -> raw flux; the exact inverse of :func:`normalize`
    with the same ``scale`` (needed, one per stamp, with ``constants.stamp_scale``)."""
    scale = _scale(x, constants, _stamp_scale(x, constants, scale, "denormalize"))
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

    def constants(self, beta: float = DEFAULT_BETA, stamp_scale: bool = False
                  ) -> NormalizationConstants:
        """The per-band ``<max>`` so far (with per-stamp flux scaling when ``stamp_scale``)."""
        if self._count == 0:
            raise ValueError("no images were seen: cannot compute normalisation constants")
        return NormalizationConstants(self.bands, tuple(self._sum / self._count), beta,
                                      stamp_scale)


def rescale(images: np.ndarray, source: NormalizationConstants,
            target: NormalizationConstants) -> np.ndarray:
    """Raw (N, bands, H, W) images whose normalisation with ``target``'s constants equals the
    normalisation of ``images`` with ``source``'s: x <max>_target beta_source /
    (<max>_source beta_target) per band. Swapping ``source`` and ``target`` inverts it."""
    factor = np.asarray(target.max_values) / np.asarray(source.max_values)
    factor *= source.beta / target.beta
    return images * factor.reshape(1, -1, 1, 1)
