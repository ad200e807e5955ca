"""Shear calibration of every ellipticity estimator (SPEC 6). Populations of ``shear.n_scenes``
scenes are simulated (``simulation.builder.SceneSource``, the ``simulation`` section of ``C``) with
constant applied shears ``g`` in ``shear.g_values`` on each component in turn (the other one 0),
as 90-degree-rotated twin pairs that cancel shape noise. The deblender of run ``R`` (t2) is
applied to the blends; each estimator of :mod:`evaluation.estimators` is measured, and
``<e> = A g + c`` is fitted per component, with ``m = A / A_truth - 1`` where ``A_truth`` is the
response of uniform-weight moments on the noiseless isolated truth (bootstrap 1-sigma errors over
twin pairs; see :mod:`evaluation.shear_fit`).

Populations are simulated in chunks of ``shear.chunk_scenes`` scenes, each measured and cached in
``DIR/shear_cache`` (npz) as soon as it is done: an interrupted run resumes where it stopped. With
``shear.shared_galaxies`` (default) every population draws the same scenes, only the shear
differs (common random numbers).

Output, in ``DIR`` (default ``R/evaluation``, the report's directory): the table on stdout, the
``shear`` entry of ``metrics.json`` and the shear section of ``report.md`` (merged into an existing
report, never losing its other content), and ``fig_shear_response.png``. An existing shear result
is not replaced without ``--force``.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from deblend.core.atomic import write_text_atomic
from deblend.core.chunk_cache import chunk_key, join_chunks, read_chunk, write_chunk
from deblend.core.config import Config
from deblend.core.inference import FINAL_STAGE, Deblender
from deblend.core.outputs import mark
from deblend.core.runs import RunLayout, lineage_identity
from evaluation import plots
from evaluation.estimators import (
    ESTIMATORS,
    REFERENCES,
    SHORT_NAMES,
    measure_estimators,
)
from evaluation.models import Model
from evaluation.report_io import (
    EVALUATION_KIND,
    REPORT_FILE,
    claim_evaluation_directory,
    fmt_err,
    markdown_table,
    read_metrics,
    replace_section,
    section,
    write_metrics,
)
from evaluation.results import ShearCalibration, ShearResult
from evaluation.shear_fit import (
    ShearPopulation,
    calibrate,
    estimates_from_arrays,
    estimates_to_arrays,
    population_means,
)
from simulation.builder import SceneSource
from simulation.conditions import at_nominal_conditions

CACHE_DIR = "shear_cache"
FIGURE = "fig_shear_response.png"
CACHE_VERSION = 2
"""Bumped when what a chunk holds changes for the same settings (2: reconstructions averaged over
the 8 symmetric views)."""
REFERENCE = "truth_moments"
HSM_REFERENCE = "truth_hsm"
"""Secondary reference: HSM estimators are also calibrated against HSM on the truth."""


# -- populations ----------------------------------------------------------------------------------
def shear_populations(g_values: Sequence[float]) -> list[tuple[float, float]]:
    """(g1, g2) of every population: each g on component 1, then on component 2 (unique)."""
    if len(set(g_values)) < 2:
        raise ValueError(f"shear.g_values needs at least two distinct values, got {list(g_values)}")
    pops: list[tuple[float, float]] = []
    for g1, g2 in [(float(g), 0.0) for g in g_values] + [(0.0, float(g)) for g in g_values]:
        if (g1, g2) not in pops:
            pops.append((g1, g2))
    return pops


def chunk_sizes(n_scenes: int, chunk_scenes: int) -> list[int]:
    """Split ``n_scenes`` (even) into chunks of at most ``chunk_scenes`` (rounded down to even)."""
    if n_scenes % 2:
        raise ValueError(f"shear.n_scenes must be even (twin pairs), got {n_scenes}")
    size = max(2, chunk_scenes - chunk_scenes % 2)
    sizes = [size] * (n_scenes // size)
    if n_scenes % size:
        sizes.append(n_scenes % size)
    return sizes


def chunk_seed(base_seed: int, chunk: int, g: tuple[float, float], shared: bool) -> int:
    """Seed of one chunk; independent of the shear when the populations share their galaxies."""
    entropy = [int(base_seed), int(chunk)]
    if not shared:
        entropy.append(zlib.crc32(f"{g[0]:+.6f},{g[1]:+.6f}".encode()))
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def population_config(config: Config, g: tuple[float, float]) -> Config:
    """The simulation config of one population: shear ``g``, rotated twins, even batches, the
    survey's nominal conditions, CatSim's own targets."""
    sim = at_nominal_conditions(config.simulation)
    return config.replace("simulation", shear=list(g), rotated_twins=True,
                          conditions=sim.conditions, bright=sim.bright,
                          btk_batch_size=sim.btk_batch_size + sim.btk_batch_size % 2,
                          shard_size=sim.shard_size + sim.shard_size % 2)


def _cache_name(g: tuple[float, float], chunk: int) -> str:
    return f"pop_g1{g[0]:+.4f}_g2{g[1]:+.4f}_chunk{chunk:04d}.npz"


def _cache_key(config: Config, g: tuple[float, float], chunk: int, n: int, seed: int,
               model_id: str) -> str:
    return chunk_key({"version": CACHE_VERSION, "simulation": population_config(config, g)
                      .to_dict()["simulation"], "chunk": chunk, "n": n, "seed": seed,
                      "model": model_id})


def measure_chunk(source: Any, model: Model, n: int, seed: int,
                  progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Draw ``n`` twin scenes with ``source`` and measure every estimator on them."""
    scenes, labels = source.draw(n, seed, progress=progress)
    twin = np.asarray(labels["twin"])
    if not np.array_equal(twin, np.tile([0, 1], n // 2)):
        raise RuntimeError("the simulation did not return consecutive (scene, rotated twin) pairs")
    bands = tuple(source.geometry.bands)
    prediction = model.predict(scenes.blend)
    estimates = measure_estimators(
        bands=bands, label_bands=source.sim.label_bands,
        reconstruction_raw=prediction.reconstruction, regressor_e=prediction.ellipticity,
        regressor_raw_e=prediction.ellipticity_raw,
        blend_raw=scenes.blend, noisy_raw=scenes.noisy, clean_raw=scenes.clean, references=True)
    arrays = estimates_to_arrays(estimates)
    arrays["n_galaxies"] = np.asarray(labels["n_galaxies"], np.int16)
    arrays["label_e1"] = np.asarray(labels["e1"], np.float64)
    arrays["label_e2"] = np.asarray(labels["e2"], np.float64)
    return arrays


def simulate_populations(config: Config, model: Model, cache_dir: Path, model_id: str, *,
                         progress: bool = True, log: Callable[[str], None] = print
                         ) -> list[ShearPopulation]:
    """Every population of ``config.shear``, measured, from the cache where possible."""
    shear = config.shear
    pops = shear_populations(shear.g_values)
    sizes = chunk_sizes(shear.n_scenes, shear.chunk_scenes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    total = len(pops) * shear.n_scenes
    bar = tqdm(total=total, desc="shear populations", unit="scene", disable=not progress,
               smoothing=0.1)
    populations = []
    reused = 0
    try:
        for g in pops:
            source = None
            parts = []
            for chunk, n in enumerate(sizes):
                seed = chunk_seed(shear.seed, chunk, g, shear.shared_galaxies)
                key = _cache_key(config, g, chunk, n, seed, model_id)
                path = cache_dir / _cache_name(g, chunk)
                arrays = read_chunk(path, key)
                if arrays is None:
                    if source is None:
                        source = SceneSource(population_config(config, g).simulation)
                        if tuple(source.geometry.bands) != tuple(model.bands):
                            raise ValueError(
                                f"the config simulates bands {' '.join(source.geometry.bands)} "
                                f"but the model was trained on {' '.join(model.bands)}")
                    bar.set_postfix_str(f"g=({g[0]:+.3f}, {g[1]:+.3f})")
                    arrays = measure_chunk(source, model, n, seed, progress=bar.update)
                    write_chunk(path, key, arrays)
                else:
                    reused += 1
                    bar.update(n)
                parts.append(arrays)
            populations.append(ShearPopulation(g[0], g[1], estimates_from_arrays(
                join_chunks(parts))))
    finally:
        bar.close()
    if reused:
        log(f"reused {reused} cached chunk(s) from {cache_dir}")
    return populations


# -- result ---------------------------------------------------------------------------------------
def shear_result(populations: Sequence[ShearPopulation], config: Config) -> ShearResult:
    """Calibration table plus the bookkeeping of how many scenes each number rests on."""
    shear = config.shear
    names = [n for n in list(ESTIMATORS) + list(REFERENCES) if n in populations[0].estimates]
    extra = [HSM_REFERENCE] if HSM_REFERENCE in names else []
    calibration = calibrate(populations, reference=REFERENCE, n_bootstrap=shear.bootstrap,
                            seed=shear.seed, shared_galaxies=shear.shared_galaxies,
                            extra_references=extra)
    calibration = dataclasses.replace(calibration, **{
        comp: dataclasses.replace(part, estimators={n: part.estimators[n] for n in names})
        for comp, part in (("g1", calibration.g1), ("g2", calibration.g2))})
    n_fit = {comp: len(calibration.component(comp).g_values) for comp in ("g1", "g2")}
    sim = config.simulation
    return ShearResult(
        meta={
            "populations": [[p.g1, p.g2] for p in populations],
            "g_values": list(shear.g_values),
            "n_scenes_per_population": int(shear.n_scenes),
            "n_pairs_per_population": int(shear.n_scenes // 2),
            "n_populations": len(populations),
            "n_scenes_simulated": int(shear.n_scenes * len(populations)),
            "n_scenes_per_fit": {c: int(n * shear.n_scenes) for c, n in n_fit.items()},
            "shared_galaxies": bool(shear.shared_galaxies),
            "independent_galaxy_sets": int(shear.n_scenes // 2 if shear.shared_galaxies
                                           else shear.n_scenes // 2 * len(populations)),
            "bootstrap": int(shear.bootstrap), "seed": int(shear.seed),
            "reference": REFERENCE,
            "requirements": {"lsst_y10_m": 0.003, "debvader_m_blends": 0.016},
            "simulation": {"survey": sim.survey, "catalog": sim.catalog or "embedded model",
                           "target_max_mag": sim.target_max_mag,
                           "neighbours": [sim.min_neighbours, sim.max_neighbours],
                           "noise": sim.noise, "label_bands": list(sim.label_bands)},
        },
        estimators={n: {**ESTIMATORS, **REFERENCES}[n] for n in names},
        calibration=calibration,
        population_means=population_means(populations, names),
        figure=FIGURE,
    )


def _calibration_row(cal: ShearCalibration, name: str) -> list[str]:
    """A1, c1, m1, A2, c2, m2 of one estimator with their errors, then its pairs "n1 / n2"."""
    cells = []
    for part in (cal.g1, cal.g2):
        r = part.estimators[name]
        cells += [fmt_err(r.A, r.A_err, 4), fmt_err(r.c, r.c_err, 5, True),
                  fmt_err(r.m, r.m_err, 4, True)]
    return cells + [f"{cal.g1.estimators[name].n_pairs} / {cal.g2.estimators[name].n_pairs}"]


CALIBRATION_HEADER = ["estimator", "A1", "c1", "m1", "A2", "c2", "m2", "pairs"]


def format_table(result: ShearResult) -> str:
    """The calibration as a plain-text table (stdout)."""
    width = 22
    head = (f"{'estimator':<24}" + "".join(f"{h:>{width}}" for h in CALIBRATION_HEADER[1:-1])
            + f"{'pairs':>12}")
    lines = [head, "-" * len(head)]
    for name in result.calibration.g1.estimators:
        *cells, pairs = _calibration_row(result.calibration, name)
        lines.append(f"{SHORT_NAMES.get(name, name):<24}" + "".join(f"{c:>{width}}" for c in cells)
                     + f"{pairs:>12}")
    meta = result.meta
    lines.append(f"{meta['n_scenes_per_population']} scenes per population "
                 f"({meta['n_pairs_per_population']} twin pairs), {meta['n_populations']} "
                 f"populations; each component's fit uses {meta['n_scenes_per_fit']['g1']} scenes; "
                 f"m = A / A_truth - 1 with A_truth = A of '{meta['reference']}'; "
                 f"bootstrap {meta['bootstrap']} replicates.")
    return "\n".join(lines)


def render_shear_markdown(result: ShearResult) -> str:
    """The shear section of report.md (every number from ``result``)."""
    meta, cal = result.meta, result.calibration
    rows = [[SHORT_NAMES.get(name, name)] + _calibration_row(cal, name)
            for name in cal.g1.estimators]
    pops = ", ".join(f"({g1:+g}, {g2:+g})" for g1, g2 in meta["populations"])
    shared = ("All populations draw the same scenes (same seeds; only the shear differs), so "
              f"they rest on {meta['independent_galaxy_sets']} independent twin pairs; the "
              "bootstrap resamples pair k jointly in every population and for every estimator."
              if meta["shared_galaxies"] else
              "Every population draws its own scenes; the bootstrap resamples pairs within each "
              "population, the same draws for every estimator.")
    sim = meta["simulation"]
    req = meta["requirements"]
    lines = [
        "## 5. Shear calibration", "",
        f"Fit of <e_i> = A g_i + c per component over populations with constant applied shears "
        f"(g1, g2) = {pops}; component 1 uses the populations with g2 = 0, component 2 those with "
        f"g1 = 0. **Each population has {meta['n_scenes_per_population']} scenes "
        f"({meta['n_pairs_per_population']} 90-degree-rotated twin pairs); each component's fit "
        f"rests on {meta['n_scenes_per_fit']['g1']} scenes.** {shared}",
        "",
        f"m = A / A_truth - 1 with A_truth the response of `{meta['reference']}` (uniform-weight "
        f"moments of the noiseless isolated truth); errors are 1-sigma over "
        f"{meta['bootstrap']} bootstrap replicates of the twin pairs (A and A_truth resampled "
        f"together). Simulation: {sim['survey']}, catalog {sim['catalog']}, targets brighter "
        f"than {sim['target_max_mag']} mag, {sim['neighbours'][0]}-{sim['neighbours'][1]} "
        f"neighbours, noise '{sim['noise']}'. A pair counts where both twins were measured "
        f"(last column: pairs used by the fit of component 1 / 2, summed over its "
        f"populations).", "",
        markdown_table(CALIBRATION_HEADER, rows),
        *_hsm_table(cal),
        f"For scale: LSST DESC's Year-10 requirement is |m| < {req['lsst_y10_m']:g}; Debvader "
        f"reported a {100 * req['debvader_m_blends']:.1f}% multiplicative ellipticity bias on "
        f"blends.", "",
        "Mean twin-pair ellipticity per population, the points of the fits (± standard error "
        "of the mean over pairs):", "",
    ]
    names = list(cal.g1.estimators)
    columns: list[tuple[int, int]] = []  # (population position, component index)
    for c_index, comp in enumerate(("g1", "g2")):
        other = "g2" if comp == "g1" else "g1"
        columns += sorted(((i, c_index) for i, row in enumerate(result.population_means)
                           if row[other] == 0.0),
                          key=lambda ic: result.population_means[ic[0]][comp])
    pops_rows = result.population_means
    header = ["estimator"] + [f"<e{c + 1}> at g{c + 1} = {pops_rows[i][f'g{c + 1}']:+g}"
                              for i, c in columns]
    mean_rows = []
    for name in names:
        mean_rows.append([SHORT_NAMES.get(name, name)] + [
            fmt_err(pops_rows[i][name][f"e{c + 1}"], pops_rows[i][name][f"e{c + 1}_err"], 5,
                    True) for i, c in columns])
    lines += [markdown_table(header, mean_rows),
              f"![shear response and multiplicative bias]({result.figure})", "",
              f"Produced by: `{meta.get('command', '')}` on {meta.get('created', '')}.", ""]
    return "\n".join(lines)


def _hsm_table(cal: ShearCalibration) -> list[str]:
    """Markdown lines: m of the HSM estimators against HSM on the truth (if measured)."""
    names = [n for n, fit in cal.g1.estimators.items()
             if n.endswith("_hsm") and HSM_REFERENCE in fit.m_vs]
    if not names:
        return []
    rows = []
    for name in names:
        row = [SHORT_NAMES.get(name, name)]
        for part in (cal.g1, cal.g2):
            r = part.estimators[name].m_vs[HSM_REFERENCE]
            row.append(fmt_err(r["m"], r["m_err"], 4, True))
        rows.append(row)
    return [f"HSM estimators against their own reference, m = A / A(`{HSM_REFERENCE}`) - 1 "
            f"(galsim.hsm on the noiseless isolated truth; same bootstrap):", "",
            markdown_table(["estimator", "m1 vs truth HSM", "m2 vs truth HSM"], rows)]


def shear_is_complete(out: str | Path) -> bool:
    """Whether ``out/metrics.json`` holds a shear result (an unreadable one does not count)."""
    try:
        return "shear" in read_metrics(out)
    except ValueError:
        return False


def write_shear(out: Path, result: ShearResult, run: Path, force: bool) -> None:
    """Merge ``result`` into ``out/metrics.json`` and ``out/report.md`` (or create them)."""
    metrics = read_metrics(out, rebuild=force)
    if "shear" in metrics and not force:
        raise FileExistsError(f"{out / 'metrics.json'} already holds a shear result; pass --force "
                              f"to replace it")
    metrics["shear"] = result.to_dict()
    mark(out, EVALUATION_KIND)
    write_metrics(out, metrics)
    report = out / REPORT_FILE
    body = render_shear_markdown(result)
    if report.is_file():
        text = report.read_text()
        write_text_atomic(report, replace_section(text, "shear", body))
    else:
        header = f"# Shear calibration: run `{run}`\n"
        write_text_atomic(report, section("header", header) + "\n" + section("shear", body))


def measure_shear(run: str | Path, config: Config, out: str | Path | None = None, *,
                  force: bool = False, progress: bool = True, command: str | None = None,
                  config_path: str | None = None, log: Callable[[str], None] = print
                  ) -> ShearResult:
    """Simulate, measure, calibrate; write into ``out`` (default ``run/evaluation``)."""
    run = Path(run)
    out = Path(out) if out is not None else run / "evaluation"
    claim_evaluation_directory(out)
    if "shear" in read_metrics(out, rebuild=force) and not force:
        raise FileExistsError(f"{out / 'metrics.json'} already holds a shear result; pass --force "
                              f"to replace it")
    model = Deblender.from_run(run)
    model.require_survey_psf("the shear calibration")
    out.mkdir(parents=True, exist_ok=True)
    model_id = lineage_identity(RunLayout(run), FINAL_STAGE)
    populations = simulate_populations(config, model, out / CACHE_DIR, model_id,
                                       progress=progress, log=log)
    result = shear_result(populations, config)
    result.meta.update(run=str(run), config=config_path,
                       command=command or f"python -m evaluation.shear --run {run}",
                       created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    plots.plot_shear_response(result.population_means, result.calibration, out / FIGURE)
    write_shear(out, result, run, force)
    log(format_table(result))
    log(f"shear calibration written to {out / 'metrics.json'} and {out / REPORT_FILE}")
    return result
