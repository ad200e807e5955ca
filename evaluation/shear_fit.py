"""Shear calibration: fit <e> = A g + c per component and m = A / A_truth - 1 (SPEC 6).

Data: populations of scenes with a constant applied shear (g1, g2), drawn as consecutive
90-degree-rotated twin pairs (2k, 2k+1) so that intrinsic shapes cancel in each pair's mean.
Component 1 is fitted on the populations with g2 = 0 (e1 against g1), component 2 on those with
g1 = 0 (e2 against g2); the unsheared population serves both.

The fit is ordinary least squares of the twin-pair means on g (equivalently on the population
means weighted by their counts of valid pairs); a pair counts only where both twins were measured.
``m = A / A_truth - 1`` where ``A_truth`` is the response of the reference estimator (uniform-weight
moments of the noiseless isolated truth). Errors are bootstrap standard deviations over twin
pairs: every replicate resamples the same pairs for every estimator, so the correlation between A
and A_truth is carried into m's error. When the populations share their galaxies (the same scenes
under every shear: common random numbers), pair k is resampled jointly in every population.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from evaluation.metrics import nanmean
from evaluation.results import ComponentCalibration, ShearCalibration, ShearFit

COMPONENTS = ("g1", "g2")


def pair_means(values: np.ndarray) -> np.ndarray:
    """Means of consecutive twin pairs (2k, 2k+1) -> (n // 2,); NaN if either twin is NaN."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size % 2:
        raise ValueError(f"twin pairs need an even number of scenes, got {values.size}")
    return values.reshape(-1, 2).mean(axis=1)


@dataclass
class ShearPopulation:
    """One population: its applied shear and every estimator's per-scene (e1, e2)."""

    g1: float
    g2: float
    estimates: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def n_scenes(self) -> int:
        first = next(iter(self.estimates.values()))
        return int(len(first[0]))


def fit_shear_bias(g: np.ndarray, sums: np.ndarray, counts: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """OLS of e on the applied shear g: the response A (slope) and the additive bias c.

    Given per population (last axis) the applied ``g``, the sum of the estimates and their
    count, this is OLS on every estimate at once; leading axes (bootstrap replicates) broadcast.
    Fewer than two distinct shears with estimates give NaN.
    """
    total = counts.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gbar = (counts * g).sum(axis=-1) / total
        ebar = sums.sum(axis=-1) / total
        dg = g - gbar[..., None]
        sxy = (dg * sums).sum(axis=-1)  # = sum over pairs of (g - gbar) * e
        sxx = (counts * dg ** 2).sum(axis=-1)
        slope = sxy / sxx
        intercept = ebar - slope * gbar
    bad = ~(sxx > 0)
    slope = np.where(bad, np.nan, slope)
    intercept = np.where(bad, np.nan, intercept)
    return slope, intercept


def _component_populations(populations: Sequence[ShearPopulation], component: str
                           ) -> list[ShearPopulation]:
    other = "g2" if component == "g1" else "g1"
    return [p for p in populations if getattr(p, other) == 0.0]


def calibrate(populations: Sequence[ShearPopulation], *, reference: str = "truth_moments",
              n_bootstrap: int = 200, seed: int = 0, shared_galaxies: bool = True,
              extra_references: Sequence[str] = ()) -> ShearCalibration:
    """A, c and m (with bootstrap 1-sigma errors) of every estimator, per component.

    The reference's own m is 0 by construction (its row reports A_truth). ``m_vs`` gives m
    against each of ``extra_references`` (e.g. HSM on the truth, the natural reference of HSM
    estimators).
    """
    if not populations:
        raise ValueError("no shear populations to calibrate")
    names = list(populations[0].estimates)
    for ref in (reference, *extra_references):
        if ref not in names:
            raise ValueError(f"reference estimator '{ref}' was not measured ({names})")
    if n_bootstrap < 2:
        raise ValueError(f"shear.bootstrap must be >= 2, got {n_bootstrap}")
    n_pairs_all = {p.n_scenes // 2 for p in populations}
    if shared_galaxies and len(n_pairs_all) != 1:
        raise ValueError("shared_galaxies needs the same number of scenes in every population")
    rng = np.random.default_rng(seed)
    components: dict[str, ComponentCalibration] = {}
    for c_index, component in enumerate(COMPONENTS):
        pops = _component_populations(populations, component)
        g = np.array([getattr(p, component) for p in pops])
        if len(np.unique(g)) < 2:
            raise ValueError(f"component {component} needs at least two distinct shears "
                             f"(with the other component 0), got {sorted(set(g.tolist()))}")
        # bootstrap weights: how many times each pair is drawn, per replicate and population
        if shared_galaxies:
            n_pairs = pops[0].n_scenes // 2
            draws = rng.integers(0, n_pairs, size=(n_bootstrap, n_pairs))
            weights_one = np.stack([np.bincount(d, minlength=n_pairs) for d in draws])
            weights = [weights_one] * len(pops)
        else:
            weights = []
            for p in pops:
                n_pairs = p.n_scenes // 2
                draws = rng.integers(0, n_pairs, size=(n_bootstrap, n_pairs))
                weights.append(np.stack([np.bincount(d, minlength=n_pairs) for d in draws]))
        fits: dict[str, dict[str, np.ndarray]] = {}
        for name in names:
            means = [pair_means(p.estimates[name][c_index]) for p in pops]
            valid = [np.isfinite(m) for m in means]
            filled = [np.where(v, m, 0.0) for m, v in zip(means, valid)]
            sums = np.array([f.sum() for f in filled])
            counts = np.array([v.sum() for v in valid], dtype=np.float64)
            a_full, c_full = fit_shear_bias(g, sums, counts)
            b_sums = np.stack([w @ f for w, f in zip(weights, filled)], axis=-1)
            b_counts = np.stack([w @ v.astype(np.float64) for w, v in zip(weights, valid)],
                                axis=-1)
            a_boot, c_boot = fit_shear_bias(g, b_sums, b_counts)
            fits[name] = {"A": a_full, "c": c_full, "A_boot": a_boot, "c_boot": c_boot,
                          "n_pairs": counts}
        ref = fits[reference]
        table = {}
        for name in names:
            fit = fits[name]
            m_full, m_boot = _multiplicative_bias(fit, ref)
            m_vs = {}
            for ref_name in extra_references:
                m_other, m_other_boot = _multiplicative_bias(fit, fits[ref_name])
                m_vs[ref_name] = {"m": float(m_other),
                                  "m_err": _std(m_other_boot) if name != ref_name else 0.0}
            table[name] = ShearFit(
                A=float(fit["A"]), A_err=_std(fit["A_boot"]), c=float(fit["c"]),
                c_err=_std(fit["c_boot"]), m=float(m_full),
                m_err=_std(m_boot) if name != reference else 0.0,
                n_pairs=int(fit["n_pairs"].sum()),
                n_pairs_per_population=[int(v) for v in fit["n_pairs"]], m_vs=m_vs)
        components[component] = ComponentCalibration(g.tolist(), table)
    return ShearCalibration(reference, int(n_bootstrap),
                            "twin pairs, jointly across populations" if shared_galaxies
                            else "twin pairs, per population", **components)


def _multiplicative_bias(fit: dict[str, np.ndarray], reference: dict[str, np.ndarray]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """m = A / A_reference - 1, on the full sample and in every bootstrap replicate (the two
    responses resampled together)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return fit["A"] / reference["A"] - 1.0, fit["A_boot"] / reference["A_boot"] - 1.0


def _std(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if finite.size > 1 else float("nan")


def population_means(populations: Sequence[ShearPopulation], names: Sequence[str] | None = None
                     ) -> list[dict[str, object]]:
    """Per population: the shear and each estimator's mean pair-averaged (e1, e2) and count."""
    out = []
    for p in populations:
        row: dict[str, object] = {"g1": p.g1, "g2": p.g2, "n_scenes": p.n_scenes}
        for name in names or list(p.estimates):
            e1, e2 = (pair_means(p.estimates[name][i]) for i in (0, 1))
            row[name] = {"e1": nanmean(e1), "e2": nanmean(e2),
                         "e1_err": _sem(e1), "e2_err": _sem(e2)}
        out.append(row)
    return out


def _sem(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def estimates_from_arrays(values: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray,
                                                                               np.ndarray]]:
    """{name: (e1, e2)} from a flat mapping ``{"<name>__e1": ..., "<name>__e2": ...}`` (npz)."""
    names = sorted({key.rsplit("__", 1)[0] for key in values if key.endswith(("__e1", "__e2"))})
    return {name: (np.asarray(values[f"{name}__e1"]), np.asarray(values[f"{name}__e2"]))
            for name in names}


def estimates_to_arrays(estimates: Mapping[str, tuple[np.ndarray, np.ndarray]]
                        ) -> dict[str, np.ndarray]:
    """Inverse of :func:`estimates_from_arrays`."""
    out = {}
    for name, (e1, e2) in estimates.items():
        out[f"{name}__e1"] = np.asarray(e1, dtype=np.float64)
        out[f"{name}__e2"] = np.asarray(e2, dtype=np.float64)
    return out
