"""Image-fidelity metrics of a reconstruction against the clean isolated truth.

Conventions (stated in every report):

- **SSIM** (``skimage.metrics.structural_similarity``, 7x7 uniform window, default K1/K2) is
  computed per band on the *normalised* images (SPEC 3: ``tanh(asinh(beta x / <max>))`` with the
  model's constants), where both the clean truth and the decoder's sigmoid output lie in [0, 1);
  hence a fixed ``data_range = 1`` for every band and every image. This is the space the networks
  are trained in and the one the report's SSIM figures refer to.
- **Cosine similarity** is that of the flattened (bands x H x W) normalised images.
- **Flux and size** are compared in raw units (electrons): total flux per band and the
  uniform-weight moment size per band (``deblend.core.shapes.moment_size``), as relative residuals
  ``(reconstruction - truth) / truth``; summaries are the median and the normalised median
  absolute deviation ``1.4826 * MAD`` (a robust scatter).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.metrics import structural_similarity

from deblend.core.shapes import moment_size

SSIM_DATA_RANGE = 1.0
SSIM_CONVENTION = ("SSIM per band on the SPEC-3 normalised images (model constants), "
                   "skimage structural_similarity, 7x7 window, data_range = 1 for every band")
COSINE_CONVENTION = "cosine similarity of the flattened (bands x H x W) normalised images"
SCATTER_CONVENTION = "NMAD = 1.4826 * median absolute deviation of the relative residuals"


def _check_pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    if prediction.ndim != 4:
        raise ValueError(f"expected images (N, bands, H, W), got shape {prediction.shape}")
    return prediction, truth


def ssim_per_band(prediction: np.ndarray, truth: np.ndarray,
                  data_range: float = SSIM_DATA_RANGE) -> np.ndarray:
    """SSIM of every image and band: (N, bands) from two (N, bands, H, W) arrays.

    Pass normalised images (values in [0, 1)) with the default ``data_range=1``.
    """
    prediction, truth = _check_pair(prediction, truth)
    n, bands = prediction.shape[:2]
    out = np.empty((n, bands))
    for i in range(n):
        for b in range(bands):
            out[i, b] = structural_similarity(truth[i, b], prediction[i, b], data_range=data_range)
    return out


def cosine_similarity(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Cosine of the angle between each flattened prediction and its truth: (N,).

    NaN where either image is all zeros.
    """
    prediction, truth = _check_pair(prediction, truth)
    a = prediction.reshape(len(prediction), -1)
    b = truth.reshape(len(truth), -1)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1.0), np.nan)


def relative_residual(value: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(value - truth) / truth, NaN where truth is not positive or either is not finite."""
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (value - truth) / truth
    out[~(truth > 0) | ~np.isfinite(out)] = np.nan
    return out


def robust_summary(values: np.ndarray) -> dict[str, float]:
    """Median, NMAD scatter, mean, std and count of the finite entries of ``values``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"median": float("nan"), "nmad": float("nan"), "mean": float("nan"),
                "std": float("nan"), "n": 0}
    median = float(np.median(finite))
    return {"median": median, "nmad": float(1.4826 * np.median(np.abs(finite - median))),
            "mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def flux_size_residuals(prediction_raw: np.ndarray, truth_raw: np.ndarray
                        ) -> dict[str, np.ndarray]:
    """Per-image, per-band relative residuals of total flux and moment size, raw units.

    Returns ``{"flux": (N, bands), "size": (N, bands)}``; sizes are uniform-weight moment
    sizes sqrt((Qxx + Qyy) / 2) in pixels of each band's image.
    """
    prediction_raw, truth_raw = _check_pair(prediction_raw, truth_raw)
    flux = relative_residual(prediction_raw.sum(axis=(2, 3)), truth_raw.sum(axis=(2, 3)))
    size = relative_residual(moment_size(prediction_raw), moment_size(truth_raw))
    return {"flux": flux, "size": size}


def fidelity_summary(ssim: np.ndarray, cosine: np.ndarray, bands: Sequence[str]
                     ) -> dict[str, object]:
    """Means/medians of SSIM (over images and bands, and per band) and of cosine similarity."""
    per_image = np.nanmean(ssim, axis=1) if ssim.size else np.array([])
    return {
        "n": int(len(cosine)),
        "ssim_mean": nanmean(per_image),
        "ssim_median": nanmedian(per_image),
        "ssim_std": nanstd(per_image),
        "ssim_per_band": {band: nanmean(ssim[:, b]) for b, band in enumerate(bands)},
        "cosine_mean": nanmean(cosine),
        "cosine_median": nanmedian(cosine),
        "cosine_std": nanstd(cosine),
    }


def flux_size_summary(residuals: dict[str, np.ndarray], bands: Sequence[str]
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """{band: {"flux": robust summary, "size": robust summary}} of :func:`flux_size_residuals`."""
    return {band: {kind: robust_summary(residuals[kind][:, b]) for kind in ("flux", "size")}
            for b, band in enumerate(bands)}


def nanmean(x: np.ndarray) -> float:
    """Mean of the finite values (NaN when there is none), as a float."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def nanmedian(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmedian(x)) if np.isfinite(x).any() else float("nan")


def nanstd(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanstd(x)) if np.isfinite(x).any() else float("nan")
