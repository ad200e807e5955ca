"""deblend: weak-lensing galaxy deblending with a beta-VAE and an ellipticity regressor.

``from deblend import Deblender`` gives the inference API (:mod:`deblend.inference`); it is
imported on first use so that ``import deblend`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deblend.inference import Deblender, Prediction

__all__ = ["Deblender", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deblend import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'deblend' has no attribute {name!r}")
