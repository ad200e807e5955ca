"""Shear bias on sheared fields, measured from pixels by metadetection (no truth positions).

For each field set of :func:`simulation.sheared_fields.draw_field_set` (+g, -g with the same
noise, and their 90-degree twins), every image is cut into cells with margins
(:func:`deblend.core.cells.tile`) and measured by :func:`deblend.core.cell_measure.
measure_cells`. Estimators, all on the same field images:

- ``deblend``: the deblender's regressor with metadetection's population response (detection,
  centroid and selection responses inside R);
- ``deblend_object``: the same detections and e, with the per-object (stamp) responses only:
  the difference to ``deblend`` is the detection term;
- ``hsm``: galsim.hsm adaptive moments of the blended stamp (band sum of r, i, z) on the same
  detections, with the population response (blend HSM);
- ``anacal``: AnaCal (FPFS) with its own detection and analytic responses
  (:func:`evaluation.anacal_peer.anacal_cell_catalogue`).

Each field image reduces to sums (per estimator: sum of e and of R, counts), so any number of
fields combine exactly. Shear: g_hat(+-) = R^-1 <e>(+-) over the +g (resp. -g) images and
their twins, R the mean of the two signs' responses; m = (g_hat(+) - g_hat(-)) / (2 g) - 1 and
c = (g_hat(+) + g_hat(-)) / 2 on the sheared component, c on the other one too; 1-sigma errors
by jackknife over field sets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from astropy.table import Table

from deblend.core.arguments import require_positive_int
from deblend.core.atomic import atomic_output, write_json_atomic, write_text_atomic
from deblend.core.cell_measure import ESTIMATOR, measure_cells
from deblend.core.cells import CellImage, tile
from deblend.core.chunk_cache import chunk_key, read_chunk, write_chunk
from deblend.core.inference import Deblender
from deblend.core.metacal import METACAL_SHEARS
from deblend.core.metadetect import WALK_VIEWS, MetadetectSettings, step_sums
from deblend.core.runs import RunLayout, lineage_identity
from deblend.core.shapes import hsm_shapes
from deblend.core.workers import run_tasks, shared
from evaluation.anacal_peer import (
    anacal_cell_catalogue,
    anacal_shear_sums,
    detection_margin,
)
from evaluation.report_io import read_metrics, reconvolution_words
from simulation.sheared_fields import ShearedField, draw_field_set

ESTIMATORS = ("deblend", "deblend_object", "hsm", "anacal")
HSM_BANDS = ("r", "i", "z")
SIGNS = {"plus": 1, "minus": -1, "plus_rot": 1, "minus_rot": -1}
NOISE_FIELDS = {"plus": 0, "minus": 0, "plus_rot": 1, "minus_rot": 1}
"""The image noise field of each image of a set (+g and -g share one, the twins another): the
metacal correction noise is drawn from it too, so +g and -g also share their correction noise."""
CACHE_VERSION = 3
"""Bumped when the measurement changes (2: one correction-noise field per cell; 3: +g and -g
share their correction noise)."""


@dataclass(frozen=True)
class FieldSettings:
    """Cells of ``cell`` pixels read with ``margin`` around them; the walk's settings."""

    cell: int = 100
    margin: int = 40
    views: int = WALK_VIEWS
    anacal: bool = True


def hsm_estimator(bands: tuple[str, ...]):
    """Blend HSM: adaptive-moment distortions of the r+i+z sum of each stamp (NaN on failure)."""
    index = [bands.index(b) for b in HSM_BANDS]

    def estimate(stamps: np.ndarray) -> np.ndarray:
        if len(stamps) == 0:
            return np.zeros((0, 2))
        shape = hsm_shapes(stamps[:, index].sum(axis=1))
        return np.stack([shape.e1, shape.e2], axis=1)
    return estimate


def anacal_cell(cell: CellImage, pixel_scale: float, bands: tuple[str, ...]) -> Table | None:
    """AnaCal's catalogue of a cell with its own detection: the owned square is clipped to
    AnaCal's detectable region (:func:`evaluation.anacal_peer.detection_margin` from every
    edge) and the cell to even sides (AnaCal's rule); None when nothing is left to own."""
    edge = detection_margin(pixel_scale)
    (x0, x1, y0, y1), (height, width) = cell.owned_box, cell.shape
    height, width = height - height % 2, width - width % 2
    owned = (max(x0, edge), min(x1, width - edge), max(y0, edge), min(y1, height - edge))
    if owned[0] >= owned[1] or owned[2] >= owned[3]:
        return None
    return anacal_cell_catalogue(cell.images[:, :height, :width],
                                 cell.variance[:, :height, :width], cell.psfs, pixel_scale,
                                 bands=bands, owned=owned)


def field_cells(field: ShearedField, settings: FieldSettings) -> list[CellImage]:
    """The cells of a field image, each owning its square."""
    variance = np.broadcast_to(np.asarray(field.variance, np.float64)[:, None, None],
                               field.images.shape)
    return [CellImage(t.cut(field.images), t.cut(variance), field.psfs, origin=t.read[::2],
                      owned=t.owned_in_cell())
            for t in tile(field.images.shape[1:], settings.cell, settings.margin)]


def image_sums(model: Deblender, field: ShearedField, settings: FieldSettings,
               walk: MetadetectSettings, seed: int) -> dict[str, np.ndarray]:
    """One field image reduced to sums: for ``deblend`` and ``hsm`` an (5, 3) array of
    (sum e1, sum e2, n) per metacal image; for ``deblend_object`` (sum e1, sum e2, sum R11,
    R12, R21, R22, n) on the noshear rows; for ``anacal`` (sum w e1, sum w e2, sum R1, R2, n)."""
    cells = field_cells(field, settings)
    catalogue = measure_cells(model, cells, walk, seed=seed, views=settings.views,
                              peers={"hsm": hsm_estimator(model.bands)})
    out = {name: np.stack([step_sums(catalogue, name)[step] for step in METACAL_SHEARS])
           for name in (ESTIMATOR, "hsm")}
    kept = (catalogue["mdet_step"] == "noshear") & (catalogue["flags"] == 0)
    kept &= np.isfinite(catalogue["r11"])
    rows = catalogue[kept]
    out["deblend_object"] = np.array(
        [np.sum(rows[f"{ESTIMATOR}_e1"]), np.sum(rows[f"{ESTIMATOR}_e2"]),
         *(np.sum(rows[f"r{i}{j}"]) for i in (1, 2) for j in (1, 2)), float(len(rows))])
    if settings.anacal:
        catalogues = [anacal_cell(c, field.pixel_scale, field.bands) for c in cells]
        sum_we, sum_rw, n = anacal_shear_sums([c for c in catalogues if c is not None])
        out["anacal"] = np.array([*sum_we, *sum_rw, float(n)])
    return out


def measure_field_set(model: Deblender, population: str, seed: int, index: int,
                      g: tuple[float, float], settings: FieldSettings,
                      walk: MetadetectSettings, field_pixels: int) -> dict[str, dict]:
    """Sums of every image of field set ``index`` (keys of :data:`SIGNS`)."""
    fields = draw_field_set(population, seed, index, g, field_pixels=field_pixels)
    return {key: image_sums(model, fields[key], settings, walk,
                            seed=1000 * index + NOISE_FIELDS[key]) for key in SIGNS}


def mean_and_response(sums: Sequence[dict[str, np.ndarray]], estimator: str, delta: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(<e> (2,), R (2, 2)) of one estimator from the sums of several field images: for the
    population estimators each metacal image's own kept detections; for ``deblend_object`` the
    mean per-object response; for ``anacal`` its weighted sums (R diagonal)."""
    total = np.sum([s[estimator] for s in sums], axis=0)
    if estimator in (ESTIMATOR, "hsm"):
        means = {step: total[i, :2] / total[i, 2] for i, step in enumerate(METACAL_SHEARS)}
        response = np.stack([(means[f"{j}p"] - means[f"{j}m"]) / (2 * delta) for j in (1, 2)],
                            axis=1)
        return means["noshear"], response
    if estimator == "deblend_object":
        n = total[-1]
        return total[:2] / n, total[2:6].reshape(2, 2) / n
    return total[:2], np.diag(total[2:4])  # anacal: sum w e and sum (w R + e dw/dg)


def bias(sets: Sequence[dict[str, dict]], estimator: str, g: tuple[float, float],
         delta: float) -> dict[str, float]:
    """m and c on the sheared component (and c on the other) with jackknife errors over the
    field sets (NaN with one field set). The +g and -g images share one response, the mean of theirs (the response's
    own noise then cancels in the difference): g_hat(+-) = R^-1 <e>(+-)."""
    component = int(np.argmax(np.abs(g)))

    def estimate(chosen: Sequence[dict[str, dict]]) -> np.ndarray:
        e_plus, r_plus = mean_and_response([s[k] for s in chosen for k in SIGNS if SIGNS[k] > 0],
                                           estimator, delta)
        e_minus, r_minus = mean_and_response(
            [s[k] for s in chosen for k in SIGNS if SIGNS[k] < 0], estimator, delta)
        response = 0.5 * (r_plus + r_minus)
        plus, minus = np.linalg.solve(response, e_plus), np.linalg.solve(response, e_minus)
        m = (plus[component] - minus[component]) / (2 * g[component]) - 1
        c = (plus + minus) / 2
        return np.array([m, c[component], c[1 - component]])

    value = estimate(sets)
    n = len(sets)
    if n >= 2:
        jack = np.array([estimate([s for j, s in enumerate(sets) if j != i]) for i in range(n)])
        error = np.sqrt((n - 1) / n * ((jack - jack.mean(axis=0)) ** 2).sum(axis=0))
    else:
        error = np.full(3, np.nan)
    name = component + 1
    return {f"m{name}": value[0], f"m{name}_err": error[0], f"c{name}": value[1],
            f"c{name}_err": error[1], f"c{3 - name}_at_g{name}": value[2],
            f"c{3 - name}_at_g{name}_err": error[2]}


def objects_per_image(sets: Sequence[dict[str, dict]]) -> float:
    """Mean number of kept noshear detections per field image (deblend)."""
    return float(np.mean([s[k][ESTIMATOR][0, 2] for s in sets for k in SIGNS]))


# -- the benchmark: many field sets, cached one by one ------------------------------------------
def flatten(sums: dict[str, dict]) -> dict[str, np.ndarray]:
    """A field set's sums as flat arrays for the chunk cache (``image/estimator`` keys)."""
    return {f"{image}/{name}": value for image, by_name in sums.items()
            for name, value in by_name.items()}


def unflatten(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in arrays.items():
        image, name = key.split("/")
        out.setdefault(image, {})[name] = np.asarray(value)
    return out


def _measure_set(*args) -> dict[str, dict]:
    return measure_field_set(shared(), *args)


def run_field_benchmark(model: Deblender, model_id: str, out: Path, *,
                        populations: Sequence[str] = ("btk", "galsim"), n_fields: int = 4,
                        g: float = 0.02, field_pixels: int = 300, seed: int = 0,
                        settings: FieldSettings = FieldSettings(),
                        walk: MetadetectSettings | None = None, jobs: int = 1,
                        shard: tuple[int, int] | None = None,
                        log=print, timing: dict | None = None) -> dict[str, dict] | None:
    """m, c of every estimator (:data:`ESTIMATORS`) on ``n_fields`` field sets per population
    and sheared component (g along e1, then along e2); each field set is cached under
    ``out/cache`` as it ends (an interrupted run resumes; a changed setting measures again).
    ``jobs``: field sets measured at once, on forked CPU processes
    (:func:`deblend.core.workers.run_tasks`). ``shard`` (k, n): measure only the uncached field
    sets whose place in the list (populations, components, indices) is k modulo n, cache them
    and return None: n machines sharing ``out`` fill the cache, and a last run without
    ``shard`` reads it and reports. ``timing`` collects the wall seconds and kept detections
    of what this call measured."""
    walk = walk or MetadetectSettings(stamp_pixels=model.stamp_pixels)
    jobs = require_positive_int(jobs, "jobs")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    estimators = [e for e in ESTIMATORS if settings.anacal or e != "anacal"]
    plan, cached, todo = [], {}, []
    for population in populations:
        for component in (0, 1):
            shear = (g, 0.0) if component == 0 else (0.0, g)
            for index in range(n_fields):
                key = chunk_key({"version": CACHE_VERSION, "model": model_id,
                                 "population": population, "g": shear,
                                 "index": index, "seed": seed, "pixels": field_pixels,
                                 "settings": settings.__dict__, "walk": walk.identity()})
                path = Path(out) / "cache" / f"{population}-g{component + 1}-{index:04d}.npz"
                place = len(plan)
                plan.append((population, component, index, shear, path, key))
                sums = read_chunk(path, key)
                if sums is not None:
                    cached[place] = unflatten(sums)
                elif shard is None or place % shard[1] == shard[0]:
                    todo.append(place)
    start = time.perf_counter()

    def keep(k: int, sums: dict[str, dict]) -> None:
        population, component, index, _, path, key = plan[todo[k]]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_chunk(path, key, flatten(sums))
        cached[todo[k]] = sums
        if timing is not None:
            timing["objects"] = timing.get("objects", 0.0) + sum(
                s[ESTIMATOR][0, 2] for s in sums.values())
        log(f"[fields] {population} g{component + 1} field set {index + 1}/{n_fields} measured "
            f"({len(cached)}/{len(plan)} cached, {time.perf_counter() - start:.0f} s)")

    tasks = [(population, seed, index, shear, settings, walk, field_pixels)
             for population, _, index, shear, _, _ in (plan[place] for place in todo)]
    run_tasks(_measure_set, tasks, jobs, keep, shared=model)
    if timing is not None:
        timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - start
    if shard is not None:
        return None
    results: dict[str, dict] = {}
    for population in populations:
        row: dict[str, dict] = {e: {} for e in estimators}
        objects = []
        for component in (0, 1):
            shear = (g, 0.0) if component == 0 else (0.0, g)
            sets = [cached[place] for place, (p, c, *_) in enumerate(plan)
                    if p == population and c == component]
            objects.append(objects_per_image(sets))
            for name in estimators:
                row[name].update(bias(sets, name, shear, walk.delta))
        for name in estimators:
            row[name]["n_field_sets"] = n_fields
            row[name]["objects_per_image"] = objects[-1]
            row[name]["sets_for_target"] = sets_for_target(row[name], n_fields)
        results[population] = row
    return results


TARGET_M_ERROR = 0.002
"""The 1-sigma error on m that issue 22 asks of the field benchmark."""


def sets_for_target(row: dict[str, float], n_fields: int) -> float:
    """Field sets per population and component that would bring the larger of the two errors
    on m to :data:`TARGET_M_ERROR`, if it falls as one over the square root of their number
    (NaN without an error: one field set)."""
    worst = max(row["m1_err"], row["m2_err"])
    return float(np.ceil(n_fields * (worst / TARGET_M_ERROR) ** 2)) if np.isfinite(
        worst) else float("nan")


def field_table(results: dict[str, dict]) -> str:
    """m1, m2, c1, c2 with 1-sigma jackknife errors, per population and estimator."""
    lines = ["| population | estimator | m1 | m2 | c1 | c2 | field sets | kept per image | "
             f"sets for σ(m) = {TARGET_M_ERROR} |", "|---|---|---|---|---|---|---|---|---|"]
    for population, row in results.items():
        for name, r in row.items():
            def f(key: str) -> str:
                return f"{r[key]:+.4f} ± {r[key + '_err']:.4f}"
            lines.append(f"| {population} | {name} | {f('m1')} | {f('m2')} | {f('c1')} | "
                         f"{f('c2')} | {r['n_field_sets']} | {r['objects_per_image']:.1f} | "
                         f"{r.get('sets_for_target', float('nan')):,.0f} |")
    return "\n".join(lines) + "\n"


def report_markdown(results: dict[str, dict], g: float, field_pixels: int, pixel_scale: float,
                    target_psf_fwhm: float | Sequence[float] | None = None) -> str:
    """The report: what was measured, and :func:`field_table`."""
    arcmin = field_pixels * pixel_scale / 60
    return "\n".join([
        "# Shear from sheared fields by metadetection\n",
        f"Applied |g| = {g} on each component in turn; fields of {field_pixels} px "
        f"({arcmin:.2f} arcmin) at 40 galaxies/arcmin^2 (i < 25.3), four images per field set "
        f"(+g, -g with the same noise, and their 90-degree twins). m = g_hat / g - 1; "
        f"1-sigma errors by jackknife over field sets. Estimators: `deblend` (population "
        f"response: detection, centroid and selection inside R), `deblend_object` (the same "
        f"detections and e, per-object stamp responses only), `hsm` (blend HSM on the same "
        f"detections, population response), `anacal` (its own detection, analytic responses); "
        f"{reconvolution_words(target_psf_fwhm)}.\n",
        field_table(results)])


# -- the main job's step ------------------------------------------------------------------------
METRICS_KEY = "fields"


def field_report_is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished field report."""
    return (Path(out) / "report.md").is_file() and METRICS_KEY in read_metrics(out)


def run_field_report(run: str | Path, config, out: str | Path, *, device: str = "cpu",
                     jobs: int = 1, shard: tuple[int, int] | None = None,
                     log=print) -> dict | None:
    """The field benchmark of a trained run with the ``fields`` section of ``config``
    (:class:`deblend.core.config.FieldsConfig`): ``out/metrics.json``, ``out/report.md`` and
    ``out/cell.png`` (one measured cell: detections and their e sticks). Resumable. ``jobs``
    and ``shard`` as :func:`run_field_benchmark` (a shard writes its cache only: None)."""
    fields = config.fields
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Deblender.from_run(run, device=device)
    model_id = lineage_identity(RunLayout(Path(run)), "stage3")
    settings = FieldSettings(cell=fields.cell, margin=fields.margin, views=fields.views,
                             anacal=fields.anacal)
    walk = field_walk(model, config)
    timing: dict = {}
    start = time.perf_counter()
    results = run_field_benchmark(model, model_id, out, populations=fields.populations,
                                  n_fields=fields.n_fields, g=fields.g,
                                  field_pixels=fields.field_pixels, seed=fields.seed,
                                  settings=settings, walk=walk, jobs=jobs, shard=shard,
                                  log=log, timing=timing)
    if results is None:
        return None
    pixel_scale = model.data.pixel_scale
    metrics = {"applied_g": fields.g, "field_pixels": fields.field_pixels,
               "pixel_scale": pixel_scale, "density_per_arcmin2": 40.0, "max_mag_i": 25.3,
               "cell": fields.cell, "margin": fields.margin, "views": fields.views,
               "results": results, "seconds": round(time.perf_counter() - start, 1),
               "measured_seconds": round(timing.get("seconds", 0.0), 1),
               "kept_detections_measured": timing.get("objects", 0.0)}
    target = model.target_fwhm(config.metacal.target_psf_fwhm)
    if target is not None:
        metrics["target_psf_fwhm"] = target
    figure = cell_figure(model, fields, settings, out / "cell.png", walk)
    text = report_markdown(results, fields.g, fields.field_pixels, pixel_scale, target)
    text += (f"\nOne measured cell (noshear detections kept, with the regressor's e sticks): "
             f"[{figure.name}]({figure.name}).\n")
    write_text_atomic(out / "report.md", text)
    write_json_atomic(out / "metrics.json", {METRICS_KEY: metrics})
    return metrics


def field_walk(model: Deblender, config) -> MetadetectSettings:
    """The metadetection settings of a run's field benchmark: the model's stamp, and metacal
    reconvolving to ``metacal.target_psf_fwhm`` (else the model's own target, else each band's
    narrowest Gaussian), holding each cell's sky plane out of its shear with
    ``metacal.hold_sky_plane``; a target narrower than a band's PSF allows is refused when met."""
    return MetadetectSettings(stamp_pixels=model.stamp_pixels,
                              target_sigma=model.target_sigma(config.metacal.target_psf_fwhm),
                              hold_sky_plane=config.metacal.hold_sky_plane)


def cell_figure(model: Deblender, fields, settings: FieldSettings, path: Path,
                walk: MetadetectSettings | None = None) -> Path:
    """PNG of the first cell-sized region of the galsim (or first) population's +g field: the
    r+i+z image, every kept noshear detection and a stick of length 40 |e| pixels along the
    regressor's position angle (pixel frame)."""
    population = "galsim" if "galsim" in fields.populations else fields.populations[0]
    size = min(fields.field_pixels, 2 * fields.cell + 2 * fields.margin)
    field = draw_field_set(population, fields.seed, 0, (fields.g, 0.0),
                           field_pixels=size)["plus"]
    catalogue = measure_cells(model, field_cells(field, settings),
                              walk or MetadetectSettings(stamp_pixels=model.stamp_pixels),
                              seed=fields.seed, views=settings.views, per_object=False)
    rows = catalogue[(catalogue["mdet_step"] == "noshear") & (catalogue["flags"] == 0)]
    index = [model.bands.index(b) for b in HSM_BANDS]
    image = field.images[index].sum(axis=0)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(np.arcsinh(image / (3 * np.sqrt(field.variance[index].sum()))), origin="lower",
              cmap="gray_r")
    e1, e2 = np.asarray(rows[f"{ESTIMATOR}_e1"]), np.asarray(rows[f"{ESTIMATOR}_e2"])
    angle, length = 0.5 * np.arctan2(e2, e1), 40 * np.hypot(e1, e2)
    for x, y, a, n in zip(rows["x"], rows["y"], angle, length):
        ax.plot([x - 0.5 * n * np.cos(a), x + 0.5 * n * np.cos(a)],
                [y - 0.5 * n * np.sin(a), y + 0.5 * n * np.sin(a)], color="tab:red", lw=2)
    ax.scatter(field.truth["x"], field.truth["y"], s=12, facecolors="none",
               edgecolors="tab:blue", label="truth (sheared positions)")
    ax.scatter(rows["x"], rows["y"], s=8, color="tab:red", label="kept detections, e sticks")
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(-0.5, size - 0.5)
    ax.set_title(f"{population} field, g = ({fields.g}, 0): metadetection, noshear image")
    ax.legend(loc="upper right", fontsize=8)
    try:
        with atomic_output(path, suffix=".tmp.png") as tmp:  # a full disk names the file
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
