"""The deblender on real DES pixels: single-epoch DECam frames through ``deblend measure``'s path.

A directory of DECam community-pipeline frames, as ``../shared/data/des_decam/`` holds them
(:func:`find_frames`): per band ``*_ooi_<band>_*.fits`` (image, its WCS), ``*_oow_*`` (inverse
variance), ``*_ood_*`` (data-quality mask, 0 = good) and ``*_ooi_<band>_*-psfex.fits`` (the
PSFEx model, legacypipe's merged layout), and where every band has one,
``*_ooi_<band>_*-splinesky.fits`` (legacypipe's sky model of the whole CCD). The frames come
from different exposures and CCDs and are not sky-subtracted, so they are read with
``resample`` (every band onto the model's pixel grid over the first band's frame, PSF included)
and with their sky models subtracted (:mod:`deblend.core.sky_model`; without them, a constant
sky per band, ``subtract_sky``, which the bright galaxy pulls up: 50 px from it the frames are
then left 0.4-0.5 sky sigma below zero, with the sky models within 0.1); the model's bands that
the frames lack are declared missing. The frames carry no zero point: :data:`NOMINAL_ZP`
are nominal DECam values for these 90 s frames (about +-0.3 mag), stated in the report; the
model's zero points come from its survey (surveycodex).

:func:`run_real_des` writes into ``out``: ``catalogue.fits`` (``deblend measure``'s catalogue),
``real_des.png`` (image, reconstruction and residual of the present bands, detections with the
regressor's e sticks; the reconstruction is the detections' decodings, each from its stamp
recentred on the detection (:mod:`deblend.core.recentre`) and moved back, with their fluxes
fitted to the pixels, :mod:`deblend.core.photometry`, as the catalogue's ``forced_flux_<band>``),
``real_des.md`` and ``metrics.json`` (detections, and the residual of the brightest detection
per pixel in units of the noise, away from its core).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402

from deblend.core.atomic import atomic_output, write_json_atomic, write_text_atomic  # noqa: E402
from deblend.core.cell_measure import ESTIMATOR, detection_templates  # noqa: E402
from deblend.core.inference import N_VIEWS, Deblender  # noqa: E402
from deblend.core.metadetect import MetadetectSettings  # noqa: E402
from deblend.core.outputs import claim_directory, replace_directory  # noqa: E402
from deblend.core.photometry import fit_amplitudes, fitted_scene  # noqa: E402
from deblend.core.survey_input import SurveyImage, SurveyInputs, read_survey  # noqa: E402
from deblend.core.survey_measure import measure_survey  # noqa: E402
from evaluation.reconstruction_defects import (  # noqa: E402
    CORE_RADIUS,
    GALAXY_RADIUS,
    ring_mask,
)
from evaluation.report_io import reconvolution_words  # noqa: E402
from simulation.surveys import zero_points  # noqa: E402

NOMINAL_ZP = {"g": 30.0, "r": 30.2, "z": 29.8}
"""Assumed AB zero points (magnitude of one count) of the 90 s DECam frames of
``des_decam/`` (their headers carry none): DECam's nominal 1 s zero points plus 2.5 log10(90),
checked against the frames' sky levels; about +-0.3 mag."""
REAL_DES_KIND = "real-des"
"""The kind of output directory :func:`run_real_des` writes (:mod:`deblend.core.outputs`)."""
_FRAME = re.compile(r"^(?P<stem>.+)_ooi_(?P<band>[A-Za-z])_(?P<tail>[^-]+)\.fits$")


def find_frames(data_dir: str | Path) -> dict[str, dict[str, Path]]:
    """{band: {"image", "weight", "mask", "psf"[, "sky"]: path}} of the DECam frames in
    ``data_dir`` ("sky": the band's SplineSky, when it has one); ValueError naming the first
    file a band lacks."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"no such directory: {data_dir}")
    frames: dict[str, dict[str, Path]] = {}
    for path in sorted(data_dir.glob("*_ooi_*.fits")):
        match = _FRAME.match(path.name)
        if match is None:
            continue
        stem, band, tail = match["stem"], match["band"], match["tail"]
        ccd = tail.rsplit(".", 1)[-1]
        files = {"image": path,
                 "weight": data_dir / f"{stem}_oow_{band}_{tail}.fits",
                 "mask": data_dir / f"{stem}_ood_{band}_{tail}.fits",
                 "psf": data_dir / f"{stem}_ooi_{band}_{tail.rsplit('.', 1)[0]}-{ccd}-psfex.fits"}
        for kind, file in files.items():
            if not file.is_file():
                raise ValueError(f"band {band} of {data_dir}: no {kind} file {file.name}")
        sky = data_dir / f"{stem}_ooi_{band}_{tail.rsplit('.', 1)[0]}-{ccd}-splinesky.fits"
        if sky.is_file():
            files["sky"] = sky
        if band in frames:
            raise ValueError(f"{data_dir} holds two frames of band {band}")
        frames[band] = files
    if not frames:
        raise ValueError(f"{data_dir} holds no DECam frame (*_ooi_<band>_*.fits)")
    return frames


def survey_inputs(frames: Mapping[str, Mapping[str, Path]], model: Deblender,
                  zeropoints: Mapping[str, float]) -> SurveyInputs:
    """The :class:`SurveyInputs` of the frames for ``model`` (module docstring): their sky
    models subtracted when every present band has one, else a constant sky per band."""
    present = [b for b in model.bands if b in frames]
    if not present:
        raise ValueError(f"none of the frames' bands ({' '.join(frames)}) is one of the "
                         f"model's ({' '.join(model.bands)})")
    missing = tuple(b for b in model.bands if b not in frames)

    def layout(kind: str) -> dict[str, Path]:
        return {b: Path(frames[b][kind]) for b in present}

    skies = layout("sky") if all("sky" in frames[b] for b in present) else None
    return SurveyInputs(layout("image"), layout("weight"), layout("psf"), layout("mask"),
                        {b: zeropoints[b] for b in present if b in zeropoints},
                        zero_points(model.data.survey, model.bands), missing, "centre",
                        resample=True, subtract_sky=skies is None, skies=skies)


def scene_model(model: Deblender, survey: SurveyImage, rows: Table
                ) -> tuple[np.ndarray, np.ndarray]:
    """((bands, H, W) model image, (K, bands) amplitudes): the model's reconstructions of the
    ``rows``' detections (averaged over the symmetric views, recentred on each detection as
    the catalogue's stamps are: :func:`~deblend.core.cell_measure.detection_templates`), fitted
    to the frames' pixels with one amplitude per source and band
    (:mod:`deblend.core.photometry`, as the catalogue's ``forced_flux_<band>``) and pasted at
    their detections (raw model units)."""
    positions = np.stack([np.asarray(rows["x"], np.float64),
                          np.asarray(rows["y"], np.float64)], axis=1).reshape(-1, 2)
    if len(positions) == 0:
        return np.zeros_like(survey.images), np.zeros((0, len(model.bands)))
    templates = detection_templates(model, survey.images, positions,
                                    recentre=MetadetectSettings().recentre,
                                    reconstruction_views=N_VIEWS)
    amplitudes = fit_amplitudes(survey.images, survey.variance, templates, positions)
    return fitted_scene(survey.images.shape, templates, positions, amplitudes), amplitudes


RADIAL_EDGES: tuple[float, ...] = (0.0, 3.0, 5.0, 8.0, 12.0, 16.0, 22.0, 30.0, 40.0)
"""Annuli (pixels from the brightest detection) of the residual's radial profile."""


def chi_planes(survey: SurveyImage, scene: np.ndarray) -> dict[str, np.ndarray]:
    """{present band: (H, W) residual (image - model) / sigma}, NaN where masked."""
    out = {}
    for k, band in enumerate(survey.bands):
        if band not in survey.missing:
            with np.errstate(invalid="ignore"):
                out[band] = np.where(np.isfinite(survey.variance[k]), (
                    survey.images[k] - scene[k]) / np.sqrt(survey.variance[k]), np.nan)
    return out


def residual_in_noise(survey: SurveyImage, scene: np.ndarray, x: float, y: float) -> dict:
    """The residual (image - model) / sigma over the present bands' unmasked pixels between
    :data:`CORE_RADIUS` and :data:`GALAXY_RADIUS` of (x, y): its rms and mean."""
    ring = ring_mask(survey.shape, x, y)
    values = np.concatenate([chi[ring & np.isfinite(chi)]
                             for chi in chi_planes(survey, scene).values()])
    return {"rms": float(np.sqrt(np.mean(values ** 2))), "mean": float(np.mean(values)),
            "pixels": int(values.size)}


def residual_by_radius(survey: SurveyImage, scene: np.ndarray, x: float, y: float) -> dict:
    """The residual in units of the noise in the annuli :data:`RADIAL_EDGES` around (x, y),
    per present band: {"edges": [...], "bands": {band: {"rms": [...], "mean": [...],
    "pixels": [...]}}} (rms and mean None for an annulus without unmasked pixels)."""
    height, width = survey.shape
    yy, xx = np.mgrid[:height, :width]
    radius = np.hypot(xx - x, yy - y)
    bands: dict[str, Any] = {}
    for band, chi in chi_planes(survey, scene).items():
        rms, mean, pixels = [], [], []
        for lo, hi in zip(RADIAL_EDGES[:-1], RADIAL_EDGES[1:]):
            values = chi[(radius >= lo) & (radius < hi) & np.isfinite(chi)]
            rms.append(float(np.sqrt(np.mean(values ** 2))) if values.size else None)
            mean.append(float(np.mean(values)) if values.size else None)
            pixels.append(int(values.size))
        bands[band] = {"rms": rms, "mean": mean, "pixels": pixels}
    return {"edges": list(RADIAL_EDGES), "bands": bands}


def _display(survey: SurveyImage, cube: np.ndarray) -> np.ndarray:
    """Sum over the present bands, in units of the summed noise (asinh-stretched)."""
    present = [k for k, b in enumerate(survey.bands) if b not in survey.missing]
    variance = np.where(np.isfinite(survey.variance[present]), survey.variance[present], 0.0)
    sigma = np.sqrt(np.median(variance.sum(axis=0)))
    return np.arcsinh(cube[present].sum(axis=0) / (3.0 * sigma))


def plot_real_des(survey: SurveyImage, scene: np.ndarray, rows: Table, path: Path,
                  radial: Mapping[str, Any] | None = None, stamp_pixels: int | None = None
                  ) -> Path:
    """PNG: image, reconstruction, residual (present bands summed), detections and e sticks;
    with ``radial`` (:func:`residual_by_radius` of the brightest detection) a fourth panel, its
    rms per band by radius against the noise level, the test's ring and the stamp's half-width
    (``stamp_pixels``) marked."""
    image, reconstruction = _display(survey, survey.images), _display(survey, scene)
    residual = _display(survey, survey.images - scene)
    fig, axes = plt.subplots(1, 4 if radial else 3, figsize=(20 if radial else 15, 5.4))
    limits = (float(min(image.min(), reconstruction.min())), float(image.max()))
    for ax, data, title in ((axes[0], image, "image (resampled, sky-subtracted)"),
                            (axes[1], reconstruction, "reconstruction (detections pasted)"),
                            (axes[2], residual, "residual")):
        ax.imshow(data, origin="lower", cmap="gray_r",
                  vmin=limits[0] if ax is not axes[2] else -3, vmax=limits[1]
                  if ax is not axes[2] else 3)
        ax.set_title(title, fontsize=10)
    e1, e2 = np.asarray(rows[f"{ESTIMATOR}_e1"]), np.asarray(rows[f"{ESTIMATOR}_e2"])
    angle, length = 0.5 * np.arctan2(e2, e1), 40 * np.hypot(e1, e2)
    for x, y, a, n in zip(rows["x"], rows["y"], angle, length):
        axes[0].plot([x - 0.5 * n * np.cos(a), x + 0.5 * n * np.cos(a)],
                     [y - 0.5 * n * np.sin(a), y + 0.5 * n * np.sin(a)], color="tab:red", lw=2)
    axes[0].scatter(rows["x"], rows["y"], s=10, color="tab:red",
                    label="noshear detections, e sticks (40 px per unit e)")
    axes[0].legend(loc="upper right", fontsize=8)
    if radial:
        plot_radial(axes[3], radial, stamp_pixels)
    present = " ".join(b for b in survey.bands if b not in survey.missing)
    fig.suptitle(f"Real DES pixels (bands {present}; missing: {' '.join(survey.missing)}), "
                 f"{survey.pixel_scale:g}\" pixels", fontsize=11)
    try:
        with atomic_output(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path


def plot_radial(ax: Any, radial: Mapping[str, Any], stamp_pixels: int | None) -> None:
    """The residual's rms per band by radius (:func:`residual_by_radius`)."""
    edges = np.asarray(radial["edges"])
    middle = 0.5 * (edges[1:] + edges[:-1])
    for band, profile in radial["bands"].items():
        rms = np.array([np.nan if v is None else v for v in profile["rms"]])
        ax.plot(middle, rms, marker="o", label=band)
    ax.axhline(1.0, color="k", lw=1, ls=":", label="noise level")
    ax.axvspan(CORE_RADIUS, GALAXY_RADIUS, color="0.9", label="the test's ring")
    if stamp_pixels:
        ax.axvline(stamp_pixels / 2, color="tab:red", lw=1, ls="--",
                   label="the model's stamp half-width")
    ax.set_xlabel("pixels from the brightest detection")
    ax.set_ylabel("residual rms / noise")
    ax.set_title("brightest detection: residual by radius", fontsize=10)
    ax.legend(fontsize=8)


def run_real_des(model_or_run: Any, data_dir: str | Path, out: str | Path, *,
                 zeropoints: Mapping[str, float] | None = None, force: bool = False,
                 target_fwhm: float | Sequence[float] | None = None,
                 deblend_contrast: float | None = None, device: str = "cpu",
                 log: Callable[[str], None] = print) -> dict:
    """Measure the frames of ``data_dir`` with the model (module docstring); returns the
    metrics also written to ``out/metrics.json``. ``target_fwhm`` (arcsec, one or one per
    band): the round Gaussian metacal reconvolves to (default: the model's own target, else
    each band's narrowest). ``deblend_contrast``: the detection's
    (:func:`~deblend.core.survey_measure.measure_survey`'s, default SEP's 0.005)."""
    model = model_or_run if isinstance(model_or_run, Deblender) else \
        Deblender.from_run(model_or_run, device=device)
    model.require_survey_psf("the real DES frames' measurement")
    target_fwhm = model.target_fwhm(target_fwhm)
    model.target_sigma(target_fwhm)  # a wrong band count is refused before anything is read
    frames = find_frames(data_dir)
    inputs = survey_inputs(frames, model, {**NOMINAL_ZP, **dict(zeropoints or {})})
    survey = read_survey(inputs, model.bands, model.data.pixel_scale,
                         psfex_pixels=model.stamp_pixels)
    out = Path(out)
    claim_directory(out, REAL_DES_KIND, force)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sky = ("the frames' sky models (legacypipe SplineSky) subtracted" if inputs.skies
               else "a constant sky subtracted per band (sigma-clipped median)")
        metrics = _measure_and_report(model, survey, tmp, target_fwhm, deblend_contrast, log,
                                      sky)
        replace_directory(tmp, out, REAL_DES_KIND)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def _measure_and_report(model: Deblender, survey: SurveyImage, out: Path,
                        target_fwhm: float | Sequence[float] | None,
                        deblend_contrast: float | None, log: Callable[[str], None],
                        sky: str) -> dict:
    catalogue_path = measure_survey(model, survey, out / "catalogue.fits", force=True,
                                    per_object=False, progress=False, target_fwhm=target_fwhm,
                                    deblend_contrast=deblend_contrast, log=log)
    catalogue = Table.read(catalogue_path)
    rows = catalogue[catalogue["mdet_step"] == "noshear"]
    scene, amplitudes = scene_model(model, survey, rows)
    metrics: dict[str, Any] = {
        "bands_present": [b for b in model.bands if b not in survey.missing],
        "bands_missing": list(survey.missing), "zeropoints": survey.zeropoints,
        "pixel_scale": survey.pixel_scale, "shape": list(survey.shape),
        "noshear_detections": len(rows), "sky": sky,
        "unflagged_detections": int(np.sum(np.asarray(rows["flags"]) == 0)),
        "notes": list(survey.notes)}
    if target_fwhm is not None:
        metrics["target_psf_fwhm"] = target_fwhm
    if len(rows):
        brightest = int(np.argmax(np.asarray(rows["snr"])))
        x, y = float(rows["x"][brightest]), float(rows["y"][brightest])
        metrics["brightest"] = {"x": x, "y": y, "snr": float(rows["snr"][brightest]),
                                "residual_chi": residual_in_noise(survey, scene, x, y),
                                "residual_by_radius": residual_by_radius(survey, scene, x, y),
                                "forced_over_reconstruction": {
                                    band: float(amplitudes[brightest, b])
                                    for b, band in enumerate(model.bands)
                                    if band not in survey.missing}}
    plot_real_des(survey, scene, rows, out / "real_des.png",
                  metrics.get("brightest", {}).get("residual_by_radius"), model.stamp_pixels)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "real_des.md", report(metrics))
    return metrics


def real_summary(metrics: Mapping[str, Any]) -> str:
    """One paragraph on a :func:`run_real_des` result."""
    text = (f"{metrics['noshear_detections']} noshear detections on real DECam frames (bands "
            f"{' '.join(metrics['bands_present'])}; missing: "
            f"{' '.join(metrics['bands_missing']) or 'none'})")
    if "brightest" in metrics:
        chi = metrics["brightest"]["residual_chi"]
        text += (f"; the brightest (S/N {metrics['brightest']['snr']:.0f}) leaves a residual of "
                 f"rms {chi['rms']:.2f} noise sigma per pixel between {CORE_RADIUS:g} and "
                 f"{GALAXY_RADIUS:g} pixels of its centre (1.0: the noise level)")
    return text + "."


def report(metrics: Mapping[str, Any]) -> str:
    """The markdown report of :func:`run_real_des`."""
    lines = ["# The deblender on real DES pixels", "",
             f"Bands present: {' '.join(metrics['bands_present'])}; declared missing (zeros, "
             f"infinite variance): {' '.join(metrics['bands_missing']) or 'none'}. Every band "
             f"resampled onto {metrics['shape'][1]}x{metrics['shape'][0]} pixels of "
             f"{metrics['pixel_scale']:g}\"; {metrics.get('sky', 'a constant sky subtracted')}"
             f"; image zero points assumed (the frames carry none): " + ", ".join(
                 f"{b} {zp[0]:.2f}" for b, zp in metrics["zeropoints"].items()) + ".", "",
             "PSF from PSFEx at the image centre; "
             + reconvolution_words(metrics.get("target_psf_fwhm")) + ".", "",
             f"Noshear detections: {metrics['noshear_detections']} "
             f"({metrics['unflagged_detections']} unflagged).", ""]
    if "brightest" in metrics:
        b = metrics["brightest"]
        chi = b["residual_chi"]
        lines += [f"Brightest detection at ({b['x']:.1f}, {b['y']:.1f}), S/N {b['snr']:.0f}: "
                  f"its residual between {CORE_RADIUS:g} and {GALAXY_RADIUS:g} pixels of its "
                  f"centre has rms {chi['rms']:.2f} and mean {chi['mean']:+.2f} in units of "
                  f"the noise ({chi['pixels']} pixels; 1.0 is the noise level). Its fluxes "
                  f"fitted to the pixels are " + ", ".join(
                      f"{band} {ratio:.3f}" for band, ratio in b.get(
                          "forced_over_reconstruction", {}).items())
                  + " times its reconstruction's.", ""]
        radial = b.get("residual_by_radius")
        if radial:
            edges, profiles = radial["edges"], radial["bands"]
            lines += ["Its residual by radius (rms / mean in units of the noise; the figure's "
                      "fourth panel):", "",
                      "| pixels | " + " | ".join(profiles) + " |",
                      "| :--- |" + " ---: |" * len(profiles)]
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                cells = ["-" if p["rms"][i] is None else f"{p['rms'][i]:.2f} / {p['mean'][i]:+.2f}"
                         for p in profiles.values()]
                lines.append(f"| {lo:g}-{hi:g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["![image, reconstruction, residual](real_des.png)", "", "Notes:", ""]
    lines += [f"- {note}" for note in metrics["notes"]]
    return "\n".join(lines) + "\n"
