"""A seeded, parametric statistical model of the CatSim galaxy population.

The full LSST CatSim catalog (``OneDegSq.fits``) cannot be downloaded on the project's machines,
so :func:`generate_catsim_catalog` draws an embedded default catalog with the same schema
(:data:`CATSIM_COLUMNS`, same units) from the model below.  The model is a chain of simple
distributions, each with a few constants that were fitted, with the estimator named next to
each constant, to 100 real CatSim rows (the sample of the OneDegSq field that BTK ships, one
contiguous 0.02 x 0.02 deg patch; its faintest ``i_ab`` is 27.93).
:func:`fit_parameters` is that calibration (``python -m simulation.catalog_model --calibrate
PATH``); the shipped constants are literals rounded from its output, so nothing is read at run
time.  Magnitudes are AB, sizes arcsec, angles degrees, ``x = ln(1 + z) - ln 2`` below.

Model, in the order the draws are made
--------------------------------------
1. i-band magnitude ``m`` (number counts).  A double power law in flux, i.e. a smoothly broken
   exponential in magnitude, on ``[I_MAG_BRIGHT, I_MAG_FAINT] = [15, 28]``::

       dN/dm  proportional to  1 / (10**(-a (m - m_b)) + 10**(-b (m - m_b)))

   bright slope ``a`` (``dlog10 N/dm``), faint slope ``b`` (negative: the catalog's counts turn
   over before its i = 28 limit) and break ``m_b``: maximum likelihood.  Sampled by inverting the
   tabulated CDF; ``max_i_mag`` truncates it (the table keeps ``n_rows`` rows).
2. Redshift ``z | m``: ``ln(1 + z) ~ Normal(z0 + z1 (m - 25), sz)`` truncated to
   ``z in [0.01, 6]`` (least squares = maximum likelihood of the untruncated model): fainter
   galaxies lie further.  (The residuals of ``ln(1 + z)`` are close to Gaussian; those of
   ``ln z`` are skewed and gave too many z > 3 galaxies.)
3. Colours ``u-g, g-r, r-i, i-z, z-y | z``: for each colour ``c = mu(x) + s(x) Y`` with
   ``mu`` a degree-4 polynomial in ``x``, ``ln s`` a degree-2 polynomial, and ``Y`` a
   sinh-arcsinh variable ``Y = sinh((asinh(G) + eps) / delta)`` of a standard normal ``G``
   (Jones & Pewsey 2009; ``eps`` gives skewness -- the red tails and the u-band drop-outs --,
   ``delta`` tail weight; ``eps = 0, delta = 1`` is a Gaussian).  Per colour these 10 constants
   are a joint maximum-likelihood fit (degrees 4 and 2 had the best BIC among the low-degree
   choices that reproduce the one-point colour distributions); ``x`` is clipped to the sample's
   redshift range ``[0.1, 5]`` before the polynomials are evaluated.  The five ``G`` are
   correlated (a Gaussian copula) with the correlation matrix of the sample's fitted ``G``
   (its rows with ``G = sinh(delta asinh((c - mu) / s) - eps)``).  Rows with a colour
   outside the fixed plausible range ``COLOUR_BOUNDS`` are redrawn (about 1.4% of them: the
   heavy tails that ``delta < 1`` gives would otherwise reach absurd colours).  Then
   ``r = i + (r-i)``, ``g = r + (g-r)``, ``u = g + (u-g)``, ``z = i - (i-z)``, ``y = z - (z-y)``.
4. Components.  ``P(bulge | m) = 1 / (1 + exp((m - m50) / w))`` (logistic, maximum likelihood;
   brighter galaxies more often have a bulge).  A galaxy with a bulge has no disk with
   probability ``f_pure`` (fraction in the sample); otherwise it is a bulge+disk composite,
   bulge-dominated with probability ``f_bd`` (fraction of composites with B/T > 0.5; then
   ``B/T ~ Uniform(0.5, 0.99)``, not fitted: too few such rows) else
   ``log10(B/T) ~ Normal(bt_mu, bt_sigma)`` truncated to ``[-3, log10 0.5]`` (sample mean and
   standard deviation).  Galaxies without a bulge are pure disks (B/T = 0).
5. Sizes (half-light semi-major axes): ``log10 a_d ~ Normal(d0 + d1 (m - 25), sd)`` and
   ``log10 a_b ~ Normal(b0 + b1 (m - 25), sb)``, each truncated at 3 sigma (least squares over
   rows with that component): fainter galaxies are smaller.
6. Axis ratios: ``b/a = q_min + (1 - q_min) Beta(alpha, beta)`` with ``q_min`` 0.2 for disks
   and 0.6 for bulges (fixed just below the sample minima 0.22 and 0.64); ``alpha``, ``beta``:
   maximum likelihood.  ``b = (b/a) a``, so ``a >= b > 0`` for every present component.
7. Position angle ``~ Uniform[0, 360)`` degrees (CatSim's convention, as in the sample), one
   angle per galaxy: ``pa_bulge == pa_disk`` whenever both components exist (BTK asserts it).
8. Flux normalisations: ``i + 2.5 log10(fluxnorm_bulge + fluxnorm_disk) ~ Normal(k0 + k1 z, sk)``
   (least squares), split by B/T; ``fluxnorm_agn = 0`` (as in the sample).  BTK only uses the
   ratio of the normalisations; the band fluxes come from the ``*_ab`` magnitudes.
9. Sky positions uniform (in ra and sin(dec)) in a square patch with corner at (ra, dec) =
   (0, 0), ``ra >= 0``, ``dec <= 0``, whose area gives the sample's surface density
   (bounding-box estimate) for the drawn magnitude range.  ``galtileid = 2_200_000_000 + row``.
   Absent components have ``a = b = pa = 0`` and zero flux normalisation, as in CatSim.

This is a statistical stand-in fitted to 100 galaxies of one small patch: one-point
distributions agree with them (see ``tests/test_catalog_model.py``), but joint structure beyond
the relations listed, clustering in redshift and rare populations are not CatSim's.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.table import Table
from scipy import optimize, special, stats

__all__ = [
    "CATSIM_COLUMNS",
    "COLOUR_NAMES",
    "CatalogModelParameters",
    "DEFAULT_PARAMETERS",
    "fit_parameters",
    "format_parameters",
    "generate_catsim_catalog",
    "main",
]

#: The CatSim columns, in order (the order of the sample file and of BTK's CatSim catalog).
CATSIM_COLUMNS: tuple[str, ...] = (
    "galtileid", "ra", "dec", "redshift",
    "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn",
    "a_b", "a_d", "b_b", "b_d", "pa_bulge", "pa_disk",
    "u_ab", "g_ab", "r_ab", "i_ab", "z_ab", "y_ab",
)

#: The modelled colours, in the order of every per-colour constant below.
COLOUR_NAMES: tuple[str, ...] = ("u-g", "g-r", "r-i", "i-z", "z-y")

# --------------------------------------------------------------------------------------------
# Fixed choices (not fitted).
# --------------------------------------------------------------------------------------------
I_MAG_BRIGHT = 15.0  # bright end of the counts (sample's brightest: 17.83; 0.09% of rows brighter)
I_MAG_FAINT = 28.0  # faint limit of CatSim OneDegSq (sample's faintest i_ab: 27.93)
I_MAG_PIVOT = 25.0  # pivot magnitude of the linear relations
Z_MIN, Z_MAX = 0.01, 6.0  # redshift truncation
COLOUR_Z_RANGE = (0.1, 5.0)  # redshift range of the colour polynomials (sample: 0.15 - 4.90)
COLOUR_MEAN_DEGREE = 4  # degree of mu(x)
COLOUR_LOGSCALE_DEGREE = 2  # degree of ln s(x)
COLOUR_TAIL_MIN = 0.3  # floor on delta (numerical safety; fitted values 0.4 - 0.8)
# Plausible range of each colour (by hand: Lyman-break drop-outs reach several magnitudes in
# u-g; optical colours of galaxies stay within about -0.7 and +2..3).  Draws outside it are
# redrawn, which removes about 1.4% of the draws (the heavy SHASH tails).
COLOUR_BOUNDS: tuple[tuple[float, float], ...] = (
    (-1.0, 6.0), (-0.7, 3.0), (-0.7, 2.0), (-0.7, 1.5), (-0.7, 1.2))
_MAX_REDRAWS = 200
Q_DISK_MIN = 0.2  # lower end of disk b/a (sample minimum 0.222)
Q_BULGE_MIN = 0.6  # lower end of bulge b/a (sample minimum 0.644)
SIZE_CLIP_SIGMA = 3.0  # log-normal sizes truncated at +-3 sigma
BT_BULGE_DOMINATED = 0.5  # B/T threshold of a bulge-dominated composite
BT_COMPOSITE_MAX = 0.99  # largest B/T of a composite (keeps its disk flux > 0; sample: 0.957)
LOG10_BT_MIN = -3.0  # smallest B/T of a composite: 1e-3 (sample: 0.006)
GALTILEID_OFFSET = 2_200_000_000  # sample ids are 2200002241 - 2217033742
MAX_PATCH_SIDE_DEG = 60.0  # the patch stops growing here (then the density rises)
_CDF_GRID_POINTS = 8193  # tabulation of the i-band CDF

# --------------------------------------------------------------------------------------------
# Fitted constants: fit_parameters() on the 100-row CatSim sample, rounded to 4 significant
# digits.  The estimator of each is named in the module docstring and on the line.
# --------------------------------------------------------------------------------------------
# 1. i-band counts: maximum likelihood (multi-start Nelder-Mead) of the truncated double power law.
COUNTS_BRIGHT_SLOPE = 0.3221  # a: dlog10(N)/dm brighter than the break
COUNTS_FAINT_SLOPE = -0.5671  # b: dlog10(N)/dm fainter than the break (the counts turn over)
COUNTS_BREAK_MAG = 27.0  # m_b (fit: 26.995)
# 2. ln(1 + z) | i: ordinary least squares on i - 25; sigma is the rms residual.
LN1PZ_INTERCEPT = 0.7849  # z0: mean ln(1 + z) at i = 25 (median z = 1.19)
LN1PZ_SLOPE = 0.07502  # z1: per magnitude fainter
LN1PZ_SIGMA = 0.3202  # sz
# 3. colours | z: per-colour joint maximum likelihood (BFGS then Nelder-Mead) of mean polynomial,
#    log-scale polynomial and sinh-arcsinh shape; rows follow COLOUR_NAMES (u-g, g-r, r-i, i-z,
#    z-y); polynomial coefficients in increasing powers of x = ln(1 + z) - ln 2.
COLOUR_MEAN_COEFFS: tuple[tuple[float, ...], ...] = (
    (-0.07963, -0.6465, 2.837, -1.176, 0.3744),
    (0.2422, -1.526, 0.9796, 2.262, -0.4789),
    (0.4656, -1.352, -0.946, 4.163, -2.203),
    (0.2549, -0.05438, -0.8808, -0.1974, 0.8014),
    (0.2008, 0.3303, -0.6439, -1.145, 1.174),
)
COLOUR_LOGSCALE_COEFFS: tuple[tuple[float, ...], ...] = (
    (-3.597, -1.589, 4.52),
    (-2.754, -1.617, 1.184),
    (-2.327, -0.9301, -1.377),
    (-2.433, 0.405, -2.464),
    (-2.393, 0.7656, -1.67),
)
COLOUR_SKEW: tuple[float, ...] = (0.3737, 0.2389, 0.06651, 0.18, 0.1392)  # eps (> 0: red tail)
COLOUR_TAIL: tuple[float, ...] = (0.4258, 0.4785, 0.567, 0.6103, 0.7445)  # delta (< 1: heavy)
# Correlation of the five fitted Gaussians G of the sample (Pearson; the copula's matrix).
COLOUR_CORRELATION: tuple[tuple[float, ...], ...] = (
    (1.0, 0.3804, 0.4277, 0.5115, 0.3656),
    (0.3804, 1.0, 0.4957, 0.4375, 0.4729),
    (0.4277, 0.4957, 1.0, 0.4031, 0.1898),
    (0.5115, 0.4375, 0.4031, 1.0, 0.4487),
    (0.3656, 0.4729, 0.1898, 0.4487, 1.0),
)
# 4. components.
BULGE_HALF_MAG = 24.25  # m50: P(bulge | i) = 1/2 here (logistic maximum likelihood)
BULGE_WIDTH_MAG = 1.874  # w: logistic width (mag); P(bulge) = 0.97 at i = 18, 0.12 at i = 28
PURE_BULGE_FRACTION = 0.03333  # f_pure: bulge rows without a disk / bulge rows (1 / 30)
BULGE_DOMINATED_FRACTION = 0.06897  # f_bd: composites with B/T > 0.5 / composites (2 / 29)
LOG10_BT_MEAN = -1.387  # bt_mu: mean log10(B/T) of the other 27 composites
LOG10_BT_SIGMA = 0.4249  # bt_sigma: their standard deviation (ddof = 0)
# 5. half-light semi-major axes: ordinary least squares of log10(a / arcsec) on i - 25 over the
#    rows with the component (99 disks, 30 bulges); sigma is the rms residual (dex).
LOG10_A_DISK_INTERCEPT = -0.441  # d0: median a_d = 0.36" at i = 25
LOG10_A_DISK_SLOPE = -0.06352  # d1: per magnitude fainter
LOG10_A_DISK_SIGMA = 0.2703  # sd
LOG10_A_BULGE_INTERCEPT = -0.7697  # b0: median a_b = 0.17" at i = 25
LOG10_A_BULGE_SLOPE = -0.0687  # b1
LOG10_A_BULGE_SIGMA = 0.2336  # sb
# 6. axis ratios: maximum likelihood (scipy.stats.beta.fit, loc/scale fixed) of Beta(alpha, beta)
#    for (b/a - q_min) / (1 - q_min).
Q_DISK_ALPHA = 1.158
Q_DISK_BETA = 0.9207
Q_BULGE_ALPHA = 1.036
Q_BULGE_BETA = 0.5388  # bulges are rounder: mass piles up toward b/a = 1
# 8. flux normalisation: ordinary least squares of i + 2.5 log10(fluxnorm_bulge + fluxnorm_disk)
#    on z; sigma is the rms residual (mag).
FLUXNORM_ZP_INTERCEPT = -18.34  # k0
FLUXNORM_ZP_SLOPE = 0.06631  # k1, per unit redshift
FLUXNORM_ZP_SIGMA = 0.5082  # sk
# 9. surface density of i < 28 galaxies (deg^-2): n / bounding-box area, the box widened by the
#    unbiased-range factor ((n + 1) / (n - 1))^2 (about 64 per arcmin^2).
SURFACE_DENSITY_DEG2 = 230500.0


@dataclass(frozen=True)
class CatalogModelParameters:
    """Every fitted constant of the model (defaults: the shipped literals above)."""

    counts_bright_slope: float = COUNTS_BRIGHT_SLOPE
    counts_faint_slope: float = COUNTS_FAINT_SLOPE
    counts_break_mag: float = COUNTS_BREAK_MAG
    ln1pz_intercept: float = LN1PZ_INTERCEPT
    ln1pz_slope: float = LN1PZ_SLOPE
    ln1pz_sigma: float = LN1PZ_SIGMA
    colour_mean_coeffs: tuple[tuple[float, ...], ...] = COLOUR_MEAN_COEFFS
    colour_logscale_coeffs: tuple[tuple[float, ...], ...] = COLOUR_LOGSCALE_COEFFS
    colour_skew: tuple[float, ...] = COLOUR_SKEW
    colour_tail: tuple[float, ...] = COLOUR_TAIL
    colour_correlation: tuple[tuple[float, ...], ...] = COLOUR_CORRELATION
    bulge_half_mag: float = BULGE_HALF_MAG
    bulge_width_mag: float = BULGE_WIDTH_MAG
    pure_bulge_fraction: float = PURE_BULGE_FRACTION
    bulge_dominated_fraction: float = BULGE_DOMINATED_FRACTION
    log10_bt_mean: float = LOG10_BT_MEAN
    log10_bt_sigma: float = LOG10_BT_SIGMA
    log10_a_disk_intercept: float = LOG10_A_DISK_INTERCEPT
    log10_a_disk_slope: float = LOG10_A_DISK_SLOPE
    log10_a_disk_sigma: float = LOG10_A_DISK_SIGMA
    log10_a_bulge_intercept: float = LOG10_A_BULGE_INTERCEPT
    log10_a_bulge_slope: float = LOG10_A_BULGE_SLOPE
    log10_a_bulge_sigma: float = LOG10_A_BULGE_SIGMA
    q_disk_alpha: float = Q_DISK_ALPHA
    q_disk_beta: float = Q_DISK_BETA
    q_bulge_alpha: float = Q_BULGE_ALPHA
    q_bulge_beta: float = Q_BULGE_BETA
    fluxnorm_zp_intercept: float = FLUXNORM_ZP_INTERCEPT
    fluxnorm_zp_slope: float = FLUXNORM_ZP_SLOPE
    fluxnorm_zp_sigma: float = FLUXNORM_ZP_SIGMA
    surface_density_deg2: float = SURFACE_DENSITY_DEG2


DEFAULT_PARAMETERS = CatalogModelParameters()


# --------------------------------------------------------------------------------------------
# Shared pieces of the model.
# --------------------------------------------------------------------------------------------
def _counts_density(mag: np.ndarray, slope_bright: float, slope_faint: float,
                    break_mag: float) -> np.ndarray:
    """Unnormalised dN/dm of the i-band counts at ``mag`` (AB)."""
    dm = np.asarray(mag, dtype=float) - break_mag
    return 1.0 / (10.0 ** (-slope_bright * dm) + 10.0 ** (-slope_faint * dm))


def _counts_cdf(params: CatalogModelParameters, faint: float) -> tuple[np.ndarray, np.ndarray]:
    """Tabulated (magnitude grid, unnormalised cumulative counts) on [I_MAG_BRIGHT, faint]."""
    grid = np.linspace(I_MAG_BRIGHT, faint, _CDF_GRID_POINTS)
    dens = _counts_density(grid, params.counts_bright_slope, params.counts_faint_slope,
                           params.counts_break_mag)
    cum = np.concatenate(([0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))))
    return grid, cum


def _colour_x(redshift: np.ndarray) -> np.ndarray:
    """Colour-model abscissa x = ln(1 + z) - ln 2, with z clipped to COLOUR_Z_RANGE."""
    z = np.clip(np.asarray(redshift, dtype=float), *COLOUR_Z_RANGE)
    return np.log1p(z) - math.log(2.0)


def _poly(coeffs: Sequence[float], x: np.ndarray) -> np.ndarray:
    """Polynomial with coefficients in increasing powers, evaluated at x."""
    return np.polynomial.polynomial.polyval(x, np.asarray(coeffs, dtype=float))


def _truncated_normal(rng: np.random.Generator, mean: np.ndarray | float,
                      sigma: float, low: np.ndarray | float, high: np.ndarray | float,
                      size: int) -> np.ndarray:
    """Normal(mean, sigma) truncated to [low, high], by inverting the CDF (one uniform each)."""
    mean = np.broadcast_to(np.asarray(mean, dtype=float), (size,))
    a = special.ndtr((np.asarray(low, dtype=float) - mean) / sigma)
    b = special.ndtr((np.asarray(high, dtype=float) - mean) / sigma)
    u = rng.random(size)
    p = np.clip(a + u * (b - a), 1e-300, 1.0 - 1e-16)
    return np.clip(mean + sigma * special.ndtri(p), low, high)


def _sinh_arcsinh(g: np.ndarray, eps: float, delta: float) -> np.ndarray:
    """Jones & Pewsey sinh-arcsinh transform of standard normal draws ``g``."""
    return np.sinh((np.arcsinh(g) + eps) / delta)


def _colours_from_gaussians(gauss: np.ndarray, x: np.ndarray,
                            params: CatalogModelParameters) -> np.ndarray:
    """Colours (n, 5) from correlated standard normals (n, 5) at abscissae x (n,)."""
    colours = np.empty_like(gauss)
    for k in range(len(COLOUR_NAMES)):
        shape = _sinh_arcsinh(gauss[:, k], params.colour_skew[k], params.colour_tail[k])
        colours[:, k] = (_poly(params.colour_mean_coeffs[k], x)
                         + np.exp(_poly(params.colour_logscale_coeffs[k], x)) * shape)
    return colours


def _draw_colours(rng: np.random.Generator, x: np.ndarray,
                  params: CatalogModelParameters) -> np.ndarray:
    """Draw the five colours (mag) at abscissae x, redrawing rows outside COLOUR_BOUNDS."""
    chol = np.linalg.cholesky(np.asarray(params.colour_correlation, dtype=float))
    lo, hi = np.asarray(COLOUR_BOUNDS, dtype=float).T
    ncol = len(COLOUR_NAMES)
    colours = _colours_from_gaussians(rng.standard_normal((x.size, ncol)) @ chol.T, x, params)
    bad = np.flatnonzero(np.any((colours < lo) | (colours > hi), axis=1))
    for _ in range(_MAX_REDRAWS):
        if bad.size == 0:
            break
        redraw = _colours_from_gaussians(rng.standard_normal((bad.size, ncol)) @ chol.T,
                                         x[bad], params)
        colours[bad] = redraw
        bad = bad[np.any((redraw < lo) | (redraw > hi), axis=1)]
    return np.clip(colours, lo, hi)  # only rows still out of range after _MAX_REDRAWS


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------
def generate_catsim_catalog(n_rows: int, seed: int = 0, max_i_mag: float | None = None, *,
                            params: CatalogModelParameters | None = None) -> Table:
    """Draw ``n_rows`` CatSim-schema galaxies from the model (see the module docstring).

    Args:
        n_rows: number of rows (>= 1).
        seed: seed of ``np.random.default_rng``; the same seed gives an identical table.
        max_i_mag: optional faint limit on ``i_ab`` (AB mag); the counts are truncated there
            (and at the model's own limit, 28), so the table still has ``n_rows`` rows.
        params: model constants (default: the shipped, fitted ones).

    Returns:
        An astropy Table with :data:`CATSIM_COLUMNS`: ``galtileid`` int64; ``ra``, ``dec``
        (deg); ``redshift``; ``fluxnorm_*``; ``a_b``, ``a_d``, ``b_b``, ``b_d`` (half-light
        semi-axes, arcsec; 0 for an absent component); ``pa_bulge``, ``pa_disk`` (deg, [0, 360));
        ``u_ab`` ... ``y_ab`` (AB mag).  All float columns are float64.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)):
        raise TypeError(f"n_rows must be an integer, got {n_rows!r}")
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    n = int(n_rows)
    p = DEFAULT_PARAMETERS if params is None else params
    faint = I_MAG_FAINT
    if max_i_mag is not None:
        if not np.isfinite(max_i_mag) or max_i_mag <= I_MAG_BRIGHT:
            raise ValueError(f"max_i_mag must be finite and > {I_MAG_BRIGHT}, got {max_i_mag}")
        faint = min(float(max_i_mag), I_MAG_FAINT)
    rng = np.random.default_rng(seed)

    # 1. i-band magnitude: inverse of the tabulated CDF.
    grid, cum = _counts_cdf(p, faint)
    i_mag = np.interp(rng.random(n) * cum[-1], cum, grid)

    # 2. redshift | i.
    ln1pz = _truncated_normal(rng, p.ln1pz_intercept + p.ln1pz_slope * (i_mag - I_MAG_PIVOT),
                              p.ln1pz_sigma, math.log1p(Z_MIN), math.log1p(Z_MAX), n)
    redshift = np.expm1(ln1pz)

    # 3. colours | z (Gaussian copula of sinh-arcsinh marginals, redrawn outside COLOUR_BOUNDS).
    x = _colour_x(redshift)
    colours = _draw_colours(rng, x, p)
    u_g, g_r, r_i, i_z, z_y = colours.T
    r_mag = i_mag + r_i
    g_mag = r_mag + g_r
    u_mag = g_mag + u_g
    z_mag = i_mag - i_z
    y_mag = z_mag - z_y

    # 4. components and bulge-to-total flux ratio.
    p_bulge = special.expit(-(i_mag - p.bulge_half_mag) / p.bulge_width_mag)
    has_bulge = rng.random(n) < p_bulge
    has_disk = ~(has_bulge & (rng.random(n) < p.pure_bulge_fraction))
    bulge_dominated = rng.random(n) < p.bulge_dominated_fraction
    bt_dominated = BT_BULGE_DOMINATED + (BT_COMPOSITE_MAX - BT_BULGE_DOMINATED) * rng.random(n)
    bt_minor = 10.0 ** _truncated_normal(rng, p.log10_bt_mean, p.log10_bt_sigma, LOG10_BT_MIN,
                                         math.log10(BT_BULGE_DOMINATED), n)
    bt = np.where(bulge_dominated, bt_dominated, bt_minor)
    bt = np.where(has_bulge, np.where(has_disk, bt, 1.0), 0.0)

    # 5.-6. sizes and axis ratios (drawn for every row, kept for present components).
    dm = i_mag - I_MAG_PIVOT
    mean_d = p.log10_a_disk_intercept + p.log10_a_disk_slope * dm
    a_d = 10.0 ** _truncated_normal(rng, mean_d, p.log10_a_disk_sigma,
                                    mean_d - SIZE_CLIP_SIGMA * p.log10_a_disk_sigma,
                                    mean_d + SIZE_CLIP_SIGMA * p.log10_a_disk_sigma, n)
    q_d = np.minimum(Q_DISK_MIN + (1.0 - Q_DISK_MIN) * rng.beta(p.q_disk_alpha, p.q_disk_beta, n),
                     1.0)
    mean_b = p.log10_a_bulge_intercept + p.log10_a_bulge_slope * dm
    a_b = 10.0 ** _truncated_normal(rng, mean_b, p.log10_a_bulge_sigma,
                                    mean_b - SIZE_CLIP_SIGMA * p.log10_a_bulge_sigma,
                                    mean_b + SIZE_CLIP_SIGMA * p.log10_a_bulge_sigma, n)
    q_b = np.minimum(
        Q_BULGE_MIN + (1.0 - Q_BULGE_MIN) * rng.beta(p.q_bulge_alpha, p.q_bulge_beta, n), 1.0)

    # 7. one position angle per galaxy.
    pa = rng.uniform(0.0, 360.0, n)

    # 8. flux normalisations.
    zp = p.fluxnorm_zp_intercept + p.fluxnorm_zp_slope * redshift + p.fluxnorm_zp_sigma * \
        rng.standard_normal(n)
    fluxnorm = 10.0 ** (-0.4 * (i_mag - zp))

    # 9. positions: a square patch at the sample's surface density.
    fraction = cum[-1] / _counts_cdf(p, I_MAG_FAINT)[1][-1]
    side = min(math.sqrt(n / (p.surface_density_deg2 * fraction)), MAX_PATCH_SIDE_DEG)
    ra = side * rng.random(n)
    sin_lo = math.sin(math.radians(-side))
    dec = np.degrees(np.arcsin(sin_lo + (0.0 - sin_lo) * rng.random(n)))

    zeros = np.zeros(n)
    columns = {
        "galtileid": GALTILEID_OFFSET + np.arange(n, dtype=np.int64),
        "ra": ra,
        "dec": dec,
        "redshift": redshift,
        "fluxnorm_bulge": np.where(has_bulge, bt * fluxnorm, 0.0),
        "fluxnorm_disk": np.where(has_disk, (1.0 - bt) * fluxnorm, 0.0),
        "fluxnorm_agn": zeros,
        "a_b": np.where(has_bulge, a_b, 0.0),
        "a_d": np.where(has_disk, a_d, 0.0),
        "b_b": np.where(has_bulge, q_b * a_b, 0.0),
        "b_d": np.where(has_disk, q_d * a_d, 0.0),
        "pa_bulge": np.where(has_bulge, pa, 0.0),
        "pa_disk": np.where(has_disk, pa, 0.0),
        "u_ab": u_mag,
        "g_ab": g_mag,
        "r_ab": r_mag,
        "i_ab": i_mag,
        "z_ab": z_mag,
        "y_ab": y_mag,
    }
    table = Table([columns[name] for name in CATSIM_COLUMNS], names=CATSIM_COLUMNS, copy=False)
    table.meta["ORIGIN"] = "simulation.catalog_model"
    table.meta["SEED"] = int(seed)
    return table


# --------------------------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------------------------
def _column(table: Table, name: str) -> np.ndarray:
    return np.asarray(table[name], dtype=float)


def _ols(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares coefficients and the rms residual (maximum-likelihood sigma)."""
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef, float(np.sqrt(np.mean((y - design @ coef) ** 2)))


def _fit_counts(i_mag: np.ndarray) -> tuple[float, float, float]:
    """Maximum likelihood of the truncated double power law (multi-start Nelder-Mead)."""
    grid = np.linspace(I_MAG_BRIGHT, I_MAG_FAINT, _CDF_GRID_POINTS)

    def nll(theta: np.ndarray) -> float:
        a, b, mb = theta
        if not (0.0 < a < 2.0 and -2.0 < b < a and I_MAG_BRIGHT < mb < I_MAG_FAINT + 3.0):
            return 1e12
        dens = _counts_density(grid, a, b, mb)
        norm = np.sum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))
        return float(-np.sum(np.log(_counts_density(i_mag, a, b, mb) / norm)))

    best = None
    for start in [(0.3, 0.0, 25.0), (0.3, -0.3, 26.5), (0.5, 0.1, 24.0), (0.4, -0.5, 27.0)]:
        res = optimize.minimize(nll, np.array(start), method="Nelder-Mead",
                                options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 20000})
        if best is None or res.fun < best.fun:
            best = res
    return tuple(float(v) for v in best.x)  # type: ignore[return-value]


def _fit_colour(colour: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float,
                                                            np.ndarray]:
    """Maximum likelihood of one colour's model; also returns the sample's fitted ``G``."""
    vm = np.vander(x, COLOUR_MEAN_DEGREE + 1, increasing=True)
    vs = np.vander(x, COLOUR_LOGSCALE_DEGREE + 1, increasing=True)
    nm, ns = vm.shape[1], vs.shape[1]
    coef0, rms = _ols(vm, colour)
    start = np.concatenate([coef0, [math.log(rms)], np.zeros(ns - 1), [0.0, 0.0]])

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        delta = COLOUR_TAIL_MIN + float(math.exp(theta[-1]))
        return theta[:nm], theta[nm:nm + ns], float(theta[-2]), delta

    def nll(theta: np.ndarray) -> float:
        cm, cs, eps, delta = unpack(theta)
        log_s = vs @ cs
        if np.any(np.abs(log_s) > 20) or not delta < 20:
            return 1e12
        w = (colour - vm @ cm) / np.exp(log_s)
        asw = np.arcsinh(w)
        s = np.sinh(delta * asw - eps)
        # log density of the sinh-arcsinh variable, plus the Jacobian of the scale.
        logpdf = (math.log(delta) + 0.5 * np.log1p(s * s) - 0.5 * np.log1p(w * w)
                  - 0.5 * s * s - 0.5 * math.log(2 * math.pi) - log_s)
        return float(-np.sum(logpdf))

    res = optimize.minimize(nll, start, method="BFGS", options={"gtol": 1e-7, "maxiter": 10000})
    res = optimize.minimize(nll, res.x, method="Nelder-Mead",
                            options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 40000,
                                     "maxfev": 40000})
    cm, cs, eps, delta = unpack(res.x)
    w = (colour - vm @ cm) / np.exp(vs @ cs)
    gauss = np.sinh(delta * np.arcsinh(w) - eps)
    return cm, cs, eps, delta, gauss


def _fit_beta(q: np.ndarray, q_min: float) -> tuple[float, float]:
    """Maximum likelihood of Beta(alpha, beta) for (q - q_min) / (1 - q_min)."""
    u = np.clip((q - q_min) / (1.0 - q_min), 1e-4, 1.0 - 1e-4)
    alpha, beta, _, _ = stats.beta.fit(u, floc=0.0, fscale=1.0)
    return float(alpha), float(beta)


def fit_parameters(table: Table) -> CatalogModelParameters:
    """Fit every model constant to a CatSim-schema table (how the shipped literals were made).

    The estimators are those named in the module docstring.  The table needs the CatSim columns;
    rows are used as they are (no cuts), so pass a magnitude-complete sample with ``i_ab < 28``.
    """
    missing = [c for c in CATSIM_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(f"table lacks CatSim column(s): {', '.join(missing)}")
    i_mag = _column(table, "i_ab")
    z = _column(table, "redshift")
    fb, fd = _column(table, "fluxnorm_bulge"), _column(table, "fluxnorm_disk")
    has_b, has_d = fb > 0, fd > 0
    if np.any(i_mag > I_MAG_FAINT) or np.any(i_mag < I_MAG_BRIGHT):
        raise ValueError(f"i_ab outside the model's range [{I_MAG_BRIGHT}, {I_MAG_FAINT}]")
    dm = i_mag - I_MAG_PIVOT
    ones = np.ones_like(dm)

    a, b, mb = _fit_counts(i_mag)
    (z0, z1), sz = _ols(np.c_[ones, dm], np.log1p(z))

    x = _colour_x(z)
    mags = {band: _column(table, f"{band}_ab") for band in "ugrizy"}
    colour_values = [mags["u"] - mags["g"], mags["g"] - mags["r"], mags["r"] - mags["i"],
                     mags["i"] - mags["z"], mags["z"] - mags["y"]]
    mean_coeffs, scale_coeffs, skews, tails, gaussians = [], [], [], [], []
    for colour in colour_values:
        cm, cs, eps, delta, gauss = _fit_colour(colour, x)
        mean_coeffs.append(tuple(float(v) for v in cm))
        scale_coeffs.append(tuple(float(v) for v in cs))
        skews.append(eps)
        tails.append(delta)
        gaussians.append(gauss)
    corr = np.corrcoef(np.vstack(gaussians))

    def logistic_nll(theta: np.ndarray) -> float:
        prob = special.expit(-(i_mag - theta[0]) / math.exp(theta[1]))
        prob = np.clip(prob, 1e-12, 1 - 1e-12)
        return float(-np.sum(np.where(has_b, np.log(prob), np.log1p(-prob))))

    res = optimize.minimize(logistic_nll, np.array([26.0, 0.0]), method="Nelder-Mead",
                            options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 10000})
    m50, width = float(res.x[0]), float(math.exp(res.x[1]))

    composite = has_b & has_d
    bt = fb / (fb + fd)
    f_pure = float(np.sum(has_b & ~has_d) / max(np.sum(has_b), 1))
    dominated = composite & (bt > BT_BULGE_DOMINATED)
    f_bd = float(np.sum(dominated) / max(np.sum(composite), 1))
    minor = np.log10(bt[composite & ~dominated])
    bt_mu, bt_sigma = float(np.mean(minor)), float(np.std(minor))

    (d0, d1), sd = _ols(np.c_[ones, dm][has_d], np.log10(_column(table, "a_d")[has_d]))
    (b0, b1), sb = _ols(np.c_[ones, dm][has_b], np.log10(_column(table, "a_b")[has_b]))
    qd_a, qd_b = _fit_beta(_column(table, "b_d")[has_d] / _column(table, "a_d")[has_d],
                           Q_DISK_MIN)
    qb_a, qb_b = _fit_beta(_column(table, "b_b")[has_b] / _column(table, "a_b")[has_b],
                           Q_BULGE_MIN)

    zp_obs = i_mag + 2.5 * np.log10(fb + fd)
    (k0, k1), sk = _ols(np.c_[ones, z], zp_obs)

    ra, dec = _column(table, "ra"), _column(table, "dec")
    n = len(table)
    box = (np.ptp(ra) * math.cos(math.radians(float(np.mean(dec)))) * np.ptp(dec))
    density = n / (box * ((n + 1) / (n - 1)) ** 2) if n > 1 and box > 0 else float("nan")

    return CatalogModelParameters(
        counts_bright_slope=a, counts_faint_slope=b, counts_break_mag=mb,
        ln1pz_intercept=float(z0), ln1pz_slope=float(z1), ln1pz_sigma=sz,
        colour_mean_coeffs=tuple(mean_coeffs), colour_logscale_coeffs=tuple(scale_coeffs),
        colour_skew=tuple(skews), colour_tail=tuple(tails),
        colour_correlation=tuple(tuple(float(v) for v in row) for row in corr),
        bulge_half_mag=m50, bulge_width_mag=width,
        pure_bulge_fraction=f_pure, bulge_dominated_fraction=f_bd,
        log10_bt_mean=bt_mu, log10_bt_sigma=bt_sigma,
        log10_a_disk_intercept=float(d0), log10_a_disk_slope=float(d1), log10_a_disk_sigma=sd,
        log10_a_bulge_intercept=float(b0), log10_a_bulge_slope=float(b1), log10_a_bulge_sigma=sb,
        q_disk_alpha=qd_a, q_disk_beta=qd_b, q_bulge_alpha=qb_a, q_bulge_beta=qb_b,
        fluxnorm_zp_intercept=float(k0), fluxnorm_zp_slope=float(k1), fluxnorm_zp_sigma=sk,
        surface_density_deg2=float(density),
    )


def _round_sig(value: object, digits: int = 4) -> object:
    """Round floats (also inside nested tuples) to ``digits`` significant digits."""
    if isinstance(value, tuple):
        return tuple(_round_sig(v, digits) for v in value)
    if isinstance(value, float) and value != 0.0 and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def format_parameters(params: CatalogModelParameters, digits: int = 4) -> str:
    """The constants as ``NAME = literal`` lines (the form they take in this module)."""
    return "\n".join(f"{name.upper()} = {_round_sig(value, digits)!r}"
                     for name, value in asdict(params).items())


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``--calibrate PATH`` prints fitted constants; ``--n N --seed S --out FILE`` writes FITS."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.catalog_model",
        description="Parametric CatSim galaxy-population model: calibrate it or draw a catalog.")
    parser.add_argument("--calibrate", metavar="PATH", type=Path,
                        help="fit the model to a CatSim-schema table and print the constants")
    parser.add_argument("--n", type=int, default=None, help="number of rows to draw")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-i-mag", type=float, default=None, help="faint limit on i_ab")
    parser.add_argument("--out", type=Path, default=None, help="output FITS file")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = parser.parse_args(argv)

    if args.calibrate is not None:
        if args.out is not None or args.n is not None:
            parser.error("--calibrate cannot be combined with --n/--out")
        if not args.calibrate.is_file():
            parser.error(f"no such file: {args.calibrate}")
        table = Table.read(args.calibrate)
        print(f"# fitted to {len(table)} rows of {args.calibrate}")
        print(format_parameters(fit_parameters(table)))
        return 0
    if args.out is None or args.n is None:
        parser.error("give --calibrate PATH, or --n N and --out FILE.fits")
    if args.n < 1:
        parser.error("--n must be >= 1")
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    table = generate_catsim_catalog(args.n, seed=args.seed, max_i_mag=args.max_i_mag)
    table.write(args.out, format="fits", overwrite=args.force)
    print(f"wrote {len(table)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
