"""Inference with a trained run: deblend raw stamps and read ellipticities from the latent space.

    from deblend import Deblender
    model = Deblender.from_run("runs/quick/train")
    out = model.predict(stamps)      # stamps: (N, bands, 45, 45) raw flux (electrons), numpy
    out.reconstruction               # (N, bands, 45, 45) central galaxy, raw flux, noiseless
    out.mu, out.sigma                # (N, latent_dim) mean and standard deviation of q(z|x)
    out.ellipticity                  # (N, 2) regressor's (e1, e2): distortion, pixel frame
    out.ellipticity_raw              # (N, 2) the same before the response calibration

Stamps are normalised with the constants the run was trained with (SPEC 3) and the
reconstruction is denormalised back to raw flux; all arrays are float32. ``ellipticity`` is the
regressor averaged over the stamp's 8 symmetric views (:mod:`deblend.core.symmetry`), with its response
(measured on the calibration split at the end of stage3) divided out (:mod:`deblend.core.response`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deblend.core.arguments import require_positive_int
from deblend.core.device import resolve_device
from deblend.core.networks import Decoder, Encoder, Regressor
from deblend.core.normalization import NormalizationConstants, denormalize, normalize
from deblend.core.response import Response
from deblend.core.runs import (
    DataIdentity,
    RunError,
    RunLayout,
    build_module,
    load_lineage,
)
from deblend.core.symmetry import N_VIEWS, ellipticity_in_view, image_view

FINAL_STAGE = "stage3"
"""The stage whose lineage makes the full deblender (stage3 -> stage2 -> stage1)."""


@dataclass(frozen=True)
class Prediction:
    """Batched output of :meth:`Deblender.predict`; float32 numpy arrays."""

    reconstruction: np.ndarray
    """(N, bands, H, W) reconstructed central galaxy in raw flux units (electrons)."""
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


class Deblender:
    """Encoder + decoder (+ regressor) of a run, with the normalisation they were trained with."""

    def __init__(self, encoder: Encoder, decoder: Decoder, regressor: Regressor | None,
                 data: DataIdentity, device: torch.device | str = "cpu",
                 response: Response | None = None) -> None:
        if encoder.hparams() != decoder.hparams():
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

    @classmethod
    def from_run(cls, run: str | Path, *, stage: str = FINAL_STAGE,
                 device: str = "auto") -> "Deblender":
        """Load the networks of ``stage`` of a training run and of its ancestors.

        Each network (encoder, decoder, regressor) is taken from the nearest stage of the
        lineage that trained one: for ``stage3`` (the default) the stage2 encoder, the stage1
        decoder and the stage3 regressor; ``stage="stage1"`` gives the stage1 VAE alone (no
        regressor, so ``ellipticity`` is None). Refuses stages that are missing, unfinished, or
        were trained on another version of their parent stage.
        """
        layout = RunLayout(Path(run))
        if not layout.root.is_dir():
            raise RunError(f"run directory not found: {layout.root}")
        lineage = [payload for payload, _ in
                   load_lineage(layout, stage, needed_by="Deblender.from_run").values()]
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
        return cls(build_module(nearest["encoder"]["entry"]),
                   build_module(nearest["decoder"]["entry"]), regressor,
                   DataIdentity.from_dict(nearest["encoder"]["payload"]["data"]),
                   resolve_device(device), response)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.data.bands

    @property
    def stamp_pixels(self) -> int:
        return self.data.stamp_pixels

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def normalization(self) -> NormalizationConstants:
        return self.data.normalization

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` as float32 (N, bands, H, W), or a ValueError naming what is wrong."""
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
        if array.shape[2:] != (size, size):
            raise ValueError(f"images are {array.shape[2]}x{array.shape[3]} pixels, the model "
                             f"expects {size}x{size}; shape {array.shape}, expected {expected}")
        array = array.astype(np.float32, copy=False)
        bad = ~np.isfinite(array)
        if bad.any():
            n, band = np.argwhere(bad)[0][:2]
            kind = "NaN" if np.isnan(array[n, band]).any() else "inf"
            raise ValueError(f"images contain {int(bad.sum())} non-finite pixels ({kind} first "
                             f"in image {n}, band {self.bands[band]})")
        return array

    def symmetrized_ellipticity(self, x: Tensor, mu: Tensor) -> Tensor:
        """Raw regressor (e1, e2) of normalised stamps ``x``, averaged over the 8 views.

        Each view of the stamp (:mod:`deblend.core.symmetry`) is encoded and read by the regressor,
        and its output is mapped back to the original frame before averaging; ``mu`` is the
        latent mean of ``x`` itself (view 0), already computed by the caller. float32.
        """
        assert self.regressor is not None
        total = self.regressor(mu).float()
        for view in range(1, N_VIEWS):
            view_mu, _ = self.encoder(image_view(x, view))
            total += ellipticity_in_view(self.regressor(view_mu).float(), view)
        return total / N_VIEWS

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> Prediction:
        """Deblend raw-flux stamps (N, bands, H, W), ``batch_size`` stamps at a time.

        z = mu is decoded (no sampling); the ellipticity is the regressor's average over the
        stamp's 8 symmetric views (:meth:`symmetrized_ellipticity`), calibrated by the run's
        response. See :class:`Prediction` for the outputs.
        """
        batch_size = require_positive_int(batch_size, "batch_size")
        array = self.check_images(images)
        n = array.shape[0]
        reconstruction = np.empty_like(array)
        mu = np.empty((n, self.latent_dim), np.float32)
        sigma = np.empty_like(mu)
        ellipticity = None if self.regressor is None else np.empty((n, 2), np.float32)
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            x = torch.from_numpy(normalize(array[part], self.normalization)).to(self.device)
            batch_mu, logvar = self.encoder(x)
            x_hat = self.decoder(batch_mu)
            reconstruction[part] = denormalize(x_hat.float().cpu().numpy(), self.normalization)
            mu[part] = batch_mu.float().cpu().numpy()
            sigma[part] = torch.exp(0.5 * logvar).float().cpu().numpy()
            if ellipticity is not None:
                ellipticity[part] = self.symmetrized_ellipticity(x, batch_mu).cpu().numpy()
        if ellipticity is None or self.response is None:
            return Prediction(reconstruction, mu, sigma, ellipticity)
        return Prediction(reconstruction, mu, sigma, self.response.calibrate(ellipticity),
                          ellipticity)
