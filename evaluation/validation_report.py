"""The evaluation of a trained run on the validation split of a dataset, and its report.

:func:`write_report` runs t1 (the stage-1 VAE) and t2 (the deblender) on the noisy validation
blends and writes ``report.md``, ``metrics.json`` (an :class:`evaluation.results.EvaluationResult`)
and the figures into the report directory; ``python -m evaluation.report`` is its command line
(its help lists the figures). A shear result already in the directory is kept.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from deblend.core.atomic import write_text_atomic
from deblend.core.config import Config
from deblend.core.normalization import normalize_with_truth
from deblend.core.outputs import mark
from deblend.core.runs import run_config
from evaluation import metrics as fidelity
from evaluation import plots
from evaluation.ellipticity import breakdown, ellipticity_stats, magnitude_bin_labels
from evaluation.estimators import (
    ESTIMATORS,
    SHORT_NAMES,
    concatenate,
    label_image,
    measure_estimators,
)
from evaluation.models import Model, load_models
from evaluation.report_io import (
    EVALUATION_KIND,
    REPORT_FILE,
    claim_evaluation_directory,
    fmt,
    fmt_err,
    markdown_table,
    read_metrics,
    section,
    write_metrics,
)
from evaluation.results import (
    EllipticityBreakdown,
    EllipticityStats,
    EvaluationResult,
    Fidelity,
    ShearResult,
)
from evaluation.shear_calibration import render_shear_markdown
from simulation.dataset import open_dataset

FIGURES = {
    "gallery": "fig12_gallery.png",
    "fidelity": "fig13_fidelity.png",
    "scatter": "fig14_ellipticity_scatter.png",
    "delta_e": "fig15_delta_e.png",
    "distributions": "fig16_e_distributions.png",
    "flux_size": "fig_flux_size.png",
    "breakdown": "fig_breakdown.png",
}
STAGES = ("t1", "t2")
REFERENCE_VALUES = {"ssim_stage1": 0.90, "ssim_stage2": 0.93, "cosine_stage1": 0.98,
                    "cosine_stage2": 0.985}
"""The report's published figures (SPEC 6), printed for comparison."""
STAGE_DESCRIPTIONS = {
    "t1": "stage-1 encoder + stage-1 decoder (VAE trained on isolated galaxies) applied to blends",
    "t2": "stage-2 encoder + stage-1 decoder (the deblender) applied to blends",
}


# -- evaluation ------------------------------------------------------------------------------------
def _check_models(models: Mapping[str, Model], data: Any) -> None:
    for name, model in models.items():
        if tuple(model.bands) != tuple(data.bands):
            raise ValueError(f"model {name} was trained on bands {' '.join(model.bands)} but the "
                             f"data at {data.root} has {' '.join(data.bands)}")
        if not model.normalization.matches(data.normalization):
            print(f"warning: the normalisation constants of {data.root} differ from model "
                  f"{name}'s; the model's constants are used", file=sys.stderr)


def choose_gallery(n_galaxies: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of ``size`` samples, drawn at random in turn from each blend multiplicity."""
    rng = np.random.default_rng(seed)
    groups = [list(rng.permutation(np.flatnonzero(n_galaxies == k)))
              for k in sorted(np.unique(n_galaxies))]
    chosen: list[int] = []
    while len(chosen) < min(size, len(n_galaxies)):
        for group in groups:
            if group and len(chosen) < size:
                chosen.append(int(group.pop()))
    return np.array(sorted(chosen, key=lambda i: (n_galaxies[i], i)), dtype=np.int64)


def evaluate(data: Any, models: Mapping[str, Model], config: Config, *, progress: bool = True
             ) -> tuple[EvaluationResult, dict[str, Any]]:
    """Run the models on the validation blends; returns (metrics, arrays for the figures)."""
    ev = config.evaluation
    _check_models(models, data)
    indices = data.split_indices("validation")
    if len(indices) == 0:
        raise ValueError(f"{data.root} has no validation samples (simulation.val_fraction = 0)")
    if ev.max_samples is not None:
        indices = indices[:ev.max_samples]
    bands = tuple(data.bands)
    sim_meta = data.meta["simulation"]
    label_bands = tuple(sim_meta["label_bands"])
    ref_band = sim_meta["ref_band"]
    all_labels = data.labels()
    labels = {k: np.asarray(all_labels[k])[indices] for k in
              ("e1", "e2", "hsm_e1", "hsm_e2", "n_galaxies", f"mag_{ref_band}")}
    gallery_pos = choose_gallery(labels["n_galaxies"], ev.gallery_size, ev.seed)
    gallery: dict[str, list[np.ndarray]] = {k: [] for k in ("blend", "truth", "t2", "regressor",
                                                           "recon_moments")}

    ssim: dict[str, list[np.ndarray]] = {s: [] for s in models}
    cosine: dict[str, list[np.ndarray]] = {s: [] for s in models}
    residuals: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in models}
    estimates = []
    batch_size = max(1, ev.batch_size)
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="evaluating validation blends", unit="batch",
                      disable=not progress):
        chunk = indices[start:start + batch_size]
        blend = data.images("blend", chunk).astype(np.float64)
        noisy = data.images("noisy", chunk).astype(np.float64)
        clean = data.images("clean", chunk).astype(np.float64)
        predictions = {}
        for stage, model in models.items():
            pred = model.predict(blend)
            predictions[stage] = pred
            recon_norm, truth_norm = normalize_with_truth(
                pred.reconstruction.astype(np.float64), clean, model.normalization)
            ssim[stage].append(fidelity.ssim_per_band(recon_norm, truth_norm))
            cosine[stage].append(fidelity.cosine_similarity(recon_norm, truth_norm))
            residuals[stage].append(fidelity.flux_size_residuals(pred.reconstruction, clean))
        t2 = predictions["t2"]
        estimates.append(measure_estimators(
            bands=bands, label_bands=label_bands, reconstruction_raw=t2.reconstruction,
            regressor_e=t2.ellipticity, regressor_raw_e=t2.ellipticity_raw, blend_raw=blend,
            noisy_raw=noisy))
        here = gallery_pos[(gallery_pos >= start) & (gallery_pos < start + len(chunk))] - start
        if here.size:
            gallery["blend"].append(label_image(blend[here], bands, label_bands))
            gallery["truth"].append(label_image(clean[here], bands, label_bands))
            gallery["t2"].append(label_image(t2.reconstruction[here], bands, label_bands))
            gallery["regressor"].append(t2.ellipticity[here])
            last = estimates[-1]["recon_moments"]
            gallery["recon_moments"].append(np.stack([last[0][here], last[1][here]], axis=1))

    ssim_all = {s: np.concatenate(v) for s, v in ssim.items()}
    cosine_all = {s: np.concatenate(v) for s, v in cosine.items()}
    residual_all = {s: {k: np.concatenate([r[k] for r in v]) for k in ("flux", "size")}
                    for s, v in residuals.items()}
    est = concatenate(estimates)
    est = {name: est[name] for name in ESTIMATORS if name in est}
    truth = (labels["e1"].astype(np.float64), labels["e2"].astype(np.float64))
    mags = labels[f"mag_{ref_band}"]

    ellipticity: dict[str, EllipticityBreakdown] = {}
    for name, (e1, e2) in est.items():
        ellipticity[name] = breakdown(truth[0], truth[1], e1, e2, labels["n_galaxies"], mags,
                                      ev.mag_edges)
        if name.endswith("_hsm"):
            vs_hsm_truth = ellipticity_stats(labels["hsm_e1"], labels["hsm_e2"], e1, e2)
            ellipticity[name] = dataclasses.replace(ellipticity[name], vs_hsm_truth=vs_hsm_truth)

    n_valid_total = len(data.split_indices("validation"))
    metrics = EvaluationResult(
        meta={
            "dataset": str(data.root), "dataset_id": data.dataset_id, "survey": data.survey,
            "bands": list(bands), "label_bands": list(label_bands), "ref_band": ref_band,
            "pixel_scale_arcsec": data.pixel_scale, "split": "validation",
            "n_validation": int(n_valid_total), "n_evaluated": int(len(indices)),
            "first_index": int(indices[0]), "last_index": int(indices[-1]),
            "evaluation_config": config.to_dict()["evaluation"],
            "magnitude_bins": magnitude_bin_labels(ev.mag_edges),
            "n_by_n_galaxies": {str(int(k)): int((labels["n_galaxies"] == k).sum())
                                for k in np.unique(labels["n_galaxies"])},
        },
        conventions={
            "ellipticity": "distortion e = (a^2 - b^2)/(a^2 + b^2) in the pixel frame "
                           "(x = array axis 1, y = array axis 0); truth labels: uniform-weight "
                           f"moments of the clean target summed over bands {list(label_bands)}",
            "ssim": fidelity.SSIM_CONVENTION,
            "ssim_data_range": fidelity.SSIM_DATA_RANGE,
            "cosine": fidelity.COSINE_CONVENTION,
            "flux_size": "relative residuals (reconstruction - truth)/truth of the total flux "
                         "and of the uniform-weight moment size per band, raw electrons",
            "scatter": fidelity.SCATTER_CONVENTION,
            "slope": "OLS of predicted on true per component; slope < 1: bias toward round shapes",
            "contours": "figure 15: Gaussian-KDE density levels enclosing 68.3/95.4/99.7% of the "
                        "points",
        },
        reference_values=dict(REFERENCE_VALUES),
        stages={s: STAGE_DESCRIPTIONS.get(s, s) for s in models},
        estimators={name: ESTIMATORS[name] for name in est},
        fidelity={s: Fidelity(**fidelity.fidelity_summary(ssim_all[s], cosine_all[s], bands))
                  for s in models},
        flux_size={s: fidelity.flux_size_summary(residual_all[s], bands) for s in models},
        ellipticity=ellipticity,
        figures=dict(FIGURES),
    )
    gallery_arrays = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in gallery.items()}
    gallery_arrays["titles"] = [
        f"sample {int(indices[p])}: {int(labels['n_galaxies'][p])} galaxies, "
        f"{ref_band} = {float(mags[p]):.1f}" for p in gallery_pos]
    gallery_arrays["true_e"] = np.stack([truth[0][gallery_pos], truth[1][gallery_pos]], axis=1)
    arrays = {"ssim": ssim_all, "cosine": cosine_all, "residuals": residual_all,
              "estimates": est, "truth": truth, "gallery": gallery_arrays, "bands": bands}
    return metrics, arrays


def make_figures(out: Path, metrics: EvaluationResult, arrays: Mapping[str, Any]) -> None:
    """Draw every figure of the report into ``out``."""
    est, truth = arrays["estimates"], arrays["truth"]
    overall = {name: metrics.ellipticity[name].all for name in est}
    plots.plot_fidelity(arrays["ssim"], arrays["cosine"], out / FIGURES["fidelity"])
    plots.plot_flux_size(arrays["residuals"], arrays["bands"], out / FIGURES["flux_size"])
    plots.plot_ellipticity_scatter(truth, est, overall, out / FIGURES["scatter"])
    plots.plot_delta_e(truth, est, out / FIGURES["delta_e"])
    plots.plot_distributions(truth, est, out / FIGURES["distributions"])
    plots.plot_breakdown({n: metrics.ellipticity[n] for n in est}, out / FIGURES["breakdown"])
    g = arrays["gallery"]
    plots.plot_gallery(g["blend"], g["truth"], g["t2"], g["true_e"],
                       {"regressor": g["regressor"], "recon_moments": g["recon_moments"]},
                       out / FIGURES["gallery"], titles=g["titles"])


# -- markdown -------------------------------------------------------------------------------------
def ellipticity_row(name: str, s: EllipticityStats) -> list[str]:
    """A markdown-table row (see :data:`ELLIPTICITY_HEADER`) of one estimator's statistics."""
    return [SHORT_NAMES.get(name, name), fmt(s.n_valid), fmt_err(s.e1.slope, s.e1.slope_err),
            fmt(s.e1.intercept, 4, signed=True), fmt_err(s.e2.slope, s.e2.slope_err),
            fmt(s.e2.intercept, 4, signed=True), fmt(s.e1.rmse), fmt(s.e2.rmse), fmt(s.e.rmse),
            fmt(s.e.mean_ratio)]


ELLIPTICITY_HEADER = ["estimator", "N", "slope e1", "intercept e1", "slope e2", "intercept e2",
                      "RMSE e1", "RMSE e2", "RMSE abs(e)", "<abs(e)> pred/true"]


def _breakdown_table(ellipticity: Mapping[str, EllipticityBreakdown], key: str,
                     group_name: str) -> str:
    rows = []
    for name, b in ellipticity.items():
        for group, s in getattr(b, key).items():
            rows.append([SHORT_NAMES.get(name, name), group, fmt(s.n_valid), fmt(s.e1.slope),
                         fmt(s.e2.slope), fmt(s.e1.rmse), fmt(s.e2.rmse), fmt(s.e.mean_ratio)])
    return markdown_table(["estimator", group_name, "N", "slope e1", "slope e2", "RMSE e1",
                           "RMSE e2", "<abs(e)> pred/true"], rows,
                          ["l", "l"] + ["r"] * 6)


def render_markdown(metrics: EvaluationResult) -> str:
    """The whole report.md from ``metrics`` (every number printed comes from it)."""
    meta, conv = metrics.meta, metrics.conventions
    figs = metrics.figures
    bands = meta["bands"]
    parts = []
    head = [f"# Evaluation report: run `{meta['run']}`", "",
            f"- Dataset: `{meta['dataset']}` (id `{meta['dataset_id']}`, {meta['survey']}, bands "
            f"{' '.join(bands)}, {meta['pixel_scale_arcsec']}\"/pixel)",
            f"- Samples: the first {meta['n_evaluated']} of the {meta['n_validation']} validation "
            f"samples (indices {meta['first_index']}-{meta['last_index']}), noisy blends; "
            + ", ".join(f"{v} with {k} galaxies" for k, v in meta["n_by_n_galaxies"].items()),
            f"- Produced by: `{meta['command']}` on {meta['created']}",
            f"- Ellipticity convention: {conv['ellipticity']}.",
            f"- SSIM: {conv['ssim']}. Cosine: {conv['cosine']}.",
            ""]
    parts.append(section("header", "\n".join(head)))

    fid = metrics.fidelity
    ref = metrics.reference_values
    text = ["## 1. Image fidelity on noisy validation blends (figure 13)", "",
            "Reconstructions of the same blends by the two models, against the clean isolated "
            "target. " + "; ".join(f"**{s}**: {d}" for s, d in metrics.stages.items()) + ".",
            "",
            markdown_table(["model", "N", "SSIM mean", "SSIM median", "SSIM std", "cosine mean",
                            "cosine median", "cosine std"],
                           [[s, fmt(f.n), fmt(f.ssim_mean), fmt(f.ssim_median),
                             fmt(f.ssim_std), fmt(f.cosine_mean, 4),
                             fmt(f.cosine_median, 4), fmt(f.cosine_std, 4)]
                            for s, f in fid.items()]),
            "Mean SSIM per band:", "",
            markdown_table(["model"] + bands,
                           [[s] + [fmt(f.ssim_per_band[b]) for b in bands]
                            for s, f in fid.items()]),
            f"Report's figures for comparison (SPEC 6): SSIM ~{ref['ssim_stage1']:.2f} (stage 1) "
            f"and {ref['ssim_stage2']:.2f} (stage 2), cosine {ref['cosine_stage1']:.3g} and "
            f"{ref['cosine_stage2']:.3g}. Both metrics are blind to shape errors.", "",
            f"![SSIM and cosine similarity per model]({figs['fidelity']})", ""]
    parts.append(section("fidelity", "\n".join(text)))

    text = ["## 2. Flux and size fidelity (raw electrons)", "",
            f"Relative residuals (reconstruction - truth) / truth per band: median and "
            f"{conv['scatter']}. Size: uniform-weight moment size sqrt((Qxx+Qyy)/2) of each band.",
            ""]
    for s, per_band in metrics.flux_size.items():
        text += [f"**{s}**", "",
                 markdown_table(["band", "N", "flux median", "flux NMAD", "size median",
                                 "size NMAD"],
                                [[b, fmt(v["flux"]["n"]), fmt(v["flux"]["median"], 3, True),
                                  fmt(v["flux"]["nmad"]), fmt(v["size"]["median"], 3, True),
                                  fmt(v["size"]["nmad"])] for b, v in per_band.items()])]
    text += [f"![flux and size residuals per band]({figs['flux_size']})", ""]
    parts.append(section("flux_size", "\n".join(text)))

    ell = metrics.ellipticity
    text = ["## 3. Ellipticity against the truth labels", "",
            "Estimators:", ""]
    text += [f"- **{SHORT_NAMES.get(n, n)}** (`{n}`): {d}" for n, d in
             metrics.estimators.items()]
    text += ["", "Uniform-weight moments over a whole noisy 45x45 stamp are dominated by the sky "
             "noise (every pixel has the same weight and the flux in the denominator is noisy); "
             "they are the labels' estimator and the report's baseline, the HSM variants what a "
             "survey pipeline would measure. N counts the samples where the estimator succeeded "
             "(HSM may fail to converge).", "",
             f"Slopes and intercepts: {conv['slope']} (± OLS standard error). "
             "RMSE of e_pred - e_true; abs(e) is the modulus.", "",
             markdown_table(ELLIPTICITY_HEADER,
                            [ellipticity_row(n, b.all) for n, b in ell.items()])]
    hsm_rows = [ellipticity_row(n, b.vs_hsm_truth) for n, b in ell.items()
                if b.vs_hsm_truth is not None]
    if hsm_rows:
        text += ["HSM estimators against HSM of the clean truth (`hsm_e1`, `hsm_e2` labels: the "
                 "same estimator on both sides, so only the image's error remains):", "",
                 markdown_table(ELLIPTICITY_HEADER, hsm_rows)]
    text += ["### By number of galaxies in the blend", "",
             _breakdown_table(ell, "by_n_galaxies", "galaxies"),
             f"### By target magnitude ({meta['ref_band']} band)", "",
             _breakdown_table(ell, "by_magnitude", f"{meta['ref_band']} mag"),
             f"![predicted vs true e1, e2, abs(e) (figure 14)]({figs['scatter']})", "",
             f"![Delta e with 1/2/3-sigma contours (figure 15)]({figs['delta_e']})", "",
             f"![distributions of e1 and e2 (figure 16)]({figs['distributions']})", "",
             f"![slope and RMSE by blend multiplicity and magnitude]({figs['breakdown']})", ""]
    parts.append(section("ellipticity", "\n".join(text)))

    text = ["## 4. Gallery (figure 12)", "",
            "Label-band sums (raw electrons, asinh stretch) of the noisy blend, the clean truth "
            "and the t2 reconstruction, and the residual truth - reconstruction. Sticks lie "
            "along the major axis with length proportional to abs(e): true (green; dashed over "
            "the reconstruction), regressor (red), moments of the reconstruction (cyan).", "",
            f"![gallery]({figs['gallery']})", ""]
    parts.append(section("gallery", "\n".join(text)))

    parts.append(section("shear", render_shear_markdown(metrics.shear) if metrics.shear else
                         "## 5. Shear calibration\n\nNot run yet: `python -m evaluation.shear "
                         f"--run {meta['run']} --config <config> --out <this directory>`.\n"))
    return "\n".join(parts)


# -- command line ---------------------------------------------------------------------------------
def prepare_output(out: Path, force: bool) -> ShearResult | None:
    """Refuse a directory that is not deblend's evaluation output, and an existing report in
    ``out`` without ``force``. Returns a shear result found there (kept across a forced re-run),
    or None."""
    claim_evaluation_directory(out)
    existing = read_metrics(out, rebuild=force)
    has_report = bool(set(existing) - {"shear"}) or (
        (out / REPORT_FILE).is_file() and not existing)
    if has_report and not force:
        raise FileExistsError(f"{out} already holds a report; pass --force to replace it "
                              f"(a shear calibration in it is kept)")
    return ShearResult.from_dict(existing["shear"]) if "shear" in existing else None


def write_report(run: str | Path, data_dir: str | Path, out: str | Path | None = None, *,
                 config: Config | None = None, force: bool = False, progress: bool = True,
                 command: str | None = None, log=print) -> EvaluationResult:
    """Evaluate ``run`` on ``data_dir`` and write the report into ``out``; returns the metrics."""
    run = Path(run)
    out = Path(out) if out is not None else run / "evaluation"
    config = config or run_config(run)
    data = open_dataset(data_dir)
    shear = prepare_output(out, force)
    models = load_models(run)
    metrics, arrays = evaluate(data, models, config, progress=progress)
    metrics.meta["run"] = str(run)
    metrics.meta["command"] = (command or
                                  f"python -m evaluation.report --run {run} --data {data_dir}")
    metrics.meta["created"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    make_figures(out, metrics, arrays)
    metrics.shear = shear
    mark(out, EVALUATION_KIND)
    write_metrics(out, metrics.to_dict())
    write_text_atomic(out / REPORT_FILE, render_markdown(metrics))
    log(summary_lines(metrics))
    log(f"report written to {out / REPORT_FILE}")
    return metrics


def report_is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a written evaluation report (report.md is written last)."""
    return (Path(out) / REPORT_FILE).is_file()


def summary_lines(metrics: EvaluationResult) -> str:
    """A short plain-text summary for the terminal."""
    lines = []
    for s, f in metrics.fidelity.items():
        lines.append(f"{s}: SSIM mean {fmt(f.ssim_mean)}  cosine mean {fmt(f.cosine_mean, 4)}")
    lines.append(f"{'estimator':<24}{'slope e1':>10}{'slope e2':>10}{'RMSE e1':>10}{'RMSE e2':>10}"
                 f"{'|e| ratio':>11}")
    for name, b in metrics.ellipticity.items():
        s = b.all
        lines.append(f"{SHORT_NAMES.get(name, name):<24}{fmt(s.e1.slope):>10}"
                     f"{fmt(s.e2.slope):>10}{fmt(s.e1.rmse):>10}"
                     f"{fmt(s.e2.rmse):>10}{fmt(s.e.mean_ratio):>11}")
    return "\n".join(lines)
