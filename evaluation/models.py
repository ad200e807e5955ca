"""The two models the evaluation compares, both applied to noisy blends.

- ``t1``: the stage-1 encoder and the stage-1 decoder (the VAE trained on isolated galaxies),
  applied to blends it never saw: ``Deblender.from_run(run, encoder="stage1")``.
- ``t2``: the full deblender (stage-2 encoder, stage-1 decoder, stage-3 regressor):
  ``Deblender.from_run(run)``.

Both give the reconstruction in raw flux units (the decoder output denormalised with the
model's constants); ``t2`` also gives the regressor's (e1, e2). The latent mean mu is decoded
(no sampling), as the deblender does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deblend.normalization import NormalizationConstants, normalize


@dataclass
class Prediction:
    """Outputs of one model on a batch of raw blends (N, bands, H, W)."""

    reconstruction: np.ndarray
    """raw flux units (electrons), (N, bands, H, W)"""
    e: np.ndarray | None = None
    """regressor (e1, e2), (N, 2), or None for a model without a regressor"""


class Model(Protocol):
    name: str
    bands: tuple[str, ...]
    normalization: NormalizationConstants

    def predict(self, blend_raw: np.ndarray) -> Prediction: ...


class DeblenderModel:
    """A :class:`deblend.Deblender` under a report name ("t1" or "t2")."""

    def __init__(self, deblender: Any, name: str = "t2", batch_size: int = 256) -> None:
        self.deblender = deblender
        self.name = name
        self.batch_size = batch_size
        self.normalization: NormalizationConstants = deblender.normalization
        self.bands = tuple(deblender.bands)

    @classmethod
    def from_run(cls, run_dir: str | Path, stage: str = "t2", batch_size: int = 256,
                 device: str = "auto") -> "DeblenderModel":
        """t2: ``Deblender.from_run(run)``; t1: ``Deblender.from_run(run, encoder="stage1")``."""
        from deblend import Deblender

        if stage not in ("t1", "t2"):
            raise ValueError(f"unknown model '{stage}' (t1 or t2)")
        encoder = "stage1" if stage == "t1" else "stage2"
        return cls(Deblender.from_run(run_dir, encoder=encoder, device=device), stage, batch_size)

    def predict(self, blend_raw: np.ndarray) -> Prediction:
        out = self.deblender.predict(np.asarray(blend_raw, dtype=np.float32),
                                     batch_size=self.batch_size)
        e = None if out.ellipticity is None else np.asarray(out.ellipticity, dtype=np.float64)
        return Prediction(np.asarray(out.reconstruction, dtype=np.float64), e)


def load_models(run_dir: str | Path, batch_size: int = 256, device: str = "auto"
                ) -> dict[str, Model]:
    """{"t1": stage-1 VAE on blends, "t2": the deblender} of a run with all three stages."""
    return {stage: DeblenderModel.from_run(run_dir, stage, batch_size, device)
            for stage in ("t1", "t2")}


def normalized(model: Model, images_raw: np.ndarray) -> np.ndarray:
    """``images_raw`` in the model's normalised space (SPEC 3)."""
    return normalize(np.asarray(images_raw, dtype=np.float64), model.normalization)
