"""Training, the third layer: it imports ``deblend.core`` and ``simulation`` only.

Each stage is declared whole in :mod:`training.stages` (data, networks trained and frozen, loss,
epochs, augmentation, last step); :mod:`training.runner` runs or resumes one stage in a run
directory (``python -m deblend.train`` is its command line), with the epoch loop of
:mod:`training.loop` and the batches of :mod:`training.data`. Checkpoints and the run layout are
the core's run format (:mod:`deblend.core.runs`).
"""
