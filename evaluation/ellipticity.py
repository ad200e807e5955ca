"""Ellipticity accuracy of an estimator against the truth labels (SPEC 6).

For each component (e1, e2, distortions in the pixel frame) the ordinary-least-squares line of
*predicted on true*, ``e_pred = slope * e_true + intercept``: a slope below 1 is the bias toward
round shapes. Also the RMSE of ``e_pred - e_true``, the mean offset, and for the modulus the ratio
``<|e|_pred> / <|e|_true>``. Samples where the estimator failed (NaN) are left out and counted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from evaluation.results import (
    EllipticityBreakdown,
    EllipticityStats,
    LineStats,
    ModulusStats,
)


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """OLS of ``y`` on ``x``: slope, intercept and their standard errors (finite pairs only).

    Fewer than 3 usable points, or no spread in ``x``, give NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    good = np.isfinite(x) & np.isfinite(y)
    x, y = x[good], y[good]
    nan = {"slope": np.nan, "slope_err": np.nan, "intercept": np.nan, "intercept_err": np.nan}
    n = x.size
    if n < 3:
        return {k: float(v) for k, v in nan.items()}
    xm = x.mean()
    sxx = ((x - xm) ** 2).sum()
    if sxx <= 0:
        return {k: float(v) for k, v in nan.items()}
    slope = ((x - xm) * (y - y.mean())).sum() / sxx
    intercept = y.mean() - slope * xm
    resid = y - slope * x - intercept
    s2 = (resid ** 2).sum() / (n - 2)
    return {"slope": float(slope), "slope_err": float(np.sqrt(s2 / sxx)),
            "intercept": float(intercept),
            "intercept_err": float(np.sqrt(s2 * (1.0 / n + xm ** 2 / sxx)))}


def component_stats(e_true: np.ndarray, e_pred: np.ndarray) -> dict[str, float]:
    """Slope/intercept (with errors), RMSE, bias (mean offset) and scatter of one component
    (the fields of :class:`evaluation.results.LineStats`)."""
    e_true = np.asarray(e_true, dtype=np.float64)
    e_pred = np.asarray(e_pred, dtype=np.float64)
    delta = e_pred - e_true
    delta = delta[np.isfinite(delta)]
    stats = fit_line(e_true, e_pred)
    if delta.size:
        stats.update(rmse=float(np.sqrt(np.mean(delta ** 2))), bias=float(delta.mean()),
                     scatter=float(delta.std()))
    else:
        stats.update(rmse=float("nan"), bias=float("nan"), scatter=float("nan"))
    return stats


def ellipticity_stats(e1_true: np.ndarray, e2_true: np.ndarray, e1_pred: np.ndarray,
                      e2_pred: np.ndarray) -> EllipticityStats:
    """Every accuracy number of one estimator on one sample (``e`` is the modulus)."""
    e1_true, e2_true, e1_pred, e2_pred = (np.asarray(a, dtype=np.float64)
                                          for a in (e1_true, e2_true, e1_pred, e2_pred))
    valid = (np.isfinite(e1_true) & np.isfinite(e2_true) & np.isfinite(e1_pred)
             & np.isfinite(e2_pred))
    e_true = np.hypot(e1_true, e2_true)[valid]
    e_pred = np.hypot(e1_pred, e2_pred)[valid]
    modulus = component_stats(e_true, e_pred)
    mean_true = float(e_true.mean()) if e_true.size else float("nan")
    mean_pred = float(e_pred.mean()) if e_pred.size else float("nan")
    modulus.update(mean_true=mean_true, mean_pred=mean_pred,
                   mean_ratio=mean_pred / mean_true if mean_true > 0 else float("nan"))
    return EllipticityStats(int(valid.size), int(valid.sum()),
                            LineStats(**component_stats(e1_true[valid], e1_pred[valid])),
                            LineStats(**component_stats(e2_true[valid], e2_pred[valid])),
                            ModulusStats(**modulus))


def magnitude_bin_labels(edges: Sequence[float]) -> list[str]:
    """Names of the bins cut by interior ``edges``: '< 22', '22-23', ..., '>= 24'."""
    edges = list(edges)
    if not edges:
        return ["all"]
    names = [f"< {edges[0]:g}"]
    names += [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    names.append(f">= {edges[-1]:g}")
    return names


def magnitude_bins(mags: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each magnitude for the interior ``edges`` (len(edges) + 1 bins)."""
    edges = np.asarray(list(edges), dtype=np.float64)
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"evaluation.mag_edges must increase strictly, got {edges.tolist()}")
    return np.searchsorted(edges, np.asarray(mags, dtype=np.float64), side="right")


def breakdown(e1_true: np.ndarray, e2_true: np.ndarray, e1_pred: np.ndarray,
              e2_pred: np.ndarray, n_galaxies: np.ndarray, mags: np.ndarray,
              mag_edges: Sequence[float]) -> EllipticityBreakdown:
    """:func:`ellipticity_stats` overall, per number of galaxies ("1", "2", ...) and per
    target-magnitude bin ("< 22", ...); empty groups are omitted."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (e1_true, e2_true, e1_pred, e2_pred)]
    n_galaxies = np.asarray(n_galaxies)
    by_n = {}
    for k in sorted(np.unique(n_galaxies).tolist()):
        mask = n_galaxies == k
        by_n[str(int(k))] = ellipticity_stats(*(a[mask] for a in arrays))
    bins = magnitude_bins(mags, mag_edges)
    by_mag = {}
    for index, name in enumerate(magnitude_bin_labels(mag_edges)):
        mask = bins == index
        if mask.any():
            by_mag[name] = ellipticity_stats(*(a[mask] for a in arrays))
    return EllipticityBreakdown(ellipticity_stats(*arrays), by_n, by_mag)
