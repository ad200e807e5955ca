"""``python -m benchmarks.reconstruction_defects --run R [--n N] [--stage S] [--map PRIOR]
[--mag BRIGHT FAINT] [--out DIR]``.

The reconstruction's own defects (:mod:`evaluation.reconstruction_defects`) on N isolated
galaxies drawn directly with GalSim (rotated-twin pairs, BTK-like noise): the additive and
multiplicative bias of the reconstruction's moment ellipticity (uniform and Gaussian weights,
r+i+z) against the noiseless truth, the same per symmetric view in the network's frame, the
flux residual in bins of i magnitude (and of magnitude and true size), and where in the profile
the defects live (light kept per annulus, slope of the uniform-weight e inside apertures of
growing radius), and the residual in units of the noise 3-12 pixels from the centre by S/N
(where the reconstruction stops being at the noise level), for the plain reconstruction and for
the average of the 8 views' reconstructions (and, with ``--map PRIOR``, for MAP deblending's
reconstructions under that prior). ``--mag`` draws brighter (or fainter) galaxies than the
default i = 20-24. Prints the tables; writes ``reconstruction_defects.json``,
``flux_residual.png``, ``radial_profile.png`` and ``report.md`` into ``--out`` (default
``RUN/reconstruction_defects``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from deblend.core.arguments import non_negative_int_arg, positive_int_arg
from deblend.core.atomic import atomic_output, write_json_atomic, write_text_atomic
from deblend.core.cli import fail_cleanly
from deblend.core.inference import Deblender
from deblend.core.map_deblend import PRIORS
from deblend.core.outputs import mark, refuse_foreign
from evaluation.reconstruction_defects import (
    CORE_RADIUS,
    GALAXY_RADIUS,
    WEIGHTS,
    draw_isolated_galaxies,
    measure_defects,
)
from simulation.galsim_population import PopulationSpec

KIND = "reconstruction-defects"
RESULTS = "reconstruction_defects.json"
FIGURE = "flux_residual.png"
PROFILE_FIGURE = "radial_profile.png"
REPORT = "report.md"
VARIANTS = {"plain": "1 view (plain decoding)", "symmetrised": "8-view average (predict's default)",
            "map": "MAP ({map_prior} prior)"}
"""Measured variants and their labels (formatted with the result's keys)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reconstruction_defects",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--stage", default="stage3", help="stage whose networks are measured "
                        "(stage1: the VAE's own encoder; default stage3: the full deblender)")
    parser.add_argument("--n", type=positive_int_arg, default=2000,
                        help="galaxies (an even number: rotated-twin pairs; default 2000)")
    parser.add_argument("--seed", type=non_negative_int_arg, default=2024,
                        help="population and noise seed (default 2024)")
    parser.add_argument("--sigma", type=float, default=3.0,
                        help="Gaussian weight sigma in pixels (default 3)")
    parser.add_argument("--map", choices=PRIORS, dest="map_prior",
                        help="also measure MAP deblending's reconstructions under this prior")
    parser.add_argument("--mag", type=float, nargs=2, metavar=("BRIGHT", "FAINT"),
                        default=PopulationSpec().target_mag,
                        help="the galaxies' reference-band (i) magnitude range, drawn uniformly "
                             "(default %(default)s; brighter to probe where the reconstruction "
                             "leaves the noise level)")
    parser.add_argument("--out", help="output directory (default: RUN/reconstruction_defects)")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.mag[0]) and math.isfinite(args.mag[1])
            and args.mag[0] < args.mag[1]):
        parser.error(f"--mag needs two finite magnitudes, bright first, got {args.mag}")
    return args


def _pm(entry: dict[str, Any], key: str, error: str, digits: int = 4, sign: str = "+") -> str:
    value, err = entry[key], entry[error]
    if not math.isfinite(value):
        return "-"
    return f"{value:{sign}.{digits}f} ± {err:.{digits}f}"


def _label(result: dict[str, Any], variant: str) -> str:
    return VARIANTS[variant].format(**result)


def table(result: dict[str, Any]) -> str:
    """Markdown tables: the e bias (additive c over twin pairs, multiplicative m), then the
    flux residual per magnitude bin, for each variant."""
    bright, faint = result.get("target_mag", PopulationSpec().target_mag)
    lines = [(f"n = {result['n']} isolated GalSim galaxies ({result['n'] // 2} rotated-twin "
              f"pairs, i = {bright:g}-{faint:g}), shapes from {'+'.join(result['shape_bands'])}; "
              f"Gaussian weight sigma {result['gaussian_sigma_pixels']:g} px"), "",
             "| variant | weight | c1 | c2 | m1 | m2 |", "|:---|:---|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        if variant not in result:
            continue
        for weight, bias in result[variant]["bias"].items():
            lines.append(f"| {_label(result, variant)} | {weight} "
                         f"| {_pm(bias['e1'], 'additive', 'additive_error')} "
                         f"| {_pm(bias['e2'], 'additive', 'additive_error')} "
                         f"| {_pm(bias['e1'], 'multiplicative', 'multiplicative_error', 3)} "
                         f"| {_pm(bias['e2'], 'multiplicative', 'multiplicative_error', 3)} |")
    lines += ["", "flux(reconstruction) / flux(truth) - 1, r+i+z, by i magnitude:", ""]
    variants = [v for v in VARIANTS if v in result]
    bins = result[variants[0]]["flux"]["bins"]
    lines.append("| i mag | n | " + " | ".join(_label(result, v) for v in variants) + " |")
    lines.append("|:---|---:|" + "---:|" * len(variants))
    for k, row in enumerate(bins):
        cells = [_pm(result[v]["flux"]["bins"][k], "mean", "error", 3) for v in variants]
        lines.append(f"| {row['lo']:g}-{row['hi']:g} | {row['n']} | " + " | ".join(cells) + " |")
    cells = [_pm(result[v]["flux"]["slope"], "slope", "error", 3) for v in variants]
    lines.append("| slope per mag | | " + " | ".join(cells) + " |")
    lines += _size_table(result, variants)
    lines += _profile_tables(result, variants)
    lines += _residual_table(result, variants)
    if "view_biases" in result:
        lines += ["", ("Residual e per symmetric view (uniform weight), in the stamp frame and "
                       "in the network's frame (a fixed network-frame bias is constant in the "
                       "latter):"),
                  "", "| view | e1 | e2 | network e1 | network e2 |", "|---:|---:|---:|---:|---:|"]
        for row in result["view_biases"][WEIGHTS[0]]:
            lines.append(f"| {row['view']} | " + " | ".join(
                _pm(row[k], "mean", "error") for k in ("e1", "e2", "network_e1", "network_e2"))
                + " |")
        for weight, bias in result["network_frame_bias"].items():
            lines.append(f"\nfixed network-frame bias ({weight} weight, averaged over the 8 "
                         f"views): e1 {_pm(bias['e1'], 'mean', 'error')}, "
                         f"e2 {_pm(bias['e2'], 'mean', 'error')}")
        lines.append(f"\nequivariance error (rms of view^-1 f(view x) - f(x), relative): "
                     f"{result['equivariance_error']:.4f}")
    return "\n".join(lines)


def _size_table(result: dict[str, Any], variants: list[str]) -> list[str]:
    """The flux residual by i magnitude (rows) within bins of the true half-light radius."""
    lines = ["", "the same by i magnitude and true half-light radius (at a fixed magnitude a "
             "larger galaxy has a fainter surface brightness):", "",
             "| variant | i mag | " + " | ".join(
                 f"hlr {e['hlr_lo']:g}-{e['hlr_hi']:g}\"" for e in
                 result[variants[0]]["flux_by_size"]) + " |",
             "|:---|:---|" + "---:|" * len(result[variants[0]]["flux_by_size"])]
    for v in variants:
        sizes = result[v]["flux_by_size"]
        for k, row in enumerate(sizes[0]["bins"]):
            cells = [f"{_pm(e['bins'][k], 'mean', 'error', 3)} ({e['bins'][k]['n']})"
                     for e in sizes]
            lines.append(f"| {_label(result, v)} | {row['lo']:g}-{row['hi']:g} | "
                         + " | ".join(cells) + " |")
    return lines


def _profile_tables(result: dict[str, Any], variants: list[str]) -> list[str]:
    """Light kept per annulus and the uniform-weight e slope inside apertures (r+i+z)."""
    header = " | ".join(_label(result, v) for v in variants)
    lines = ["", "light kept per annulus, flux(reconstruction) / flux(truth), r+i+z:", "",
             f"| radius (px) | truth (e/px) | {header} |", "|:---|---:|" + "---:|" * len(variants)]
    for k, ring in enumerate(result[variants[0]]["light_by_radius"]):
        cells = [_pm(result[v]["light_by_radius"][k], "kept", "error", 3, "") for v in variants]
        lines.append(f"| {ring['lo']:g}-{ring['hi']:g} | {ring['truth_per_pixel']:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "slope of e(reconstruction) against e(truth), uniform weight inside a circular "
              "aperture, e1 / e2:", "", f"| aperture radius (px) | {header} |",
              "|:---|" + "---:|" * len(variants)]
    for k, row in enumerate(result[variants[0]]["slope_by_aperture"]):
        cells = [" / ".join(f"{result[v]['slope_by_aperture'][k][c]['slope']:.3f}"
                            for c in ("e1", "e2")) for v in variants]
        lines.append(f"| < {row['radius']:g} | " + " | ".join(cells) + " |")
    return lines


def _residual_table(result: dict[str, Any], variants: list[str]) -> list[str]:
    """Ring rms of (image - reconstruction) / sigma by S/N: median (90th percentile)."""
    rows = result[variants[0]]["residual_by_snr"]
    lines = ["", (f"image - reconstruction in units of the noise (sky + galaxy Poisson), rms over "
                  f"the pixels {CORE_RADIUS:g}-{GALAXY_RADIUS:g} px from the centre in all bands, "
                  f"median (90th percentile) by the galaxy's matched-filter S/N against the sky "
                  f"(1.0: the noise level; noise alone gives the floor):"), "",
             "| S/N | n | floor | " + " | ".join(_label(result, v) for v in variants) + " |",
             "|:---|---:|---:|" + "---:|" * len(variants)]
    for k, row in enumerate(rows):
        if not row["n"]:
            continue
        cells = [f"{result[v]['residual_by_snr'][k]['median']:.2f} "
                 f"({result[v]['residual_by_snr'][k]['p90']:.2f})" for v in variants]
        hi = "" if math.isinf(row["hi"]) else f"{row['hi']:g}"
        lines.append(f"| {row['lo']:g}-{hi} | {row['n']} | {row['floor']:.2f} | "
                     + " | ".join(cells) + " |")
    return lines


def profile_figure(result: dict[str, Any], path: Path) -> Path:
    """Light kept against annulus radius, and the e slope against aperture radius."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for colour, variant in enumerate(v for v in VARIANTS if v in result):
        label = _label(result, variant)
        rings = result[variant]["light_by_radius"]
        left.errorbar([0.5 * (r["lo"] + r["hi"]) for r in rings], [r["kept"] for r in rings],
                      yerr=[r["error"] for r in rings], marker="o", capsize=3, label=label,
                      color=f"C{colour}")
        rows = result[variant]["slope_by_aperture"]
        for component, style in (("e1", "-"), ("e2", "--")):
            right.plot([r["radius"] for r in rows], [r[component]["slope"] for r in rows],
                       style, marker="o", color=f"C{colour}", label=f"{label}, {component}")
    left.axhline(1.0, color="black", lw=0.8)
    left.set_xlabel("annulus centre (pixels from the stamp centre)")
    left.set_ylabel("flux(recon) / flux(truth) in the annulus")
    right.axhline(1.0, color="black", lw=0.8)
    right.set_xlabel("aperture radius (pixels)")
    right.set_ylabel("slope of e(recon) vs e(truth), uniform weight")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(f"isolated GalSim galaxies, n = {result['n']}, r+i+z")
    fig.tight_layout()
    with atomic_output(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def figure(result: dict[str, Any], path: Path) -> Path:
    """Flux residual against i magnitude (each variant, with 1-sigma errors)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for offset, variant in zip((-0.05, 0.0, 0.05), VARIANTS):
        if variant not in result:
            continue
        label = _label(result, variant)
        bins = result[variant]["flux"]["bins"]
        x = [0.5 * (b["lo"] + b["hi"]) + offset for b in bins]
        ax.errorbar(x, [b["mean"] for b in bins], yerr=[b["error"] for b in bins], marker="o",
                    capsize=3, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("i magnitude (AB)")
    ax.set_ylabel("flux(recon) / flux(truth) - 1  (r+i+z)")
    ax.set_title(f"isolated GalSim galaxies, n = {result['n']}")
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def run_benchmark(run: str | Path, out: str | Path | None = None, *, n: int = 2000,
                  seed: int = 2024, stage: str = "stage3", sigma: float = 3.0,
                  device: str = "auto", map_prior: str | None = None,
                  mag: Sequence[float] = PopulationSpec().target_mag) -> dict[str, Any]:
    """Draw the population (i magnitudes uniform in ``mag``), measure, write the JSON, figure
    and report; return the results. The flux residual is binned by whole magnitudes over
    ``mag``."""
    if n % 2:
        raise ValueError(f"--n must be even (rotated-twin pairs), got {n}")
    run = Path(run)
    out = Path(out) if out is not None else run / "reconstruction_defects"
    refuse_foreign(out, KIND)
    model = Deblender.from_run(run, stage=stage, device=device)
    model.require_survey_psf("the reconstruction-defect benchmark")
    started = time.time()
    spec = PopulationSpec(target_mag=(float(mag[0]), float(mag[1])))
    galaxies = draw_isolated_galaxies(n, seed, model.data.survey, model.stamp_pixels, spec)
    mag_edges = tuple(float(m) for m in range(math.floor(mag[0]), math.ceil(mag[1]) + 1))
    result = measure_defects(model, galaxies, sigma=sigma, map_prior=map_prior,
                             mag_edges=mag_edges)
    result.update({"run": str(run), "stage": stage, "seed": seed,
                   "target_mag": list(spec.target_mag),
                   "population": "simulation.galsim_population.GalSimPopulation, "
                                 "neighbours=False, BTK-like noise (add_btk_noise, 'all')",
                   "seconds": time.time() - started})
    print(write_outputs(result, out, f"{run} ({stage})"))
    return result


def write_outputs(result: dict[str, Any], out: Path, title: str) -> str:
    """Write the JSON, the figure and the markdown report of ``result`` into ``out`` (marked as
    deblend's); return the table."""
    refuse_foreign(out, KIND)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, KIND)
    write_json_atomic(out / RESULTS, result)
    figure(result, out / FIGURE)
    profile_figure(result, out / PROFILE_FIGURE)
    text = table(result)
    write_text_atomic(out / REPORT, f"# Reconstruction defects: {title}\n\n{text}\n\n"
                      f"![flux residual]({FIGURE})\n\n![light and shape by radius]"
                      f"({PROFILE_FIGURE})\n")
    return text


@fail_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_benchmark(args.run, args.out, n=args.n, seed=args.seed, stage=args.stage,
                  sigma=args.sigma, device=args.device, map_prior=args.map_prior,
                  mag=args.mag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
