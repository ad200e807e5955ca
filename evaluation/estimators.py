"""Ellipticity estimators compared by the evaluation and the shear calibration.

Every image-based estimator measures the *label image*: the sum over ``label_bands`` of a raw-flux
(electrons) image, the very estimator that made the truth labels (``simulation.labels``). All
return distortions (e1, e2) in the pixel frame; failures are NaN.

Estimators (keys of :data:`ESTIMATORS`):

- ``regressor``: the stage-3 regressor reading mu of the stage-2 encoder (no image measurement),
  averaged over the stamp's 8 symmetric views (:mod:`deblend.core.symmetry`), with its response on the
  calibration split divided out (:mod:`deblend.core.response`);
- ``regressor_raw``: the same regressor's output before that calibration (only for calibrated
  runs): the MSE-trained posterior mean, shrunk toward round;
- ``recon_moments``: uniform-weight moments of the stage-2 reconstruction (denormalised);
- ``recon_hsm``: galsim.hsm adaptive moments of the same reconstruction;
- ``blend_moments`` / ``blend_hsm``: uniform-weight / adaptive moments of the noisy blend itself
  (no deblending);
- ``noisy_moments`` / ``noisy_hsm``: the same on the noisy isolated target (no neighbour).
  Uniform-weight moments over a whole noisy stamp are dominated by the sky noise (every pixel
  counts, and the flux in the denominator is noisy): they are the labels' estimator, kept as the
  report's baseline, while the HSM variants are what a survey pipeline would measure;
- ``truth_moments`` / ``truth_hsm``: the same two estimators on the clean isolated target; the
  references of the shear calibration (``truth_moments`` gives A_truth).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from deblend.core.shapes import hsm_shapes, moments_ellipticity

ESTIMATORS: dict[str, str] = {
    "regressor": "stage-3 regressor on the stage-2 latent mu, averaged over the stamp's 8 "
                 "symmetric views, response-calibrated",
    "regressor_raw": "the same regressor before the response calibration",
    "recon_moments": "uniform-weight moments of the stage-2 reconstruction",
    "recon_hsm": "galsim.hsm adaptive moments of the stage-2 reconstruction",
    "blend_moments": "uniform-weight moments of the noisy blend (no deblending)",
    "blend_hsm": "galsim.hsm adaptive moments of the noisy blend (no deblending)",
    "noisy_moments": "uniform-weight moments of the noisy isolated target",
    "noisy_hsm": "galsim.hsm adaptive moments of the noisy isolated target",
}
"""Estimators compared with the truth labels on the validation set."""

REFERENCES: dict[str, str] = {
    "truth_moments": "uniform-weight moments of the clean isolated target (the labels)",
    "truth_hsm": "galsim.hsm adaptive moments of the clean isolated target",
}
"""Estimators on the noiseless truth, used as references by the shear calibration."""

SHORT_NAMES: dict[str, str] = {
    "regressor": "regressor",
    "regressor_raw": "regressor (raw)",
    "recon_moments": "recon. moments",
    "recon_hsm": "recon. HSM",
    "blend_moments": "blend moments",
    "blend_hsm": "blend HSM",
    "noisy_moments": "noisy isolated moments",
    "noisy_hsm": "noisy isolated HSM",
    "truth_moments": "truth moments",
    "truth_hsm": "truth HSM",
}


def label_image(images_raw: np.ndarray, bands: Sequence[str], label_bands: Sequence[str]
                ) -> np.ndarray:
    """Sum over ``label_bands`` of raw images (N, bands, H, W) -> (N, H, W), float64."""
    images_raw = np.asarray(images_raw)
    if images_raw.ndim != 4 or images_raw.shape[1] != len(bands):
        raise ValueError(f"expected images (N, {len(bands)}, H, W), got {images_raw.shape}")
    missing = [b for b in label_bands if b not in bands]
    if missing:
        raise ValueError(f"label band '{missing[0]}' is not among the image bands {list(bands)}")
    index = [list(bands).index(b) for b in label_bands]
    return images_raw[:, index].astype(np.float64).sum(axis=1)


def moments_estimator(images_raw: np.ndarray, bands: Sequence[str],
                      label_bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-weight moment distortion of the label image of each raw image."""
    return moments_ellipticity(label_image(images_raw, bands, label_bands))


def hsm_estimator(images_raw: np.ndarray, bands: Sequence[str],
                  label_bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """galsim.hsm adaptive-moment distortion of the label image (NaN where HSM fails)."""
    shape = hsm_shapes(label_image(images_raw, bands, label_bands))
    return shape.e1, shape.e2


def measure_estimators(*, bands: Sequence[str], label_bands: Sequence[str],
                       reconstruction_raw: np.ndarray | None = None,
                       regressor_e: np.ndarray | None = None,
                       regressor_raw_e: np.ndarray | None = None,
                       blend_raw: np.ndarray | None = None,
                       noisy_raw: np.ndarray | None = None,
                       clean_raw: np.ndarray | None = None,
                       references: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(e1, e2) per estimator for whichever inputs are given.

    ``regressor_e`` and ``regressor_raw_e`` (before calibration) are (N, 2).
    ``references=True`` adds ``truth_moments`` and ``truth_hsm`` measured on ``clean_raw``.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if regressor_e is not None:
        regressor_e = np.asarray(regressor_e, dtype=np.float64)
        out["regressor"] = (regressor_e[:, 0], regressor_e[:, 1])
    if regressor_raw_e is not None:
        regressor_raw_e = np.asarray(regressor_raw_e, dtype=np.float64)
        out["regressor_raw"] = (regressor_raw_e[:, 0], regressor_raw_e[:, 1])
    if reconstruction_raw is not None:
        out["recon_moments"] = moments_estimator(reconstruction_raw, bands, label_bands)
        out["recon_hsm"] = hsm_estimator(reconstruction_raw, bands, label_bands)
    if blend_raw is not None:
        out["blend_moments"] = moments_estimator(blend_raw, bands, label_bands)
        out["blend_hsm"] = hsm_estimator(blend_raw, bands, label_bands)
    if noisy_raw is not None:
        out["noisy_moments"] = moments_estimator(noisy_raw, bands, label_bands)
        out["noisy_hsm"] = hsm_estimator(noisy_raw, bands, label_bands)
    if references and clean_raw is not None:
        out["truth_moments"] = moments_estimator(clean_raw, bands, label_bands)
        out["truth_hsm"] = hsm_estimator(clean_raw, bands, label_bands)
    return out


def concatenate(parts: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Join per-batch outputs of :func:`measure_estimators` (same keys in every part)."""
    if not parts:
        return {}
    return {name: (np.concatenate([p[name][0] for p in parts]),
                   np.concatenate([p[name][1] for p in parts])) for name in parts[0]}
