"""The two models the evaluation compares, both applied to noisy blends.

- ``t1``: the stage-1 encoder and the stage-1 decoder (the VAE trained on isolated galaxies),
  applied to blends it never saw: ``Deblender.from_run(run, stage="stage1")``.
- ``t2``: the full deblender (stage-2 encoder, stage-1 decoder, stage-3 regressor):
  ``Deblender.from_run(run)``.

Both give the reconstruction in raw flux units (the decoder output denormalised with the
model's constants); ``t2`` also gives the regressor's (e1, e2). The latent mean mu is decoded
(no sampling), as the deblender does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from deblend.core.inference import Prediction
from deblend.core.normalization import NormalizationConstants


class Model(Protocol):
    """What the evaluation needs of a model; :class:`deblend.Deblender` is one."""

    bands: tuple[str, ...]
    normalization: NormalizationConstants

    def predict(self, images: np.ndarray) -> Prediction: ...


def load_models(run_dir: str | Path, device: str = "auto") -> dict[str, Model]:
    """{"t1": stage-1 VAE on blends, "t2": the deblender} of a run with all three stages."""
    from deblend import Deblender

    return {"t1": Deblender.from_run(run_dir, stage="stage1", device=device),
            "t2": Deblender.from_run(run_dir, device=device)}

