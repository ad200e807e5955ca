"""The one on-disk dataset format of deblend, its writer and its readers.

Layout of a dataset directory::

    plan.json              what is being generated (config, sample count, shards); written first
    shards/shard-00000.h5  complete shards only (each written as *.tmp, then renamed)
    metadata.json          written last, when every shard is complete: marks the dataset usable

Each shard is an HDF5 file with three contiguous, uncompressed float32 image sets of shape
(n, bands, H, W), in electrons, pixel frame: ``clean`` (isolated target, noiseless), ``noisy``
(isolated target with noise) and ``blend`` (noisy blend); a group ``labels`` of per-sample columns
(see ``simulation.labels.LABEL_DESCRIPTIONS``); and attributes ``shard_index``, ``first_sample``,
``n_samples``, ``plan_id`` and ``complete``. A dataset drawn under ``simulation.conditions`` also
stores each scene's conditions (label columns of shape (n, bands),
:data:`simulation.conditions.CONDITION_COLUMNS`) and a set ``psf`` (n, bands, S, S) float32 of
each scene and band's PSF image (:meth:`StampData.conditions`, :meth:`StampData.psfs`; a dataset
drawn without reads as the survey's nominal conditions). Because the image sets are contiguous, readers map
them straight from the file with ``numpy.memmap``: nothing ever loads a whole set into memory.

``metadata.json`` records the format version, survey, bands, pixel scale, stamp size, seed,
catalog provenance, per-band normalisation constants (SPEC 3, computed on the training split),
counts, the split (first ``n_train`` samples train, the next ``n_calibration`` calibration, the
rest validation; datasets written before the calibration split have none) and ``dataset_id``,
the identity that trained models remember.

``metadata.json`` also carries the PSF of every band under ``"psf"`` (see :data:`PSF_CONVENTION`)::

    "psf": {"images": [[[...], ...], ...],   # (bands, S, S) float64 values, nested lists
            "bands": ["u", "g", ...],         # the dataset's bands, in the same order
            "pixel_scale": 0.2,               # arcsec per pixel, the dataset's
            "convention": PSF_CONVENTION,
            "source": "BTK survey LSST"}

each image being :func:`simulation.surveys.psf_images` of the dataset's survey, bands and stamp
size. The entry is descriptive only: it is not part of the plan, so it leaves ``dataset_id``
unchanged. Datasets written before it have no ``"psf"``; :attr:`StampData.psf_images` then draws
the same images from BTK's survey definition (:attr:`StampData.psf_source` says which).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from deblend.core.atomic import atomic_output
from deblend.core.normalization import NormalizationConstants

FORMAT_VERSION = 1
IMAGE_SETS = ("clean", "noisy", "blend")
PSF_SET = "psf"
"""The per-scene PSF images of a dataset drawn under ``simulation.conditions``: (n, bands, S, S)
float32, each scene and band's effective PSF, unit sum, centred at (S-1)/2."""
PLAN_FILE = "plan.json"
METADATA_FILE = "metadata.json"
SHARD_DIR = "shards"
PSF_CONVENTION = ("effective PSF (PSF convolved with the pixel) per band, drawn by GalSim at the "
                  "stamp's centre, unit sum, pixel frame")
"""What the images of the ``"psf"`` metadata entry are (centre: (S-1)/2 in 0-based pixel
coordinates; pixel frame: x = array axis 1, y = array axis 0)."""
PSF_SOURCE_DATASET = "dataset"
PSF_SOURCE_SURVEY = "survey definition"


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete, corrupt or incompatible."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.h5"


def plan_id(plan: dict[str, Any]) -> str:
    """Stable identity of a plan (hash of its canonical JSON)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(simulation: dict[str, Any], geometry: dict[str, Any],
              catalog_sha256: str | None = None) -> dict[str, Any]:
    """The generation plan: simulation config, geometry, shards (index, first sample, count),
    and the SHA-256 of a catalog file's content (so that a catalog swapped between an
    interruption and the resume is refused, not mixed in)."""
    n, size = simulation["n_samples"], simulation["shard_size"]
    shards = [{"index": i, "first": first, "n": min(size, n - first)}
              for i, first in enumerate(range(0, n, size))]
    twins = bool(simulation.get("rotated_twins"))
    n_train = int(round(n * (1.0 - simulation["val_fraction"])))
    n_calibration = int(round(n * simulation.get("calibration_fraction", 0.0)))
    if twins:  # keep twin pairs inside one split
        n_train -= n_train % 2
        n_calibration -= n_calibration % 2
    n_calibration = min(n_calibration, n_train)
    plan = {"format_version": FORMAT_VERSION, "simulation": simulation, "geometry": geometry,
            "n_samples": n, "n_train": n_train - n_calibration, "n_calibration": n_calibration,
            "shards": shards}
    if catalog_sha256 is not None:
        plan["catalog_sha256"] = catalog_sha256
    return plan


def psf_metadata(survey: str, bands: Sequence[str], pixel_scale: float,
                 stamp_pixels: int) -> dict[str, Any]:
    """The ``"psf"`` entry of ``metadata.json``: each band's PSF image from BTK's definition of
    ``survey`` (:func:`simulation.surveys.psf_images`) with its convention and provenance."""
    # BTK is imported only where PSFs are drawn, not by every reader of a dataset
    from simulation.surveys import psf_images

    images = psf_images(survey, bands, stamp_pixels)
    return {"images": images.tolist(), "bands": list(bands), "pixel_scale": float(pixel_scale),
            "convention": PSF_CONVENTION, "source": f"BTK survey {survey}"}


def write_shard(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                attrs: dict[str, Any], psf: np.ndarray | None = None) -> None:
    """Write one shard atomically: a ``.tmp`` file, flushed, then renamed onto ``path``.
    ``psf``: (n, bands, S, S) the PSF image of every scene and band (scenes drawn under
    ``simulation.conditions``), stored as the set :data:`PSF_SET`."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=False) as handle:
        for name in IMAGE_SETS:
            handle.create_dataset(name, data=np.ascontiguousarray(images[name], np.float32))
        if psf is not None:
            handle.create_dataset(PSF_SET, data=np.ascontiguousarray(psf, np.float32))
        group = handle.create_group("labels")
        for name in sorted(labels):
            group.create_dataset(name, data=labels[name])
        for key, value in attrs.items():
            handle.attrs[key] = value
        handle.attrs["complete"] = True


def shard_is_complete(path: Path, expected_n: int, expected_plan_id: str) -> bool:
    """True only for a readable shard of this plan with all sets and the expected count."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete", False):
                return False
            if handle.attrs.get("plan_id") != expected_plan_id:
                return False
            return all(name in handle and handle[name].shape[0] == expected_n
                       for name in IMAGE_SETS)
    except (OSError, KeyError):
        return False


@dataclass(frozen=True)
class ShardInfo:
    """Where a shard's samples sit in the dataset."""

    index: int
    first: int
    n: int
    path: Path


class StampData:
    """Read access to a complete dataset: metadata, memory-mapped images, labels.

    Safe to use from DataLoader worker processes: memory maps are opened lazily per process.
    """

    def __init__(self, root: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Open ``root``; ``meta`` is given only while finalising (metadata not yet on disk)."""
        self.root = Path(root)
        self.meta: dict[str, Any] = read_metadata(self.root) if meta is None else meta
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{self.root}: dataset format {self.meta.get('format_version')} "
                               f"is not the supported {FORMAT_VERSION}")
        self.shards = [ShardInfo(s["index"], s["first"], s["n"], self.root / SHARD_DIR / s["file"])
                       for s in self.meta["shards"]]
        self._firsts = np.array([s.first for s in self.shards])
        self._maps: dict[tuple[int, str], np.memmap] = {}
        self._pid = os.getpid()
        self._labels: dict[str, np.ndarray] | None = None
        self._psf: np.ndarray | None = self._read_psf() if "psf" in self.meta else None

    # -- metadata ------------------------------------------------------------------------------
    @property
    def survey(self) -> str:
        return self.meta["survey"]

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.meta["bands"])

    @property
    def pixel_scale(self) -> float:
        """arcsec per pixel"""
        return float(self.meta["pixel_scale"])

    @property
    def stamp_pixels(self) -> int:
        return int(self.meta["stamp_pixels"])

    @property
    def n_samples(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def dataset_id(self) -> str:
        return self.meta["dataset_id"]

    @property
    def normalization(self) -> NormalizationConstants:
        return NormalizationConstants.from_dict(self.meta["normalization"])

    @property
    def psf_source(self) -> str:
        """Where :attr:`psf_images` come from: "dataset" (the ``"psf"`` entry of the metadata) or
        "survey definition" (drawn from BTK's survey, for datasets written without the entry)."""
        return PSF_SOURCE_DATASET if "psf" in self.meta else PSF_SOURCE_SURVEY

    @property
    def psf_images(self) -> np.ndarray:
        """Each band's PSF image, (bands, S, S) float64, read-only: the effective PSF (PSF
        convolved with the pixel) drawn by GalSim at the stamp's centre ((S-1)/2, 0-based), unit
        sum, pixel frame (:data:`PSF_CONVENTION`). From the metadata when it has them, otherwise
        drawn from BTK's definition of the survey (see :attr:`psf_source`)."""
        if self._psf is None:
            from simulation.surveys import psf_images

            images = psf_images(self.survey, self.bands, self.stamp_pixels)
            images.flags.writeable = False
            self._psf = images
        return self._psf

    def _read_psf(self) -> np.ndarray:
        """The validated ``"psf"`` entry of the metadata, as a read-only float64 array."""
        where = f"{self.root / METADATA_FILE}: 'psf'"
        entry = self.meta["psf"]
        if not isinstance(entry, dict) or "images" not in entry:
            raise DatasetError(f"{where} has no 'images'; regenerate the dataset, or delete the "
                               f"'psf' entry to use the survey's PSFs")
        try:
            images = np.array(entry["images"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where} images are not a (bands, S, S) array of numbers: "
                               f"{exc}") from exc
        expected = (len(self.bands), self.stamp_pixels, self.stamp_pixels)
        if images.shape != expected:
            raise DatasetError(f"{where} images have shape {images.shape}, expected {expected} "
                               f"(bands {' '.join(self.bands)}, {self.stamp_pixels}-pixel stamps)")
        if "bands" in entry and tuple(entry["bands"]) != self.bands:
            raise DatasetError(f"{where} is for bands {entry['bands']}, the dataset's are "
                               f"{list(self.bands)}")
        scale = entry.get("pixel_scale", self.pixel_scale)
        if not isinstance(scale, (int, float)) or not np.isclose(scale, self.pixel_scale):
            raise DatasetError(f"{where} pixel scale {entry['pixel_scale']} is not the "
                               f"dataset's {self.pixel_scale}")
        for band, image in zip(self.bands, images):
            if not np.all(np.isfinite(image)):
                raise DatasetError(f"{where} {band}-band image has non-finite values")
            total = float(image.sum())
            if total <= 0:
                raise DatasetError(f"{where} {band}-band image has a non-positive sum ({total})")
            if abs(total - 1.0) > 1e-6:
                raise DatasetError(f"{where} {band}-band image sums to {total}, not 1 "
                                   f"(the PSFs are stored with unit sum)")
        images.flags.writeable = False
        return images

    def split_indices(self, split: str) -> np.ndarray:
        """Sample indices of ``split``: "train", "calibration", "validation" or "all"."""
        n_train = int(self.meta["split"]["n_train"])
        n_calibration = int(self.meta["split"].get("n_calibration", 0))
        if split == "train":
            return np.arange(0, n_train)
        if split == "calibration":
            return np.arange(n_train, n_train + n_calibration)
        if split == "validation":
            return np.arange(n_train + n_calibration, self.n_samples)
        if split == "all":
            return np.arange(self.n_samples)
        raise ValueError(f"unknown split '{split}' (train, calibration, validation or all)")

    # -- images --------------------------------------------------------------------------------
    def _map(self, shard: ShardInfo, image_set: str) -> np.memmap:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: start afresh
            self._maps, self._pid = {}, os.getpid()
        key = (shard.index, image_set)
        if key not in self._maps:
            if image_set not in (*IMAGE_SETS, PSF_SET):
                raise ValueError(f"unknown image set '{image_set}' (one of {IMAGE_SETS})")
            try:
                with h5py.File(shard.path, "r") as handle:
                    if image_set not in handle:
                        raise DatasetError(f"shard {shard.path} has no '{image_set}' set; "
                                           f"regenerate the dataset")
                    dset = handle[image_set]
                    offset, shape, dtype = dset.id.get_offset(), dset.shape, dset.dtype
            except OSError as exc:
                raise DatasetError(f"shard {shard.path} is unreadable: {exc}") from exc
            if offset is None:
                raise DatasetError(f"shard {shard.path}: '{image_set}' is not stored contiguously")
            try:
                self._maps[key] = np.memmap(shard.path, dtype=dtype, mode="r", offset=offset,
                                            shape=shape)
            except (OSError, ValueError) as exc:  # e.g. a file truncated after it was written
                raise DatasetError(f"shard {shard.path} is truncated or unreadable ('{image_set}' "
                                   f"needs {int(offset) + dtype.itemsize * int(np.prod(shape))} "
                                   f"bytes): {exc}; regenerate the dataset") from exc
        return self._maps[key]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, index within shard) of global sample indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_samples):
            raise IndexError(f"sample index out of range [0, {self.n_samples})")
        shard_pos = np.searchsorted(self._firsts, indices, side="right") - 1
        return shard_pos, indices - self._firsts[shard_pos]

    def images(self, image_set: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw float32 images (len(indices), bands, H, W) of one set, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_pos, local = self.locate(indices)
        positions = np.unique(shard_pos)
        if len(positions) == 1:  # the usual training batch: one copy, no scatter
            return np.asarray(self._map(self.shards[positions[0]], image_set)[local],
                              dtype=np.float32)
        out = np.empty((len(indices), len(self.bands), self.stamp_pixels, self.stamp_pixels),
                       np.float32)
        for pos in positions:
            rows = np.flatnonzero(shard_pos == pos)
            out[rows] = self._map(self.shards[pos], image_set)[local[rows]]
        return out

    @property
    def target_psf_fwhm(self) -> tuple[float, ...] | None:
        """FWHM (arcsec) per band of the round Gaussian PSF every image was homogenised to
        (``simulation.target_psf_fwhm``); None: images at the survey's PSFs."""
        value = self.meta.get("simulation", {}).get("target_psf_fwhm")
        if value is None:
            return None
        values = [float(v) for v in np.atleast_1d(value)]
        return tuple(values * len(self.bands) if len(values) == 1 else values)

    @property
    def has_conditions(self) -> bool:
        """Whether the scenes were drawn under ``simulation.conditions`` (each its own PSF,
        depth and bands, stored); otherwise every scene had the survey's nominal ones."""
        return self.meta.get("simulation", {}).get("conditions") is not None

    def conditions(self) -> dict[str, np.ndarray]:
        """Every scene's conditions (:data:`simulation.conditions.CONDITION_COLUMNS`, each
        (N, bands)): stored ones, or the survey's nominal ones for a dataset drawn without
        ``simulation.conditions`` (every dataset written before it)."""
        from simulation.conditions import CONDITION_COLUMNS, SurveyConditions, stack_conditions
        from simulation.surveys import sky_levels

        if self.has_conditions:
            labels = self.labels()
            missing = [c for c in CONDITION_COLUMNS if c not in labels]
            if missing:
                raise DatasetError(f"{self.root}: drawn under simulation.conditions but its "
                                   f"labels lack '{missing[0]}'; regenerate the dataset")
            return {c: labels[c] for c in CONDITION_COLUMNS}
        nominal = SurveyConditions(self.survey, self.bands).nominal()
        one = stack_conditions([nominal], [sky_levels(self.survey, self.bands)])
        return {name: np.repeat(column, self.n_samples, axis=0) for name, column in one.items()}

    def psfs(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(indices), bands, S, S) float64 effective PSF of each scene and band, unit sum,
        centred at (S-1)/2 (:data:`PSF_CONVENTION`): stored per scene under
        ``simulation.conditions``, otherwise :attr:`psf_images` for every scene."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.has_conditions:
            self.locate(indices)  # the same IndexError as for images
            return np.repeat(np.asarray(self.psf_images)[None], len(indices), axis=0)
        out = self.images(PSF_SET, indices).astype(np.float64)
        return out / out.sum(axis=(2, 3), keepdims=True)

    def iter_batches(self, image_set: str, indices: np.ndarray, batch_size: int = 512
                     ) -> Iterator[np.ndarray]:
        """Raw image batches of ``indices`` in order (bounded memory)."""
        for start in range(0, len(indices), batch_size):
            yield self.images(image_set, indices[start:start + batch_size])

    # -- labels --------------------------------------------------------------------------------
    def labels(self) -> dict[str, np.ndarray]:
        """Every label column over the whole dataset (small: a few floats per sample)."""
        if self._labels is None:
            columns: dict[str, list[np.ndarray]] = {}
            for shard in self.shards:
                try:
                    with h5py.File(shard.path, "r") as handle:
                        for name, dset in handle["labels"].items():
                            columns.setdefault(name, []).append(dset[()])
                except (OSError, KeyError) as exc:  # h5py's messages do not name the file
                    raise DatasetError(f"shard {shard.path} is truncated or unreadable ("
                                       f"{' '.join(str(exc).split())}): run the command that "
                                       f"made the dataset again to draw it again") from exc
            self._labels = {name: np.concatenate(parts) for name, parts in columns.items()}
        return self._labels


def dataset_is_complete(root: str | Path) -> bool:
    """Whether ``root`` holds a finished dataset (its metadata, written last, is readable)."""
    try:
        read_metadata(Path(root))
    except DatasetError:
        return False
    return True


def read_metadata(root: Path) -> dict[str, Any]:
    """The metadata of a complete dataset; a clear :class:`DatasetError` otherwise."""
    meta_path = root / METADATA_FILE
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    if not meta_path.is_file():
        hint = (" (generation is unfinished: run simulation.generate again to resume)"
                if (root / PLAN_FILE).is_file() else "")
        raise DatasetError(f"{root} is not a complete dataset: no {METADATA_FILE}{hint}")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path} is corrupt: {exc}") from exc


def open_dataset(root: str | Path) -> StampData:
    """Open a complete dataset directory (clear :class:`DatasetError` otherwise)."""
    return StampData(root)
