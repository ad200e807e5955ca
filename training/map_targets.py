"""The targets of the ``amortize`` stage: the flow-MAP latent of each training blend's target.

MAP deblending (:mod:`deblend.core.map_deblend`) fits every detected source's latent under the
pixel likelihood and the flow prior; it keeps the flux and shapes that the stage2 encoder loses
(it regresses towards its training population's sizes at fixed magnitude, and its loss optimum
sits about 6% low in flux), but it costs about 40 ms per galaxy. The ``amortize`` stage trains an
encoder to output, from the blend alone, the latent MAP finds for its central galaxy. That target
is a function of the input, not of the hidden truth, so the encoder has no mean to regress to.

:func:`fit_map_targets` fits them once per (stage2 encoder, flow, MAP settings): SEP detections
(BTK's, :func:`deblend.core.detection.detect_sources`) plus the known centre, ``map.steps`` Adam
steps at ``map.learning_rate``. They are cached chunk by chunk in ``R/amortize/map_targets/``
(:mod:`deblend.core.chunk_cache`): an interrupted stage resumes from the chunks written, and a
chunk made by other networks or settings is fitted again. MAP fits each blend in one of the 8
symmetric views (cycling within the chunk, :func:`deblend.core.map_deblend.scene_views`), and its
latent is that of the target *as seen in that view*, so :attr:`LatentTargets.view` travels with
the latent and the stage shows the encoder the blend in that view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deblend.core.chunk_cache import chunk_key, read_chunk, write_chunk
from deblend.core.config import MapConfig
from deblend.core.detection import detect_around_target
from deblend.core.inference import Deblender
from deblend.core.map_deblend import first_sources
from simulation.dataset import StampData


@dataclass(frozen=True)
class LatentTargets:
    """Per dataset sample: the MAP latent of its target and the view it was fitted in."""

    latent: np.ndarray
    """(n_samples, D) float32, NaN for samples whose target was not fitted."""
    view: np.ndarray
    """(n_samples,) int64 view of :mod:`deblend.core.symmetry` (-1 where not fitted)."""

    def check_fitted(self, indices: np.ndarray) -> None:
        """A ValueError naming the first of ``indices`` without a finite target."""
        bad = ~np.isfinite(self.latent[indices]).all(axis=1)
        if bad.any():
            raise ValueError(f"sample {int(indices[np.argmax(bad)])} has no finite MAP target "
                             "latent")


def fit_map_targets(model: Deblender, dataset: StampData, indices: np.ndarray,
                    settings: MapConfig, directory: Path, identity: dict[str, Any], *,
                    chunk: int = 500, share: tuple[int, int] = (0, 1), progress: bool = True,
                    log: Callable[[str], None] = print) -> LatentTargets:
    """The flow-MAP latent of the target of every blend in ``indices`` (see the module doc).

    ``model`` holds the stage2 encoder (the starting latents), the decoder and the flow;
    ``identity`` names what the targets depend on (the networks' SHA-256s), and goes with the
    MAP settings and the chunk's indices into each chunk's key; ``chunk`` blends are fitted and
    cached together. With ``share`` = (k, n) only the chunks numbered k, k + n, ... are read or
    fitted (process k of n; the others stay NaN)."""
    model.require_flow()
    part_of_share = share[1] > 1
    indices = np.asarray(indices, np.int64)
    latent = np.full((dataset.n_samples, model.latent_dim), np.nan, np.float32)
    view = np.full(dataset.n_samples, -1, np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    centre = float(dataset.stamp_pixels // 2)
    setting = {key: getattr(settings, key) for key in ("steps", "learning_rate", "detection_band",
                                                       "detection_threshold", "max_sources")}
    parts = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
    bar = tqdm(total=len(indices), unit="blend", desc="MAP targets", disable=not progress)
    fitted = 0
    for number, part in enumerate(parts):
        if number % share[1] != share[0]:
            bar.update(len(part))
            continue
        path = directory / f"chunk_{number:05d}.npz"
        key = chunk_key({**identity, **setting, "indices": part.tolist()})
        arrays = read_chunk(path, key)
        if arrays is None:
            arrays = _fit_chunk(model, dataset, part, settings, centre)
            write_chunk(path, key, arrays)
            fitted += len(part)
        latent[part], view[part] = arrays["latent"], arrays["view"]
        bar.update(len(part))
        if not progress and number + 1 < len(parts):
            log(f"MAP targets: {number * chunk + len(part)}/{len(indices)} blends")
    bar.close()
    if part_of_share:
        log(f"MAP targets: {fitted} blends fitted by process {share[0]} of {share[1]}")
    else:
        log(f"MAP targets: {len(indices)} blends ({fitted} fitted now, "
            f"{len(indices) - fitted} from {directory})")
    return LatentTargets(latent, view)


def _fit_chunk(model: Deblender, dataset: StampData, part: np.ndarray, settings: MapConfig,
               centre: float) -> dict[str, np.ndarray]:
    """MAP latents (and views) of the targets of the blends ``part``: one chunk."""
    blends = dataset.images("blend", part)
    positions = detect_around_target(blends, dataset.survey, dataset.bands, (centre, centre),
                                     settings.detection_band, settings.detection_threshold,
                                     settings.max_sources)
    out = model.map_deblend(blends, positions, None, prior="flow", steps=settings.steps,
                            learning_rate=settings.learning_rate,
                            batch_size=settings.batch_size)
    first = first_sources(positions)
    if not (np.array_equal(out.scene[first], np.arange(len(part)))
            and np.allclose(out.x[first], centre) and np.allclose(out.y[first], centre)):
        raise RuntimeError("MAP returned the sources of a scene out of order: the target is not "
                           "the first source of each scene")
    return {"latent": out.latent[first].astype(np.float32), "view": out.view.astype(np.int64)}
