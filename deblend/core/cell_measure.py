"""The deblender on survey cells: metadetection catalogues from pixels (no truth positions).

:func:`measure_cells` runs :func:`deblend.core.metadetect.measure_cell` with the deblender's
regressor as the estimator (raw regressor output, distortion, pixel frame, averaged over
``views`` symmetric views) and adds to each noshear row:

- ``flux_<band>``: the reconstruction's total flux per band (model units), decoded from the
  stamp of the *original* cell (the survey PSF, not metacal's) around the detection;
- ``forced_flux_<band>``: the same reconstructions, of all the cell's noshear detections,
  fitted jointly to the cell's pixels with one amplitude per source and band
  (:mod:`deblend.core.photometry`): the flux the pixels ask for given the networks'
  morphologies (the cell's pixels as given: the held sky plane is metacal's, not taken off);
- ``r11 r12 r21 r22``: the per-object (stamp) metacal response of the regressor, measured on
  the original cell's stamp with a ``STAMP_MARGIN`` around the same pixel, sheared about the
  detection (what :meth:`Deblender.metacal` measures, here by FFT: it misses the detection,
  centroid and selection terms that the catalogue's population response holds; both are
  reported).

Every stamp the networks read is recentred on its detection to a fraction of a pixel when the
settings say so (``MetadetectSettings.recentre``, the default; :mod:`deblend.core.recentre`),
as the networks' training targets are centred; the reconstructions are moved back before they
are fitted.

Positions in the returned catalogue are in the parent image's pixels (the cell's ``origin``
added) and ``cell`` names the cell that owns the row. Every detection lies in its cell (it is
owned); a stamp that overhangs the cell is zero outside it and its rows carry the EDGE flag
(:data:`deblend.core.metadetect.FLAGS`). ``views``, ``batch_size`` and ``seed`` obey the rules of
:meth:`Deblender.predict` and ``fields.seed``; no cell gives an empty catalogue with every column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from deblend.core.arguments import NON_NEGATIVE_INT, VIEWS, require_positive_int
from deblend.core.cells import CellImage
from deblend.core.fourier_metacal import FourierMetacal
from deblend.core.metacal import metacal_response
from deblend.core.metadetect import (
    Estimator,
    WALK_VIEWS,
    MetadetectSettings,
    cell_columns,
    cell_plane,
    correction_noise,
    detection_stamps,
    unmasked,
)
from deblend.core.photometry import fit_amplitudes
from deblend.core.recentre import shift_stamps, shifted_templates, subpixel_offsets
from deblend.core.sky_plane import held_metacal
from deblend.core.stamps import cut_stamps

if TYPE_CHECKING:
    from deblend.core.inference import Deblender

ESTIMATOR = "deblend"
"""Prefix of the deblender's ellipticity columns (``deblend_e1``, ``deblend_e2``)."""
FLUX_KINDS = ("flux", "forced_flux")
"""The per-band flux columns (``<kind>_<band>``): the reconstruction's own and the forced one."""
STAMP_MARGIN = 10
"""Pixels around the model's stamp kept for the per-object metacal response."""
STAMP_PAD = 12
"""FFT zero padding of those stamps (their margin keeps the wrapped tails out of the crop)."""


KEPT_OPERATORS = 4
"""(cell, stamp) operator pairs kept between calls, most recently used last (an operator keeps
its Fourier filters per image shape; building one costs ~0.2 s per band set on a CPU)."""
_OPERATORS: dict[tuple, tuple[FourierMetacal, FourierMetacal]] = {}


def cell_operators(psfs: np.ndarray, settings: MetadetectSettings, device
                   ) -> tuple[FourierMetacal, FourierMetacal]:
    """The FFT metacal operators of cells and of per-object stamps for these PSF images and
    the settings' delta and target, reused across calls (the last :data:`KEPT_OPERATORS`)."""
    delta, target = settings.delta, settings.target_sigma
    key = (FourierMetacal.digest(psfs, delta, target), str(device))
    pair = _OPERATORS.pop(key, None)
    if pair is None:
        pair = (FourierMetacal(psfs, delta, device=device, target_sigma=target),
                FourierMetacal(psfs, delta, pad=STAMP_PAD, device=device, target_sigma=target))
    _OPERATORS[key] = pair
    while len(_OPERATORS) > KEPT_OPERATORS:
        _OPERATORS.pop(next(iter(_OPERATORS)))
    return pair


def cell_stamps(images: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """float32 (K, bands, size, size) stamps of (bands, H, W) ``images`` (the networks' input)."""
    return cut_stamps(images, positions, size).astype(np.float32)


def measure_cells(model: Deblender, cells: Iterable[CellImage],
                  settings: MetadetectSettings | None = None, *, seed: int = 0,
                  views: int = WALK_VIEWS,
                  per_object: bool = True, batch_size: int = 256,
                  peers: Mapping[str, Estimator] | None = None) -> Table:
    """The metadetection catalogue of every cell (module docstring), stacked; cell ``k`` draws
    its correction noise from ``seed + k``, one field for its metacal images and its per-object
    responses. ``peers``: more estimators measured on the same detections and stamps (columns
    ``<name>_e1``, ``<name>_e2``)."""
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    views = VIEWS.require(views, "views")
    batch_size = require_positive_int(batch_size, "batch_size")
    settings = settings or MetadetectSettings(stamp_pixels=model.stamp_pixels,
                                              hold_sky_plane=model.metacal_hold_sky_plane)
    if settings.target_sigma is None:  # the model's target, if it has one
        settings = dataclasses.replace(settings, target_sigma=model.target_sigma())
    if settings.stamp_pixels != model.stamp_pixels:
        raise ValueError(f"settings.stamp_pixels is {settings.stamp_pixels}, the model's stamps "
                         f"are {model.stamp_pixels} pixels")
    bands = model.bands

    def regressor(stamps: np.ndarray) -> np.ndarray:
        if len(stamps) == 0:
            return np.zeros((0, 2))
        out = model.predict(stamps.astype(np.float32), batch_size, views, reconstruct=False)
        return out.ellipticity if out.ellipticity_raw is None else out.ellipticity_raw

    parts = []
    for k, cell in enumerate(cells):
        if len(cell.images) != len(bands):
            raise ValueError(f"cell {k} has {len(cell.images)} bands, the model "
                             f"{len(bands)} ({' '.join(bands)})")
        operator, stamp_operator = cell_operators(cell.psfs, settings, model.device)
        images, masked = unmasked(cell.images, cell.variance)
        noise = correction_noise(np.asarray(cell.variance), seed + k)  # one field per cell
        plane = cell_plane(images, masked, settings)  # one plane per cell, held by both

        def extra(positions: np.ndarray, images=images, variance=cell.variance, noise=noise,
                  plane=plane, masked=masked, stamp_operator=stamp_operator
                  ) -> dict[str, np.ndarray]:
            fluxes = object_fluxes(model, images, variance, positions, batch_size,
                                   settings.recentre)
            if not per_object:
                return fluxes
            return {**fluxes, **object_responses(images, noise, positions, regressor,
                                                 stamp_operator, settings.noise_correction,
                                                 plane, masked, model.stamp_pixels,
                                                 settings.recentre)}

        columns = cell_columns(cell, bands, {ESTIMATOR: regressor, **(peers or {})}, settings,
                               seed=seed + k, operator=operator, extra=extra, noise=noise,
                               plane=plane)
        columns["x"] = columns["x"] + cell.origin[0]
        columns["y"] = columns["y"] + cell.origin[1]
        columns["cell"] = np.full(len(columns["x"]), k, np.int32)
        parts.append(columns)
    if not parts:
        return empty_catalogue(bands, [ESTIMATOR, *(peers or {})], per_object)
    return Table({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})


def empty_catalogue(bands: tuple[str, ...], estimators: list[str], per_object: bool) -> Table:
    """The catalogue of no cell: no row, the columns (and dtypes) of :func:`measure_cells`."""
    float_columns = ["x", "y", "snr", "size_ratio",
                     *[f"{name}_e{i}" for name in estimators for i in (1, 2)],
                     *[f"{kind}_{band}" for kind in FLUX_KINDS for band in bands],
                     *([f"r{i}{j}" for i in (1, 2) for j in (1, 2)] if per_object else [])]
    return Table({"mdet_step": np.zeros(0, "U7"),
                  **{key: np.zeros(0, np.float64) for key in float_columns},
                  "flags": np.zeros(0, np.int32), "cell": np.zeros(0, np.int32)})


def detection_templates(model: Deblender, images: np.ndarray, positions: np.ndarray, *,
                        recentre: bool, batch_size: int = 256, reconstruction_views: int = 1
                        ) -> np.ndarray:
    """(K, bands, S, S) reconstructions (raw model units) of the detections at ``positions`` of
    (bands, H, W) ``images``, each on the stamp around its nearest pixel, ready to paste there:
    with ``recentre``, decoded from the stamp recentred on the detection and moved back by its
    sub-pixel offset (:mod:`deblend.core.recentre`)."""
    stamps = detection_stamps(images, positions, model.stamp_pixels, recentre)
    templates = model.predict(stamps.astype(np.float32), batch_size, views=1, reconstruct=True,
                              reconstruction_views=reconstruction_views).reconstruction
    return shifted_templates(templates, positions) if recentre else templates


def object_fluxes(model: Deblender, images: np.ndarray, variance: np.ndarray,
                  positions: np.ndarray, batch_size: int, recentre: bool = True
                  ) -> dict[str, np.ndarray]:
    """``flux_<band>`` and ``forced_flux_<band>`` (module docstring) of the noshear detections
    at ``positions`` of the original cell (``images`` with masked pixels at 0, ``variance`` inf
    there); ``recentre``: as :func:`detection_templates`."""
    if len(positions):
        templates = detection_templates(model, images, positions, recentre=recentre,
                                        batch_size=batch_size)
        amplitudes = fit_amplitudes(images, variance, templates, positions)
        recon = templates.astype(np.float64).sum(axis=(2, 3))
    else:
        recon = amplitudes = np.zeros((0, len(model.bands)))
    fluxes = {"flux": recon, "forced_flux": amplitudes * recon}
    return {f"{kind}_{band}": fluxes[kind][:, b] for kind in FLUX_KINDS
            for b, band in enumerate(model.bands)}


def object_responses(images: np.ndarray, noise: np.ndarray, positions: np.ndarray, regressor,
                     stamp_operator: FourierMetacal, noise_correction: bool,
                     plane: np.ndarray | None, masked: np.ndarray | None, size: int,
                     recentre: bool = True) -> dict[str, np.ndarray]:
    """``r11 r12 r21 r22``: the per-object metacal response (module docstring) of the noshear
    detections at ``positions`` of the original cell; ``plane``: the cell's held sky plane (its
    stamps held out of the stamps' shear), or None; ``masked``: the cell's masked pixels
    (:func:`~deblend.core.sky_plane.held_metacal`); ``recentre``: each sheared stamp is moved
    by its detection's sub-pixel offset before the crop, as the catalogue's stamps are (the
    shear is about the nearest pixel's centre: it moves the galaxy by g times that offset, a
    hundredth of a pixel)."""
    response = np.full((len(positions), 2, 2), np.nan)
    if len(positions):
        wide = size + 2 * STAMP_MARGIN
        crop = slice(STAMP_MARGIN, STAMP_MARGIN + size)
        sheared = held_metacal(
            stamp_operator, cell_stamps(images, positions, wide),
            cell_stamps(noise, positions, wide) if noise_correction else None,
            None if plane is None else cell_stamps(plane, positions, wide),
            None if masked is None else cut_stamps(masked, positions, wide))
        offsets = -subpixel_offsets(positions)
        stamps = {name: shift_stamps(image, offsets, crop=STAMP_MARGIN) if recentre
                  else image[..., crop, crop] for name, image in sheared.items()}
        response = metacal_response({name: regressor(image) for name, image in stamps.items()},
                                    stamp_operator.delta)
    return {f"r{i}{j}": response[:, i - 1, j - 1] for i in (1, 2) for j in (1, 2)}
