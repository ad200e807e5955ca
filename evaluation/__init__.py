"""Evaluation, the fourth layer: it imports ``deblend.core``, ``simulation`` and ``training``.

The report on the validation split (:mod:`evaluation.validation_report`, command
``python -m evaluation.report``) and the shear calibration against the applied shear
(:mod:`evaluation.shear_calibration`, command ``python -m evaluation.shear``), built from metrics,
estimators, fits and plots; what they produce is typed in :mod:`evaluation.results` and written
to ``metrics.json`` from there.
"""
