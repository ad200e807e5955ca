"""A BTK deblender that runs a trained deblend model, to be scored with BTK's own tools.

    import btk
    from deblend.core.btk_deblender import VAEDeblender
    deblender = VAEDeblender.from_run("runs/quick/train", max_n_sources=3)
    deblend_batch = deblender(blend_batch)             # a btk.blend_batch.DeblendBatch
    matching = btk.match.PixelHungarianMatcher(5.0)(blend_batch.catalog_list,
                                                    deblend_batch.catalog_list)

Sources are detected with BTK's SEP deblender on one band (``detection_band``, i by default);
around each detection a model-sized stamp (45x45) is cut from the blend (zero-padded at the
edges) and recentred on the detection to a fraction of a pixel (:mod:`deblend.core.recentre`, as
the survey walk's stamps), all stamps of the batch go through :meth:`deblend.Deblender.predict`
together, and each reconstruction is moved back by its offset and pasted at its detection in a
full-size image. With ``map_prior`` ("normal" or "flow") the sources of each blend are instead
fitted together by MAP deblending (:mod:`deblend.core.map_deblend`, the survey's sky levels as
the background variance), and ``e1``/``e2`` are the regressor's reading of each source's
MAP-deblended stamp (the blend minus the other sources' MAP models; it reads shapes better than
the MAP latent itself). The output catalog carries ``ra``/``dec`` (arcsec, BTK's convention), ``x_peak``/``y_peak``
(pixels) and the regressor's ``e1``/``e2`` (distortion, pixel frame).

Edges: SEP's detections lie in the blend; a source near its edge is deblended from a stamp that
is zero outside the blend, and its reconstruction is cropped to the blend
(:mod:`deblend.core.stamps`). The arguments obey the rules of the ``map`` config keys they mirror
(``max_n_sources``: ``map.max_sources``, ``thresh``: ``map.detection_threshold``,
``map_steps``: ``map.steps``; ``min_area`` >= 1); ``map_steps`` is refused without a
``map_prior`` (it would have no effect). A batch of no blend, or blends without detections, give
empty catalogs and images of the usual shape.
"""

from __future__ import annotations

from pathlib import Path

import btk
import numpy as np
from astropy.table import Table
from btk.blend_batch import BlendBatch, DeblendBatch, DeblendExample
from surveycodex.utilities import mean_sky_level

from deblend.core.arguments import NON_NEGATIVE_INT, POSITIVE_FLOAT, require_positive_int
from deblend.core.inference import Deblender
from deblend.core.map_fit import DEFAULT_STEPS
from deblend.core.recentre import recentred_stamps, shifted_templates
from deblend.core.stamps import nearest_pixel, paste_stamp


class VAEDeblender(btk.deblend.Deblender):
    """Detection by SEP, deblending and ellipticities by a trained :class:`Deblender`."""

    def __init__(self, model: Deblender, max_n_sources: int, detection_band: str = "i",
                 thresh: float = 1.5, min_area: int = 5, map_prior: str | None = None,
                 map_steps: int | None = None) -> None:
        """``map_steps``: Adam steps of the MAP mode (default :data:`DEFAULT_STEPS`); only with
        a ``map_prior``."""
        model.require_survey_psf("BTK's deblender interface")
        max_n_sources = require_positive_int(max_n_sources, "max_n_sources")
        thresh = POSITIVE_FLOAT.require(thresh, "thresh")
        min_area = require_positive_int(min_area, "min_area")
        super().__init__(max_n_sources)
        if map_prior not in (None, "normal", "flow"):
            raise ValueError(f"map_prior must be None, 'normal' or 'flow', got {map_prior!r}")
        if map_prior is None and map_steps is not None:
            raise ValueError("map_steps has no effect without a map_prior ('normal' or 'flow')")
        if map_prior == "flow":
            model.require_flow()
        self.map_prior = map_prior
        self.map_steps = DEFAULT_STEPS if map_steps is None else NON_NEGATIVE_INT.require(
            map_steps, "map_steps")
        if detection_band not in model.bands:
            raise ValueError(f"detection band '{detection_band}' is not a model band "
                             f"({' '.join(model.bands)})")
        self.model = model
        self.detector = btk.deblend.SepSingleBand(max_n_sources, thresh=thresh, min_area=min_area,
                                                  use_band=model.bands.index(detection_band))

    @classmethod
    def from_run(cls, run: str | Path, max_n_sources: int, **kwargs) -> "VAEDeblender":
        """Load the three stages of a training run (see :meth:`Deblender.from_run`)."""
        return cls(Deblender.from_run(run), max_n_sources, **kwargs)

    def check_batch(self, blend_batch: BlendBatch) -> None:
        """The survey's bands and pixel scale must be the model's; clear ValueError otherwise."""
        bands = tuple(blend_batch.survey.available_filters)
        if bands != self.model.bands:
            raise ValueError(f"the blend batch has bands {' '.join(bands)}, the model was trained "
                             f"on {' '.join(self.model.bands)}")
        scale = blend_batch.survey.pixel_scale.to_value("arcsec")
        if not np.isclose(scale, self.model.data.pixel_scale, rtol=1e-3):
            raise ValueError(f"the blend batch has {scale}\"/pixel, the model was trained on "
                             f"{self.model.data.pixel_scale}\"/pixel")

    def deblend(self, ii: int, blend_batch: BlendBatch) -> DeblendExample:
        """Deblend the ``ii``-th blend of the batch."""
        self.check_batch(blend_batch)
        detections = self.detector.deblend(ii, blend_batch).catalog
        return self._examples(blend_batch, [ii], [detections])[0]

    def batch_call(self, blend_batch: BlendBatch, njobs: int = 1, **kwargs) -> DeblendBatch:
        """Deblend the whole batch with one batched model call."""
        self.check_batch(blend_batch)
        indices = list(range(blend_batch.batch_size))
        detections = [self.detector.deblend(ii, blend_batch).catalog for ii in indices]
        examples = self._examples(blend_batch, indices, detections)
        n_bands, size = len(self.model.bands), blend_batch.image_size
        images = np.zeros((0, self.max_n_sources, n_bands, size, size), np.float32)
        return DeblendBatch(blend_batch.batch_size, self.max_n_sources,
                            [example.catalog for example in examples], n_bands, size, None,
                            np.array([example.deblended_images for example in examples])
                            if examples else images)

    def _examples(self, blend_batch: BlendBatch, indices: list[int],
                  detections: list[Table]) -> list[DeblendExample]:
        size = self.model.stamp_pixels
        image_size = blend_batch.image_size
        stamps, owners, centres = [], [], []
        for ii, catalog in zip(indices, detections):
            positions = np.stack([np.asarray(catalog["x_peak"], np.float64),
                                  np.asarray(catalog["y_peak"], np.float64)], axis=1)
            if len(positions):
                stamps.extend(recentred_stamps(blend_batch.blend_images[ii], positions, size))
                centres.append(positions)
            for jj, (x, y) in enumerate(positions):
                owners.append((ii, jj, *nearest_pixel(x, y)))
        n_bands = len(self.model.bands)
        images = np.zeros((len(indices), self.max_n_sources, n_bands, image_size, image_size),
                          np.float32)
        e1 = [np.zeros(len(c), np.float32) for c in detections]
        e2 = [np.zeros(len(c), np.float32) for c in detections]
        if stamps:
            reconstructions, ellipticities = self._deblend_sources(
                blend_batch, indices, detections, stamps, np.concatenate(centres))
            position = {ii: k for k, ii in enumerate(indices)}
            for (ii, jj, x, y), recon, ell in zip(owners, reconstructions, ellipticities):
                k = position[ii]
                paste_stamp(images[k, jj], recon, x, y)
                e1[k][jj], e2[k][jj] = ell
        examples = []
        for k, catalog in enumerate(detections):
            catalog = catalog.copy()
            catalog["e1"], catalog["e2"] = e1[k], e2[k]
            examples.append(DeblendExample(self.max_n_sources, catalog, n_bands, image_size,
                                           None, images[k]))
        return examples

    def _deblend_sources(self, blend_batch: BlendBatch, indices: list[int],
                         detections: list[Table], stamps: list[np.ndarray],
                         positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction and (e1, e2) of every detected source, in detection order: the
        encoder on each source's recentred stamp (its reconstruction moved back to the
        detection's (K, 2) ``positions``), or MAP deblending of each whole blend."""
        if self.map_prior is None:
            prediction = self.model.predict(np.stack(stamps))
            return (shifted_templates(prediction.reconstruction, positions),
                    prediction.ellipticity)
        survey = blend_batch.survey
        sky = np.array([mean_sky_level(survey, survey.get_filter(b)).to_value("electron")
                        for b in self.model.bands])
        positions = [np.stack([np.asarray(c["x_peak"], float), np.asarray(c["y_peak"], float)],
                              axis=1) for c in detections]
        fitted = self.model.map_deblend(blend_batch.blend_images[indices], positions, sky,
                                        prior=self.map_prior, steps=self.map_steps)
        return fitted.reconstruction, fitted.ellipticity_deblended
