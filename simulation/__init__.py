"""Simulation, the second layer: BTK scenes and the dataset format; it imports ``deblend.core``
only.

Catalogs (:mod:`simulation.catalogs`, the embedded model :mod:`simulation.catalog_model`), scene
drawing (:mod:`simulation.scenes`, :mod:`simulation.sampling`), labels (:mod:`simulation.labels`)
and the sharded on-disk dataset (:mod:`simulation.builder`, :mod:`simulation.dataset`);
``python -m simulation.generate`` is the command line.
"""
