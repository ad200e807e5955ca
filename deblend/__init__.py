"""deblend: weak-lensing galaxy deblending with a beta-VAE and an ellipticity regressor.

``from deblend import Deblender`` gives the inference API (:mod:`deblend.core.inference`).
The package holds the core layer (:mod:`deblend.core`) and the entry points: the main job
(``python -m deblend run``, :mod:`deblend.pipeline`) and training (``python -m deblend.train``).
"""

from deblend.core.inference import Deblender, Prediction

__all__ = ["Deblender", "Prediction"]
