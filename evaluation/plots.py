"""Figures of the evaluation report (matplotlib, Agg backend, PNG written atomically).

Every function takes plain arrays/dicts and a path, draws one figure and returns the path.
Ellipticities are distortions in the pixel frame; images are shown with origin="lower" so that
position angles (counter-clockwise from +x) read as drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from deblend.core.atomic import atomic_output
from deblend.core.shapes import ellipticity_modulus, position_angle, second_moments
from evaluation.estimators import SHORT_NAMES
from evaluation.results import EllipticityBreakdown, EllipticityStats, ShearCalibration

STAGE_COLOURS = {"t1": "tab:orange", "t2": "tab:blue"}
ESTIMATOR_COLOURS = {
    "regressor": "tab:red",
    "regressor_raw": "tab:pink",
    "recon_moments": "tab:blue",
    "recon_hsm": "tab:cyan",
    "blend_moments": "tab:gray",
    "blend_hsm": "tab:brown",
    "noisy_moments": "tab:green",
    "noisy_hsm": "tab:olive",
    "truth_moments": "black",
    "truth_hsm": "tab:purple",
}
# fractions of points enclosed by the 1, 2, 3 sigma contours (the 1D Gaussian fractions)
SIGMA_FRACTIONS = (0.6827, 0.9545, 0.9973)
STICK_PIXELS_PER_UNIT_E = 50.0
"""Gallery sticks: length in pixels per unit of |e| (|e| = 0.2 draws a 10-pixel stick)."""
STICK_MIN_PIXELS = 2.0

plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "axes.titlesize": 10,
                     "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
                     "legend.fontsize": 8})


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG through a temporary name, then rename; closes the figure."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _label(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def _number(value: float | None) -> float:
    """A result's number as a float (NaN where it was not measurable)."""
    return np.nan if value is None else float(value)


def _finite_number(value: float | None) -> bool:
    return bool(np.isfinite(_number(value)))


def _finite(*arrays: np.ndarray) -> np.ndarray:
    mask = np.ones(len(arrays[0]), bool)
    for a in arrays:
        mask &= np.isfinite(np.asarray(a, dtype=np.float64))
    return mask


# -- figure 13: SSIM and cosine similarity per stage ---------------------------------------------
def plot_fidelity(ssim: Mapping[str, np.ndarray], cosine: Mapping[str, np.ndarray],
                  path: str | Path, ssim_note: str = "normalised images, data_range = 1") -> Path:
    """Histograms of per-image SSIM (mean over bands) and cosine similarity, one colour per stage.

    ``ssim[stage]`` is (N, bands) or (N,); ``cosine[stage]`` is (N,).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, values, title, xlabel in (
            (axes[0], ssim, f"SSIM vs clean truth ({ssim_note})", "SSIM (mean over bands)"),
            (axes[1], cosine, "Cosine similarity vs clean truth", "cosine similarity")):
        arrays = {k: (np.nanmean(v, axis=1) if np.ndim(v) == 2 else np.asarray(v, float))
                  for k, v in values.items()}
        allv = np.concatenate([a[np.isfinite(a)] for a in arrays.values()] or [np.zeros(0)])
        lo = float(np.percentile(allv, 0.5)) if allv.size else 0.0
        lo = min(lo, 0.99)
        bins = np.linspace(lo, 1.0, 41)
        for stage, a in arrays.items():
            a = a[np.isfinite(a)]
            if not a.size:
                continue
            ax.hist(np.clip(a, lo, 1.0), bins=bins, histtype="step", lw=1.8,
                    color=STAGE_COLOURS.get(stage), label=f"{stage}: mean {a.mean():.3f}, "
                    f"median {np.median(a):.3f} (N={a.size})")
            ax.axvline(a.mean(), color=STAGE_COLOURS.get(stage), ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation blends")
        ax.legend(loc="upper left")
    fig.suptitle("Figure 13 - image fidelity on noisy validation blends "
                 "(t1: stage-1 encoder, t2: stage-2 encoder; same decoder)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# -- flux and size residuals -----------------------------------------------------------------------
def plot_flux_size(residuals: Mapping[str, Mapping[str, np.ndarray]], bands: Sequence[str],
                   path: str | Path) -> Path:
    """Box plots per band of the relative flux and moment-size residuals, one box per stage.

    ``residuals[stage]["flux"|"size"]`` are (N, bands) relative residuals.
    """
    stages = list(residuals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind, title in ((axes[0], "flux", "Total flux"), (axes[1], "size", "Moment size")):
        width = 0.8 / max(len(stages), 1)
        all_values = []
        for s, stage in enumerate(stages):
            data = residuals[stage][kind]
            columns = [data[:, b][np.isfinite(data[:, b])] for b in range(len(bands))]
            all_values += [c for c in columns if c.size]
            positions = np.arange(len(bands)) + (s - (len(stages) - 1) / 2) * width
            keep = [i for i, c in enumerate(columns) if c.size]
            if not keep:
                continue
            box = ax.boxplot([columns[i] for i in keep], positions=positions[keep],
                             widths=width * 0.9, showfliers=False, patch_artist=True,
                             whis=(5, 95))
            for patch in box["boxes"]:
                patch.set_facecolor(STAGE_COLOURS.get(stage, "white"))
                patch.set_alpha(0.6)
            if ax is axes[0]:
                ax.plot([], [], "s", color=STAGE_COLOURS.get(stage), alpha=0.6, ms=10,
                        label=stage)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(bands)), list(bands))
        ax.set_xlabel("band")
        ax.set_ylabel("(reconstruction - truth) / truth")
        ax.set_title(f"{title}: relative residual per band (raw electrons)")
        if all_values:
            merged = np.concatenate(all_values)
            lo, hi = np.percentile(merged, [3, 97])
            pad = 0.1 * (hi - lo + 1e-6)
            ax.set_ylim(lo - pad, hi + pad)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(stages) + 1,
               title="boxes: quartiles and median; whiskers: 5-95%", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    return save_figure(fig, path)


# -- figure 14: predicted vs true ------------------------------------------------------------------
def plot_ellipticity_scatter(truth: tuple[np.ndarray, np.ndarray],
                             estimates: Mapping[str, tuple[np.ndarray, np.ndarray]],
                             stats: Mapping[str, EllipticityStats], path: str | Path
                             ) -> Path:
    """e1, e2 and |e| predicted against true, one row per estimator, with 1:1 and OLS lines."""
    names = list(estimates)
    fig, axes = plt.subplots(len(names), 3, figsize=(11, 3.3 * len(names)), squeeze=False)
    t1, t2 = (np.asarray(a, float) for a in truth)
    modulus = np.hypot(t1, t2)
    finite = modulus[np.isfinite(modulus)]
    # zoom on the truth's range (outliers are clipped onto the frame)
    half = float(np.clip(1.15 * np.percentile(finite, 99.5), 0.2, 1.0)) if finite.size else 1.0
    for row, name in enumerate(names):
        p1, p2 = (np.asarray(a, float) for a in estimates[name])
        panels = (("e1", t1, p1, (-half, half)), ("e2", t2, p2, (-half, half)),
                  ("e", modulus, np.hypot(p1, p2), (0, half)))
        for col, (comp, t, p, lims) in enumerate(panels):
            ax = axes[row, col]
            ok = _finite(t, p)
            ax.scatter(t[ok], np.clip(p[ok], *lims), s=4, alpha=0.35,
                       color=ESTIMATOR_COLOURS.get(name, "tab:blue"), rasterized=True)
            ax.plot(lims, lims, "k--", lw=1, label="1:1")
            line = getattr(stats[name], comp) if name in stats else None
            if line is not None and _finite_number(line.slope):
                xs = np.array(lims, float)
                ax.plot(xs, line.slope * xs + line.intercept, color="tab:red", lw=1.2,
                        label=f"fit: slope {line.slope:.2f}, RMSE {line.rmse:.3f}")
            ax.set_xlim(*lims)
            ax.set_ylim(*lims)
            ax.set_aspect("equal")
            sym = "|e|" if comp == "e" else comp
            ax.set_xlabel(f"true {sym} (label)")
            ax.set_ylabel(f"predicted {sym}")
            ax.set_title(f"{_label(name)}: {sym}  (N={int(ok.sum())})")
            ax.legend(loc="upper left")
    fig.suptitle("Figure 14 - predicted vs true ellipticity (distortion, pixel frame; "
                 "points beyond the frame drawn on its edge)",
                 fontsize=11, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


# -- figure 15: Delta e with contours -------------------------------------------------------------
def sigma_contour_levels(density_at_points: np.ndarray,
                         fractions: Sequence[float] = SIGMA_FRACTIONS) -> np.ndarray:
    """Density thresholds whose super-level sets enclose the given fractions of the points."""
    d = np.sort(np.asarray(density_at_points, float))
    return np.array([np.quantile(d, 1.0 - f) for f in fractions])


def _contours(ax: plt.Axes, x: np.ndarray, y: np.ndarray, lims: tuple[float, float],
              colour: str) -> bool:
    from scipy.stats import gaussian_kde

    if x.size < 10:
        return False
    try:
        kde = gaussian_kde(np.vstack([x, y]))
        levels = sigma_contour_levels(kde(np.vstack([x, y])))
        grid = np.linspace(*lims, 120)
        xx, yy = np.meshgrid(grid, grid)
        zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
    except (np.linalg.LinAlgError, ValueError):
        return False
    levels = np.unique(levels)  # contour() wants increasing levels
    if levels.size == 0 or not np.all(np.isfinite(levels)):
        return False
    # levels ascend: 3 sigma (outermost), 2 sigma, 1 sigma
    styles = (("0.7", ":"), ("1.1", "--"), ("1.6", "-"))[-levels.size:]
    ax.contour(xx, yy, zz, levels=levels, colors=colour,
               linewidths=[float(w) for w, _ in styles], linestyles=[ls for _, ls in styles])
    return True


def plot_delta_e(truth: tuple[np.ndarray, np.ndarray],
                 estimates: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path
                 ) -> Path:
    """Delta e = e_pred - e_true in the (Delta e1, Delta e2) plane with 1/2/3-sigma contours."""
    names = list(estimates)
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.2 * nrow), squeeze=False)
    t1, t2 = (np.asarray(a, float) for a in truth)
    deltas = {n: (np.asarray(estimates[n][0], float) - t1, np.asarray(estimates[n][1], float) - t2)
              for n in names}
    # common frame: the median over estimators of their 99th percentile of |Delta e|, so that
    # the noise-dominated estimators do not squash the others (their outliers sit on the edge)
    tails = []
    for d in deltas.values():
        values = np.abs(np.concatenate(d))
        values = values[np.isfinite(values)]
        if values.size:
            tails.append(np.percentile(values, 99))
    half = float(np.clip(1.2 * np.median(tails), 0.05, 1.5)) if tails else 0.5
    lims = (-half, half)
    for ax, name in zip(axes.ravel(), names):
        d1, d2 = deltas[name]
        ok = _finite(d1, d2)
        x, y = d1[ok], d2[ok]
        colour = ESTIMATOR_COLOURS.get(name, "tab:blue")
        ax.scatter(np.clip(x, *lims), np.clip(y, *lims), s=3, alpha=0.25, color=colour,
                   rasterized=True)
        drew = _contours(ax, x, y, lims, "k")
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        if x.size:
            ax.plot(np.median(x), np.median(y), "+", color="tab:red", ms=10, mew=2,
                    label=f"median ({np.median(x):+.3f}, {np.median(y):+.3f})")
        if drew:
            for ls, text in (("-", "1 sigma (68.3%)"), ("--", "2 sigma (95.4%)"),
                             (":", "3 sigma (99.7%)")):
                ax.plot([], [], "k", ls=ls, label=text)
        else:
            ax.plot([], [], "k-", label="too few points for contours")
        ax.set_xlim(*lims)
        ax.set_ylim(*lims)
        ax.set_aspect("equal")
        ax.set_xlabel("Delta e1 = e1_pred - e1_true")
        ax.set_ylabel("Delta e2 = e2_pred - e2_true")
        ax.set_title(f"{_label(name)} (N={x.size})")
        ax.legend(loc="upper left")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("Figure 15 - ellipticity residuals with contours enclosing 68.3/95.4/99.7% "
                 "of the points (Gaussian KDE)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# -- figure 16: distributions ---------------------------------------------------------------------
def plot_distributions(truth: tuple[np.ndarray, np.ndarray],
                       estimates: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path
                       ) -> Path:
    """Histograms of e1 and e2 per estimator, each over the truth's histogram."""
    names = list(estimates)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 2.6 * len(names)), squeeze=False)
    bins = np.linspace(-1, 1, 51)
    for row, name in enumerate(names):
        for col, comp in enumerate(("e1", "e2")):
            ax = axes[row, col]
            t = np.asarray(truth[col], float)
            p = np.asarray(estimates[name][col], float)
            t, p = t[np.isfinite(t)], p[np.isfinite(p)]
            ax.hist(t, bins=bins, histtype="stepfilled", color="lightgray", label=
                    f"truth (std {t.std():.3f})" if t.size else "truth")
            ax.hist(np.clip(p, -1, 1), bins=bins, histtype="step", lw=1.6,
                    color=ESTIMATOR_COLOURS.get(name, "tab:blue"),
                    label=f"{_label(name)} (std {p.std():.3f})" if p.size else _label(name))
            ax.set_xlabel(comp)
            ax.set_ylabel("samples")
            ax.set_title(f"{_label(name)}: distribution of {comp}")
            ax.legend(loc="upper right")
    fig.suptitle("Figure 16 - distributions of e1 and e2 against the truth labels", fontsize=11,
                 y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


# -- breakdowns -----------------------------------------------------------------------------------
SLOPE_RANGE = (-0.5, 2.0)
RMSE_MAX = 0.6
def plot_breakdown(breakdowns: Mapping[str, EllipticityBreakdown], path: str | Path) -> Path:
    """Slope and RMSE (averaged over e1 and e2) per n_galaxies and per magnitude bin."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (key, xlabel) in enumerate((("by_n_galaxies", "galaxies in the blend"),
                                         ("by_magnitude", "target magnitude bin"))):
        groups: list[str] = []
        for b in breakdowns.values():
            for g in getattr(b, key):
                if g not in groups:
                    groups.append(g)
        x = np.arange(len(groups))
        for name, b in breakdowns.items():
            slope, rmse = [], []
            for g in groups:
                s = getattr(b, key).get(g)
                if s is None:
                    slope.append(np.nan)
                    rmse.append(np.nan)
                    continue
                slope.append(0.5 * (_number(s.e1.slope) + _number(s.e2.slope)))
                rmse.append(np.sqrt(0.5 * (_number(s.e1.rmse) ** 2 + _number(s.e2.rmse) ** 2)))
            kw = dict(marker="o", color=ESTIMATOR_COLOURS.get(name), label=_label(name))
            # off-scale values (the noise-dominated uniform moments) sit on the frame's edge
            axes[0, col].plot(x, np.clip(slope, *SLOPE_RANGE), **kw)
            axes[1, col].plot(x, np.clip(rmse, 0.0, RMSE_MAX), **kw)
        axes[0, col].set_ylim(SLOPE_RANGE[0] - 0.05, SLOPE_RANGE[1] + 0.05)
        axes[1, col].set_ylim(0.0, RMSE_MAX * 1.03)
        axes[0, col].axhline(1.0, color="k", ls="--", lw=0.8)
        for row, ylabel in ((0, "slope (mean of e1, e2)"), (1, "RMSE (rms of e1, e2)")):
            ax = axes[row, col]
            ax.set_xticks(x, groups)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0, col].set_title(f"Slope of predicted vs true, by {xlabel}")
        axes[1, col].set_title(f"RMSE of e_pred - e_true, by {xlabel}")
    fig.suptitle("Ellipticity accuracy by blend multiplicity and target magnitude (values beyond "
                 "the frame are drawn on its edge)", fontsize=11)
    axes[0, 0].legend(loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


# -- figure 12: gallery ---------------------------------------------------------------------------
def draw_stick(ax: plt.Axes, x0: float, y0: float, e1: float, e2: float, colour: str,
               label: str, lw: float = 2.0, ls: str = "-") -> None:
    """An ellipticity stick centred on (x0, y0) pixels: along the major axis (pixel frame), of
    length proportional to abs(e) (at least STICK_MIN_PIXELS); nothing for a NaN estimate."""
    if not (np.isfinite(e1) and np.isfinite(e2)):
        return
    e = float(ellipticity_modulus(e1, e2))
    theta = float(position_angle(e1, e2))
    half = 0.5 * max(e * STICK_PIXELS_PER_UNIT_E, STICK_MIN_PIXELS)
    dx, dy = half * np.cos(theta), half * np.sin(theta)
    ax.plot([x0 - dx, x0 + dx], [y0 - dy, y0 + dy], color=colour, lw=lw, ls=ls,
            solid_capstyle="round", label=label)


def plot_gallery(blend: np.ndarray, truth: np.ndarray, reconstruction: np.ndarray,
                 true_e: np.ndarray, predicted: Mapping[str, np.ndarray], path: str | Path,
                 titles: Sequence[str] | None = None, units: str = "electrons") -> Path:
    """Rows of blend | truth | reconstruction | residual (label images, raw units).

    ``blend``, ``truth``, ``reconstruction`` are (N, H, W) label images; ``true_e`` is (N, 2);
    ``predicted[name]`` is (N, 2). Sticks: length proportional to |e|, along the major axis.
    """
    n = len(truth)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.0 * n), squeeze=False)
    stick_colours = {"truth": "lime", "regressor": "red", "recon_moments": "cyan",
                     "recon_hsm": "yellow"}
    for i in range(n):
        t = np.asarray(truth[i], float)
        peak = float(np.nanmax(t)) if np.isfinite(t).any() and np.nanmax(t) > 0 else 1.0
        soft = 0.02 * peak
        stretch = lambda img: np.arcsinh(np.asarray(img, float) / soft)  # noqa: E731
        vmax = float(stretch(peak))
        vmin = float(stretch(-0.05 * peak))
        moments = second_moments(t)
        x0 = float(moments.x0) if np.isfinite(moments.x0) else t.shape[1] / 2
        y0 = float(moments.y0) if np.isfinite(moments.y0) else t.shape[0] / 2
        panels = (("noisy blend", blend[i]), ("clean truth", t),
                  ("reconstruction (t2)", reconstruction[i]))
        for col, (name, img) in enumerate(panels):
            ax = axes[i, col]
            im = ax.imshow(stretch(img), origin="lower", cmap="magma", vmin=vmin, vmax=vmax)
            ax.set_title(name if titles is None else f"{titles[i]}\n{name}" if col == 0 else name)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[i, 2], fraction=0.046, pad=0.02,
                     label=f"asinh(flux / {soft:.3g} {units}), first 3 panels")
        draw_stick(axes[i, 1], x0, y0, *true_e[i], stick_colours["truth"], "true e", lw=2.5)
        for name, values in predicted.items():
            draw_stick(axes[i, 2], x0, y0, *values[i], stick_colours.get(name, "white"),
                   f"{_label(name)} e", lw=2.5)
        draw_stick(axes[i, 2], x0, y0, *true_e[i], stick_colours["truth"], "true e", lw=1.2, ls="--")
        legend_text = ", ".join(f"{_label(n)} |e|={float(ellipticity_modulus(*v[i])):.2f}"
                                for n, v in predicted.items())
        axes[i, 2].text(0.02, 0.98, legend_text, transform=axes[i, 2].transAxes, va="top",
                        fontsize=6.5, color="white")
        axes[i, 1].text(0.02, 0.98, f"true |e|={float(ellipticity_modulus(*true_e[i])):.2f}",
                        transform=axes[i, 1].transAxes, va="top", fontsize=6.5, color="white")
        residual = t - np.asarray(reconstruction[i], float)
        lim = float(np.nanmax(np.abs(residual))) if np.isfinite(residual).any() else 1.0
        lim = lim if lim > 0 else 1.0
        ax = axes[i, 3]
        im = ax.imshow(residual, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title("residual: truth - reconstruction")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=units)
        if i == 0:
            axes[i, 2].legend(loc="lower left", fontsize=7, framealpha=0.6)
    fig.suptitle(f"Figure 12 - gallery: label-band sum of each image; sticks along the major axis, "
                 f"length {STICK_PIXELS_PER_UNIT_E:g} px x |e| (at least "
                 f"{STICK_MIN_PIXELS:g} px); dashed: truth", fontsize=11, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


# -- shear ----------------------------------------------------------------------------------------
def plot_shear_response(means: Sequence[Mapping[str, object]], calibration: ShearCalibration,
                        path: str | Path, reference: str = "truth_moments") -> Path:
    """<e_i> - c against g_i per estimator with the fitted lines, and the m of each estimator.

    The response panels are scaled on the reference's response (points off the frame are drawn
    on its edge as triangles); the m panel on the estimators with |m| < 2 (others marked at the
    edge with their value).
    """
    comps = ("g1", "g2")
    names = list(calibration.g1.estimators)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for col, comp in enumerate(comps):
        ax = axes[col]
        other = "g2" if comp == "g1" else "g1"
        rows = sorted((r for r in means if r[other] == 0.0), key=lambda r: r[comp])
        g = np.array([r[comp] for r in rows], float)
        table = calibration.component(comp).estimators
        a_ref = _number(table[reference].A) if reference in table else np.nan
        gmax = float(np.max(np.abs(g))) if g.size else 0.02
        half = 2.5 * abs(a_ref) * gmax if np.isfinite(a_ref) and a_ref != 0 else 0.1
        for k, name in enumerate(names):
            fit = table[name]
            if not _finite_number(fit.c):
                continue
            e = np.array([r[name][f"e{col + 1}"] for r in rows], float) - fit.c  # type: ignore
            err = np.array([r[name][f"e{col + 1}_err"] for r in rows], float)  # type: ignore
            colour = ESTIMATOR_COLOURS.get(name)
            x = g + (k - (len(names) - 1) / 2) * 0.04 * gmax
            inside = np.abs(e) <= half
            ax.errorbar(x[inside], e[inside], yerr=err[inside], fmt="o", ms=4, color=colour,
                        capsize=2)
            for xo, eo in zip(x[~inside], e[~inside]):
                ax.plot(xo, np.sign(eo) * half * 0.97, "^" if eo > 0 else "v", color=colour,
                        ms=6)
            gs = np.array([g.min(), g.max()]) if g.size else np.zeros(2)
            if _finite_number(fit.A):
                off_scale = np.isfinite(a_ref) and abs(fit.A) > 3 * abs(a_ref)
                ax.plot(gs, fit.A * gs, color=colour, lw=1, ls=":" if off_scale else "-",
                        alpha=0.3 if off_scale else 1.0,
                        label=f"{_label(name)}: A = {fit.A:.3f}"
                              + (" (off scale)" if off_scale else ""))
        ax.set_ylim(-half, half)
        ax.set_xlabel(f"applied shear {comp}")
        ax.set_ylabel(f"<e{col + 1}> - c (twin-pair means)")
        ax.set_title(f"Response of e{col + 1} to {comp} ({other} = 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[2]
    y = np.arange(len(names))
    values = []
    for comp in comps:
        table = calibration.component(comp).estimators
        for n in names:
            m, err = _number(table[n].m), _number(table[n].m_err)
            if np.isfinite(m) and abs(m) < 2:
                values += [m - (err if np.isfinite(err) else 0), m + (err if np.isfinite(err)
                                                                     else 0)]
    lo, hi = (min(values + [-0.01]), max(values + [0.01])) if values else (-1.0, 1.0)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    for j, comp in enumerate(comps):
        table = calibration.component(comp).estimators
        m = np.array([_number(table[n].m) for n in names], float)
        err = np.array([_number(table[n].m_err) for n in names], float)
        yy = y + (j - 0.5) * 0.25
        inside = np.isfinite(m) & (m >= lo) & (m <= hi)
        colour = ("tab:blue", "tab:orange")[j]
        ax.errorbar(m[inside], yy[inside], xerr=np.nan_to_num(err[inside]), fmt="o", capsize=3,
                    color=colour, label=f"m{j + 1} (from {comp})")
        for value, where in zip(m[~inside & np.isfinite(m)], yy[~inside & np.isfinite(m)]):
            edge = hi if value > hi else lo
            ax.plot(edge, where, ">" if value > hi else "<", color=colour, ms=7)
            ax.annotate(f"{value:+.2g}", (edge, where), textcoords="offset points",
                        xytext=(-28 if value > hi else 6, 3), fontsize=7, color=colour)
    ax.set_xlim(lo, hi)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvspan(-0.003, 0.003, color="tab:green", alpha=0.25, label="LSST Y10: |m| < 0.003")
    ax.set_yticks(y, [_label(n) for n in names])
    ax.set_xlabel("multiplicative bias m = A / A_truth - 1")
    ax.set_title("Multiplicative bias (bootstrap 1-sigma)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
