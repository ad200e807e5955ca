"""Inference with a trained run: deblend raw stamps and read ellipticities from the latent space.

    from deblend import Deblender
    model = Deblender.from_run("runs/quick/train")
    out = model.predict(stamps)      # stamps: (N, bands, 45, 45) raw flux (electrons), numpy
    out.reconstruction               # (N, bands, 45, 45) central galaxy, raw flux, noiseless,
                                     # averaged over the stamp's 8 symmetric views
    out.mu, out.sigma                # (N, latent_dim) mean and standard deviation of q(z|x)
    out.ellipticity                  # (N, 2) regressor's (e1, e2): distortion, pixel frame
    out.ellipticity_raw              # (N, 2) the same before the response calibration

With each band's PSF image (datasets store them: ``StampData.psf_images``), the deblender
also runs on the five metacalibration images of every stamp (:mod:`deblend.core.metacal`)::

    mc = model.metacal(stamps, psfs)  # psfs: (bands, S, S) effective PSF images
    mc.ellipticity                    # (N, 2) raw regressor on the noshear images
    mc.response                       # (N, 2, 2) its per-object shear response
    # population shear: deblend.core.metacal.population_shear(mc.ellipticity, mc.response)

Stamps are normalised with the constants the run was trained with (SPEC 3) and the
reconstruction is denormalised back to raw flux; all arrays are float32. ``ellipticity`` is the
regressor averaged over the stamp's 8 symmetric views (:mod:`deblend.core.symmetry`), with its
response (measured on the calibration split at the end of stage3) divided out
(:mod:`deblend.core.response`). That split-fitted response is kept for per-object ellipticities on
the training population (the comparisons with truth labels); it does not transfer to other
populations, so shear uses the metacal response measured on each stamp's own images instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table
from torch import Tensor

from deblend.core import arguments
from deblend.core.arguments import VIEWS, require_positive_int
from deblend.core.cell_measure import measure_cells
from deblend.core.cells import CellImage
from deblend.core.device import resolve_device
from deblend.core.flow import LatentFlow
from deblend.core.map_deblend import MapPrediction, map_deblend
from deblend.core.map_fit import DEFAULT_LEARNING_RATE, DEFAULT_STEPS
from deblend.core.metadetect import WALK_VIEWS, MetadetectSettings
from deblend.core.metacal import (
    DEFAULT_DELTA,
    MetacalOperator,
    check_psf_images,
    metacal_response,
    target_sigmas,
)
from deblend.core.networks import Decoder, Encoder, Regressor
from deblend.core.normalization import (
    NormalizationConstants,
    denormalize,
    flux_scales,
    normalize,
)
from deblend.core.response import Response
from deblend.core.runs import (
    DataIdentity,
    RunError,
    RunLayout,
    build_module,
    load_lineage,
    run_config,
)
from deblend.core.sky_plane import held_metacal, sky_plane
from deblend.core.symmetry import (
    N_VIEWS,
    ellipticity_in_view,
    image_from_view,
    image_view,
)

KEPT_OPERATORS = 3
"""Metacal operators kept in a process, whichever :class:`Deblender` built them (one per set of
PSFs, delta, stamp sizes, target and device): building one takes 5-25 s on a CPU, and the steps
of a job (benchmark rows, reports) each load their own Deblender of the same run."""
_OPERATORS: dict[tuple, MetacalOperator] = {}
"""The kept operators, most recently used last."""
VIEW_COUNTS = arguments.VIEW_COUNTS
"""How many symmetric views the regressor may be averaged over (the rule :data:`deblend.core.
arguments.VIEWS`, shared with the config's ``views`` keys)."""
FINAL_STAGE = "stage3"
"""The stage whose lineage makes the full deblender (stage3 -> stage2 -> stage1)."""
FLOW_STAGE = "flow"
"""The stage that fits the latent prior of the MAP deblender (on the same stage1)."""


def release_metacal_operators() -> None:
    """Drop every kept metacal operator (their memory; the next use builds afresh)."""
    _OPERATORS.clear()


@dataclass(frozen=True)
class Prediction:
    """Batched output of :meth:`Deblender.predict`; float32 numpy arrays."""

    reconstruction: np.ndarray | None
    """(N, bands, H, W) reconstructed central galaxy in raw flux units (electrons); None when
    :meth:`Deblender.predict` was asked not to decode (``reconstruct=False``)."""
    mu: np.ndarray
    """(N, latent_dim) latent mean."""
    sigma: np.ndarray
    """(N, latent_dim) latent standard deviation, exp(logvar / 2)."""
    ellipticity: np.ndarray | None
    """(N, 2) regressor (e1, e2), response-calibrated when the run has a response; None without
    a regressor (stage1 encoder)."""
    ellipticity_raw: np.ndarray | None = None
    """(N, 2) regressor output before the calibration, in [-1, 1]; None when uncalibrated."""

    @property
    def regressor_output(self) -> np.ndarray | None:
        """(N, 2) the regressor's own output, before any calibration; None without a regressor."""
        return self.ellipticity if self.ellipticity_raw is None else self.ellipticity_raw

    @property
    def e1(self) -> np.ndarray | None:
        """(N,) regressor e1 (distortion, pixel frame), or None."""
        return None if self.ellipticity is None else self.ellipticity[:, 0]

    @property
    def e2(self) -> np.ndarray | None:
        """(N,) regressor e2 (distortion, pixel frame), or None."""
        return None if self.ellipticity is None else self.ellipticity[:, 1]


@dataclass(frozen=True)
class MetacalPrediction:
    """:meth:`Deblender.predict` of the five metacal images of each stamp."""

    images: dict[str, Prediction]
    """Keyed by :data:`deblend.core.metacal.METACAL_SHEARS` (noshear, 1p, 1m, 2p, 2m)."""
    delta: float
    inputs: dict[str, np.ndarray] | None = None
    """The metacal images themselves (raw flux, float32), when asked for with ``keep_inputs``."""

    @property
    def ellipticity(self) -> np.ndarray:
        """(N, 2) the regressor's own output (before any calibration) on the noshear images."""
        e = self.images["noshear"].regressor_output
        if e is None:
            raise ValueError("this deblender has no regressor")
        return e

    @property
    def response(self) -> np.ndarray:
        """(N, 2, 2) per-object metacal response of the regressor's own output."""
        outputs = {name: p.regressor_output for name, p in self.images.items()}
        if any(e is None for e in outputs.values()):
            raise ValueError("this deblender has no regressor")
        return metacal_response(outputs, self.delta)  # type: ignore[arg-type]


class Deblender:
    """Encoder + decoder (+ regressor) of a run, with the normalisation they were trained with."""

    def __init__(self, encoder: Encoder, decoder: Decoder, regressor: Regressor | None,
                 data: DataIdentity, device: torch.device | str = "cpu",
                 response: Response | None = None, flow: LatentFlow | None = None,
                 metacal_target_fwhm: float | Sequence[float] | None = None,
                 metacal_hold_sky_plane: bool = False) -> None:
        stamp_keys = ("n_bands", "stamp_size", "latent_dim")
        if any(encoder.hparams()[key] != decoder.hparams()[key] for key in stamp_keys):
            raise ValueError(f"encoder {encoder.hparams()} and decoder {decoder.hparams()} differ")
        if len(data.bands) != encoder.n_bands or data.stamp_pixels != encoder.stamp_size:
            raise ValueError("the data identity does not match the networks' bands or stamp size")
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)
        self.decoder = decoder.eval().to(self.device)
        self.regressor = None if regressor is None else regressor.eval().to(self.device)
        self.data = data
        """The dataset the networks were trained on (bands, stamp size, pixel scale, ...)."""
        self.response = response if regressor is not None else None
        """The regressor's response divided out of ``Prediction.ellipticity`` (None: raw)."""
        if flow is not None and flow.latent_dim != encoder.latent_dim:
            raise ValueError(f"the flow has latent size {flow.latent_dim}, the encoder "
                             f"{encoder.latent_dim}")
        self.flow = None if flow is None else flow.eval().to(self.device)
        """The latent prior of :meth:`map_deblend` (None: the run has no trained flow)."""
        target_sigmas(metacal_target_fwhm, len(data.bands), data.pixel_scale)  # checks it
        self.metacal_target_fwhm = metacal_target_fwhm
        """FWHM (arcsec, one or one per band) of the round Gaussian metacal reconvolves to
        by default: the run's ``metacal.target_psf_fwhm`` (None: :meth:`target_fwhm`'s next
        choice)."""
        self.metacal_hold_sky_plane = bool(metacal_hold_sky_plane)
        """Whether metacal holds each image's sky plane out of its shear by default: the run's
        ``metacal.hold_sky_plane``."""

    @classmethod
    def from_run(cls, run: str | Path, *, stage: str = FINAL_STAGE,
                 device: str = "auto") -> "Deblender":
        """Load the networks of ``stage`` of a training run and of its ancestors.

        Each network (encoder, decoder, regressor) is taken from the nearest stage of the
        lineage that trained one: for ``stage3`` (the default) the amortize encoder when the run
        trained one (``training.amortized_map``), else the stage2 encoder, the stage1 decoder and
        the stage3 regressor; ``stage="stage1"`` gives the stage1 VAE alone (no
        regressor, so ``ellipticity`` is None). Refuses stages that are missing, unfinished, or
        were trained on another version of their parent stage.
        """
        layout = RunLayout(Path(run))
        if not layout.root.is_dir():
            raise RunError(f"run directory not found: {layout.root}")
        stages = load_lineage(layout, stage, needed_by="Deblender.from_run")
        lineage = [payload for payload, _ in stages.values()]
        nearest: dict[str, dict] = {}
        for payload in lineage:
            for name, entry in payload["modules"].items():
                nearest.setdefault(name, {"entry": entry, "payload": payload})
        for name in ("encoder", "decoder"):
            if name not in nearest:
                raise RunError(f"{stage} in {layout.root} and its parents have no {name}")
        regressor, response = None, None
        if "regressor" in nearest:
            regressor = build_module(nearest["regressor"]["entry"])
            entry = nearest["regressor"]["payload"].get("response") or {}
            if entry.get("status") == "calibrated":
                response = Response.from_dict(entry)
        metacal = run_config(layout.root).metacal
        return cls(build_module(nearest["encoder"]["entry"]),
                   build_module(nearest["decoder"]["entry"]), regressor,
                   DataIdentity.from_dict(nearest["encoder"]["payload"]["data"]),
                   resolve_device(device), response, _lineage_flow(layout, stages),
                   metacal.target_psf_fwhm, metacal.hold_sky_plane)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.data.bands

    def require_flow(self) -> LatentFlow:
        """The trained flow prior, or a RunError saying how to train it."""
        if self.flow is None:
            raise RunError("this deblender has no latent flow: train it with `python -m "
                           "deblend.train flow --run RUN` (or use prior='normal')")
        return self.flow

    @property
    def stamp_pixels(self) -> int:
        return self.data.stamp_pixels

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def normalization(self) -> NormalizationConstants:
        return self.data.normalization

    def check_images(self, images: np.ndarray, margin: bool = False,
                     available: np.ndarray | None = None) -> np.ndarray:
        """``images`` as float32 (N, bands, H, W), or a ValueError naming what is wrong.

        With ``margin``, stamps larger than the model's (by an even number of pixels, centred on
        the same target) are accepted too: metacalibration's input. ``available``
        (:func:`fill_missing_bands`) fills the bands it marks missing with 0 (a copy)."""
        if isinstance(images, torch.Tensor):
            raise ValueError("images must be a numpy array (use tensor.cpu().numpy())")
        array = np.asarray(images)
        if array.dtype.kind not in "fiu":
            raise ValueError(f"images must be numeric, got dtype {array.dtype}")
        n_bands, size = len(self.bands), self.stamp_pixels
        expected = f"(N, {n_bands}, {size}, {size})"
        if array.ndim != 4:
            raise ValueError(f"images must have shape {expected}, got {array.ndim}-D shape "
                             f"{array.shape}")
        if array.shape[1] != n_bands:
            raise ValueError(f"images have {array.shape[1]} bands, the model expects {n_bands} "
                             f"({' '.join(self.bands)}); shape {array.shape}, expected {expected}")
        side = array.shape[2]
        fits = (array.shape[3] == side and side >= size and (side - size) % 2 == 0) if margin \
            else array.shape[2:] == (size, size)
        if not fits:
            wanted = f"{size}x{size}" + (" or larger by an even number, square" if margin else "")
            raise ValueError(f"images are {array.shape[2]}x{array.shape[3]} pixels, the model "
                             f"expects {wanted}; shape {array.shape}, expected {expected}")
        if available is not None:
            array = fill_missing_bands(array, available, self.bands)
        return check_finite(array.astype(np.float32, copy=False), self.bands)

    def check_scenes(self, scenes: np.ndarray) -> np.ndarray:
        """Scenes of any size (N, bands, H, W) as float32, or a ValueError naming what is wrong
        (type, bands, dimensions, non-finite pixels)."""
        if isinstance(scenes, torch.Tensor):
            raise ValueError("scenes must be a numpy array (use tensor.cpu().numpy())")
        array = np.asarray(scenes)
        if array.dtype.kind not in "fiu":
            raise ValueError(f"scenes must be numeric, got dtype {array.dtype}")
        if array.ndim != 4 or array.shape[1] != len(self.bands):
            raise ValueError(f"scenes must have shape (N, {len(self.bands)}, H, W) (bands "
                             f"{' '.join(self.bands)}), got shape {array.shape}")
        return check_finite(array.astype(np.float32, copy=False), self.bands)

    def map_deblend(self, scenes: np.ndarray, positions: list[np.ndarray],
                    sky_levels: np.ndarray | None = None, *, prior: str = "flow",
                    steps: int = DEFAULT_STEPS,
                    learning_rate: float = DEFAULT_LEARNING_RATE, batch_size: int = 32,
                    posterior_samples: int = 0, seed: int = 0) -> MapPrediction:
        """MAP latents of every source of raw scenes (N, bands, H, W) at ``positions`` (one
        (K_i, 2) array of (x, y) pixels per scene), under the pixel likelihood and ``prior``
        ("flow" or "normal"); see :mod:`deblend.core.map_deblend`. ``posterior_samples`` > 0
        adds the Laplace posterior of each source's regressor (e1, e2), drawn from ``seed``.
        A position outside its scene is refused (ValueError naming it); a source near the edge
        is fitted with the part of its stamp inside the scene. No scene, or scenes without
        sources, give an empty result."""
        return map_deblend(self, scenes, positions, sky_levels, prior=prior, steps=steps,
                           learning_rate=learning_rate, batch_size=batch_size,
                           posterior_samples=posterior_samples, seed=seed)

    def view_latents(self, x: Tensor, mu: Tensor, views: int) -> list[Tensor]:
        """Latent means of the first ``views`` symmetric views of normalised stamps ``x``
        (:mod:`deblend.core.symmetry`); ``mu``, the latent mean of ``x`` itself (view 0), is
        already computed by the caller."""
        return [mu] + [self.encoder(image_view(x, view))[0] for view in range(1, views)]

    def symmetrized_ellipticity(self, x: Tensor, view_mu: list[Tensor]) -> Tensor:
        """Raw regressor (e1, e2) averaged over the views whose latents are ``view_mu``
        (:meth:`view_latents` of normalised stamps ``x``), each output mapped back to the
        stamps' frame first; a regressor that reads the stamps' moments reads those of the same
        view. float32."""
        regressor = self.regressor
        assert regressor is not None
        total = torch.zeros(x.shape[0], 2, device=x.device)
        for view, view_mu_v in enumerate(view_mu):
            features = (regressor.stamp_features(image_view(x, view)) if regressor.reads_stamps
                        else None)
            total += ellipticity_in_view(regressor(view_mu_v, features).float(), view)
        return total / len(view_mu)

    def symmetrized_reconstruction(self, view_mu: list[Tensor], scale: np.ndarray | None = None
                                   ) -> Tensor:
        """Raw-flux reconstruction averaged over the views whose latents are ``view_mu``: each
        view is decoded, denormalised (with the stamps' flux ``scale``, one per stamp, used when
        the normalisation has per-stamp scales: the same in every view) and mapped back to the
        stamps' frame, then averaged in raw flux. With all 8 views this removes the decoder's
        preferred orientation (it is fixed in the networks' frame, so it averages out); float32."""
        norm = self.normalization
        total = denormalize(self.decoder(view_mu[0]).float(), norm, scale)
        for view, view_mu_v in enumerate(view_mu[1:], start=1):
            total += image_from_view(
                denormalize(self.decoder(view_mu_v).float(), norm, scale), view)
        return total / len(view_mu)

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 256, views: int = N_VIEWS,
                reconstruct: bool = True, reconstruction_views: int = N_VIEWS,
                available: np.ndarray | None = None) -> Prediction:
        """Deblend raw-flux stamps (N, bands, H, W), ``batch_size`` stamps at a time.

        Each of the stamp's symmetric views (:mod:`deblend.core.symmetry`) is encoded once. The
        ellipticity is the regressor's average over the first ``views`` of them (default all 8;
        a regressor that reads the stamp's moments, ``model.regressor_moments``, reads each
        view's own), calibrated by the run's response. The reconstruction decodes z = mu (no sampling) of the
        first ``reconstruction_views`` views and averages them mapped back, in raw flux (default
        all 8, which removes the decoder's preferred orientation; 1 is the plain decoding of
        the stamp). ``reconstruct=False`` skips the decoder, which costs about three encoders
        per view. ``mu`` and ``sigma`` are those of the stamp itself. See :class:`Prediction`.
        ``views`` has no effect without a regressor, nor ``reconstruction_views`` with
        ``reconstruct=False`` (both are still checked). No stamp (N = 0) gives empty arrays.
        ``available``: which bands each stamp has (:func:`fill_missing_bands`); a missing band
        may hold anything, NaN included, and is shown to the networks as 0 (no flux above the
        sky). The networks were trained with every band present: their output degrades with a
        band missing (``python -m benchmarks.conditions``).
        """
        batch_size, views, reconstruction_views = self.check_batching(
            batch_size, views, reconstruction_views)
        array = self.check_images(images, available=available)
        n = array.shape[0]
        reconstruction = np.empty_like(array) if reconstruct else None
        mu = np.empty((n, self.latent_dim), np.float32)
        sigma = np.empty_like(mu)
        ellipticity = None if self.regressor is None else np.empty((n, 2), np.float32)
        n_views = max(views if ellipticity is not None else 1,
                      reconstruction_views if reconstruct else 1)
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            scale = flux_scales(array[part], self.normalization)
            x = torch.from_numpy(normalize(array[part], self.normalization, scale)).to(
                self.device)
            batch_mu, logvar = self.encoder(x)
            view_mu = self.view_latents(x, batch_mu, n_views)
            if reconstruction is not None:
                reconstruction[part] = self.symmetrized_reconstruction(
                    view_mu[:reconstruction_views], scale).cpu().numpy()
            mu[part] = batch_mu.float().cpu().numpy()
            sigma[part] = torch.exp(0.5 * logvar).float().cpu().numpy()
            if ellipticity is not None:
                ellipticity[part] = self.symmetrized_ellipticity(x, view_mu[:views]).cpu().numpy()
        if ellipticity is None or self.response is None:
            return Prediction(reconstruction, mu, sigma, ellipticity)
        return Prediction(reconstruction, mu, sigma, self.response.calibrate(ellipticity),
                          ellipticity)

    @staticmethod
    def check_batching(batch_size: int, views: int, reconstruction_views: int
                       ) -> tuple[int, int, int]:
        """:meth:`predict`'s batch size and view counts by the library's rules (those of
        ``evaluation.batch_size`` and ``metacal.views``), or a ValueError naming the argument."""
        return (require_positive_int(batch_size, "batch_size"), VIEWS.require(views, "views"),
                VIEWS.require(reconstruction_views, "reconstruction_views"))

    def target_fwhm(self, target_fwhm: float | Sequence[float] | None = None
                    ) -> float | tuple[float, ...] | None:
        """The FWHM (arcsec, one or one per band) of the round Gaussian metacal reconvolves
        to: ``target_fwhm`` when given, else the run's ``metacal.target_psf_fwhm``, else the
        one the training images were homogenised to (``simulation.target_psf_fwhm``); None
        when none is set (each band's narrowest Gaussian its PSF allows)."""
        for choice in (target_fwhm, self.metacal_target_fwhm, self.data.target_psf_fwhm):
            if choice is not None:
                return choice if np.ndim(choice) == 0 else tuple(choice)
        return None

    def require_survey_psf(self, what: str) -> None:
        """Refuse to let ``what`` give the networks images at the survey's own PSF when they were
        trained on images homogenised to a round target PSF (``simulation.target_psf_fwhm``):
        they would be shown a sky they never saw. Metacal's images are at the target, so such a
        model is measured through metacal (a ValueError saying so)."""
        if self.data.target_psf_fwhm is not None:
            raise ValueError(
                f"{what} gives the networks images at the survey's PSF, but this model was "
                f"trained on images homogenised to a round PSF of FWHM "
                f"{self.data.target_psf_fwhm} arcsec (simulation.target_psf_fwhm): measure it "
                f"through metacal, whose images are at that target (python -m "
                f"benchmarks.metacal, benchmarks.conditions, deblend measure)")

    def target_sigma(self, target_fwhm: float | Sequence[float] | None = None
                     ) -> tuple[float, ...] | None:
        """Metacal's reconvolution sigma per band (pixels) of :meth:`target_fwhm`."""
        return target_sigmas(self.target_fwhm(target_fwhm), len(self.bands),
                             self.data.pixel_scale)

    def metacal_operator(self, psfs: np.ndarray, delta: float = DEFAULT_DELTA,
                         input_pixels: int | None = None,
                         target_fwhm: float | Sequence[float] | None = None) -> MetacalOperator:
        """The metacal operator for (bands, S, S) PSF images and input stamps of
        ``input_pixels`` (default: the model's stamp), on this deblender's device; every band
        is reconvolved to the round Gaussian of :meth:`target_sigma` (``target_fwhm``, arcsec,
        one for every band or one per band, else the model's own target, else the narrowest
        each band's PSF allows). The last
        :data:`KEPT_OPERATORS` of the process are kept (0.5 GB each for six 45x45 bands, 1 GB
        with a 10-pixel margin) and reused for the same PSFs, ``delta``, sizes, target and
        device, by any Deblender."""
        check_psf_images(psfs, len(self.bands))
        input_pixels = (self.stamp_pixels if input_pixels is None
                        else require_positive_int(input_pixels, "input_pixels"))
        target = self.target_sigma(target_fwhm)
        key = (MetacalOperator.digest(psfs), float(delta), self.stamp_pixels, int(input_pixels),
               target, str(self.device))
        operator = _OPERATORS.pop(key, None)
        if operator is None:
            operator = MetacalOperator.build(psfs, self.stamp_pixels, delta,
                                             input_pixels=input_pixels, target_sigma=target,
                                             device=self.device)
        _OPERATORS[key] = operator  # most recently used last
        while len(_OPERATORS) > KEPT_OPERATORS:
            _OPERATORS.pop(next(iter(_OPERATORS)))
        return operator

    def metacal(self, images: np.ndarray, psfs: np.ndarray, *, noise: np.ndarray | None = None,
                delta: float = DEFAULT_DELTA, batch_size: int = 256, views: int = N_VIEWS,
                keep_inputs: bool = False, reconstruct: bool = True,
                reconstruction_views: int = N_VIEWS,
                target_fwhm: float | Sequence[float] | None = None,
                hold_sky_plane: bool | None = None) -> MetacalPrediction:
        """:meth:`predict` on the five metacalibration images of raw stamps (N, bands, H, W).

        ``psfs`` is each band's effective PSF image (bands, S, S), as datasets store it.
        ``images`` may be larger than the model's stamps (cutouts with a margin around the same
        centre, e.g. 65x65 for a 45x45 model): the metacal images are then cropped to the
        model's stamp, which keeps the stamp edge, sheared by metacal too, out of what the
        networks see. Do give a margin (10 pixels is plenty): without it the sheared edge biases
        every estimator that reads the whole stamp at the 1% level. ``noise``, an independent
        noise field like the stamps' own, switches metacal's noise correction on (twice the
        noise, which the networks did not see in training). The regressor's response is then
        measured on each stamp's own images. ``views`` and ``reconstruction_views`` are
        :meth:`predict`'s; ``reconstruct=False`` skips the decoder (e and R only, several times
        faster); ``target_fwhm`` :meth:`metacal_operator`'s. ``hold_sky_plane``: each stamp's
        fitted sky plane (:func:`~deblend.core.sky_plane.sky_plane`, on the whole input) is taken
        out before the shear and put back, unsheared, in the five images: a sky-subtraction
        residual stays in the images as the real shear left it instead of being sheared by
        metacal into a response to shear (default: the run's ``metacal.hold_sky_plane``). No
        stamp (N = 0) gives five empty predictions.
        """
        batch_size, views, reconstruction_views = self.check_batching(
            batch_size, views, reconstruction_views)
        array = self.check_images(images, margin=True)
        operator = self.metacal_operator(psfs, delta, array.shape[2], target_fwhm)
        if hold_sky_plane is None:
            hold_sky_plane = self.metacal_hold_sky_plane
        plane = sky_plane(array) if hold_sky_plane and array.shape[0] else None
        if noise is not None:
            noise = self.check_images(noise, margin=True)
            if noise.shape != array.shape:
                raise ValueError(f"noise must have the images' shape {array.shape}, got "
                                 f"{noise.shape}")
        outputs: dict[str, list[Prediction]] = {}
        inputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, max(array.shape[0], 1), batch_size):  # no stamp: one empty batch
            part = slice(start, start + batch_size)
            for name, image in held_metacal(
                    operator, array[part], None if noise is None else noise[part],
                    None if plane is None else plane[part], dtype=torch.float32).items():
                outputs.setdefault(name, []).append(
                    self.predict(image, batch_size, views, reconstruct, reconstruction_views))
                if keep_inputs:
                    inputs.setdefault(name, []).append(image)
        return MetacalPrediction(
            {name: join_predictions(parts) for name, parts in outputs.items()}, operator.delta,
            {name: np.concatenate(parts) for name, parts in inputs.items()} if keep_inputs
            else None)


    def measure_cells(self, cells: Iterable[CellImage], settings: MetadetectSettings | None = None,
                      *, seed: int = 0, views: int = WALK_VIEWS, per_object: bool = True,
                      batch_size: int = 256) -> Table:
        """Metadetection catalogues of survey cells (:class:`~deblend.core.cells.CellImage`,
        in this model's units and bands): detection on each of the five metacal images, the
        regressor on stamps around each detection, cuts, one row per kept detection and image.
        See :func:`deblend.core.cell_measure.measure_cells`; the population shear of the
        result is :func:`deblend.core.metadetect.metadetect_shear`."""
        return measure_cells(self, cells, settings, seed=seed, views=views,
                             per_object=per_object, batch_size=batch_size)


def _lineage_flow(layout: RunLayout, stages: dict[str, tuple[dict, str]]) -> LatentFlow | None:
    """The run's finished flow when it was fitted on the very stage1 of ``stages`` (a lineage
    from :func:`load_lineage`), else None."""
    if not layout.best(FLOW_STAGE).is_file():
        return None
    try:
        flow_stages = load_lineage(layout, FLOW_STAGE, needed_by="Deblender.from_run")
    except RunError:
        return None
    payload, _ = flow_stages[FLOW_STAGE]
    parent = payload["parent"]["stage"]
    if parent not in stages or stages[parent][1] != flow_stages[parent][1]:
        return None
    return build_module(payload["modules"]["flow"])


def fill_missing_bands(array: np.ndarray, available: np.ndarray, bands: tuple[str, ...]
                       ) -> np.ndarray:
    """A copy of stamps ``array`` (N, bands, H, W) whose missing bands are 0 (the sky level of
    sky-subtracted images: no flux). ``available``: booleans, (bands,) for every stamp or
    (N, bands) per stamp, False where a band is missing (not observed, or masked); at least
    one band of each stamp must be available."""
    mask = np.asarray(available)
    if mask.dtype != np.bool_:
        raise ValueError(f"available must be booleans (True: the band is there), got dtype "
                         f"{mask.dtype}")
    n, n_bands = array.shape[:2]
    if mask.shape not in ((n_bands,), (n, n_bands)):
        raise ValueError(f"available must have shape ({n_bands},) or ({n}, {n_bands}) (bands "
                         f"{' '.join(bands)}), got {mask.shape}")
    mask = np.broadcast_to(mask, (n, n_bands))
    if n and not mask.any(axis=1).all():
        raise ValueError(f"stamp {int(np.argmin(mask.any(axis=1)))} has no band available")
    out = np.array(array, dtype=np.float32, copy=True)
    out[~mask] = 0.0
    return out


def check_finite(array: np.ndarray, bands: tuple[str, ...]) -> np.ndarray:
    """``array`` (N, bands, ...) itself, or a ValueError locating its first non-finite pixel."""
    bad = ~np.isfinite(array)
    if bad.any():
        n, band = np.argwhere(bad)[0][:2]
        kind = "NaN" if np.isnan(array[n, band]).any() else "inf"
        raise ValueError(f"images contain {int(bad.sum())} non-finite pixels ({kind} first "
                         f"in image {n}, band {bands[band]})")
    return array


def join_predictions(parts: list[Prediction]) -> Prediction:
    """One :class:`Prediction` from consecutive batches."""
    def join(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)
    return Prediction(join("reconstruction"), join("mu"), join("sigma"), join("ellipticity"),
                      join("ellipticity_raw"))
