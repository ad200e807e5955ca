"""The MAP deblending report: every method on validation blends and dense fields, one table.

    python -m benchmarks.map_deblending --run RUN/train --out RUN/map_deblending

writes ``report.md``, ``metrics.json`` and ``flux_by_magnitude.png`` into the output directory
(the main job does the same as its ``map_deblending`` step when ``map.enabled``). Methods:
``encoder`` (the deblender's encoder + decoder on each source's stamp), ``map_normal`` and ``map_flow``
(:mod:`deblend.core.map_deblend` under each prior of ``map.priors``; ``map_flow`` needs the
run's flow stage) and ``scarlet2`` (:mod:`evaluation.scarlet2_peer`, when installed and
``scarlet2_blends`` > 0, on that many of the blends only). Metrics: :mod:`evaluation.
map_comparison`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from deblend.core.atomic import write_text_atomic
from deblend.core.config import Config
from deblend.core.inference import Deblender
from evaluation.map_comparison import (
    FLUX_MAG_EDGES,
    MethodResult,
    Truth,
    blend_scenes,
    encoder_on_stamps,
    field_scenes,
    map_on_scenes,
    map_shear_bias,
    on_truth_grid,
    summarize,
)
from evaluation.plots import save_figure
from evaluation.report_io import fmt, fmt_err, markdown_table, write_metrics

REPORT_FILE = "report.md"
FIGURE_FILE = "flux_by_magnitude.png"


def compare_methods(model: Deblender, scenes: np.ndarray, positions: list[np.ndarray],
                    measured: list[np.ndarray], sky_levels: np.ndarray, config: Config,
                    log: Callable[[str], None]) -> dict[str, MethodResult]:
    """Every method of the module docstring on the same scenes and detections."""
    results = {"encoder": encoder_on_stamps(model, scenes, positions, measured)}
    for prior in config.map.priors:
        if prior == "flow" and model.flow is None:
            log("map_flow skipped: the run has no trained flow stage")
            continue
        results[f"map_{prior}"], _ = map_on_scenes(model, scenes, positions, measured,
                                                   sky_levels, prior, config.map)
        log(f"map_{prior}: {results[f'map_{prior}'].seconds:.1f} s")
    return results


def scarlet2_on_blends(model: Deblender, scenes: np.ndarray, positions: list[np.ndarray],
                       psfs: np.ndarray, sky_levels: np.ndarray) -> MethodResult:
    """scarlet2 on blends whose first position is the target (its reconvolved model)."""
    from evaluation.scarlet2_peer import scarlet2_deblend

    fitted = scarlet2_deblend(scenes, psfs, positions, sky_levels, model.bands)
    recon = np.stack([blend.sources[0].stamp(model.stamp_pixels) for blend in fitted])
    seconds = float(sum(blend.cpu_seconds for blend in fitted))
    return MethodResult(recon.astype(np.float32), None, seconds,
                        sum(len(blend.sources) for blend in fitted))


def run_map_comparison(run: str | Path, config: Config, out: str | Path, *, data: Any,
                       n_blends: int | None = None, n_fields: int | None = None,
                       shear_scenes: int = 0, scarlet2_blends: int = 0,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every method on ``n_blends`` validation blends of ``data`` (a StampData) and on
    ``n_fields`` dense fields drawn from ``config``; MAP's shear bias on ``shear_scenes``
    GalSim scenes when > 0; write the report into ``out``. Returns the metrics."""
    from simulation.dense_fields import draw_fields
    from simulation.surveys import sky_levels as survey_sky_levels

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Deblender.from_run(run, device=config.training.device)
    model.require_survey_psf("the MAP comparison")
    n_blends = config.map.n_blends if n_blends is None else n_blends
    metrics: dict[str, Any] = {"settings": config.to_dict()["map"], "run": str(run),
                               "flow": model.flow is not None}
    sky = survey_sky_levels(data.survey, data.bands)

    log(f"MAP comparison on {n_blends} validation blends")
    blends, positions, truth = blend_scenes(model, data, n_blends, config.map)
    targets = [np.array([0])] * len(blends)
    results = compare_methods(model, blends, positions, targets, sky, config, log)
    if scarlet2_blends > 0:
        from evaluation.scarlet2_peer import scarlet2_available

        if scarlet2_available():
            k = min(scarlet2_blends, len(blends))
            log(f"scarlet2 on {k} blends")
            peer = scarlet2_on_blends(model, blends[:k], positions[:k], data.psf_images, sky)
            metrics["scarlet2_blends"] = summarize(peer, Truth(truth.stamps[:k], truth.e[:k],
                                                               truth.mag[:k]), model)
            metrics["scarlet2_blends"]["encoder_same_blends"] = summarize(
                MethodResult(results["encoder"].reconstruction[:k],
                             results["encoder"].ellipticity[:k]
                             if results["encoder"].ellipticity is not None else None,
                             results["encoder"].seconds, results["encoder"].n_galaxies),
                Truth(truth.stamps[:k], truth.e[:k], truth.mag[:k]), model)
        else:
            log("scarlet2 is not installed: pip install 'deblend[peers]' to compare with it")
    metrics["blends"] = {name: summarize(result, truth, model) for name, result in
                         results.items()}

    n_fields = config.dense_fields.n_fields if n_fields is None else n_fields
    if n_fields > 0:
        log(f"MAP comparison on {n_fields} dense fields")
        fields = draw_fields(config.simulation, config.dense_fields, n_fields)
        found, measured, field_truth, matches = field_scenes(model, fields, config.map)
        field_results = compare_methods(model, fields.images, found, measured,
                                        fields.sky_levels, config, log)
        metrics["fields"] = {name: summarize(on_truth_grid(result, fields, matches, found,
                                                           model.stamp_pixels),
                                             field_truth, model)
                             for name, result in field_results.items()}
        metrics["fields_detection"] = {
            "galaxies": int(fields.n_galaxies.sum()),
            "detections": int(sum(len(f) for f in found)), "matched": len(matches)}

    if shear_scenes > 0:
        metrics["shear"] = {}
        for prior in config.map.priors:
            if prior == "flow" and model.flow is None:
                continue
            log(f"MAP ({prior}) shear bias on {shear_scenes} GalSim scenes")
            metrics["shear"][f"map_{prior}"] = map_shear_bias(model, config, prior,
                                                              shear_scenes)
    write_metrics(out, metrics)
    plot_flux_by_magnitude(metrics, out / FIGURE_FILE)
    write_text_atomic(out / REPORT_FILE, report_markdown(metrics))
    return metrics


def _row(name: str, m: dict[str, Any]) -> list[str]:
    recon, reg, deblended = m["recon_moments"], m.get("regressor"), m.get("regressor_deblended")
    flux = f"{fmt(m['flux']['median'], 3, True)} / {fmt(m['flux']['nmad'])}"
    offsets = " / ".join(fmt(recon[c]["mean_offset"], 4, True) for c in ("e1", "e2"))
    return [name, str(m["n"]), flux,
            fmt(m["ssim"]["median"]),
            f"{fmt(recon['e1']['slope'], 2)} / {fmt(recon['e2']['slope'], 2)}",
            offsets,
            "–" if reg is None else f"{fmt(reg['e1']['slope'], 2)} / {fmt(reg['e2']['slope'], 2)}",
            "–" if reg is None else f"{fmt(reg['e1']['rmse'])} / {fmt(reg['e2']['rmse'])}",
            "–" if deblended is None
            else f"{fmt(deblended['e1']['rmse'])} / {fmt(deblended['e2']['rmse'])}",
            " / ".join(fmt(v, 2) for v in m["coverage"]["0.68"]) if "coverage" in m else "–",
            fmt(1000 * m["seconds_per_galaxy"], 1)]


HEADER = ["method", "n", "flux resid. median / NMAD", "SSIM median", "recon slope e1 / e2",
          "recon mean offset e1 / e2", "regressor slope e1 / e2", "regressor RMSE e1 / e2",
          "regressor RMSE on the MAP-deblended stamp e1 / e2", "68% coverage e1 / e2",
          "ms / galaxy"]


def report_markdown(metrics: dict[str, Any]) -> str:
    """The report: one table per kind of scene, the shear biases, the flux trend."""
    s = metrics["settings"]
    intro = (f"Run: `{metrics['run']}`. MAP: {s['steps']} Adam steps (lr "
             f"{s['learning_rate']}) from the deblender encoder's latents, sky + Poisson "
             f"likelihood; Laplace posterior ({s['posterior_samples']} samples). For MAP, "
             "'regressor' reads the MAP latent; the MAP-deblended stamp is the scene minus "
             "the other sources' MAP models, read by the encoder and regressor. Truth: the "
             "noiseless isolated galaxies; flux over the label bands r+i+z; e = uniform-weight "
             "moment distortion (pixel frame). Nothing here was fitted on these scenes.")
    lines = ["# MAP deblending: encoder alone vs MAP (N(0, I) and flow priors)", "", intro, ""]
    for key, title in (("blends", "Validation blends (targets)"),
                       ("fields", "Dense fields (matched detections)")):
        if key not in metrics:
            continue
        lines += [f"## {title}", "",
                  markdown_table(HEADER, [_row(name, m) for name, m in metrics[key].items()])]
        if key == "fields":
            d = metrics["fields_detection"]
            detected = (f"{d['galaxies']} galaxies, {d['detections']} SEP detections, "
                        f"{d['matched']} matched within 3 px.")
            lines += [detected, ""]
    if "scarlet2_blends" in metrics:
        peer = metrics["scarlet2_blends"]
        lines += ["## scarlet2 on the first blends", "",
                  markdown_table(HEADER, [_row("scarlet2", peer),
                                          _row("encoder (same blends)",
                                               peer["encoder_same_blends"])])]
    if metrics.get("shear"):
        rows = []
        for name, bias in metrics["shear"].items():
            for estimator in ("regressor", "recon_gauss"):
                b = bias[estimator]
                rows.append([name, estimator, str(bias["n_scenes"]),
                             *[fmt_err(b[k], b[f"{k}_err"], 4, True)
                               for k in ("m1", "m2", "c1", "c2")]])
        lines += ["## Shear bias against the applied shear (metacal, isolated GalSim scenes)",
                  "", markdown_table(["method", "estimator", "scenes", "m1", "m2", "c1", "c2"],
                                     rows)]
    lines += ["## Flux residual with brightness", "", f"![flux]({FIGURE_FILE})", ""]
    return "\n".join(lines) + "\n"


def plot_flux_by_magnitude(metrics: dict[str, Any], path: Path) -> Path:
    """Median flux residual per magnitude bin, per method, blends and fields side by side."""
    kinds = [k for k in ("blends", "fields") if k in metrics]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    centres = np.concatenate([[FLUX_MAG_EDGES[0] - 0.5],
                              0.5 * (np.array(FLUX_MAG_EDGES[1:]) + FLUX_MAG_EDGES[:-1]),
                              [FLUX_MAG_EDGES[-1] + 0.5]])
    for ax, kind in zip(axes[0], kinds):
        for name, m in metrics[kind].items():
            medians = [b["median"] for b in m["flux_by_mag"].values()]
            errors = [b["nmad"] / np.sqrt(max(b["n"], 1)) for b in m["flux_by_mag"].values()]
            ax.errorbar(centres, medians, yerr=errors, marker="o", label=name, capsize=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("magnitude (ref band)")
        ax.set_ylabel("median flux residual (r+i+z)")
        ax.set_title(kind)
        ax.legend()
    return save_figure(fig, path)
