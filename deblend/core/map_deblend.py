"""MAP deblending with a trained run: scenes of any size in, one fitted latent per source out.

    from deblend import Deblender
    model = Deblender.from_run("runs/quick/train")        # loads the flow too when trained
    out = model.map_deblend(scenes, positions, sky_levels, prior="flow")
    out.latent, out.reconstruction, out.flux, out.ellipticity      # one row per source
    out.ellipticity_deblended      # the regressor on the scene minus the other sources' models
    out.posterior.intervals[0.68]                         # with posterior_samples > 0

``scenes`` (N, bands, H, W) electrons, sky-subtracted (any H, W: stamps, or fields larger than
the model's stamps); ``positions`` one (K_i, 2) array of (x, y) pixel positions per scene
(x = column, y = row; e.g. from :func:`deblend.core.detection.detect_sources`), each inside
its scene: a position whose nearest pixel lies outside the scene is refused (ValueError naming
the scene, the source, the position and the scene's size), while a source near the edge is
fitted with the part of its stamp that lies in the scene (the stamp cut around it is zero
outside, its model is cropped to the scene); ``sky_levels``
(bands,) the background variance in electrons^2 per pixel (the sky level for Poisson sky),
estimated from each scene's sigma-clipped pixels when None. Each source starts from the deblender
encoder's latent of the model-sized stamp cut around it, then every latent of a scene is fitted
together (:func:`deblend.core.map_fit.fit_scenes`). The ellipticity of a source is the
regressor's reading of its MAP latent (response-calibrated like :meth:`Deblender.predict`);
its posterior comes from the Laplace approximation (:mod:`deblend.core.posterior`) pushed
through the regressor, plus the regressor's own scatter, and is calibrated the same way. MAP
moves latents off those the regressor was trained on, so
:attr:`MapPrediction.ellipticity_deblended` also reads each source from its MAP-deblended stamp
(the scene minus the other sources' MAP models) through :meth:`Deblender.predict`.

The decoder has an orientation fixed in its own frame (:mod:`deblend.core.symmetry`), so each
scene is fitted in one of the symmetric views, cycling with its index (:func:`scene_views`), and
everything but the latents is mapped back: over a catalogue the orientation averages out, as
``predict``'s 8-view average does within each stamp (MAP cannot afford 8 fits per scene).

The arguments obey the rules of the ``map`` config keys they mirror (:mod:`deblend.core.
arguments`): ``steps`` >= 0, ``learning_rate`` > 0, ``batch_size`` >= 1, ``posterior_samples``
0 or >= 2 (and > 0 only with a regressor), ``seed`` >= 0. No scene (N = 0), or scenes without
sources, give an empty, well-formed :class:`MapPrediction` (M = 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from astropy.stats import sigma_clipped_stats

from deblend.core.arguments import (
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSTERIOR_SAMPLES,
    require_positive_int,
)
from deblend.core.map_fit import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_STEPS,
    LogPrior,
    MapFit,
    SceneModel,
    SceneSources,
    fit_scenes,
    normal_log_prior,
    render_scene,
    stamp_indices,
)
from deblend.core.normalization import flux_scales, normalize
from deblend.core.posterior import (
    EllipticityPosterior,
    decoder_jacobian,
    laplace_precision,
    laplace_samples,
    prior_hessian,
)
from deblend.core.response import Response
from deblend.core.stamps import cut_stamp
from deblend.core.symmetry import (
    N_VIEWS,
    ellipticity_in_view,
    image_from_view,
    image_view,
    in_views,
    position_from_view,
    position_in_view,
)

if TYPE_CHECKING:
    from deblend.core.inference import Deblender

PRIORS = ("normal", "flow")
"""Latent priors of the MAP fit: the VAE's N(0, I), or the trained flow."""


@dataclass(frozen=True)
class MapPrediction:
    """Result of :meth:`Deblender.map_deblend`: per source (M in all), float32 numpy arrays."""

    scene: np.ndarray
    """(M,) index of each source's scene."""
    x: np.ndarray
    """(M,) pixel column of the source's stamp centre."""
    y: np.ndarray
    """(M,) pixel row."""
    latent: np.ndarray
    """(M, D) MAP latent, of the source as seen in its scene's :attr:`view`."""
    initial_latent: np.ndarray
    """(M, D) the deblender encoder's latent the fit started from (in the same view)."""
    reconstruction: np.ndarray
    """(M, bands, S, S) the decoded source at its MAP latent, electrons, centred on (x, y)."""
    ellipticity: np.ndarray | None
    """(M, 2) regressor (e1, e2) of the MAP latent (distortion, pixel frame), calibrated by the
    run's response when it has one; None without a regressor."""
    ellipticity_raw: np.ndarray | None
    """(M, 2) the regressor's own output (before the calibration)."""
    model: np.ndarray
    """(N, bands, H, W) sum of every source's reconstruction: the fitted scene."""
    objective: np.ndarray
    """(2, N) -log posterior of each scene (up to a constant) at the start and at the MAP."""
    view: np.ndarray
    """(N,) the symmetric view each scene was fitted in (:func:`scene_views`); every other
    field is mapped back to the scene's own frame, except the latents."""
    posterior: EllipticityPosterior | None = None
    """Posterior of each source's (e1, e2), when asked for: Laplace draws of the latent through
    the regressor, plus the regressor's own scatter, calibrated like :attr:`ellipticity` (raw
    draws when the run has no response)."""
    deblended: np.ndarray | None = None
    """(M, bands, S, S) electrons: the source's MAP-deblended stamp, i.e. the scene minus every
    other source's MAP model, cut around (x, y): the source with the scene's own noise."""
    ellipticity_deblended: np.ndarray | None = None
    """(M, 2) :meth:`Deblender.predict`'s ellipticity (8 views, calibrated like it) of
    :attr:`deblended`: the regressor reading an image like those it was trained on, rather than
    a latent it never saw (MAP moves latents off the encoder's). None without a regressor."""

    @property
    def flux(self) -> np.ndarray:
        """(M, bands) each reconstruction's total flux, electrons."""
        return self.reconstruction.sum(axis=(2, 3))


def estimate_sky_levels(scenes: np.ndarray) -> np.ndarray:
    """(N, bands) background variance of each scene and band (electrons^2 per pixel): the
    square of the sigma-clipped standard deviation of its pixels."""
    _, _, std = sigma_clipped_stats(scenes, axis=(2, 3), sigma=3.0, maxiters=5)
    return np.asarray(std, np.float64) ** 2


def check_positions(positions: list[np.ndarray], n_scenes: int, height: int, width: int
                    ) -> list[np.ndarray]:
    """One (K_i, 2) float array of finite (x, y) per scene, each inside its ``height`` x
    ``width`` scene (its nearest pixel in the scene); a ValueError naming what is wrong."""
    if len(positions) != n_scenes:
        raise ValueError(f"positions must hold one (K, 2) array per scene: {len(positions)} "
                         f"arrays for {n_scenes} scenes")
    checked = []
    for i, p in enumerate(positions):
        p = np.asarray(p, np.float64).reshape(-1, 2) if np.size(p) else np.zeros((0, 2))
        if not np.isfinite(p).all():
            raise ValueError(f"positions of scene {i} are not finite")
        pixel = np.floor(p + 0.5)
        outside = np.flatnonzero((pixel[:, 0] < 0) | (pixel[:, 0] >= width)
                                 | (pixel[:, 1] < 0) | (pixel[:, 1] >= height))
        if len(outside):
            k = int(outside[0])
            raise ValueError(f"positions: source {k} of scene {i} at (x, y) = "
                             f"({p[k, 0]:g}, {p[k, 1]:g}) is outside the scene of {width} x "
                             f"{height} pixels (x in [-0.5, {width - 0.5:g}), y in [-0.5, "
                             f"{height - 0.5:g})); {len(outside)} such source(s)")
        checked.append(p)
    return checked


def scene_views(n: int, height: int, width: int) -> np.ndarray:
    """(n,) the view of :mod:`deblend.core.symmetry` each of ``n`` scenes is fitted in: the 8
    views in turn for square scenes, the 4 that keep a non-square scene's shape (flips and
    half-turns) otherwise."""
    cycle = np.arange(N_VIEWS) if height == width else np.arange(0, N_VIEWS, 2)
    return cycle[np.arange(n) % len(cycle)]


def first_sources(positions: list[np.ndarray]) -> np.ndarray:
    """(N,) the row of each scene's first source (its first position) in a
    :class:`MapPrediction` of those ``positions``: sources come scene by scene, in order."""
    return np.cumsum([0] + [len(p) for p in positions])[:-1]


def map_deblend(model: Deblender, scenes: np.ndarray, positions: list[np.ndarray],
                sky_levels: np.ndarray | None = None, *, prior: str = "flow",
                steps: int = DEFAULT_STEPS, learning_rate: float = DEFAULT_LEARNING_RATE,
                batch_size: int = 32, posterior_samples: int = 0, seed: int = 0
                ) -> MapPrediction:
    """See the module docstring; :meth:`Deblender.map_deblend` calls it."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    log_prior: LogPrior = normal_log_prior if prior == "normal" else model.require_flow().log_prob
    batch_size = require_positive_int(batch_size, "batch_size")
    steps = NON_NEGATIVE_INT.require(steps, "steps")
    learning_rate = POSITIVE_FLOAT.require(learning_rate, "learning_rate")
    posterior_samples = POSTERIOR_SAMPLES.require(posterior_samples, "posterior_samples")
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    if posterior_samples and model.regressor is None:
        raise ValueError("posterior_samples > 0 needs a regressor (the posterior is the "
                         "regressor's); this deblender has none")
    array = model.check_scenes(scenes)
    n = array.shape[0]
    height, width = array.shape[-2:]
    positions = check_positions(positions, n, height, width)
    if sky_levels is None:
        sky = estimate_sky_levels(array)
        flat = np.argwhere(~(np.isfinite(sky) & (sky > 0)))
        if len(flat):
            scene, band = (int(i) for i in flat[0])
            raise ValueError(f"scene {scene} band {band} has no pixel variance (a constant or "
                             f"empty scene): its noise level cannot be estimated; give "
                             f"sky_levels (electrons^2 per pixel)")
    else:
        sky = check_sky_levels(sky_levels, n, array.shape[1])
        if not (np.isfinite(sky).all() and (sky > 0).all()):
            raise ValueError("sky_levels must be positive and finite (electrons^2 per pixel)")
    views = scene_views(n, height, width)
    viewed = in_views(array, views, image_view)
    in_view = [position_in_view(np.floor(p + 0.5), int(v), height, width)
               for p, v in zip(positions, views)]
    scene_model = SceneModel(model.decoder, model.normalization)
    generator = torch.Generator().manual_seed(seed)
    parts: list[dict[str, np.ndarray]] = []
    models = np.zeros_like(array)
    objective = np.zeros((2, n), np.float32)
    nonfinite = np.zeros(n, bool)
    for start in range(0, max(n, 1), batch_size):  # no scene: one empty batch
        part = slice(start, start + batch_size)
        fitted = _fit_batch(model, scene_model, viewed[part], in_view[part], sky[part],
                            log_prior, steps, learning_rate, posterior_samples, generator)
        fitted["scene"] += start
        models[part] = fitted.pop("model")
        objective[:, part] = fitted.pop("objective")
        nonfinite[part] = fitted.pop("nonfinite")
        parts.append(fitted)
    if nonfinite.any():
        warnings.warn(f"MAP: {int(nonfinite.sum())} of {n} scenes had a non-finite objective or "
                      f"gradient ({prior} prior): latents the decoder or the prior cannot "
                      "handle, such as a flow evaluated far from the latents it was trained on. "
                      "Those steps were not followed; the scenes may have kept their starting "
                      "latents.",
                      RuntimeWarning, stacklevel=3)
    joined = {key: np.concatenate([p[key] for p in parts], axis=1 if key == "samples" else 0)
              for key in parts[0]}
    models = in_views(models, views, image_from_view)
    source_views = views[joined["scene"]]
    joined["reconstruction"] = in_views(joined["reconstruction"], source_views, image_from_view)
    xy = np.stack([joined["x"], joined["y"]], axis=1)
    for view in np.unique(source_views):
        rows = source_views == view
        xy[rows] = np.rint(position_from_view(xy[rows], int(view), height, width))
    joined["x"], joined["y"] = xy[:, 0], xy[:, 1]
    if "ellipticity_raw" in joined:
        joined["ellipticity_raw"] = in_views(joined["ellipticity_raw"], source_views,
                                              ellipticity_in_view)
    if "samples" in joined:
        joined["samples"] = in_views(joined["samples"].transpose(1, 0, 2), source_views,
                                      ellipticity_in_view).transpose(1, 0, 2)
    raw = joined.get("ellipticity_raw")
    calibrated = raw
    if raw is not None and model.response is not None:
        calibrated = model.response.calibrate(raw)
    posterior = None
    if posterior_samples > 0 and raw is not None:
        samples = joined["samples"]
        if model.response is not None:
            samples = calibrated_samples(samples, model.response, generator)
        posterior = EllipticityPosterior.from_samples(samples)
    deblended = deblended_stamps(array - models, joined["scene"], joined["x"], joined["y"],
                                 joined["reconstruction"])
    e_deblended = None
    if model.regressor is not None:
        e_deblended = model.predict(deblended, batch_size=256, reconstruct=False).ellipticity
    return MapPrediction(joined["scene"], joined["x"], joined["y"], joined["latent"],
                         joined["initial_latent"], joined["reconstruction"], calibrated,
                         raw if model.response is not None else None, models, objective,
                         views, posterior, deblended, e_deblended)


def check_sky_levels(sky_levels: np.ndarray, n_scenes: int, n_bands: int) -> np.ndarray:
    """(N, bands) float64 sky levels from (bands,) or (N, bands) ``sky_levels``; a ValueError
    naming the argument when the shape fits neither."""
    sky = np.asarray(sky_levels, np.float64)
    if sky.shape not in ((n_bands,), (n_scenes, n_bands)):
        raise ValueError(f"sky_levels must have shape ({n_bands},) or ({n_scenes}, {n_bands}), "
                         f"got {sky.shape}")
    return np.broadcast_to(sky, (n_scenes, n_bands)).copy()


def calibrated_samples(samples: np.ndarray, response: Response,
                       generator: torch.Generator) -> np.ndarray:
    """(n, M, 2) regressor samples as calibrated ellipticities, with the regressor's own error.

    Each raw sample gets a draw of the regressor's scatter about its response line (measured on
    the calibration split, :attr:`Response.scatter`; the latent's posterior alone leaves it out)
    and is then calibrated like :attr:`MapPrediction.ellipticity`."""
    n, m, _ = samples.shape
    raw = np.asarray(samples, np.float64).reshape(n * m, 2)
    if response.scatter is not None:
        noise = torch.randn(n * m, 2, generator=generator, dtype=torch.float64).numpy()
        raw = raw + noise * response.scatter
    return response.calibrate(raw).reshape(n, m, 2)


def deblended_stamps(residuals: np.ndarray, scene: np.ndarray, x: np.ndarray, y: np.ndarray,
                     reconstructions: np.ndarray) -> np.ndarray:
    """(M, bands, S, S) each source's stamp of its scene's residual (scene minus the fitted
    model of every source, (N, bands, H, W)) around its centre (x, y), plus its own
    reconstruction: the scene as it would be without the other sources, noise included."""
    size = reconstructions.shape[-1]
    out = np.empty_like(reconstructions)
    for j, (i, cx, cy) in enumerate(zip(scene, x, y)):
        out[j] = cut_stamp(residuals[i], float(cx), float(cy), size) + reconstructions[j]
    return out


def _fit_batch(model: Deblender, scene_model: SceneModel, scenes: np.ndarray,
               positions: list[np.ndarray], sky: np.ndarray, log_prior: LogPrior, steps: int,
               learning_rate: float, posterior_samples: int, generator: torch.Generator
               ) -> dict[str, np.ndarray]:
    device, size = model.device, model.stamp_pixels
    sources = SceneSources.from_lists([torch.from_numpy(p) for p in positions], device)
    n, k = sources.mask.shape
    owners = sources.mask.cpu().numpy()
    grid = sources.positions.cpu().numpy()
    stamps = [cut_stamp(scenes[i], *grid[i, j], size) for i, j in zip(*np.nonzero(owners))]
    z0 = torch.zeros(n, k, model.latent_dim, device=device)
    first = np.stack(stamps) if stamps else None
    if first is not None:
        mu = model.predict(first, views=1, reconstruct=False).mu
        z0[torch.from_numpy(owners).to(device)] = torch.from_numpy(mu).to(device)
    if model.normalization.stamp_scale:  # each source decoded at its first stamp's scale
        scales = np.ones(0) if first is None else flux_scales(first, model.normalization)
        sources = sources.with_flux_scales(torch.from_numpy(scales))
    images = torch.from_numpy(scenes).to(device)
    sky_t = torch.from_numpy(sky).to(device)
    fit = fit_scenes(scene_model, images, sources, z0, sky_t, log_prior, steps, learning_rate)
    mask = sources.mask
    out: dict[str, np.ndarray] = {
        "scene": np.nonzero(owners)[0].astype(np.int64),
        "x": grid[..., 0][owners].astype(np.int64), "y": grid[..., 1][owners].astype(np.int64),
        "latent": fit.z[mask].detach().float().cpu().numpy(),
        "initial_latent": z0[mask].float().cpu().numpy(),
        "reconstruction": fit.stamps[mask].float().cpu().numpy(),
        "objective": fit.objective[[0, -1]].float().cpu().numpy(),
        "nonfinite": fit.nonfinite_gradient.cpu().numpy(),
    }
    with torch.no_grad():
        out["model"] = render_scene(fit.stamps, sources, scenes.shape[-2],
                                    scenes.shape[-1]).float().cpu().numpy()
        features = source_features(model, stamps)
        if model.regressor is not None:
            out["ellipticity_raw"] = model.regressor(fit.z[mask], features).float().cpu().numpy()
    if posterior_samples > 0 and model.regressor is not None and not mask.any():
        out["samples"] = np.zeros((posterior_samples, 0, 2), np.float32)
    elif posterior_samples > 0 and model.regressor is not None:
        out["samples"] = _posterior_samples(model, scene_model, fit, sources, log_prior,
                                            posterior_samples, generator, features)
    return out


def source_features(model: Deblender, stamps: list[np.ndarray]) -> torch.Tensor | None:
    """The regressor's stamp features (:meth:`Regressor.stamp_features`) of each source's raw
    blend stamp, as in training (the stamp the encoder's first guess was read from), in source
    order; None when the regressor reads mu alone."""
    regressor = model.regressor
    if regressor is None or not regressor.reads_stamps:
        return None
    size = model.stamp_pixels
    raw = np.stack(stamps) if stamps else np.zeros((0, len(model.bands), size, size), np.float32)
    x = torch.from_numpy(normalize(raw.astype(np.float32), model.normalization))  # own scales
    return regressor.stamp_features(x.to(model.device))


def _posterior_samples(model: Deblender, scene_model: SceneModel, fit: MapFit,
                       sources: SceneSources, log_prior: LogPrior, n_samples: int,
                       generator: torch.Generator, features: torch.Tensor | None
                       ) -> np.ndarray:
    """(n_samples, M, 2) regressor outputs of Laplace draws around each source's MAP latent,
    under the fit's own pixel weights; ``features``: :func:`source_features`, the same for
    every draw of a source."""
    mask = sources.mask
    z = fit.z[mask].detach()
    size = model.stamp_pixels
    half = size // 2
    padded = torch.nn.functional.pad(fit.inverse_variance, (half, half, half, half))  # 0 outside
    index = stamp_indices(sources.positions, size, fit.inverse_variance.shape[-1])  # (N, K, S*S)
    n, bands = fit.inverse_variance.shape[:2]
    flat = padded.reshape(n, bands, -1)
    weights = torch.stack([flat.gather(2, index[:, k, None, :].expand(n, bands, -1))
                           for k in range(index.shape[1])], dim=1)  # (N, K, B, S*S)
    weights = weights[mask].reshape(z.shape[0], -1)
    jacobian = decoder_jacobian(lambda v: scene_model.stamps(v, scale=v.new_ones(len(v))), z)
    if sources.flux_scale is not None:  # a stamp is linear in its flux scale
        jacobian = jacobian * sources.flux_scale[mask].to(jacobian)[:, None, None]
    precision = laplace_precision(jacobian.double(), weights.double(),
                                  prior_hessian(log_prior, z).double())
    draws = laplace_samples(z.double(), precision, n_samples, generator).float()
    with torch.no_grad():
        repeated = None if features is None else features.repeat(n_samples, 1)
        e = model.regressor(draws.reshape(-1, z.shape[1]), repeated).reshape(
            n_samples, z.shape[0], 2)
    return e.cpu().numpy()
