"""The metacalibrated shear benchmark: m and c of every estimator against the applied shear, on
populations that nothing was fitted on (config section ``metacal``, SPEC 6).

Variants: each population of ``metacal.populations`` ("btk": the training simulation's code and
catalog; "galsim": another galaxy population and PSF widths drawn directly with GalSim), with and
without neighbours. Each variant draws ``metacal.n_scenes`` scenes in chunks; a scene and its
90-degree twin are drawn at +g and at -g with the same galaxies, positions (sheared with the
scene) and noise (:mod:`simulation.shear_pairs`), ``metacal.margin_pixels`` larger on each side
than the model's stamp, and every estimator of :mod:`evaluation.metacal_shear` is measured on the
central stamp of their metacal images. Each chunk is cached in ``DIR/cache`` as soon
as it is measured, so an interrupted run resumes where it stopped.

Output, in ``DIR``: ``metrics.json`` (every m, c with errors, per variant, estimator and bin),
``report.md`` (the tables) and ``fig_metacal_shear.png``. An existing result is not replaced
without ``force``.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from deblend.core.atomic import atomic_output, write_text_atomic
from deblend.core.chunk_cache import (
    chunk_key,
    join_chunks,
    read_chunk,
    without_defaults,
    write_chunk,
)
from deblend.core.config import Config
from deblend.core.inference import FINAL_STAGE, Deblender
from deblend.core.outputs import mark, refuse_foreign
from deblend.core.runs import RunLayout, lineage_identity
from evaluation.metacal_shear import (
    METACAL_ESTIMATORS,
    measure_metacal,
    measured_from_arrays,
    measured_to_arrays,
    shear_bias,
)
from evaluation.report_io import (
    fmt_err,
    jsonable,
    markdown_table,
    noise_correction_words,
    read_metrics,
    write_metrics,
)
from evaluation.shear_calibration import chunk_sizes
from simulation.shear_pairs import ShearPairBatch, draw_shear_pairs

KIND = "metacal_shear"
"""The kind of output a benchmark directory is (:mod:`deblend.core.outputs`)."""
REPORT = "report.md"
FIGURE = "fig_metacal_shear.png"
CACHE_DIR = "cache"
CACHE_VERSION = 4
"""Bumped when what a chunk holds changes for the same settings (2: reconstructions averaged over
the 8 symmetric views; 3: the metacal images sheared by ``metacal.delta``, not always 0.01; 4:
AnaCal corrects its noise bias with metacal's correction noise)."""
NOT_IN_CHUNKS = ("n_scenes", "bootstrap", "populations", "neighbours")
"""Settings that do not change what a chunk holds: a larger run reuses a smaller one's chunks."""
SCENE_COLUMNS = ("n_galaxies", "neighbour_distance", "target_snr", "twin")
SNR_BINS = (0.0, 20.0, 50.0, 100.0, np.inf)
DISTANCE_BINS_ARCSEC = (0.0, 2.0, 3.0, np.inf)
SHORT_NAMES = {"regressor": "regressor", "recon_gauss": "recon. Gaussian-weighted",
               "recon_hsm": "recon. HSM", "blend_gauss": "blend Gaussian-weighted",
               "blend_hsm": "blend HSM", "anacal": "AnaCal"}


@dataclass(frozen=True)
class Variant:
    population: str
    neighbours: bool

    @property
    def name(self) -> str:
        return f"{self.population}_{'blended' if self.neighbours else 'isolated'}"

    @property
    def label(self) -> str:
        return f"{self.population}, {'0-2 neighbours' if self.neighbours else 'isolated'}"


def variants(config: Config) -> list[Variant]:
    return [Variant(p, n) for p in config.metacal.populations for n in config.metacal.neighbours]


def check_estimators(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in METACAL_ESTIMATORS]
    if unknown:
        raise ValueError(f"metacal.estimators: unknown estimator '{unknown[0]}' (known: "
                         f"{', '.join(METACAL_ESTIMATORS)})")


# -- chunks -------------------------------------------------------------------------------------
def chunk_seed(base: int, name: str, chunk: int) -> int:
    """The seed of one chunk of the scenes called ``name`` (a variant, a benchmark)."""
    entropy = [int(base), zlib.crc32(name.encode()), int(chunk)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2 ** 31 - 1))


def drawing_simulation(config: Config) -> Any:
    """The simulation settings scenes are drawn with: the run's, with stamps larger by
    ``metacal.margin_pixels`` on each side (metacal's input; everything is measured on the
    central stamp of the model's size)."""
    sim = config.simulation
    return config.replace("simulation", stamp_pixels=sim.stamp_pixels
                          + 2 * config.metacal.margin_pixels).simulation


def chunk_psf_scale(config: Config, variant: Variant, chunk: int) -> float:
    """PSF width factor of a chunk: the galsim population cycles through its scales."""
    if variant.population != "galsim":
        return 1.0
    scales = config.metacal.galsim_psf_scales
    return float(scales[chunk % len(scales)])


def _cache_key(config: Config, variant: Variant, chunk: int, n: int, model_id: str) -> str:
    measured = without_defaults({k: v for k, v in config.to_dict()["metacal"].items()
                                 if k not in NOT_IN_CHUNKS}, {"hold_sky_plane": False})
    return chunk_key({"version": CACHE_VERSION, "metacal": measured,
                      "simulation": config.to_dict()["simulation"], "variant": variant.name,
                      "chunk": chunk, "n": n, "model": model_id})


def measure_pairs(model: Deblender, batch: ShearPairBatch, config: Config
                  ) -> dict[str, np.ndarray]:
    """Every configured estimator at +g and -g, and the scenes' properties, as flat arrays."""
    mc = config.metacal
    arrays: dict[str, np.ndarray] = {c: np.asarray(getattr(batch, c)) for c in SCENE_COLUMNS}
    noise = batch.correction_noise if mc.noise_correction else None
    for sign, stamps in (("plus", batch.plus), ("minus", batch.minus)):
        measured = measure_metacal(model, stamps, batch.psfs, correction_noise=noise,
                                   sky_variance=batch.sky_variance, views=mc.views,
                                   estimators=mc.estimators, min_snr=mc.min_snr, delta=mc.delta,
                                   target_fwhm=mc.target_psf_fwhm,
                                   hold_sky_plane=mc.hold_sky_plane)
        for name, m in measured.items():
            arrays.update(measured_to_arrays(f"{sign}.{name}", m))
    return arrays


def measure_variant(model: Deblender, config: Config, variant: Variant, cache: Path,
                    model_id: str, bar: Any) -> dict[str, np.ndarray]:
    """All chunks of a variant, from the cache where possible, concatenated."""
    mc = config.metacal
    parts: list[dict[str, np.ndarray]] = []
    for chunk, n in enumerate(chunk_sizes(mc.n_scenes, mc.chunk_scenes)):
        key = _cache_key(config, variant, chunk, n, model_id)
        path = cache / f"{variant.name}_chunk{chunk:04d}.npz"
        arrays = read_chunk(path, key)
        if arrays is None:
            batch = draw_shear_pairs(
                variant.population, n, chunk_seed(mc.seed, variant.name, chunk), (mc.g, mc.g),
                neighbours=variant.neighbours, sim=drawing_simulation(config),
                psf_scale=chunk_psf_scale(config, variant, chunk))
            arrays = measure_pairs(model, batch, config)
            write_chunk(path, key, arrays)
        parts.append(arrays)
        bar.update(n)
    return join_chunks(parts)


# -- results ------------------------------------------------------------------------------------
def scene_bins(arrays: dict[str, np.ndarray], pixel_scale: float) -> dict[str, np.ndarray]:
    """Named boolean masks of the breakdown: target S/N, galaxies per scene, neighbour distance."""
    bins: dict[str, np.ndarray] = {}
    snr = arrays["target_snr"]
    for lo, hi in itertools.pairwise(SNR_BINS):
        bins[f"snr {lo:g}-{hi:g}"] = (snr >= lo) & (snr < hi)
    for k in np.unique(arrays["n_galaxies"]):
        bins[f"{int(k)} galaxies"] = arrays["n_galaxies"] == k
    distance = arrays["neighbour_distance"] * pixel_scale
    for lo, hi in itertools.pairwise(DISTANCE_BINS_ARCSEC):
        bins[f"neighbour {lo:g}-{hi:g}\""] = np.isfinite(distance) & (distance >= lo) & (
            distance < hi)
    # twins share their properties: a bin holds whole pairs
    return {name: np.repeat(mask.reshape(-1, 2).all(axis=1), 2) for name, mask in bins.items()}


def variant_results(arrays: dict[str, np.ndarray], config: Config, pixel_scale: float
                    ) -> dict[str, Any]:
    mc = config.metacal
    g = (mc.g, mc.g)
    out: dict[str, Any] = {"n_scenes": int(arrays["twin"].size), "estimators": {}}
    bins = scene_bins(arrays, pixel_scale)
    for name in mc.estimators:
        plus = measured_from_arrays(f"plus.{name}", arrays)
        minus = measured_from_arrays(f"minus.{name}", arrays)
        overall = shear_bias(plus, minus, g, delta=mc.delta, n_bootstrap=mc.bootstrap)
        breakdown = {}
        for bin_name, mask in bins.items():
            if mask.sum() >= 8:
                breakdown[bin_name] = shear_bias(plus, minus, g, delta=mc.delta,
                                                 n_bootstrap=mc.bootstrap, subset=mask).to_dict()
        out["estimators"][name] = {**overall.to_dict(), "bins": breakdown}
    return out


def benchmark_is_complete(out: str | Path) -> bool:
    try:
        return "metacal_shear" in read_metrics(out)
    except ValueError:
        return False


def open_benchmark(run: Path, out: Path, kind: str, complete: bool, force: bool, what: str,
                   device: str) -> tuple[Deblender, str, Path]:
    """Claim ``out`` for a ``kind`` benchmark (refused when ``complete`` unless ``force``)
    and return the run's model, its identity for the chunk cache, and the cache directory."""
    if complete and not force:
        raise FileExistsError(f"{out} already holds {what}; pass --force to measure it again "
                              "(cached chunks are reused)")
    out.mkdir(parents=True, exist_ok=True)
    mark(out, kind)
    model = Deblender.from_run(run, device=device)
    cache = out / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    return model, lineage_identity(RunLayout(run), FINAL_STAGE), cache


def run_metacal_benchmark(run: str | Path, config: Config, out: str | Path | None = None, *,
                          force: bool = False, progress: bool = True, device: str = "auto",
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every variant (resuming from the cache), write the outputs, return the metrics."""
    run = Path(run)
    out = Path(out) if out is not None else run / KIND
    check_estimators(config.metacal.estimators)
    refuse_foreign(out, KIND)
    started = time.time()
    model, model_id, cache = open_benchmark(run, out, KIND, benchmark_is_complete(out), force,
                                            "a metacal shear result", device)
    todo = variants(config)
    results: dict[str, Any] = {}
    with tqdm(total=len(todo) * config.metacal.n_scenes, desc="metacal shear", unit="scene",
              disable=not progress) as bar:
        for variant in todo:
            arrays = measure_variant(model, config, variant, cache, model_id, bar)
            results[variant.name] = {"label": variant.label,
                                     **variant_results(arrays, config, model.data.pixel_scale)}
    metrics = {"metacal_shear": {
        "applied_g": [config.metacal.g, config.metacal.g], "delta": config.metacal.delta,
        "views": config.metacal.views, "noise_correction": config.metacal.noise_correction,
        "min_snr": config.metacal.min_snr, "margin_pixels": config.metacal.margin_pixels,
        "reference": "applied shear: m = g_hat / g - 1 per component, c = additive",
        "variants": results, "run": str(run), "seconds": time.time() - started}}
    write_metrics(out, jsonable(metrics))
    write_text_atomic(out / REPORT, report_markdown(metrics["metacal_shear"]))
    figure(metrics["metacal_shear"], out / FIGURE)
    log(shear_table(metrics["metacal_shear"]))
    return metrics["metacal_shear"]


# -- report -------------------------------------------------------------------------------------
def _row(name: str, r: dict[str, Any]) -> list[str]:
    return [SHORT_NAMES.get(name, name), fmt_err(r["m1"], r["m1_err"], 4, True),
            fmt_err(r["m2"], r["m2_err"], 4, True), fmt_err(r["c1"], r["c1_err"], 5, True),
            fmt_err(r["c2"], r["c2_err"], 5, True), f"{r['kept_fraction']:.3f}"]


def shear_table(result: dict[str, Any]) -> str:
    """One markdown table: every variant and estimator, m and c against the applied shear."""
    header = ["population", "estimator", "m1", "m2", "c1", "c2", "kept", "scenes"]
    rows = []
    for v in result["variants"].values():
        for name, r in v["estimators"].items():
            rows.append([v["label"], *_row(name, r), str(r["n_scenes"])])
    return markdown_table(header, rows)


def report_markdown(result: dict[str, Any]) -> str:
    g = result["applied_g"]
    lines = [
        "# Metacalibrated shear against the applied shear", "",
        f"Applied shear (g1, g2) = ({g[0]:+g}, {g[1]:+g}) and its negative, on the same scenes "
        f"and noise; metacal step delta = {result['delta']:g}; regressor averaged over "
        f"{result['views']} views; "
        f"{noise_correction_words(result['noise_correction'])}; "
        + ("no S/N cut" if result.get("min_snr") is None else
           f"cut: weighted S/N >= {result['min_snr']:g} on each metacal image, with its selection "
           "response") + ". m = g_hat / g - 1, c = additive, "
        "1-sigma bootstrap errors over twin pairs. No network or calibration was fitted on these "
        "populations.", "", shear_table(result), "", f"![m per estimator]({FIGURE})", ""]
    for v in result["variants"].values():
        lines += [f"## Breakdown: {v['label']}", ""]
        header = ["bin", "estimator", "m1", "m2", "c1", "c2", "kept", "scenes"]
        rows = []
        for name, r in v["estimators"].items():
            for bin_name, b in r["bins"].items():
                rows.append([bin_name, *_row(name, b), str(b["n_scenes"])])
        lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(next(iter(result["variants"].values()))["estimators"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, component in zip(axes, ("1", "2")):
        for i, v in enumerate(result["variants"].values()):
            x = np.arange(len(names)) + (i - (len(result["variants"]) - 1) / 2) * 0.15
            m = [v["estimators"][n][f"m{component}"] for n in names]
            err = [v["estimators"][n][f"m{component}_err"] for n in names]
            ax.errorbar(x, m, yerr=err, fmt="o", label=v["label"], capsize=2)
        ax.axhspan(-0.003, 0.003, color="tab:green", alpha=0.15, label="|m| < 0.003")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(np.arange(len(names)), [SHORT_NAMES.get(n, n) for n in names],
                      rotation=30, ha="right")
        ax.set_title(f"m{component} against the applied shear")
    axes[0].set_ylabel("m")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
