"""Building a dataset: plan, generate shards (resumable, parallel), finalise the metadata.

Reproducibility: shard ``k`` is drawn from ``SeedSequence([seed, k])`` alone, so the same seed
gives the same bytes whatever the number of workers, the order shards run in, or interruptions.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from deblend.core.atomic import write_json_atomic, write_text_atomic
from deblend.core.config import SimulationConfig, plain
from deblend.core.metacal import target_sigmas
from deblend.core.normalization import MaxAccumulator
from deblend.core.outputs import mark, refuse_foreign
from simulation.catalogs import catalog_provenance, load_catalog, read_catsim_file
from simulation.centring import CANVAS_MARGIN
from simulation.dataset import (
    IMAGE_SETS,
    METADATA_FILE,
    PLAN_FILE,
    SHARD_DIR,
    DatasetError,
    StampData,
    make_plan,
    plan_id,
    psf_metadata,
    read_metadata,
    shard_is_complete,
    shard_name,
    write_shard,
)
from simulation.labels import LABEL_DESCRIPTIONS, scene_labels
from simulation.morphology import load_morphology_sources
from simulation.sampling import CentralTargetSampling
from simulation.scenes import SceneBatch, SceneDrawer, homogenized
from simulation.surveys import (
    SurveyGeometry,
    check_bands,
    get_survey,
    psf_images,
    survey_geometry,
    survey_sky_levels,
)

DATASET_KIND = "dataset"
"""The kind of output a dataset directory is (:mod:`deblend.core.outputs`)."""


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index`` of a dataset seeded ``seed``; depends on nothing else."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class SceneSource:
    """Everything needed to draw scenes of one simulation config: survey, catalog, geometry."""

    def __init__(self, sim: SimulationConfig) -> None:
        self.sim = sim
        self.survey = get_survey(sim.survey)
        self.geometry: SurveyGeometry = survey_geometry(sim.survey, sim.stamp_pixels)
        check_bands(sim.label_bands, self.geometry, "simulation.label_bands")
        check_bands((sim.ref_band,), self.geometry, "simulation.ref_band")
        self.catalog = load_catalog(
            sim.catalog, self.geometry.bands, sim.catalog_rows, sim.catalog_seed)
        self.catalog_note: str = self.catalog.get_raw_catalog().meta.get("dropped", "")
        """What the catalog lost to unusable rows (one line), or "" when nothing was dropped."""

    def drawer(self, seed: int, batch_size: int | None = None, keep_isolated: bool = False,
               shear_positions: bool = False) -> SceneDrawer:
        """A scene drawer seeded by ``seed`` (sampling and noise both follow from it).

        ``shear_positions``: shear the neighbours' positions with the scene too (a sheared sky,
        :class:`simulation.sampling.CentralTargetSampling`); off by default.
        """
        sim = self.sim
        sampling_seed, noise_seed = np.random.SeedSequence(seed).generate_state(2) % (2**31 - 1)
        canvas = self.geometry
        if sim.stamp_centre == "detection":  # drawn wider, cut around the detected target
            canvas = survey_geometry(sim.survey, sim.stamp_pixels + 2 * CANVAS_MARGIN)
        sampling = CentralTargetSampling(
            stamp_size=canvas.stamp_arcsec, min_neighbours=sim.min_neighbours,
            max_neighbours=sim.max_neighbours, neighbour_shift=sim.neighbour_shift,
            target_max_mag=sim.target_max_mag, neighbour_max_mag=sim.neighbour_max_mag,
            ref_band=sim.ref_band, shear=sim.shear, random_rotation=sim.random_rotation,
            rotated_twins=sim.rotated_twins, seed=int(sampling_seed),
            shear_positions=shear_positions, morphology=sim.morphology, bright=sim.bright)
        return SceneDrawer(self.catalog, self.survey, canvas, sampling,
                           batch_size=(1 if sim.conditions is not None
                                       else batch_size or sim.btk_batch_size), noise=sim.noise,
                           apply_shear=any(g != 0.0 for g in sim.shear), seed=int(noise_seed),
                           keep_isolated=keep_isolated, stamp_pixels=sim.stamp_pixels,
                           conditions=sim.conditions)

    def draw(self, n: int, seed: int, progress: Callable[[int], None] | None = None,
             shear_positions: bool = False) -> tuple[SceneBatch, dict[str, np.ndarray]]:
        """``n`` scenes and their labels, in memory (for shards and for shear populations);
        ``shear_positions`` as in :meth:`drawer`."""
        drawer = self.drawer(seed, shear_positions=shear_positions)
        parts: list[SceneBatch] = []
        drawn = 0
        while drawn < n:
            batch = drawer.draw()
            parts.append(batch)
            if progress:
                progress(min(len(batch.tables), n - drawn))
            drawn += len(batch.tables)
        centred = parts[0].offsets is not None
        scenes = SceneBatch(
            clean=np.concatenate([p.clean for p in parts])[:n],
            noisy=np.concatenate([p.noisy for p in parts])[:n],
            blend=np.concatenate([p.blend for p in parts])[:n],
            tables=[t for p in parts for t in p.tables][:n],
            offsets=np.concatenate([p.offsets for p in parts])[:n] if centred else None,
            detected=np.concatenate([p.detected for p in parts])[:n] if centred else None,
            conditions=None if parts[0].conditions is None else {
                name: np.concatenate([p.conditions[name] for p in parts])[:n]
                for name in parts[0].conditions},
            psf=None if parts[0].psf is None else np.concatenate([p.psf for p in parts])[:n])
        if self.sim.target_psf_fwhm is not None:
            scenes = homogenized(scenes, self.target_sigma, self.nominal_psfs,
                                 survey_sky_levels(self.survey, self.geometry.bands), seed)
        labels = scene_labels(scenes, self.geometry, self.sim.label_bands, self.sim.ref_band,
                              self.sim.max_neighbours)
        return scenes, labels

    @property
    def target_sigma(self) -> tuple[float, ...] | None:
        """``simulation.target_psf_fwhm`` as Gaussian sigmas per band, pixels."""
        return target_sigmas(self.sim.target_psf_fwhm, len(self.geometry.bands),
                             self.geometry.pixel_scale)

    @property
    def nominal_psfs(self) -> np.ndarray:
        """(bands, S, S) the survey's nominal effective PSF images."""
        return psf_images(self.sim.survey, self.geometry.bands, self.sim.stamp_pixels)


# -- worker side ---------------------------------------------------------------------------------
_SOURCE: SceneSource | None = None
"""The scene source of this process: built by the main process before the workers fork, so a
bad catalog or survey fails there, once, with its own message; the workers inherit it."""
_COUNTER: Any = None


def _init_worker(counter: Any) -> None:
    global _COUNTER
    _COUNTER = counter


def _count(n: int) -> None:
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += n


def generate_shard(root: Path, shard: dict[str, Any], seed: int, the_plan_id: str) -> int:
    """Draw and write one shard; returns its index. Uses the process's :class:`SceneSource`."""
    assert _SOURCE is not None, "no scene source: _run_shards sets it before the workers fork"
    scenes, labels = _SOURCE.draw(shard["n"], shard_seed(seed, shard["index"]), progress=_count)
    images = {name: getattr(scenes, name) for name in IMAGE_SETS}
    bad = [name for name, arr in images.items() if not np.all(np.isfinite(arr))]
    if bad:
        raise RuntimeError(f"shard {shard['index']}: non-finite pixels in '{bad[0]}'")
    write_shard(root / SHARD_DIR / shard_name(shard["index"]), images, labels,
                {"shard_index": shard["index"], "first_sample": shard["first"],
                 "n_samples": shard["n"], "plan_id": the_plan_id}, psf=scenes.psf)
    return int(shard["index"])


# -- main side -----------------------------------------------------------------------------------
def prepare_directory(root: Path, plan: dict[str, Any], force: bool,
                      log: Callable[[str], None] = print) -> None:
    """Create ``root`` for ``plan``; refuse to overwrite a finished or different dataset.

    An unfinished dataset with the same plan is kept, so its complete shards are reused; so is a
    finished one whose metadata or shards were damaged (truncated by a full disk or an
    interrupted copy): what is unreadable is drawn again. A directory that is not a dataset is
    refused, even with ``force`` (:mod:`deblend.core.outputs`; datasets written before outputs
    were marked are recognised by their plan).
    """
    meta, plan_path = root / METADATA_FILE, root / PLAN_FILE
    refuse_foreign(root, DATASET_KIND, legacy=lambda path: (path / PLAN_FILE).is_file())
    started = _read_plan(plan_path) if plan_path.exists() else None
    if meta.exists() and started == plan and not dataset_is_whole(root):
        log(f"{root} is a dataset of this config with an unreadable file: it is finished again")
        meta.unlink()  # written again at the end, once the damaged shards are drawn again
    if plan_path.exists() and started is None and not force:
        raise DatasetError(f"{plan_path} is unreadable (truncated?): pass --force to start the "
                           f"dataset again")
    if (not force and started is not None and not meta.exists()
            and started.get("catalog_sha256") not in (None, plan.get("catalog_sha256"))
            and {k: v for k, v in started.items() if k != "catalog_sha256"}
            == {k: v for k, v in plan.items() if k != "catalog_sha256"}):
        raise DatasetError(f"the catalog {plan['simulation']['catalog']} changed since {root} "
                           f"was started (sha256 {str(started.get('catalog_sha256'))[:12]}, now "
                           f"{str(plan.get('catalog_sha256'))[:12]}): restore it, or pass "
                           f"--force to start the dataset again")
    if meta.exists() or (plan_path.exists() and started != plan):
        if not force:
            what = "a finished dataset" if meta.exists() else "an unfinished dataset of another plan"
            raise DatasetError(f"{root} already holds {what}; pass --force to replace it")
        for path in (meta, plan_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(root / SHARD_DIR, ignore_errors=True)
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    mark(root, DATASET_KIND)
    if not plan_path.exists():
        write_json_atomic(plan_path, plan)


def dataset_is_whole(root: str | Path) -> bool:
    """Whether ``root`` holds a finished dataset whose shards are all readable and complete (a
    shard truncated after the dataset was finished makes it unfinished: drawn again)."""
    root = Path(root)
    try:
        meta = read_metadata(root)
        shards = [(root / SHARD_DIR / s["file"], s["n"]) for s in meta["shards"]]
        the_plan_id = meta["dataset_id"]
    except (DatasetError, KeyError, TypeError):
        return False
    return all(shard_is_complete(path, n, the_plan_id) for path, n in shards)


def _read_plan(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def plan_simulation(sim: SimulationConfig) -> dict[str, Any]:
    """The plan's ``simulation`` entry: the config section, without keys added since at their
    defaults (``stamp_centre: truth``, ``conditions``, ``morphology`` and ``bright`` null, no
    COSMOS fits or real galaxies in ``morphology``, no ``norm_flux_scale``), so that datasets
    planned before keep their identity."""
    simulation = plain(asdict(sim))
    if sim.stamp_centre == "truth":
        del simulation["stamp_centre"]
    for key in ("conditions", "morphology", "bright"):
        if getattr(sim, key) is None:
            del simulation[key]
    if not sim.norm_flux_scale:
        del simulation["norm_flux_scale"]
    for fraction, files in (("cosmos_fraction", ("cosmos_catalog", "cosmos_withheld")),
                            ("real_fraction", ("real_catalog",))):
        if sim.morphology is not None and getattr(sim.morphology, fraction) == 0:
            for key in (fraction, *files):
                del simulation["morphology"][key]
    return simulation


def check_catalog(sim: SimulationConfig) -> None:
    """Read and check the survey, bands and catalog of ``sim`` (a CatalogError naming the file
    and column), for a command to refuse a bad one before it claims or empties its output."""
    geometry = survey_geometry(sim.survey, sim.stamp_pixels)
    check_bands(sim.label_bands, geometry, "simulation.label_bands")
    check_bands((sim.ref_band,), geometry, "simulation.ref_band")
    if sim.catalog is not None:
        read_catsim_file(sim.catalog, geometry.bands)
    if sim.morphology is not None:
        load_morphology_sources(sim.morphology)


def build_dataset(sim: SimulationConfig, root: str | Path, *, jobs: int = 1, shard: int = 0,
                  num_shards: int = 1, force: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> StampData | None:
    """Generate (or resume) the dataset of ``sim`` in ``root``.

    Runs the shards ``k`` with ``k % num_shards == shard`` on ``jobs`` processes. When every
    shard of the plan is complete, computes the normalisation constants and writes the metadata
    and returns the opened dataset; otherwise returns None (other pieces still have to run).
    """
    root = Path(root)
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}), got {shard}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    geometry = survey_geometry(sim.survey, sim.stamp_pixels)
    check_bands(sim.label_bands, geometry, "simulation.label_bands")
    provenance = catalog_provenance(sim.catalog, sim.catalog_rows, sim.catalog_seed)
    plan = make_plan(plan_simulation(sim), plain(asdict(geometry)), provenance.get("sha256"))
    the_plan_id = plan_id(plan)
    source = SceneSource(sim)  # the catalog is read before anything is written or removed
    if sim.morphology is not None:
        load_morphology_sources(sim.morphology)  # and the galaxy catalogues
    prepare_directory(root, plan, force, log)

    mine = [s for s in plan["shards"] if s["index"] % num_shards == shard]
    done = [s for s in mine if shard_is_complete(root / SHARD_DIR / shard_name(s["index"]), s["n"],
                                                 the_plan_id)]
    todo = [s for s in mine if s not in done]
    if done:
        log(f"resuming: {len(done)} of {len(mine)} shards already complete")
    for s in todo:
        if (root / SHARD_DIR / shard_name(s["index"])).exists():
            log(f"shard {root / SHARD_DIR / shard_name(s['index'])} is truncated or unreadable: "
                f"drawing it again")
    _run_shards(root, todo, source, the_plan_id, jobs, progress, log)

    missing = [s["index"] for s in plan["shards"]
               if not shard_is_complete(root / SHARD_DIR / shard_name(s["index"]), s["n"],
                                        the_plan_id)]
    if missing:
        log(f"{len(plan['shards']) - len(missing)} of {len(plan['shards'])} shards complete; "
            f"the others belong to other --shard pieces. Run again once they are done to finalise.")
        return None
    return finalize_dataset(root, plan, sim, provenance, progress=progress)


def _run_shards(root: Path, todo: list[dict[str, Any]], source: SceneSource, the_plan_id: str,
                jobs: int, progress: bool, log: Callable[[str], None] = print) -> None:
    """Generate the ``todo`` shards from ``source`` on ``jobs`` processes.

    The first failure of any worker (an exception, or a worker killed, e.g. out of memory) stops
    every worker at once and is raised here with its own message; finished shards stay on disk.
    """
    global _SOURCE
    if not todo:
        return
    sim = source.sim
    _SOURCE = source
    if _SOURCE.catalog_note:
        log(_SOURCE.catalog_note)
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)
    total = sum(s["n"] for s in todo)
    args = [(root, s, sim.seed, the_plan_id) for s in todo]
    bar = tqdm(total=total, desc=f"simulating {sim.survey} scenes", unit="scene",
               disable=not progress, smoothing=0.1)
    try:
        if jobs == 1:
            _init_worker(counter)
            for arg in args:
                generate_shard(*arg)
                bar.update(counter.value - bar.n)
        else:
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                     initargs=(counter,)) as pool:
                try:
                    pending = {pool.submit(generate_shard, *arg) for arg in args}
                    while pending:
                        done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                        for future in done:
                            future.result()  # the worker's exception, raised here
                        bar.update(counter.value - bar.n)
                except BrokenProcessPool as exc:
                    _stop_workers(pool)
                    raise DatasetError(f"a simulation worker process died ({exc}); finished "
                                       f"shards are kept: run the same command again to resume "
                                       f"(with fewer --jobs if memory ran out)") from None
                except BaseException:
                    _stop_workers(pool)
                    raise
    finally:
        bar.close()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued shards and end the running ones now (their ``.tmp`` files are never
    taken for finished shards)."""
    processes = dict(getattr(pool, "_processes", None) or {})  # the executor's own, by pid
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        process.terminate()


def finalize_dataset(root: Path, plan: dict[str, Any], sim: SimulationConfig,
                     provenance: dict[str, Any], progress: bool = True) -> StampData:
    """Compute the normalisation constants on the training split and write ``metadata.json``
    (``provenance``: :func:`simulation.catalogs.catalog_provenance`, measured for the plan)."""
    geometry = plan["geometry"]
    shards = [{"index": s["index"], "first": s["first"], "n": s["n"], "file": shard_name(s["index"])}
              for s in plan["shards"]]
    meta: dict[str, Any] = {
        "format_version": plan["format_version"],
        "dataset_id": plan_id(plan),
        "survey": geometry["name"],
        "bands": geometry["bands"],
        "pixel_scale": geometry["pixel_scale"],
        "stamp_pixels": geometry["stamp_pixels"],
        "units": "electrons per pixel (BTK), float32",
        "pixel_frame": "x = array axis 1 (columns), y = array axis 0 (rows)",
        "image_sets": {"clean": "isolated target, noiseless", "noisy": "isolated target + noise",
                       "blend": "noisy blend of 1 to max_neighbours+1 galaxies, target centred"},
        "seed": sim.seed,
        "n_samples": plan["n_samples"],
        "split": {"n_train": plan["n_train"], "n_calibration": plan["n_calibration"],
                  "n_validation": plan["n_samples"] - plan["n_train"] - plan["n_calibration"],
                  "rule": "first n_train samples are training, the next n_calibration calibration "
                          "(the regressor's response), the rest validation"},
        "catalog": provenance,
        "labels": LABEL_DESCRIPTIONS,
        "label_convention": f"distortion e=(a^2-b^2)/(a^2+b^2) of the clean target summed over "
                            f"bands {list(sim.label_bands)}, pixel frame",
        "simulation": plan["simulation"],
        "shards": shards,
        "psf": psf_metadata(geometry["name"], geometry["bands"], geometry["pixel_scale"],
                            geometry["stamp_pixels"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    reader = StampData(root, meta={**meta, "normalization": None})
    accumulator = MaxAccumulator(tuple(geometry["bands"]))
    train = np.arange(plan["n_train"]) if plan["n_train"] > 0 else np.arange(plan["n_samples"])
    for batch in tqdm(reader.iter_batches(sim.norm_reference, train, 1024), disable=not progress,
                      desc="normalisation constants", total=-(-len(train) // 1024)):
        accumulator.add(batch)
    constants = accumulator.constants(sim.norm_beta, sim.norm_flux_scale)
    meta["normalization"] = {**constants.to_dict(), "reference_set": sim.norm_reference,
                             "computed_on": "train split" if plan["n_train"] > 0 else "all"}
    write_text_atomic(root / METADATA_FILE, metadata_text(meta))
    return StampData(root)


def metadata_text(meta: dict[str, Any]) -> str:
    """``meta`` as indented, key-sorted JSON (as :func:`write_json_atomic` writes it), except that
    each row of the PSF images is written on one line rather than one line per number."""
    psf = meta.get("psf")
    if not isinstance(psf, dict) or not isinstance(psf.get("images"), list):
        return json.dumps(meta, indent=2, sort_keys=True) + "\n"
    rows: dict[str, str] = {}
    placeholders = []
    for b, image in enumerate(psf["images"]):
        placeholders.append([])
        for y, row in enumerate(image):
            key = f"@psf-row-{b}-{y}@"
            rows[json.dumps(key)] = json.dumps(row)
            placeholders[-1].append(key)
    text = json.dumps({**meta, "psf": {**psf, "images": placeholders}}, indent=2, sort_keys=True)
    for key, row in rows.items():
        text = text.replace(key, row, 1)
    return text + "\n"
