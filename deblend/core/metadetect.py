"""Metadetection of whole cells (Sheldon et al. 2020, 2023): shear from pixels, not from truth.

The walk, the same for every cell and every estimator (SPEC 6, "Metadetection recipe"):

1. **metacal** the whole padded cell (:class:`~deblend.core.fourier_metacal.FourierMetacal`),
   with the noise correction drawn from the cell's own variance;
2. **detect** on each of the five images independently (:func:`detect_cell`): SEP on the
   inverse-variance weighted sum of the ``detection_bands`` (default r + i + z,
   :func:`detection_weights`; a band missing from the cell gets weight 0), threshold in units
   of that image's per-pixel noise (:func:`noise_sigma`; the same absolute threshold on all
   five), windowed centroids (``sep.winpos``); a held sky plane is left out of that sum;
3. **stamps**: the model's stamp cut from the same image around each detection, recentred on it
   to a fraction of a pixel (``MetadetectSettings.recentre``, :mod:`deblend.core.recentre`; off:
   around its nearest pixel);
4. **estimators** (the deblender's regressor, or any peer) on the stamps;
5. **cuts**, the same on every image: S/N of the detection image in a Gaussian aperture,
   stamps inside the cell, the cell's ownership (each object is measured by the one cell
   whose owned square holds its detection), and with ``min_size_ratio`` the size against the
   detection image's PSF (:mod:`deblend.core.object_size`; every row has its ``size_ratio``);
6. **catalogue**: one row per kept detection per image (``mdet_step``), so that the population
   response ``R_ij = (<e_i>_{+j} - <e_i>_{-j}) / (2 delta)`` and ``g = R^-1 <e>_noshear``
   (:func:`metadetect_shear`) hold the detection, centroid and selection responses.

Conventions: pixel frame, x = column (axis 1), y = row (axis 0), pixel centres at integers;
ellipticities are whatever the estimator returns (the deblender's raw regressor: distortion,
pixel frame); the shear is reduced shear g. Masked pixels (infinite variance) are set to zero
before metacal and flag the detections whose stamp holds one (:data:`FLAGS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table

from deblend.core.arguments import (
    FINITE_FLOAT,
    FRACTION,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    require_positive_int,
)
from deblend.core.cells import CellImage
from deblend.core.chunk_cache import without_defaults
from deblend.core.fourier_metacal import FourierMetacal
from deblend.core.metacal import DEFAULT_DELTA, METACAL_SHEARS, check_delta
from deblend.core.object_size import detection_psf_sigma, size_ratios
from deblend.core.sky_plane import held_metacal, sky_plane
from deblend.core.recentre import recentred_stamps
from deblend.core.stamps import central, cut_stamp, cut_stamps, nearest_pixel

Estimator = Callable[[np.ndarray], np.ndarray]
"""Stamps (N, bands, S, S) raw flux -> (N, 2) ellipticities (NaN where it fails)."""

FLAGS = {
    1: "EDGE: the model's stamp around the detection overhangs the cell",
    2: "MASKED: the stamp holds masked pixels (set to zero)",
    4: "LOW_SNR: Gaussian-aperture S/N of the detection image below min_snr",
    8: "FAILED: an estimator returned a non-finite ellipticity",
    16: "SMALL: size_ratio below min_size_ratio, or not measured (only with a size cut)",
}
"""Bits of the catalogue's ``flags`` column; rows with ``flags == 0`` enter the shear."""
EDGE, MASKED, LOW_SNR, FAILED, SMALL = 1, 2, 4, 8, 16
WINDOW_REACH = 10.0
"""Pixels beyond a cell's owned square within which an isophotal centroid may still own a
windowed centroid (:func:`detect_cell`'s ``near``; windowed centroids move by well under a
pixel on isolated objects, by a few on blends)."""
SNR_SIGMA = 2.0
"""Sigma (pixels) of the Gaussian aperture of the S/N cut."""
DEBLEND_CONTRAST = 0.005
"""SEP's (SExtractor's DEBLEND_MINCONT) default: a branch of the detection's isophote tree is
split off when it holds this fraction of the object's flux (``python -m
benchmarks.detection_contrast`` measures what lower values find and shred)."""
WALK_VIEWS = 2
"""Symmetric views the regressor is averaged over in the walk by default. One view leaves the
regressor's preferred orientation in every ellipticity, an additive shear bias that metacal does
not remove: the packaged quick model reads noisy round exponentials (half-light radius 0.2-0.8",
S/N about 40-400, 400 each) as e1 = -0.023 to +0.001 and e2 = -0.011 to -0.034 (+- 0.001) with
one view, within 0.002 of 0 with two (the second view is turned by 90 degrees, which negates e,
so a constant cancels); round stars alike; on 4 BTK field sets c2 = -0.024 +- 0.007 with one
view (``fields.views`` is 2 for that reason)."""


@dataclass(frozen=True)
class MetadetectSettings:
    """The choices of the walk. ``threshold`` is SEP's, in units of the noshear detection
    image's noise per pixel; ``min_snr`` the S/N cut (0: none); ``stamp_pixels`` the estimators'
    stamp; ``deblend_contrast`` SEP's, in [0, 1]. Each is checked by its rule
    (:mod:`deblend.core.arguments`), a ValueError naming it."""

    stamp_pixels: int = 45
    delta: float = DEFAULT_DELTA
    detection_bands: tuple[str, ...] = ("r", "i", "z")
    threshold: float = 3.0
    min_area: int = 5
    min_snr: float = 10.0
    deblend_contrast: float = DEBLEND_CONTRAST
    noise_correction: bool = True
    target_sigma: tuple[float, ...] | None = None
    """Metacal's reconvolution Gaussian per band, pixels (``metacal.target_psf_fwhm``); None:
    the narrowest each band's PSF allows."""
    hold_sky_plane: bool = False
    """Shear the cell less its fitted sky plane and put the plane back unsheared in the five
    images (``metacal.hold_sky_plane``; :func:`held_metacal`)."""
    recentre: bool = True
    """Move each detection's stamp by its sub-pixel offset so that the detection lies on the
    central pixel's centre, as the networks' training targets do
    (:mod:`deblend.core.recentre`); False: the stamp around the nearest pixel as it is."""
    min_size_ratio: float | None = None
    """Flag SMALL the detections whose ``size_ratio`` (:mod:`deblend.core.object_size`: their
    adaptive-moment size over the detection image's PSF's, squared, less 1; about 0 for stars)
    is below this, or not measured, on each metacal image alike; None: no size cut
    (metadetection's is 0.5)."""

    def __post_init__(self) -> None:
        require_positive_int(self.stamp_pixels, "stamp_pixels")
        check_delta(self.delta)
        if self.target_sigma is not None:
            for value in self.target_sigma:
                POSITIVE_FLOAT.require(value, "target_sigma")
        POSITIVE_FLOAT.require(self.threshold, "threshold")
        require_positive_int(self.min_area, "min_area")
        NON_NEGATIVE_FLOAT.require(self.min_snr, "min_snr")
        FRACTION.require(self.deblend_contrast, "deblend_contrast")
        if not self.detection_bands:
            raise ValueError("detection_bands must name at least one band")
        for name in ("hold_sky_plane", "recentre"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.min_size_ratio is not None:
            FINITE_FLOAT.require(self.min_size_ratio, "min_size_ratio")

    def identity(self) -> dict:
        """The settings as a dict for cache keys; ``hold_sky_plane`` only when on,
        ``recentre`` only when on and ``min_size_ratio`` only when set, so that keys written
        before each existed (without the hold, without recentring, without a size cut) stay
        valid for what they measured."""
        return without_defaults(dict(self.__dict__), {"hold_sky_plane": False,
                                                      "recentre": False,
                                                      "min_size_ratio": None})


def detection_weights(variance: np.ndarray, bands: tuple[str, ...],
                      detection_bands: tuple[str, ...]) -> tuple[list[int], np.ndarray]:
    """The detection bands' indices and weights: the inverse of each band's median finite
    variance, normalised (0 for a band with no finite variance: missing from the cell)."""
    missing = [b for b in detection_bands if b not in bands]
    if missing:
        raise ValueError(f"detection band(s) {' '.join(missing)} not among the cell's bands "
                         f"{' '.join(bands)}")
    index = [bands.index(b) for b in detection_bands]
    level = np.array([np.median(v[np.isfinite(v)]) if np.isfinite(v).any() else np.inf
                      for v in variance[index]])
    weights = np.where(np.isfinite(level) & (level > 0), 1.0 / level, 0.0)
    if weights.sum() <= 0:
        raise ValueError("no detection band has a finite positive variance")
    return index, weights / weights.sum()


def noise_sigma(variance: np.ndarray, weights: np.ndarray, gain: np.ndarray) -> float:
    """Per-pixel noise of the weighted detection image of metacal images: the median input
    variance of each detection band times its metacal ``gain``
    (:meth:`~deblend.core.fourier_metacal.FourierMetacal.noise_gain`), weighted; bands of
    weight 0 (missing) do not count."""
    used = weights > 0
    level = np.array([np.median(v[np.isfinite(v)]) for v in variance[used]])
    return float(np.sqrt(np.sum(weights[used] ** 2 * gain[used] * level)))


def detect_cell(image: np.ndarray, sigma: float, threshold: float, min_area: int,
                deblend_contrast: float,
                near: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """(K, 2) SEP detections (x, y) of a (H, W) detection image of per-pixel noise ``sigma``:
    threshold ``threshold * sigma``, ``min_area`` pixels, windowed centroids (``sep.winpos``
    with SExtractor's XWIN sigma, 2 r_half / 2.35). ``near`` (x0, x1, y0, y1): only objects
    whose isophotal centroid lies within :data:`WINDOW_REACH` pixels of that box get a windowed
    centroid and are returned (a cell's owned square: the margin's objects cost nothing)."""
    data = np.ascontiguousarray(image, dtype=np.float64)
    objects = sep.extract(data, threshold, err=sigma, minarea=min_area,
                          deblend_cont=deblend_contrast)
    if near is not None and len(objects):
        x0, x1, y0, y1 = near
        objects = objects[(objects["x"] > x0 - WINDOW_REACH) & (objects["x"] < x1 + WINDOW_REACH)
                          & (objects["y"] > y0 - WINDOW_REACH)
                          & (objects["y"] < y1 + WINDOW_REACH)]
    if len(objects) == 0:
        return np.zeros((0, 2))
    radius, _ = sep.flux_radius(data, objects["x"], objects["y"], 6.0 * objects["a"], 0.5,
                                normflux=objects["flux"], subpix=5)
    win_sigma = np.clip(2.0 * np.nan_to_num(radius, nan=1.0) / 2.35, 0.5, None)
    x, y, flag = sep.winpos(data, objects["x"], objects["y"], win_sigma)
    moved = flag != 0
    x, y = np.where(moved, objects["x"], x), np.where(moved, objects["y"], y)
    return np.stack([x, y], axis=1)


def aperture_snr(image: np.ndarray, positions: np.ndarray, sigma: float,
                 aperture: float = SNR_SIGMA) -> np.ndarray:
    """S/N of a (H, W) image of per-pixel noise ``sigma`` in a Gaussian aperture at each
    position's nearest pixel: sum(W I) / (sigma sqrt(sum W^2))."""
    size = int(2 * np.ceil(4 * aperture) + 1)
    axis = np.arange(size) - size // 2
    weight = np.exp(-0.5 * (axis[None, :] ** 2 + axis[:, None] ** 2) / aperture ** 2)
    out = np.empty(len(positions))
    for k, (x, y) in enumerate(positions):
        out[k] = (cut_stamp(image, x, y, size) * weight).sum()
    return out / (sigma * np.sqrt((weight ** 2).sum()))


def stamp_inside(positions: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Whether the stamp of ``size`` around each position's nearest pixel lies in the cell."""
    half = size // 2
    ok = np.empty(len(positions), bool)
    for k, (x, y) in enumerate(positions):
        cx, cy = nearest_pixel(x, y)
        ok[k] = half <= cx < shape[1] - half and half <= cy < shape[0] - half
    return ok


def correction_noise(variance: np.ndarray, seed: int) -> np.ndarray:
    """An independent Gaussian noise field of the cell's per-pixel variance (0 where masked)."""
    sigma = np.sqrt(np.where(np.isfinite(variance), variance, 0.0))
    return np.random.default_rng(seed).normal(size=variance.shape) * sigma


def unmasked(images: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``images`` with their masked pixels set to 0, ``masked``) of a cell: masked pixels are
    those of infinite (or NaN) ``variance``; a non-finite image pixel elsewhere is refused."""
    masked = ~np.isfinite(variance)
    if (~np.isfinite(images) & ~masked).any():
        raise ValueError("cell images hold non-finite pixels that are not masked "
                         "(give them infinite variance)")
    return np.where(masked, 0.0, images), masked


def cell_plane(images: np.ndarray, masked: np.ndarray, settings: MetadetectSettings
               ) -> np.ndarray | None:
    """The sky plane held out of metacal's shear (:func:`~deblend.core.sky_plane.sky_plane` of
    each band of the cell, its masked pixels left out), or None without
    ``settings.hold_sky_plane``."""
    return sky_plane(images, exclude=masked) if settings.hold_sky_plane else None


def measure_cell(cell: CellImage, bands: tuple[str, ...], estimators: Mapping[str, Estimator],
                 settings: MetadetectSettings = MetadetectSettings(), *, seed: int = 0,
                 operator: FourierMetacal | None = None,
                 extra: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
                 noise: np.ndarray | None = None) -> Table:
    """The metadetection catalogue of one cell (:func:`cell_columns` as a Table)."""
    return Table(cell_columns(cell, bands, estimators, settings, seed=seed, operator=operator,
                              extra=extra, noise=noise))


def cell_columns(cell: CellImage, bands: tuple[str, ...], estimators: Mapping[str, Estimator],
                 settings: MetadetectSettings = MetadetectSettings(), *, seed: int = 0,
                 operator: FourierMetacal | None = None,
                 extra: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
                 noise: np.ndarray | None = None, plane: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """The metadetection catalogue of one cell (module docstring): one row per owned detection
    and metacal image, columns ``mdet_step``, ``x``, ``y`` (this cell's pixels), ``snr``,
    ``flags`` and ``<name>_e1``, ``<name>_e2`` per estimator. ``seed`` draws the correction
    noise; ``operator`` may be reused across cells with the same PSFs and delta. ``extra``
    maps the noshear detections' (K, 2) positions to more columns of the noshear rows (NaN on
    the other images' rows). Every estimator is called once, on the stamps of all five images.
    Detections are kept where the cell owns them, so inside the cell;
    a stamp that overhangs the cell is zero outside it and flagged EDGE. ``seed`` >= 0 (checked
    even without the noise correction). ``noise``: the correction noise field (bands, H, W)
    when the caller draws it (to use the same field elsewhere); by default drawn from ``seed``.
    ``plane``: with ``settings.hold_sky_plane``, the cell's held sky plane (bands, H, W) when
    the caller fits it (:func:`cell_plane`); by default fitted here.
    """
    if not estimators:
        raise ValueError("give at least one estimator")
    walk = metacal_cell(cell, bands, settings, seed=seed, operator=operator, noise=noise,
                        plane=plane)
    steps = [detect_step(cell, walk.images[step], walk.detection[step], walk.sigma,
                         walk.any_masked, settings, walk.psf_sigma) for step in METACAL_SHEARS]
    counts = [len(step["x"]) for step in steps]
    columns = {"mdet_step": np.repeat(np.array(list(METACAL_SHEARS), dtype="U7"), counts),
               **{key: np.concatenate([step[key] for step in steps])
                  for key in ("x", "y", "snr", "size_ratio")}}
    flags = np.concatenate([step["flags"] for step in steps])
    stamps = np.concatenate([step["stamps"] for step in steps])
    for name, estimator in estimators.items():  # one call per cell: all five images' stamps
        e = np.asarray(estimator(stamps), np.float64).reshape(len(stamps), 2)
        flags[~np.isfinite(e).all(axis=1)] |= FAILED
        columns[f"{name}_e1"], columns[f"{name}_e2"] = e[:, 0], e[:, 1]
    if extra is not None:
        k = list(METACAL_SHEARS).index("noshear")
        rows = slice(sum(counts[:k]), sum(counts[:k + 1]))
        for key, value in extra(np.stack([steps[k]["x"], steps[k]["y"]], axis=1)).items():
            column = np.full(len(stamps), np.nan)
            column[rows] = np.asarray(value, np.float64)
            columns[key] = column
    columns["flags"] = flags
    return columns


@dataclass(frozen=True)
class MetacalCell:
    """Step 1 of one cell, and what step 2 searches: its five metacal images and their
    detection images, keyed by the names of :data:`~deblend.core.metacal.METACAL_SHEARS`."""

    images: dict[str, np.ndarray]
    """(bands, H, W) metacal images (masked pixels 0 before metacal)"""
    detection: dict[str, np.ndarray]
    """(H, W) the weighted sums of the detection bands (:func:`detection_weights`)"""
    sigma: float
    """per-pixel noise of the detection images (:func:`noise_sigma`)"""
    any_masked: np.ndarray
    """(H, W) 1 where a band present in the cell is masked, else 0"""
    psf_sigma: float
    """adaptive-moment sigma (pixels) of the detection images' PSF
    (:func:`~deblend.core.object_size.detection_psf_sigma`)"""


def metacal_cell(cell: CellImage, bands: tuple[str, ...],
                 settings: MetadetectSettings = MetadetectSettings(), *, seed: int = 0,
                 operator: FourierMetacal | None = None, noise: np.ndarray | None = None,
                 plane: np.ndarray | None = None) -> MetacalCell:
    """Step 1 of the walk on one cell, and the detection images step 2 searches
    (:func:`cell_columns`' ``seed``, ``operator``, ``noise``, ``plane``). A held sky plane is
    in the five images (the estimators read it, unsheared) but not in the detection images:
    objects are found and centred on the sky-subtracted image (with recentred stamps a plane
    left in would pull each windowed centroid, and the stamp with it, towards its gradient)."""
    seed = NON_NEGATIVE_INT.require(seed, "seed")
    images = np.asarray(cell.images, np.float64)
    variance = np.asarray(cell.variance, np.float64)
    if len(bands) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} image bands for {len(bands)} band names")
    images, masked = unmasked(images, variance)
    if operator is None:
        operator = FourierMetacal(cell.psfs, settings.delta, target_sigma=settings.target_sigma)
    if not settings.noise_correction:
        noise = None
    elif noise is None:
        noise = correction_noise(variance, seed)
    elif np.shape(noise) != variance.shape:
        raise ValueError(f"noise has shape {np.shape(noise)}, the cell {variance.shape}")
    if not settings.hold_sky_plane:
        plane = None
    elif plane is None:
        plane = cell_plane(images, masked, settings)
    elif np.shape(plane) != images.shape:
        raise ValueError(f"plane has shape {np.shape(plane)}, the cell {images.shape}")
    metacal = held_metacal(operator, images, noise, plane, masked)
    index, weights = detection_weights(variance, bands, settings.detection_bands)
    gain = operator.noise_gain(cell.shape)[index] * (2.0 if noise is not None else 1.0)
    partly = ~masked.all(axis=(1, 2))  # a band missing from the whole cell flags nothing
    sky = 0.0 if plane is None else central(plane, next(iter(metacal.values())).shape[-2:])
    detection = {step: np.tensordot(weights, (image - sky)[index], axes=1)
                 for step, image in metacal.items()}
    return MetacalCell(metacal, detection, noise_sigma(variance[index], weights, gain),
                       masked[partly].any(axis=0).astype(np.float64),
                       detection_psf_sigma(np.asarray(operator.sigma)[index], weights,
                                           settings.stamp_pixels))


def detect_step(cell: CellImage, image: np.ndarray, det: np.ndarray, sigma: float,
                any_masked: np.ndarray, settings: MetadetectSettings, psf_sigma: float
                ) -> dict[str, np.ndarray]:
    """Steps 2, 3 and 5 of the walk on one metacal ``image`` (bands, H, W) and its detection
    image ``det`` (H, W) of per-pixel noise ``sigma`` and PSF size ``psf_sigma``: the owned
    detections' x, y, S/N, size ratio, flags (EDGE, MASKED, LOW_SNR, SMALL) and the model's
    stamps around them."""
    positions = detect_cell(det, sigma, settings.threshold, settings.min_area,
                            settings.deblend_contrast, near=cell.owned_box)
    if len(positions):
        positions = positions[cell.owns(positions[:, 0], positions[:, 1])]
    flags = np.zeros(len(positions), np.int32)
    flags[~stamp_inside(positions, cell.shape, settings.stamp_pixels)] |= EDGE
    if any_masked.any():
        flags[[bool(cut_stamp(any_masked, x, y, settings.stamp_pixels).any())
               for x, y in positions]] |= MASKED
    snr = aperture_snr(det, positions, sigma)
    flags[~(snr >= settings.min_snr)] |= LOW_SNR
    size = size_ratios(det, positions, psf_sigma, settings.stamp_pixels)
    if settings.min_size_ratio is not None:
        flags[~(size >= settings.min_size_ratio)] |= SMALL
    return {"x": positions[:, 0], "y": positions[:, 1], "snr": snr, "size_ratio": size,
            "flags": flags,
            "stamps": detection_stamps(image, positions, settings.stamp_pixels,
                                       settings.recentre)}


def detection_stamps(image: np.ndarray, positions: np.ndarray, size: int, recentre: bool
                     ) -> np.ndarray:
    """The networks' (K, bands, size, size) stamps of ``image`` around the detections at
    ``positions``: recentred on them with ``recentre`` (``MetadetectSettings.recentre``,
    :func:`~deblend.core.recentre.recentred_stamps`), else cut around their nearest pixels."""
    if recentre:
        return recentred_stamps(image, positions, size)
    return cut_stamps(image, positions, size)


def metadetect_shear(catalogue: Table, estimator: str, delta: float = DEFAULT_DELTA
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(g_hat (2,), R (2, 2)) of a metadetection catalogue for one estimator: means over each
    image's own rows with ``flags == 0``; R_ij = (<e_i>_{+j} - <e_i>_{-j}) / (2 delta),
    g_hat = R^-1 <e>_noshear. ``delta`` is the metacal step of the catalogue (checked)."""
    delta = check_delta(delta)
    means = step_means(catalogue, estimator)
    response = np.stack([(means[f"{j}p"] - means[f"{j}m"]) / (2.0 * delta) for j in (1, 2)],
                        axis=1)
    return np.linalg.solve(response, means["noshear"]), response


def step_sums(catalogue: Table, estimator: str) -> dict[str, np.ndarray]:
    """Per metacal image: (sum e1, sum e2, count) over the rows with ``flags == 0``."""
    out = {}
    for step in METACAL_SHEARS:
        rows = (catalogue["mdet_step"] == step) & (catalogue["flags"] == 0)
        e = np.stack([np.asarray(catalogue[f"{estimator}_e{i}"])[rows] for i in (1, 2)], 1)
        out[step] = np.array([e[:, 0].sum(), e[:, 1].sum(), float(rows.sum())])
    return out


def step_means(catalogue: Table, estimator: str) -> dict[str, np.ndarray]:
    """Per metacal image, the mean (e1, e2) of its kept rows (ValueError when none)."""
    means = {}
    for step, (s1, s2, n) in step_sums(catalogue, estimator).items():
        if n == 0:
            raise ValueError(f"no kept detection on the {step} image")
        means[step] = np.array([s1, s2]) / n
    return means
