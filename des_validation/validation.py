"""DES validation: im3shape shapes and DES cutouts through a trained run (SPEC 7).

1. The catalog is read and cut (:mod:`des_validation.catalog`); the cutouts are read
   (:mod:`des_validation.cutouts`) and matched to the catalog by ``coadd_objects_id``.
2. Each object is centred on its catalog (ra, dec) through the cutout's WCS (the cutout centre
   without a WCS), resampled to the model's pixels and cropped, its bands mapped onto the
   model's with the u strategy, and normalised (:mod:`des_validation.prepare`).
3. The run's deblender (:class:`deblend.Deblender`) gives the reconstruction and the regressor's
   (e1, e2); the reconstruction's shape is measured as the training labels are (uniform-weight
   moments of the label-band sum, and galsim.hsm).
4. im3shape's (e_1, e_2), sky frame, shear-like, become distortions in each cutout's pixel frame
   (:mod:`des_validation.frames`) and are the reference ("truth") of every comparison.

Output in ``--out`` (default ``R/des_validation``; written as ``<out>.tmp`` then renamed; an
existing directory is replaced only with ``--force``): ``report.md``, ``metrics.json``,
``skipped.csv`` (every object left out, with its reason), ``objects.csv`` (per-object shapes) and
the figures: ``des_scatter.png``, ``des_delta_e.png``, ``des_distributions.png`` (the
evaluation report's plots, against im3shape), ``des_pixel_distributions.png`` (the report's
figure 7: per-band normalised pixel values of DES against the LSST training data) and
``des_gallery.png``.

Bad input never stops the batch: unreadable/truncated files, missing bands, NaN pixels, too-small
cutouts and ids without a catalog row are skipped, listed and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from deblend.core.atomic import write_text_atomic
from deblend.core.config import DESConfig
from deblend.core.inference import Deblender
from deblend.core.normalization import NormalizationConstants, normalize, rescale
from deblend.core.outputs import claim_directory, is_ours, replace_directory
from deblend.core.runs import RunLayout, run_config
from des_validation.catalog import apply_cuts, read_catalog
from des_validation.cutouts import DES_BANDS, Cutout, Skip, read_cutouts
from des_validation.frames import (
    local_jacobian,
    orientation,
    shear_to_distortion,
    sky_to_pixel,
    standard_jacobian,
)
from des_validation.real_pixels import real_summary, run_real_des
from des_validation.prepare import (
    DEFAULT_U_OVER_G,
    apply_band_map,
    des_constants,
    map_bands,
    prepare_stamps,
)
from evaluation import plots
from evaluation.ellipticity import ellipticity_stats
from evaluation.estimators import (
    ESTIMATORS,
    SHORT_NAMES,
    hsm_estimator,
    label_image,
    measure_estimators,
)
from evaluation.plots import draw_stick, plt, save_figure
from evaluation.report_io import fmt, markdown_table, write_metrics
from evaluation.results import DESEstimator, DESValidationResult
from evaluation.validation_report import ELLIPTICITY_HEADER, ellipticity_row
from simulation.dataset import DatasetError, open_dataset

FIGURES = {
    "scatter": "des_scatter.png",
    "delta_e": "des_delta_e.png",
    "distributions": "des_distributions.png",
    "pixels": "des_pixel_distributions.png",
    "gallery": "des_gallery.png",
}
TRAINING_PIXEL_SAMPLE = 2000
VALIDATION_KIND = "des-validation"
"""The kind of output a DES validation directory is (:mod:`deblend.core.outputs`)."""


# -- training-side information ---------------------------------------------------------------------
@dataclass
class TrainingInfo:
    """What the validation needs from the run's training data (when it can be found)."""

    label_bands: tuple[str, ...]
    dataset: Any | None
    """an opened :class:`simulation.dataset.StampData`, or None"""
    dataset_note: str


def training_info(run: Path, model: Any, training_data: str | Path | None) -> TrainingInfo:
    """Label bands and the training dataset of a run (``--training-data`` or the run's path)."""
    if training_data:
        candidates = [Path(training_data)]
    else:  # run.json's path follows a run directory moved together with its data
        layout = RunLayout(run)
        candidates = [layout.read_run().data_path(layout.root)]
    dataset, note = None, ""
    for path in candidates:
        try:
            dataset = open_dataset(path)
            note = f"training data: {path}"
        except (DatasetError, OSError, ValueError) as exc:
            if training_data:
                raise ValueError(f"--training-data {path}: {exc}") from exc
            note = (f"the run's training data ({path}) is not readable here ({exc}); "
                    f"pass --training-data")
    if dataset is not None and tuple(dataset.bands) != tuple(model.bands):
        raise ValueError(f"training data bands {dataset.bands} differ from the model's "
                         f"{model.bands}")
    if dataset is not None:
        label_bands = tuple(dataset.meta["simulation"]["label_bands"])
    else:
        label_bands = run_config(run).simulation.label_bands
    missing = [b for b in label_bands if b not in model.bands]
    if missing:
        raise ValueError(f"label band '{missing[0]}' is not a model band {model.bands}")
    return TrainingInfo(label_bands, dataset, note)


def u_over_g_ratio(des: DESConfig, info: TrainingInfo) -> tuple[float, str]:
    """The u/g flux ratio of g_extrapolate and where it comes from."""
    if des.u_over_g is not None:
        return float(des.u_over_g), "des.u_over_g (config or --u-over-g)"
    if info.dataset is not None:
        labels = info.dataset.labels()
        if "flux_u" in labels and "flux_g" in labels:
            train = info.dataset.split_indices("train")
            if len(train) == 0:
                train = info.dataset.split_indices("all")
            u = labels["flux_u"][train].astype(np.float64)
            g = labels["flux_g"][train].astype(np.float64)
            good = (g > 0) & np.isfinite(u) & np.isfinite(g)
            if good.sum() >= 5:
                return (float(np.median(u[good] / g[good])),
                        f"median flux_u/flux_g of {int(good.sum())} training targets")
    return DEFAULT_U_OVER_G, "built-in default (no training data with flux labels)"


def training_pixels(info: TrainingInfo, constants: NormalizationConstants,
                    n: int = TRAINING_PIXEL_SAMPLE) -> np.ndarray | None:
    """Normalised training blends (up to ``n``) for figure 7, or None without training data."""
    if info.dataset is None:
        return None
    indices = info.dataset.split_indices("train")
    if len(indices) == 0:
        indices = info.dataset.split_indices("all")
    indices = indices[:n]
    return normalize(info.dataset.images("blend", indices).astype(np.float64), constants)


# -- the validation itself ---------------------------------------------------------------------------
@dataclass
class Matched:
    """Cutouts matched to catalog rows, with their object position and local WCS Jacobian."""

    cutouts: list[Cutout]
    rows: list[int]
    centers: list[tuple[float, float]]
    jacobians: list[np.ndarray]
    orientations: list[str]


def match_cutouts(cutouts: Sequence[Cutout], catalog_ids: np.ndarray, selected: Any,
                  skipped: list[Skip], notes: list[str]) -> tuple[Matched, dict[str, int]]:
    """Pair cutouts with selected catalog rows; fill ``skipped`` for ids without a row."""
    all_ids = {int(i) for i in catalog_ids}
    index = {int(i): k for k, i in enumerate(selected["coadd_objects_id"])}
    matched = Matched([], [], [], [], [])
    counts = {"removed_by_cuts": 0}
    no_wcs = 0
    for cutout in cutouts:
        if cutout.object_id not in all_ids:
            skipped.append(Skip(cutout.object_id, cutout.source,
                                "id without a catalog row", stage="match"))
            continue
        if cutout.object_id not in index:
            counts["removed_by_cuts"] += 1
            continue
        row = index[cutout.object_id]
        height, width = cutout.shape
        if cutout.wcs is not None:
            try:
                x, y = cutout.wcs.world_to_pixel_values(float(selected["ra"][row]),
                                                        float(selected["dec"][row]))
                x, y = float(x), float(y)
                if not (np.isfinite(x) and np.isfinite(y)
                        and -0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                    raise ValueError(f"catalog position falls at pixel ({x:.1f}, {y:.1f})")
                jac = local_jacobian(cutout.wcs, x, y)
            except Exception as exc:  # WCS errors come in many kinds
                skipped.append(Skip(cutout.object_id, cutout.source,
                                    f"catalog position not usable in the cutout WCS: {exc}",
                                    stage="match"))
                continue
        else:
            x, y = cutout.center if cutout.center is not None else ((width - 1) / 2.0,
                                                                     (height - 1) / 2.0)
            if cutout.jacobian is not None:
                jac = cutout.jacobian
            else:
                jac = standard_jacobian(cutout.pixel_scale)
                no_wcs += 1
        matched.cutouts.append(cutout)
        matched.rows.append(row)
        matched.centers.append((x, y))
        matched.jacobians.append(jac)
        matched.orientations.append(orientation(jac))
    if no_wcs:
        notes.append(f"{no_wcs} cutouts have no WCS: taken as north up, east left, object at "
                     f"the cutout centre")
    return matched, counts


def catalog_truth(selected: Any, rows: Sequence[int], jacobians: Sequence[np.ndarray],
                  convention: str) -> dict[str, np.ndarray]:
    """im3shape (e_1, e_2) -> distortion in the sky frame and in each cutout's pixel frame."""
    e_1 = np.asarray(selected["e_1"], dtype=np.float64)[list(rows)]
    e_2 = np.asarray(selected["e_2"], dtype=np.float64)[list(rows)]
    if convention == "shear":
        d1, d2 = shear_to_distortion(e_1, e_2)
    else:
        d1, d2 = e_1, e_2
    jac = np.stack(jacobians) if len(jacobians) else np.zeros((0, 2, 2))
    p1, p2 = sky_to_pixel(d1, d2, jac) if len(jac) else (d1, d2)
    return {"e_1": e_1, "e_2": e_2, "sky_e1": d1, "sky_e2": d2, "e1": p1, "e2": p2}


def validation_is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished DES validation (it is built aside and renamed when done)."""
    return is_ours(out, VALIDATION_KIND)


def validate_des(run: str | Path, catalog: str | Path, cutouts: str | Path,
                 out: str | Path | None, des: DESConfig, *,
                 training_data: str | Path | None = None, pixel_scale: float | None = None,
                 force: bool = False, device: str = "auto", command: str | None = None,
                 target_psf_fwhm: float | Sequence[float] | None = None,
                 log=print) -> DESValidationResult:
    """Run the whole DES validation and write the report; returns the metrics. With
    ``des.real_frames`` (a directory of DECam frames) the model also measures them into
    ``out/real`` (:mod:`des_validation.real_pixels`), linked from the report, metacal
    reconvolving to ``target_psf_fwhm`` (``metacal.target_psf_fwhm``, arcsec; None: the
    model's own target, else each band's narrowest)."""

    run = Path(run)
    out = Path(out) if out is not None else run / "des_validation"
    claim_directory(out, VALIDATION_KIND, force)
    model = Deblender.from_run(run, device=device)
    model.require_survey_psf("the DES validation")
    info = training_info(run, model, training_data)
    notes: list[str] = [info.dataset_note] if info.dataset_note else []

    table = read_catalog(catalog)
    selection = apply_cuts(table, des)
    log(f"catalog: {selection.n_input} rows, {len(selection.table)} after the cuts")
    found = read_cutouts(cutouts, DES_BANDS, pixel_scale)
    notes += found.notes
    skipped: list[Skip] = list(found.skipped)
    log(f"cutouts ({found.format}): {len(found.cutouts)} read, {len(found.skipped)} skipped")
    matched, match_counts = match_cutouts(found.cutouts, np.asarray(table["coadd_objects_id"]),
                                          selection.table, skipped, notes)

    stamp = model.stamp_pixels
    prepared = prepare_stamps(matched.cutouts, matched.centers, model.data.pixel_scale, stamp,
                              des.resample)
    skipped += prepared.skipped
    kept = {int(i) for i in prepared.ids}
    keep = [k for k, c in enumerate(matched.cutouts) if c.object_id in kept]
    rows = [matched.rows[k] for k in keep]
    jacobians = [matched.jacobians[k] for k in keep]
    orientations = [matched.orientations[k] for k in keep]
    cutout_scales = sorted({round(matched.cutouts[k].pixel_scale, 4) for k in keep})

    mapping = map_bands(DES_BANDS, model.bands)
    u_over_g, u_source = u_over_g_ratio(des, info)
    images = apply_band_map(prepared.stamps, prepared.bands, mapping,
                            des.u_strategy, u_over_g)
    n = len(images)
    counts = {
        "catalog_rows": selection.n_input,
        "after_cuts": len(selection.table),
        "cutout_objects_found": len(found.cutouts) + len(found.skipped),
        "cutouts_readable": len(found.cutouts),
        "removed_by_cuts": match_counts["removed_by_cuts"],
        "selected_without_cutout": len(set(int(i) for i in selection.table["coadd_objects_id"])
                                       - {c.object_id for c in found.cutouts}
                                       - {s.object_id for s in found.skipped}),
        "skipped": len(skipped),
        "validated": n,
    }
    settings = {
        "u_strategy": des.u_strategy,
        "u_over_g": u_over_g if des.u_strategy == "g_extrapolate" else None,
        "u_over_g_source": u_source if des.u_strategy == "g_extrapolate" else None,
        "resample": des.resample,
        "normalization": des.normalization,
        "catalog_ellipticity": des.catalog_ellipticity,
        "min_snr": des.min_snr,
        "model_bands": list(model.bands),
        "band_map": mapping.describe(),
        "model_pixel_scale": model.data.pixel_scale,
        "cutout_pixel_scales": cutout_scales,
        "stamp_pixels": stamp,
        "stamp_arcsec": stamp * (model.data.pixel_scale if des.resample
                                 else (cutout_scales[0] if cutout_scales else float("nan"))),
        "label_bands": list(info.label_bands),
    }
    metrics = DESValidationResult(
        meta={"run": str(run), "catalog": str(catalog), "cutouts": str(cutouts),
                 "cutout_format": found.format, "created": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                        time.gmtime()),
                 "command": command or f"python -m des_validation.validate --run {run} "
                                       f"--catalog {catalog} --cutouts {cutouts}",
                 "model_survey": model.data.survey, "training_dataset": model.data.path},
        settings=settings, counts=counts,
        cuts=[dataclasses.asdict(c) for c in selection.cuts],
        skipped=[{"id": s.object_id, "source": s.source, "stage": s.stage,
                  "reason": s.reason} for s in skipped],
        skipped_by_reason=dict(Counter(_reason_kind(s.reason) for s in skipped)),
        orientation=dict(Counter(orientations)),
        notes=notes,
        figures={},
    )

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if des.real_frames is not None:
            if Path(des.real_frames).is_dir():
                metrics.real_pixels = run_real_des(model, des.real_frames, tmp / "real",
                                                   target_fwhm=target_psf_fwhm, log=log)
            else:
                notes.append(f"the real DES frames {des.real_frames} (des.real_frames) are not "
                             f"there: the section on real pixels is left out")
        if n == 0:
            notes.append("no object is left to validate")
            _write_outputs(tmp, metrics, None)
        else:
            training_constants = model.normalization
            constants = (des_constants(images, mapping, training_constants)
                         if des.normalization == "des" else training_constants)
            model_input = rescale(images, constants, training_constants)
            prediction = model.predict(model_input.astype(np.float32))
            reconstruction = rescale(prediction.reconstruction.astype(np.float64),
                                     training_constants, constants)
            truth = catalog_truth(selection.table, rows, jacobians, des.catalog_ellipticity)
            estimates = measure_estimators(
                bands=model.bands, label_bands=info.label_bands,
                reconstruction_raw=reconstruction, regressor_e=prediction.ellipticity,
                regressor_raw_e=prediction.ellipticity_raw)
            estimates["des_hsm"] = hsm_estimator(images, model.bands, info.label_bands)
            descriptions = dict(ESTIMATORS)
            descriptions["des_hsm"] = ("galsim.hsm adaptive moments of the prepared DES stamp "
                                       "itself (no deblending; a baseline)")
            metrics.estimators = {
                name: DESEstimator(descriptions.get(name, name),
                                   ellipticity_stats(truth["e1"], truth["e2"], *estimates[name]))
                for name in estimates}
            metrics.normalization = {
                "used": des.normalization, "constants": constants.to_dict(),
                "training": training_constants.to_dict(),
                "des_over_training": {b: c / t for b, c, t in zip(
                    model.bands, constants.max_values, training_constants.max_values)}}
            arrays = {
                "truth": (truth["e1"], truth["e2"]), "estimates": estimates,
                "des_normalised": normalize(images, constants),
                "train_normalised": training_pixels(info, training_constants),
                "images": images, "reconstruction": reconstruction,
                "bands": model.bands, "label_bands": info.label_bands,
                "ids": prepared.ids, "selected": selection.table, "rows": rows,
                "catalog_truth": truth, "orientations": orientations,
            }
            if arrays["train_normalised"] is None:
                notes.append("figure 7 shows DES only: no training data to compare with")
            _write_outputs(tmp, metrics, arrays)
        replace_directory(tmp, out, VALIDATION_KIND)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(summary_lines(metrics))
    log(f"report written to {out / 'report.md'}")
    return metrics


def _reason_kind(reason: str) -> str:
    """The reason without its details (for counting)."""
    for kind in ("truncated FITS file", "unreadable FITS file", "missing band",
                 "NaN or infinite pixels", "cutout too small for the crop",
                 "id without a catalog row", "catalog position not usable",
                 "bands have different shapes", "file name is neither"):
        if reason.startswith(kind):
            return kind
    return reason.split(":")[0]


# -- outputs -----------------------------------------------------------------------------------------
def _write_outputs(out: Path, metrics: DESValidationResult, arrays: Mapping[str, Any] | None
                   ) -> None:
    _write_skipped(out / "skipped.csv", metrics.skipped)
    if arrays is not None:
        make_figures(out, metrics, arrays)
        _write_objects(out / "objects.csv", arrays)
    write_metrics(out, metrics.to_dict())
    write_text_atomic(out / "report.md", render_markdown(metrics))


def _write_skipped(path: Path, skipped: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["coadd_objects_id", "source", "stage", "reason"])
    for s in skipped:
        writer.writerow(["" if s["id"] is None else s["id"], s["source"], s["stage"], s["reason"]])
    write_text_atomic(path, buffer.getvalue())


def _write_objects(path: Path, arrays: Mapping[str, Any]) -> None:
    truth, est = arrays["catalog_truth"], arrays["estimates"]
    selected, rows = arrays["selected"], arrays["rows"]
    names = list(est)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["coadd_objects_id", "ra", "dec", "catalog_e_1", "catalog_e_2",
                     "truth_e1_pixel", "truth_e2_pixel", "orientation"]
                    + [f"{n}_{c}" for n in names for c in ("e1", "e2")])
    for k, object_id in enumerate(arrays["ids"]):
        row = rows[k]
        writer.writerow([int(object_id), f"{float(selected['ra'][row]):.7f}",
                         f"{float(selected['dec'][row]):.7f}", f"{truth['e_1'][k]:.5f}",
                         f"{truth['e_2'][k]:.5f}", f"{truth['e1'][k]:.5f}",
                         f"{truth['e2'][k]:.5f}", arrays["orientations"][k]]
                        + [f"{est[n][c][k]:.5f}" for n in names for c in (0, 1)])
    write_text_atomic(path, buffer.getvalue())


def make_figures(out: Path, metrics: DESValidationResult, arrays: Mapping[str, Any]) -> None:
    """The evaluation report's ellipticity figures against im3shape, figure 7 and a gallery."""
    est, truth = arrays["estimates"], arrays["truth"]
    stats = {name: metrics.estimators[name].stats for name in est}
    plots.plot_ellipticity_scatter(truth, est, stats, out / FIGURES["scatter"])
    plots.plot_delta_e(truth, est, out / FIGURES["delta_e"])
    plots.plot_distributions(truth, est, out / FIGURES["distributions"])
    plot_pixel_distributions(arrays["des_normalised"], arrays["train_normalised"],
                             arrays["bands"], metrics.settings, out / FIGURES["pixels"])
    plot_des_gallery(arrays, out / FIGURES["gallery"])
    metrics.figures.update(FIGURES)


def plot_pixel_distributions(des: np.ndarray, train: np.ndarray | None, bands: Sequence[str],
                             settings: Mapping[str, Any], path: Path) -> Path:
    """Figure 7: per-band histograms of normalised pixel values, DES against LSST training."""
    ncol = 3
    nrow = -(-len(bands) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    bins = np.linspace(-0.2, 1.0, 61)
    for b, (ax, band) in enumerate(zip(axes.ravel(), bands)):
        values = des[:, b].ravel()
        ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, density=True, histtype="step",
                lw=1.6, color="tab:red", label=f"DES (N={len(des)})")
        if train is not None:
            ax.hist(np.clip(train[:, b].ravel(), bins[0], bins[-1]), bins=bins, density=True,
                    histtype="stepfilled", color="lightgray", alpha=0.8,
                    label=f"LSST training (N={len(train)})")
        ax.set_yscale("log")
        ax.set_title(f"band {band}")
        ax.set_xlabel("normalised pixel value tanh(asinh(beta x / <max>))")
        ax.set_ylabel("density")
        ax.legend(loc="upper right")
    for ax in axes.ravel()[len(bands):]:
        ax.axis("off")
    fig.suptitle(f"Figure 7 - pixel values after normalisation: DES "
                 f"({settings['normalization']} constants, u: {settings['u_strategy']}, "
                 f"resample {'on' if settings['resample'] else 'off'}) vs LSST training",
                 fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_des_gallery(arrays: Mapping[str, Any], path: Path, size: int = 6) -> Path:
    """DES stamps (label-band sum) and their reconstructions, with ellipticity sticks."""
    bands, label_bands = arrays["bands"], arrays["label_bands"]
    n = min(size, len(arrays["ids"]))
    picks = np.linspace(0, len(arrays["ids"]) - 1, n).astype(int) if n else []
    stamps = label_image(arrays["images"][picks], bands, label_bands)
    recons = label_image(arrays["reconstruction"][picks], bands, label_bands)
    fig, axes = plt.subplots(max(n, 1), 2, figsize=(6.5, 3.0 * max(n, 1)), squeeze=False)
    sticks = {"im3shape": ("lime", arrays["truth"]),
              "regressor": ("red", arrays["estimates"].get("regressor")),
              "recon. moments": ("cyan", arrays["estimates"].get("recon_moments"))}
    for row, k in enumerate(picks):
        peak = max(float(np.max(stamps[row])), 1e-12)
        soft = 0.02 * peak
        for col, (title, img) in enumerate((("DES stamp (label bands)", stamps[row]),
                                            ("reconstruction", recons[row]))):
            ax = axes[row, col]
            ax.imshow(np.arcsinh(img / soft), origin="lower", cmap="magma",
                      vmin=np.arcsinh(-0.05 * peak / soft), vmax=np.arcsinh(peak / soft))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{arrays['ids'][k]}\n{title}" if col == 0 else title, fontsize=8)
            c = (img.shape[1] - 1) / 2.0
            for label, (colour, values) in sticks.items():
                if values is not None:
                    draw_stick(ax, c, c, float(values[0][k]), float(values[1][k]), colour, label,
                               lw=2 if label == "im3shape" else 1.3)
            if row == 0 and col == 1:
                ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    fig.suptitle("DES gallery: pixel frame, asinh stretch; sticks along the major axis",
                 fontsize=10, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


# -- markdown ----------------------------------------------------------------------------------------
def _header() -> list[str]:
    return ELLIPTICITY_HEADER[:-1] + ["<abs(e)> pred/im3shape"]


def render_markdown(metrics: DESValidationResult) -> str:
    """report.md from the metrics (every number printed comes from them)."""
    meta, st, counts = metrics.meta, metrics.settings, metrics.counts
    lines = [f"# DES validation: run `{meta['run']}`", "",
             f"- Catalog: `{meta['catalog']}`; cutouts: `{meta['cutouts']}` ({meta['cutout_format']})",
             f"- Model: {meta['model_survey']} bands {' '.join(st['model_bands'])}, "
             f"{st['model_pixel_scale']}\"/pixel, {st['stamp_pixels']}x{st['stamp_pixels']} stamps",
             f"- Produced by: `{meta['command']}` on {meta['created']}", "",
             "## Settings", "",
             f"- Band mapping: {st['band_map']}; u strategy **{st['u_strategy']}**"
             + (f" (u/g = {fmt(st['u_over_g'])}, {st['u_over_g_source']})"
                if st["u_over_g"] is not None else ""),
             f"- Resampling: {'on' if st['resample'] else 'off'} (cutout pixels "
             f"{', '.join(str(s) for s in st['cutout_pixel_scales']) or '–'}\" -> "
             f"{st['model_pixel_scale'] if st['resample'] else 'unchanged'}); stamp covers "
             f"{fmt(st['stamp_arcsec'], 2)}\"",
             f"- Normalisation constants: **{st['normalization']}**",
             f"- Catalog ellipticity convention: {st['catalog_ellipticity']} "
             + ("(im3shape's |e| = (a-b)/(a+b), converted to distortions)"
                if st["catalog_ellipticity"] == "shear" else "(distortions, used as they are)"),
             f"- Shapes: the regressor's output, and moments of the reconstruction's sum over "
             f"bands {' '.join(st['label_bands'])} (the training labels' estimator); "
             f"im3shape's e is taken to each cutout's pixel frame with its WCS "
             f"(north up, east left: e2 -> -e2).",
             ""]
    lines += ["## Objects", "", "Catalog cuts (each counted on what the previous cuts left):", "",
              markdown_table(["cut", "rule", "removed", "remaining"],
                             [[c["name"], c["rule"], fmt(c["removed"]) if c["applied"] else "–",
                               fmt(c["remaining"])] for c in metrics.cuts],
                             ["l", "l", "r", "r"]),
              markdown_table(["count", "objects"], [[k.replace("_", " "), fmt(v)]
                                                    for k, v in counts.items()]),
              ]
    if metrics.orientation:
        lines += ["Cutout orientations (from the WCS): " + "; ".join(
            f"{k}: {v}" for k, v in metrics.orientation.items()), ""]
    lines += [f"### Skipped objects ({len(metrics.skipped)})", ""]
    if metrics.skipped:
        lines += [markdown_table(["reason", "objects"],
                                 [[k, fmt(v)] for k, v in metrics.skipped_by_reason.items()]),
                  markdown_table(["coadd_objects_id", "source", "stage", "reason"],
                                 [["–" if s["id"] is None else s["id"], s["source"], s["stage"],
                                   s["reason"]] for s in metrics.skipped],
                                 ["l", "l", "l", "l"]),
                  "(also in `skipped.csv`)", ""]
    else:
        lines += ["None.", ""]
    if metrics.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in metrics.notes] + [""]
    if metrics.real_pixels is not None:
        lines += ["## Real DES pixels", "", real_summary(metrics.real_pixels), "",
                  "Details in [real/real_des.md](real/real_des.md), the catalogue in "
                  "`real/catalogue.fits`.", "",
                  "![real DES frames: image, reconstruction, residual](real/real_des.png)", ""]
    if metrics.estimators:
        norm = metrics.normalization
        lines += ["## Normalisation constants (<max> per band)", "",
                  markdown_table(["band", "used", "training", "used / training"],
                                 [[b, fmt(u, 4), fmt(t, 4), fmt(norm["des_over_training"][b], 4)]
                                  for b, u, t in zip(st["model_bands"], norm["constants"]["max"],
                                                     norm["training"]["max"])]),
                  "## Ellipticity against im3shape", "",
                  "Each estimator against im3shape's (e1, e2) as distortions in the pixel frame: "
                  "OLS slope and intercept of estimate on im3shape (± standard error; slope < 1 "
                  "is the round bias), RMSE of the difference.", "",
                  markdown_table(_header(), [ellipticity_row(n, e.stats)
                                             for n, e in metrics.estimators.items()]),
                  ]
        lines += [f"- **{n}**: {e.description}" for n, e in metrics.estimators.items()]
        figs = metrics.figures
        lines += ["", "In the figures \"true\" means im3shape.", "",
                  f"![estimate vs im3shape]({figs['scatter']})", "",
                  f"![Delta e with 1/2/3-sigma contours]({figs['delta_e']})", "",
                  f"![distributions of e1 and e2]({figs['distributions']})", "",
                  "## Pixel values after normalisation (the report's figure 7)", "",
                  f"![DES vs LSST training pixel distributions]({figs['pixels']})", "",
                  "## Gallery", "", f"![DES gallery]({figs['gallery']})", ""]
    return "\n".join(lines)


def summary_lines(metrics: DESValidationResult) -> str:
    """Short terminal summary."""
    c = metrics.counts
    lines = [f"validated {c['validated']} objects ({c['skipped']} skipped, "
             f"{c['removed_by_cuts']} with a cutout removed by the cuts)"]
    if metrics.estimators:
        lines.append(f"{'estimator':<22}{'slope e1':>10}{'slope e2':>10}{'RMSE e1':>10}"
                     f"{'RMSE e2':>10}")
        for name, e in metrics.estimators.items():
            s = e.stats
            lines.append(f"{SHORT_NAMES.get(name, name):<22}{fmt(s.e1.slope):>10}"
                         f"{fmt(s.e2.slope):>10}{fmt(s.e1.rmse):>10}{fmt(s.e2.rmse):>10}")
    return "\n".join(lines)
