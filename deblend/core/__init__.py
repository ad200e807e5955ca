"""The core of deblend, the bottom layer: it imports no other part of the project.

Config (:mod:`~deblend.core.config`), networks and losses, normalisation (SPEC 3), shapes and
symmetries (SPEC 6), the response calibration, stamps, the run format (one checkpoint format, run
layout and lineage: :mod:`~deblend.core.runs`) and, on top of them, inference
(:class:`~deblend.core.inference.Deblender`, and its BTK plug-in). Above it, each importing only
the layers below: ``simulation`` -> ``training`` -> ``evaluation`` -> ``des_validation`` -> the
entry points (``python -m deblend``, ``python -m deblend.train`` and the other ``python -m``
commands).
"""
