"""Dense BTK fields: scenes larger and denser than the training stamps (MADNESS's test fields).

Each field is a square of ``dense_fields.field_arcsec`` (41" = 205 LSST pixels by default) holding
``min_galaxies`` to ``max_galaxies`` galaxies brighter than ``max_mag`` in ``simulation.ref_band``,
placed uniformly at least ``margin_arcsec`` (3") inside the border by BTK's own
:class:`btk.sampling_functions.DefaultSampling`, drawn by BTK's CatsimGenerator (through
:class:`simulation.scenes.SceneDrawer`) with the survey, catalog and noise of the ``simulation``
config section.

Conventions (as everywhere in deblend): images in electrons per pixel, float32; pixel frame
x = array axis 1 (columns), y = array axis 0 (rows); a galaxy's (x, y) is BTK's
``x_peak``/``y_peak``. The noise is BTK's: Poisson noise of the galaxies, then Poisson noise of
the sky with the mean sky subtracted, so an empty pixel has mean 0 and variance
``sky_levels[band]``. Ellipticities are distortions e = (a^2-b^2)/(a^2+b^2) of uniform-weight
moments, measured exactly as the training labels are (:mod:`simulation.labels`): on the
``simulation.stamp_pixels`` stamp of the galaxy's isolated noiseless image, cut around its
nearest pixel (:func:`deblend.core.stamps.cut_stamp`), summed over ``simulation.label_bands``.

Reproducibility: field ``i`` follows from ``(dense_fields.seed, i)`` alone, so the fields on disk
are those :func:`draw_fields` draws in memory, whatever the chunking or interruptions.

On disk (:func:`generate_fields`): a directory marked as deblend's ``dense-fields`` output
(:mod:`deblend.core.outputs`) with ``metadata.json`` (the plan, its id, the sky levels and what
each array means) and ``chunks/chunk-KKKKK.h5`` files, each written aside and renamed
(:mod:`deblend.core.atomic`); an interrupted generation resumes chunk by chunk.

Command line: ``python -m simulation.dense_fields --config C --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy.table import Table
from btk.sampling_functions import DefaultSampling
from tqdm.auto import tqdm

from deblend.core.arguments import non_negative_int_arg, positive_int_arg
from deblend.core.atomic import atomic_output, write_json_atomic
from deblend.core.cli import fail_cleanly
from deblend.core.config import (
    Config,
    DenseFieldsConfig,
    SimulationConfig,
    load_config,
    plain,
)
from deblend.core.outputs import mark, refuse_foreign
from deblend.core.shapes import moment_size, moments_ellipticity
from deblend.core.stamps import cut_stamp, nearest_pixel
from simulation.builder import SceneSource
from simulation.catalogs import catalog_provenance
from simulation.conditions import at_nominal_conditions
from simulation.scenes import SceneDrawer
from simulation.surveys import SurveyGeometry

FORMAT_VERSION = 1
DENSE_FIELDS_KIND = "dense-fields"
"""The kind of output a dense-fields directory is (:mod:`deblend.core.outputs`)."""
METADATA_FILE = "metadata.json"
CHUNK_DIR = "chunks"
DEFAULT_MARGIN_ARCSEC = 3.0
"""Galaxy centres lie at least this far inside the field's border (arcsec)."""
DEFAULT_CHUNK_SIZE = 5
"""Fields per chunk file (the unit of resumption)."""
_SEED_TAG = 0xDF1E1D
"""Mixed into every field's seed so that fields never share a stream with dataset shards."""

SIMULATION_KEYS = ("survey", "catalog", "catalog_rows", "catalog_seed", "stamp_pixels", "ref_band",
                   "label_bands", "noise", "random_rotation", "shear")
"""The keys of the ``simulation`` section that fields depend on (the others, sample counts and
neighbour settings of the training stamps, do not change them)."""

ARRAY_DESCRIPTIONS = {
    "images": "(N, bands, H, W) float32 noisy fields, electrons/pixel, BTK's noise model "
              "(sky-subtracted: an empty pixel has mean 0, variance sky_levels[band])",
    "noiseless": "(N, bands, H, W) float32 the same fields without noise (sum of the isolated "
                 "galaxies), electrons/pixel",
    "isolated": "(N, max_galaxies, bands, S, S) float32 each galaxy alone, noiseless, on the "
                "S = stamp_pixels stamp centred on its nearest pixel (cut_stamp; zero where it "
                "overhangs the field and for padding rows past n_galaxies)",
    "n_galaxies": "(N,) galaxies in each field",
    "sky_levels": "(bands,) mean sky level, electrons/pixel (surveycodex mean_sky_level): the "
                  "variance of the background noise",
}
TRUTH_DESCRIPTIONS = {
    "index": "row of the galaxy in the field's isolated stamps",
    "x": "centre, column (array axis 1), pixels, 0-based (BTK x_peak)",
    "y": "centre, row (array axis 0), pixels, 0-based (BTK y_peak)",
    "ra": "offset of the centre from the field centre along +x, arcsec (BTK ra)",
    "dec": "offset along +y, arcsec (BTK dec)",
    "mag": "catalog AB magnitude in simulation.ref_band",
    "mag_<band>": "catalog AB magnitude per survey band",
    "redshift": "catalog redshift",
    "flux": "(bands,) flux of the isolated noiseless stamp (sum over its S x S pixels), "
            "electrons: the training labels' flux",
    "field_flux": "(bands,) flux of the isolated noiseless galaxy over the whole field, electrons",
    "e1": "uniform-weight moment distortion e1 of the isolated stamp summed over label_bands "
          "(pixel frame), as the training labels",
    "e2": "uniform-weight moment distortion e2",
    "e": "sqrt(e1^2 + e2^2)",
    "moment_size": "uniform-weight moment size sqrt((Qxx+Qyy)/2) of the same image, pixels",
    "clipped": "True where the S x S stamp overhangs the field's border",
}


class DenseFieldsError(ValueError):
    """A dense-fields directory is missing, incomplete, corrupt, or made from another config."""


@dataclass
class FieldBatch:
    """Dense fields and their truth (see :data:`ARRAY_DESCRIPTIONS`, :data:`TRUTH_DESCRIPTIONS`).

    Electrons per pixel; pixel frame x = axis -1 (columns), y = axis -2 (rows).
    """

    images: np.ndarray
    """(N, bands, H, W) float32 noisy fields."""
    noiseless: np.ndarray
    """(N, bands, H, W) float32 noiseless fields."""
    sky_levels: np.ndarray
    """(bands,) float64 mean sky level, electrons/pixel = background noise variance."""
    isolated: np.ndarray
    """(N, max_galaxies, bands, S, S) float32 each galaxy alone on its stamp, zero padded."""
    n_galaxies: np.ndarray
    """(N,) int galaxies per field; rows past it in ``isolated`` are padding."""
    truth: list[Table]
    """Per field, one row per galaxy (row j = ``isolated[i, j]``); columns: TRUTH_DESCRIPTIONS."""
    bands: tuple[str, ...]
    pixel_scale: float
    """arcsec per pixel"""
    survey: str
    noise: str = "all"
    """BTK's ``add_noise`` of ``images`` ("all", "galaxy", "background" or "none"): with "none"
    or "galaxy" the images hold no sky noise, whatever ``sky_levels`` says."""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def mask(self) -> np.ndarray:
        """(N, max_galaxies) bool: True for real galaxies, False for padding rows."""
        return np.arange(self.isolated.shape[1])[None, :] < self.n_galaxies[:, None]

    @property
    def stamp_pixels(self) -> int:
        return int(self.isolated.shape[-1])


# -- drawing -------------------------------------------------------------------------------------
class FieldSampling(DefaultSampling):
    """BTK's DefaultSampling over a whole field, with deblend's rotation and shear columns.

    BTK picks ``min_number`` to ``max_number`` galaxies with ``mag_name <= max_mag`` and offsets
    (ra, dec) uniform in [-max_shift, max_shift] arcsec. Then, as
    :class:`simulation.sampling.CentralTargetSampling` does, each galaxy's position angle is
    turned by a uniform random angle (``random_rotation``) and the constant shear ``shear``
    is written in the columns ``g1``/``g2`` (used when the generator applies shear).
    """

    def __init__(self, stamp_size: float, min_number: int, max_number: int, max_shift: float,
                 max_mag: float, ref_band: str, seed: int, random_rotation: bool = True,
                 shear: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__(stamp_size=stamp_size, max_number=max_number, min_number=min_number,
                         max_shift=max_shift, seed=int(seed), max_mag=max_mag,
                         mag_name=f"{ref_band}_ab")
        self.random_rotation = random_rotation
        self.shear = shear

    def __call__(self, table: Table) -> Table:
        scene = super().__call__(table)
        if self.random_rotation:
            turn = self.rng.uniform(0.0, 180.0, size=len(scene))
            scene["pa_disk"] = (np.asarray(scene["pa_disk"], float) + turn) % 180.0
            scene["pa_bulge"] = (np.asarray(scene["pa_bulge"], float) + turn) % 180.0
        scene["g1"] = float(self.shear[0])
        scene["g2"] = float(self.shear[1])
        return scene


def field_pixels(geometry: SurveyGeometry, field_arcsec: float) -> int:
    """Side of a field in pixels: ``field_arcsec / pixel_scale``, rounded (205 for 41" LSST)."""
    return round(field_arcsec / geometry.pixel_scale)


def field_seeds(seed: int, index: int) -> tuple[int, int]:
    """(sampling seed, noise seed) of field ``index`` of fields seeded ``seed``."""
    state = np.random.SeedSequence([_SEED_TAG, seed, index]).generate_state(2) % (2**31 - 1)
    return int(state[0]), int(state[1])


class FieldSource:
    """Everything needed to draw fields of one config: the simulation's survey and catalog
    (:class:`simulation.builder.SceneSource`), the field geometry and sampling limits."""

    def __init__(self, sim: SimulationConfig, fields: DenseFieldsConfig,
                 margin_arcsec: float = DEFAULT_MARGIN_ARCSEC,
                 scene_source: SceneSource | None = None) -> None:
        self.sim, self.fields = at_nominal_conditions(sim), fields
        self.scenes = scene_source if scene_source is not None else SceneSource(self.sim)
        geometry = self.scenes.geometry
        side = field_pixels(geometry, fields.field_arcsec)
        self.geometry = SurveyGeometry(geometry.name, geometry.bands, geometry.pixel_scale, side)
        """The field's grid (``stamp_pixels`` here is the field's side)."""
        self.stamp_pixels = sim.stamp_pixels
        self.max_shift = side * geometry.pixel_scale / 2.0 - margin_arcsec
        if not margin_arcsec >= 0:
            raise ValueError(f"margin_arcsec must be >= 0, got {margin_arcsec!r}")
        if self.max_shift <= 0:
            raise ValueError(f"dense_fields.field_arcsec = {fields.field_arcsec} leaves no room "
                             f"for galaxy centres {margin_arcsec}\" inside the border: use a "
                             f"field wider than {2 * margin_arcsec}\"")
        mags = np.asarray(self.scenes.catalog.table[f"{sim.ref_band}_ab"], float)
        if not np.any(mags <= fields.max_mag):
            raise ValueError(f"dense_fields.max_mag = {fields.max_mag}: no catalog galaxy is that "
                             f"bright in {sim.ref_band} (brightest {np.nanmin(mags):.2f})")
        self.label_index = [geometry.bands.index(b) for b in sim.label_bands]
        self.sky_levels = np.array(self._drawer(0, 0).sky_levels, np.float64)

    def _drawer(self, sampling_seed: int, noise_seed: int) -> SceneDrawer:
        sampling = FieldSampling(
            stamp_size=self.geometry.stamp_arcsec, min_number=self.fields.min_galaxies,
            max_number=self.fields.max_galaxies, max_shift=self.max_shift,
            max_mag=self.fields.max_mag, ref_band=self.sim.ref_band, seed=sampling_seed,
            random_rotation=self.sim.random_rotation, shear=self.sim.shear)
        return SceneDrawer(self.scenes.catalog, self.scenes.survey, self.geometry, sampling,
                           batch_size=1, noise=self.sim.noise,
                           apply_shear=any(g != 0.0 for g in self.sim.shear), seed=noise_seed,
                           keep_isolated=True)

    def draw_one(self, seed: int, index: int) -> dict[str, Any]:
        """Field ``index`` of fields seeded ``seed``: its arrays, padded truth columns and count."""
        batch = self._drawer(*field_seeds(seed, index)).draw()
        table = batch.tables[0]
        assert batch.isolated is not None
        isolated = batch.isolated[0]  # (max_galaxies, bands, H, W)
        image = batch.blend[0]
        if not np.all(np.isfinite(image)):
            raise RuntimeError(f"field {index}: non-finite pixels in the noisy field")
        n, side, size = len(table), self.geometry.stamp_pixels, self.stamp_pixels
        x = np.asarray(table["x_peak"], np.float64)
        y = np.asarray(table["y_peak"], np.float64)
        stamps = np.zeros((self.fields.max_galaxies, len(self.geometry.bands), size, size),
                          np.float32)
        clipped = np.zeros(self.fields.max_galaxies, bool)
        for j in range(n):
            stamps[j] = cut_stamp(isolated[j], x[j], y[j], size)
            cx, cy = nearest_pixel(x[j], y[j])
            clipped[j] = (min(cx, cy) - size // 2 < 0) or (max(cx, cy) + size // 2 >= side)
        label_images = stamps[:n][:, self.label_index].astype(np.float64).sum(axis=1)
        e1, e2 = moments_ellipticity(label_images)
        columns: dict[str, np.ndarray] = {
            "index": np.arange(n), "x": x, "y": y,
            "ra": np.asarray(table["ra"], np.float64), "dec": np.asarray(table["dec"], np.float64),
            "mag": np.asarray(table[f"{self.sim.ref_band}_ab"], np.float64),
            **{f"mag_{b}": np.asarray(table[f"{b}_ab"], np.float64) for b in self.geometry.bands},
            "redshift": np.asarray(table["redshift"], np.float64),
            "flux": stamps[:n].astype(np.float64).sum(axis=(-2, -1)),
            "field_flux": isolated[:n].astype(np.float64).sum(axis=(-2, -1)),
            "e1": e1, "e2": e2, "e": np.hypot(e1, e2), "moment_size": moment_size(label_images),
            "clipped": clipped[:n],
        }
        return {"images": image.astype(np.float32),
                "noiseless": isolated[:n].astype(np.float64).sum(axis=0).astype(np.float32),
                "isolated": stamps, "n_galaxies": n,
                "truth": {name: _pad(values, self.fields.max_galaxies)
                          for name, values in columns.items()}}

    def draw_range(self, seed: int, first: int, n: int,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Fields ``first`` to ``first + n - 1`` stacked: arrays with a leading field axis."""
        parts = []
        for index in range(first, first + n):
            parts.append(self.draw_one(seed, index))
            if progress:
                progress(1)
        return {"images": np.stack([p["images"] for p in parts]),
                "noiseless": np.stack([p["noiseless"] for p in parts]),
                "isolated": np.stack([p["isolated"] for p in parts]),
                "n_galaxies": np.array([p["n_galaxies"] for p in parts], np.int32),
                "truth": {name: np.stack([p["truth"][name] for p in parts])
                          for name in parts[0]["truth"]}}

    def batch(self, arrays: dict[str, Any]) -> FieldBatch:
        """A :class:`FieldBatch` of stacked arrays (:meth:`draw_range`, or read from disk)."""
        return _field_batch(arrays, self.sky_levels, self.geometry.bands,
                            self.geometry.pixel_scale, self.geometry.name,
                            self.sim.ref_band, self.sim.label_bands, self.sim.noise)


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """``values`` (n, ...) padded along axis 0 to ``length``: NaN for floats, -1 for integers,
    False for booleans."""
    values = np.asarray(values)
    fill: Any = False if values.dtype == bool else -1 if values.dtype.kind in "iu" else np.nan
    dtype = values.dtype if values.dtype.kind in "biu" else np.float64
    out = np.full((length,) + values.shape[1:], fill, dtype)
    out[:len(values)] = values
    return out


def _field_batch(arrays: dict[str, Any], sky_levels: np.ndarray, bands: tuple[str, ...],
                 pixel_scale: float, survey: str, ref_band: str,
                 label_bands: tuple[str, ...], noise: str) -> FieldBatch:
    counts = np.asarray(arrays["n_galaxies"], np.int64)
    tables = []
    for i, n in enumerate(counts):
        table = Table({name: values[i, :n] for name, values in arrays["truth"].items()})
        table.meta.update({"bands": list(bands), "ref_band": ref_band,
                           "label_bands": list(label_bands), "field": i})
        tables.append(table)
    return FieldBatch(images=arrays["images"], noiseless=arrays["noiseless"],
                      sky_levels=np.asarray(sky_levels, np.float64), isolated=arrays["isolated"],
                      n_galaxies=counts, truth=tables, bands=tuple(bands),
                      pixel_scale=float(pixel_scale), survey=survey, noise=noise)


def draw_fields(sim: SimulationConfig, fields: DenseFieldsConfig, n: int | None = None,
                seed: int | None = None, *, progress: bool = False,
                margin_arcsec: float = DEFAULT_MARGIN_ARCSEC) -> FieldBatch:
    """``n`` fields (default ``fields.n_fields``) seeded ``seed`` (default ``fields.seed``), in
    memory; field ``i`` is the same as field ``i`` of :func:`generate_fields` with that seed."""
    n = fields.n_fields if n is None else n
    seed = fields.seed if seed is None else seed
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    source = FieldSource(sim, fields, margin_arcsec)
    with tqdm(total=n, desc="drawing dense fields", unit="field", disable=not progress) as bar:
        arrays = source.draw_range(seed, 0, n, progress=bar.update)
    return source.batch(arrays)


# -- on disk -------------------------------------------------------------------------------------
def chunk_name(index: int) -> str:
    """File name of chunk ``index``."""
    return f"chunk-{index:05d}.h5"


def make_plan(config: Config, geometry: SurveyGeometry, stamp_pixels: int, margin_arcsec: float,
              chunk_size: int) -> dict[str, Any]:
    """What a dense-fields directory is made from: the config keys fields depend on, the
    catalog's provenance (a file's SHA-256), the geometry and the chunks."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    sim, fields = config.simulation, config.dense_fields
    n = fields.n_fields
    return {
        "format_version": FORMAT_VERSION,
        "simulation": {key: plain(getattr(sim, key)) for key in SIMULATION_KEYS},
        "dense_fields": plain(asdict(fields)),
        "catalog": catalog_provenance(sim.catalog, sim.catalog_rows, sim.catalog_seed),
        "survey": geometry.name, "bands": list(geometry.bands),
        "pixel_scale": geometry.pixel_scale, "field_pixels": geometry.stamp_pixels,
        "stamp_pixels": stamp_pixels, "margin_arcsec": margin_arcsec, "chunk_size": chunk_size,
        "chunks": [{"index": k, "first": first, "n": min(chunk_size, n - first)}
                   for k, first in enumerate(range(0, n, chunk_size))],
    }


def plan_id(plan: dict[str, Any]) -> str:
    """Stable identity of a plan (hash of its canonical JSON)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """Dotted name of the first key whose value differs between two plans."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, f"{prefix}{key}.")
            return f"{prefix}{key} ({a!r} there, {b!r} now)"
    return "nothing"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def chunk_is_complete(path: Path, expected_n: int, expected_plan_id: str) -> bool:
    """True only for a readable chunk of this plan holding all its arrays and fields."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return (bool(handle.attrs.get("complete", False))
                    and handle.attrs.get("plan_id") == expected_plan_id
                    and all(name in handle and handle[name].shape[0] == expected_n
                            for name in ("images", "noiseless", "isolated", "n_galaxies"))
                    and "truth" in handle)
    except (OSError, KeyError, ValueError):
        return False


def write_chunk(path: Path, arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
    """Write one chunk atomically (a ``.tmp`` sibling, flushed, renamed onto ``path``)."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as handle:
        for name in ("images", "noiseless", "isolated", "n_galaxies"):
            handle.create_dataset(name, data=arrays[name])
        group = handle.create_group("truth")
        for name, values in arrays["truth"].items():
            group.create_dataset(name, data=values)
        group.attrs["columns"] = json.dumps(list(arrays["truth"]))  # HDF5 sorts names
        for key, value in attrs.items():
            handle.attrs[key] = value
        handle.attrs["complete"] = True


def _metadata(plan: dict[str, Any], sky_levels: np.ndarray, ref_band: str,
              label_bands: tuple[str, ...]) -> dict[str, Any]:
    return {
        "plan": plan, "plan_id": plan_id(plan),
        "n_fields": plan["dense_fields"]["n_fields"],
        "sky_levels": [float(s) for s in sky_levels],
        "ref_band": ref_band, "label_bands": list(label_bands),
        "units": "electrons per pixel (BTK), float32",
        "pixel_frame": "x = array axis 1 (columns), y = array axis 0 (rows); (x, y) = BTK "
                       "(x_peak, y_peak)",
        "ellipticity": "distortion e = (a^2-b^2)/(a^2+b^2), uniform-weight moments",
        "arrays": ARRAY_DESCRIPTIONS, "truth": TRUTH_DESCRIPTIONS,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def prepare_directory(root: Path, plan: dict[str, Any], force: bool) -> None:
    """Claim ``root`` for ``plan``: an absent or empty directory, or deblend's dense fields of
    the same plan (kept, to resume). Other dense fields are refused unless ``force`` (then
    replaced); any directory that is not deblend's dense fields is refused, even with ``force``.
    Unreadable metadata of deblend's own directory is rewritten (chunks carry their plan id)."""
    if refuse_foreign(root, DENSE_FIELDS_KIND):
        meta = _read_json(root / METADATA_FILE)
        old = meta.get("plan") if meta else None
        if isinstance(old, dict) and old != plan:
            if not force:
                raise DenseFieldsError(
                    f"{root} holds dense fields made from another config (differs in "
                    f"{_first_difference(old, plan)}): choose another --out, or pass --force to "
                    f"replace them")
            (root / METADATA_FILE).unlink(missing_ok=True)
            shutil.rmtree(root / CHUNK_DIR, ignore_errors=True)
    (root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    mark(root, DENSE_FIELDS_KIND)


def generate_fields(config: Config, out_dir: str | Path, *, progress: bool = True,
                    force: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    margin_arcsec: float = DEFAULT_MARGIN_ARCSEC,
                    log: Callable[[str], None] = print) -> Path:
    """Generate (or resume) the dense fields of ``config`` (its ``simulation`` and
    ``dense_fields`` sections) in ``out_dir``; returns ``out_dir``, then readable with
    :func:`open_fields`. Complete chunks of the same plan are kept; a directory made from
    another config is refused (replaced with ``force``)."""
    root = Path(out_dir)
    source = FieldSource(config.simulation, config.dense_fields, margin_arcsec)
    if source.scenes.catalog_note:
        log(source.scenes.catalog_note)
    plan = make_plan(config, source.geometry, source.stamp_pixels, margin_arcsec, chunk_size)
    the_plan_id = plan_id(plan)
    prepare_directory(root, plan, force)
    meta = _metadata(plan, source.sky_levels, config.simulation.ref_band,
                     config.simulation.label_bands)
    old = _read_json(root / METADATA_FILE)
    if old is None or old.get("plan") != plan or old.get("plan_id") != the_plan_id:
        write_json_atomic(root / METADATA_FILE, meta)

    chunks = plan["chunks"]
    todo = [c for c in chunks if not chunk_is_complete(root / CHUNK_DIR / chunk_name(c["index"]),
                                                       c["n"], the_plan_id)]
    for chunk in todo:
        if (root / CHUNK_DIR / chunk_name(chunk["index"])).exists():
            log(f"chunk {root / CHUNK_DIR / chunk_name(chunk['index'])} is truncated, unreadable "
                f"or of another config: drawing it again")
    if len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already complete")
    seed = config.dense_fields.seed
    with tqdm(total=plan["dense_fields"]["n_fields"], initial=sum(c["n"] for c in chunks
                                                                   if c not in todo),
              desc=f"drawing {plan['survey']} dense fields", unit="field",
              disable=not progress) as bar:
        for chunk in todo:
            arrays = source.draw_range(seed, chunk["first"], chunk["n"], progress=bar.update)
            write_chunk(root / CHUNK_DIR / chunk_name(chunk["index"]), arrays,
                        {"plan_id": the_plan_id, "chunk_index": chunk["index"],
                         "first_field": chunk["first"], "n_fields": chunk["n"],
                         "format_version": FORMAT_VERSION})
    return root


def open_fields(out_dir: str | Path) -> FieldBatch:
    """Read the complete dense fields of ``out_dir`` into memory.

    FileNotFoundError when the directory is absent; :class:`DenseFieldsError` naming the file
    (and the array) when the metadata or a chunk is missing, unreadable, truncated, of another
    plan or lacks an array.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no dense fields at {root}: the directory does not exist")
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise DenseFieldsError(f"{root} holds no {METADATA_FILE}: not (yet) a dense-fields "
                               f"directory; run python -m simulation.dense_fields")
    meta = _read_json(meta_path)
    try:
        plan, the_plan_id = meta["plan"], meta["plan_id"]  # type: ignore[index]
        chunks, sky_levels = plan["chunks"], np.asarray(meta["sky_levels"], np.float64)
        bands, ref_band = tuple(plan["bands"]), meta["ref_band"]
        label_bands, noise = tuple(meta["label_bands"]), plan["simulation"]["noise"]
    except (KeyError, TypeError) as exc:
        raise DenseFieldsError(f"{meta_path} is unreadable or lacks {exc}: run "
                               f"python -m simulation.dense_fields again to rewrite it") from None
    parts = []
    for chunk in chunks:
        parts.append(_read_chunk(root / CHUNK_DIR / chunk_name(chunk["index"]), chunk["n"],
                                 the_plan_id))
    arrays = {name: np.concatenate([p[name] for p in parts])
              for name in ("images", "noiseless", "isolated", "n_galaxies")}
    arrays["truth"] = {name: np.concatenate([p["truth"][name] for p in parts])
                       for name in parts[0]["truth"]}
    return _field_batch(arrays, sky_levels, bands, plan["pixel_scale"], plan["survey"],
                        ref_band, label_bands, noise)


def _read_chunk(path: Path, n: int, the_plan_id: str) -> dict[str, Any]:
    if not path.is_file():
        raise DenseFieldsError(f"dense fields incomplete: {path} is missing; run python -m "
                               f"simulation.dense_fields again to resume")
    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete", False):
                raise DenseFieldsError(f"{path} is incomplete (no 'complete' flag)")
            if handle.attrs.get("plan_id") != the_plan_id:
                raise DenseFieldsError(f"{path} belongs to another plan "
                                       f"({handle.attrs.get('plan_id')}, not {the_plan_id})")
            out: dict[str, Any] = {}
            for name in ("images", "noiseless", "isolated", "n_galaxies", "truth"):
                if name not in handle:
                    raise DenseFieldsError(f"{path} lacks the array '{name}'")
            for name in ("images", "noiseless", "isolated", "n_galaxies"):
                out[name] = handle[name][()]
                if out[name].shape[0] != n:
                    raise DenseFieldsError(f"{path}: '{name}' holds {out[name].shape[0]} fields, "
                                           f"expected {n}")
            missing = [c for c in TRUTH_DESCRIPTIONS if "<" not in c and c not in handle["truth"]]
            if missing:
                raise DenseFieldsError(f"{path} lacks the truth column 'truth/{missing[0]}'")
            order = json.loads(handle["truth"].attrs.get("columns", "[]"))
            names = [c for c in order if c in handle["truth"]]
            names += sorted(set(handle["truth"]) - set(names))
            out["truth"] = {name: handle["truth"][name][()] for name in names}
    except DenseFieldsError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise DenseFieldsError(f"{path} is unreadable (corrupt or truncated: "
                               f"{' '.join(str(exc).split())}); delete it and run python -m "
                               f"simulation.dense_fields again to redraw it") from None
    return out


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.dense_fields",
        description="Draw the dense BTK fields of a config's dense_fields section (resumable).")
    parser.add_argument("--config", help="YAML config (default: embedded defaults)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=positive_int_arg, help="overrides dense_fields.n_fields")
    parser.add_argument("--seed", type=non_negative_int_arg, help="overrides dense_fields.seed")
    parser.add_argument("--chunk-size", type=positive_int_arg, default=DEFAULT_CHUNK_SIZE,
                        help=f"fields per chunk file (default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--force", action="store_true",
                        help="replace dense fields made from another config")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    changes = {k: v for k, v in (("n_fields", args.n), ("seed", args.seed)) if v is not None}
    if changes:
        config = config.replace("dense_fields", **changes)
    root = generate_fields(config, args.out, progress=not args.no_progress, force=args.force,
                           chunk_size=args.chunk_size)
    batch = open_fields(root)
    print(f"dense fields complete: {root} ({len(batch)} fields of {batch.images.shape[-1]} px, "
          f"{int(batch.n_galaxies.sum())} galaxies, {batch.survey} {' '.join(batch.bands)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
