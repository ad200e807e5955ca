"""Training batches streamed from a dataset on disk.

Samples are independent random scenes, so a batch of consecutive samples is statistically as good
as a random one, and it is read with a few large copies from the memory-mapped shards instead of
one small read per sample. :class:`BlockBatchSampler` therefore yields *batches of indices*: it
rotates the selected indices by a random offset, cuts them into blocks of ``batch_size``
consecutive entries and visits the blocks in random order; offset and order are drawn from
(seed, epoch), so every epoch is reproducible. Under DDP each rank takes every
``world_size``-th block.

:class:`BatchReader` turns such a block into normalised tensors (SPEC 3, with the dataset's
constants) inside the DataLoader (``batch_size=None``: no per-sample collation), in its worker
processes when ``training.num_workers > 0``. On 2 CPU cores 0 workers is fastest: a worker
competes with torch's own threads (``python -m benchmarks.training --workers 1``).

Every epoch reads the same images and normalises them the same way, so a reader can keep what it
normalised (:class:`NormalizedImages`) and copy it from memory in later epochs: the values are
bit-identical, the first epoch costs the same and each later one skips the disk read and the
normalisation. :func:`make_loader` keeps them when they fit ``cache_bytes``
(``training.normalized_cache_gib``).

With per-stamp flux scales (``simulation.norm_flux_scale``) a sample's input and its clean target
are both normalised with the scale of the *input* stamp (over the bands it has), as
:meth:`deblend.core.inference.Deblender.predict` reads it; the reader computes each sample's
scale once, from its raw input, and keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deblend.core.normalization import flux_scales, normalize
from deblend.core.symmetry import image_view, in_views
from simulation.dataset import StampData, open_dataset
from training.map_targets import LatentTargets

TARGETS = ("clean", "ellipticity", "map_latent")
"""What a stage's loss compares with: the clean isolated target, its labels (e1, e2), or the
MAP latent of its target (:mod:`training.map_targets`)."""


def select_indices(data: StampData, split: str, min_target_e: float,
                   fraction: float = 1.0) -> np.ndarray:
    """Sample indices of ``split`` whose target has label ``e > min_target_e`` (all if 0), the
    first ``fraction`` of them (rounded up)."""
    indices = data.split_indices(split)
    if min_target_e > 0:
        e = data.labels()["e"]
        indices = indices[e[indices] > min_target_e]
    return indices[:math.ceil(fraction * len(indices))]


def ellipticity_targets(data: StampData) -> np.ndarray:
    """Label (e1, e2) of every sample as float32 ``(n_samples, 2)``."""
    labels = data.labels()
    return np.stack([labels["e1"], labels["e2"]], axis=1).astype(np.float32)


class NormalizedImages:
    """The normalised images of one image set over fixed sample ``indices``, each normalised on
    its first read and copied from memory afterwards (float32, ``len(indices)`` stamps: the
    array is allocated whole but the system commits its pages only as they are filled)."""

    def __init__(self, image_set: str, indices: np.ndarray) -> None:
        self.image_set = image_set
        self.indices = np.unique(np.asarray(indices, dtype=np.int64))
        self.filled = np.zeros(len(self.indices), dtype=bool)
        self.values: np.ndarray | None = None

    def __call__(self, data: StampData, indices: np.ndarray,
                 scale: np.ndarray | None = None) -> np.ndarray:
        """Normalised images (len(indices), bands, H, W) of ``indices`` (a subset of the
        cached indices), a fresh array the caller may change in place; ``scale``: the samples'
        flux scales (per-stamp scaling only; a sample's is always the same)."""
        rows = np.minimum(np.searchsorted(self.indices, indices), len(self.indices) - 1)
        if not np.array_equal(self.indices[rows], indices):
            raise ValueError(f"{self.image_set} images of samples outside the kept ones")
        if self.values is not None and self.filled[rows].all():
            return self.values[rows]
        images = normalize(data.images(self.image_set, indices), data.normalization, scale)
        if self.values is None:
            self.values = np.empty((len(self.indices),) + images.shape[1:], np.float32)
        self.values[rows] = images
        self.filled[rows] = True
        return images


class BatchReader(Dataset):
    """``reader[indices]`` -> (inputs, targets): normalised float32 tensors of a whole batch.

    Inputs are the ``input_set`` images ``(n, bands, H, W)``; targets the normalised clean
    images (``target="clean"``), the labels (e1, e2) ``(n, 2)`` (``target="ellipticity"``), or
    the MAP latents ``(n, D)`` of ``latent_targets`` (``target="map_latent"``), each input then
    shown in the view its latent was fitted in. The dataset is opened lazily in each process,
    so the reader pickles cheaply. With ``cached`` (the sample indices it serves) it keeps the
    normalised images it read (:class:`NormalizedImages`): later reads of them skip the disk
    and the normalisation and give the same values.
    """

    def __init__(self, root: str | Path, input_set: str, target: str,
                 latent_targets: LatentTargets | None = None,
                 cached: np.ndarray | None = None, fill_unavailable: bool = False) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target '{target}' (one of {TARGETS})")
        if (target == "map_latent") != (latent_targets is not None):
            raise ValueError("latent_targets are needed by, and only by, target 'map_latent'")
        self.root = Path(root)
        self.input_set = input_set
        self.target = target
        self.latent_targets = latent_targets
        self._data: StampData | None = None
        self._ellipticity: np.ndarray | None = None
        self.cached = cached
        self.fill_unavailable = fill_unavailable
        self._available: np.ndarray | None = None
        self._normalized: dict[str, NormalizedImages] = {}
        self._scales: np.ndarray | None = None

    @property
    def data(self) -> StampData:
        if self._data is None:
            self._data = open_dataset(self.root)
            if self.target == "ellipticity":
                self._ellipticity = ellipticity_targets(self._data)
            if self.fill_unavailable and self._data.has_conditions:
                self._available = self._data.conditions()["available"].astype(bool)
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_ellipticity": None, "_available": None,
                "_normalized": {}, "_scales": None}

    def image_sets(self) -> tuple[str, ...]:
        """The image sets a batch reads: the input set, and "clean" for target "clean"."""
        return (self.input_set, "clean") if self.target == "clean" else (self.input_set,)

    def normalized_bytes(self, n_samples: int) -> int:
        """Memory (bytes) the normalised images of :meth:`image_sets` over ``n_samples``
        samples hold once kept (float32)."""
        data = self.data
        return n_samples * len(self.image_sets()) * len(data.bands) * data.stamp_pixels ** 2 * 4

    def flux_scales(self, indices: np.ndarray) -> np.ndarray | None:
        """Each sample's flux scale (:func:`deblend.core.normalization.flux_scales` of its raw
        input over the bands the networks are shown, those ``fill_unavailable`` keeps; read
        once, then kept), or None without per-stamp scaling."""
        data = self.data
        if not data.normalization.stamp_scale:
            return None
        if self._scales is None:
            self._scales = np.full(data.n_samples, np.nan)
        missing = indices[np.isnan(self._scales[indices])]
        if len(missing):
            available = None if self._available is None else self._available[missing]
            self._scales[missing] = flux_scales(data.images(self.input_set, missing),
                                                data.normalization, available)
        return self._scales[indices]

    def normalized(self, image_set: str, indices: np.ndarray) -> np.ndarray:
        """Normalised images of ``indices`` (a fresh array), from memory when kept; with
        per-stamp scaling each sample's at its input's flux scale."""
        data = self.data
        scale = self.flux_scales(indices)
        if self.cached is None:
            return normalize(data.images(image_set, indices), data.normalization, scale)
        if image_set not in self._normalized:
            self._normalized[image_set] = NormalizedImages(image_set, self.cached)
        return self._normalized[image_set](data, indices, scale)

    def __getitem__(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.normalized(self.input_set, indices)
        if self._available is not None:  # set by self.data, which normalized() opened
            inputs[~self._available[indices]] = 0.0  # as Deblender.predict fills a missing band
        if self.target == "clean":
            targets = self.normalized("clean", indices)
        elif self.latent_targets is not None:
            inputs = in_views(inputs, self.latent_targets.view[indices], image_view)
            targets = self.latent_targets.latent[indices]
        else:
            assert self._ellipticity is not None
            targets = self._ellipticity[indices]
        return torch.from_numpy(inputs), torch.from_numpy(targets)


def first_non_finite(reader: BatchReader, indices: np.ndarray, chunk: int = 512) -> str | None:
    """Where ``reader``'s inputs or targets over ``indices`` first hold a NaN or an infinity
    (e.g. "sample 1234 (blend images)"), or None when all are finite. Reads the split once."""
    data = reader.data
    labels = ellipticity_targets(data) if reader.target == "ellipticity" else None
    for start in range(0, len(indices), chunk):
        part = np.asarray(indices[start:start + chunk])
        sets = [(f"{reader.input_set} images", data.images(reader.input_set, part))]
        if reader.latent_targets is not None:
            sets.append(("MAP target latents", reader.latent_targets.latent[part]))
        elif labels is None:
            sets.append(("clean images", data.images("clean", part)))
        else:
            sets.append(("ellipticity labels", labels[part]))
        for name, values in sets:
            finite = np.isfinite(values.reshape(len(part), -1)).all(axis=1)
            if not finite.all():
                return f"sample {int(part[np.argmin(finite)])} ({name})"
    return None


class BlockBatchSampler(Sampler[np.ndarray]):
    """Blocks of consecutive ``indices`` (see module docstring), one rank's share.

    With ``equal_shards`` every rank gets the same number of blocks (surplus blocks of the epoch
    are dropped), as DDP training needs; validation keeps every block.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, equal_shards: bool = False) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.equal_shards = equal_shards
        self.epoch = 0
        n_blocks = -(-len(self.indices) // batch_size)
        if equal_shards and n_blocks < world_size:
            raise ValueError(f"{len(self.indices)} samples make {n_blocks} batches of "
                             f"{batch_size}: too few for {world_size} processes")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose offset and block order are drawn."""
        self.epoch = epoch

    def blocks(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, in the order they are visited."""
        indices = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            indices = np.roll(indices, -int(rng.integers(self.batch_size)))
        blocks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        if self.equal_shards:
            blocks = blocks[:len(blocks) - len(blocks) % self.world_size]
        return blocks[self.rank::self.world_size]

    def num_samples(self) -> int:
        """Samples this rank sees in the current epoch."""
        return int(sum(len(block) for block in self.blocks()))

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.blocks())

    def __len__(self) -> int:
        return len(self.blocks())


def make_loader(data_dir: str | Path, *, input_set: str, target: str, split: str,
                batch_size: int,
                epoch: int = 0, seed: int = 0, min_target_e: float = 0.0, fraction: float = 1.0,
                num_workers: int = 0,
                pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                latent_targets: LatentTargets | None = None, cache_bytes: int = 0,
                fill_unavailable: bool = False) -> DataLoader:
    """DataLoader of (``input_set`` images, ``target``) batches over ``split`` of a dataset
    (its first ``fraction``, :func:`select_indices`).

    The training split is shuffled by blocks (``loader.sampler.set_epoch`` picks the epoch) and
    split evenly between DDP ranks; other splits are read in order. ``batch_size=None`` in the
    DataLoader: the reader returns whole batches, ``num_workers`` processes read ahead. The
    reader (in each worker process) keeps the normalised images it reads when they fit
    in ``cache_bytes``: all of the split's (under DDP the ranks' shares change
    from epoch to epoch, so each rank may come to hold them all). With ``fill_unavailable``,
    the input bands a dataset drawn under ``simulation.conditions`` marks unavailable are 0, as
    ``Deblender.predict(available=...)`` fills them (targets keep every band).
    """
    shuffle = split == "train"
    reader = BatchReader(data_dir, input_set, target, latent_targets,
                         fill_unavailable=fill_unavailable)
    indices = select_indices(reader.data, split, min_target_e, fraction)
    if len(indices) == 0:
        cut = f" with target e > {min_target_e} (training.min_target_e)" if min_target_e else ""
        raise ValueError(f"the {split} split of {data_dir} has no samples{cut}")
    sampler = BlockBatchSampler(indices, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                world_size=world_size, equal_shards=shuffle)
    sampler.set_epoch(epoch)
    if reader.normalized_bytes(len(indices)) <= cache_bytes:
        reader.cached = indices
    # an own generator: iterating must not draw from the global torch RNG (reproducible resume)
    return DataLoader(reader, sampler=sampler,
                      batch_size=None,
                      generator=torch.Generator().manual_seed(seed),
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)



def kept_bytes(loader: DataLoader) -> int:
    """Memory (bytes, per process) a loader of :func:`make_loader` comes to hold in normalised
    images (0 when it keeps none)."""
    reader: BatchReader = loader.dataset
    return 0 if reader.cached is None else reader.normalized_bytes(len(reader.cached))
