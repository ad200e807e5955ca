"""Typed results that cross module boundaries, and their one JSON form.

The evaluation report (:class:`EvaluationResult`), the shear calibration (:class:`ShearResult`)
and the DES validation (:class:`DESValidationResult`) are built as these objects, written to
their ``metrics.json`` by :meth:`to_dict` and read back by :meth:`from_dict`: no module parses
another's nested dicts. Numbers that could not be measured are NaN in memory and ``null`` in JSON
(so ``None`` once read back); every renderer prints both as a dash.

Ellipticities are distortions in the pixel frame; a :class:`LineStats` is the OLS fit of
predicted on true values of one component (slope < 1: bias toward round shapes). Shear biases are
against the applied shear: <e> = A g + c per component, m = A / A_truth - 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

from pydantic import TypeAdapter

from evaluation.report_io import jsonable, read_metrics

Number = Optional[float]
"""A measured value: NaN (in memory) or None (read back from JSON) when not measurable."""

T = TypeVar("T")


def _from_dict(cls: type[T], data: Any, what: str) -> T:
    """``cls`` (a dataclass, nested ones included) built from its :func:`to_plain` form."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except Exception as exc:  # pydantic's ValidationError, or a non-mapping
        first = str(exc).splitlines()
        raise ValueError(f"{what} is not a valid {cls.__name__}: "
                         f"{' '.join(first[:3])}") from exc


def to_plain(value: Any) -> Any:
    """The JSON form of a result: dataclasses as dicts in field order (an optional part left at
    its default None is left out), NaN as None, numpy values as Python ones."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (getattr(value, f.name) is None and f.default is None)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return jsonable(value)


class StoredResult:
    """A result with one JSON form: :meth:`to_dict` writes it, :meth:`from_dict` reads it back
    (a clear ValueError naming :attr:`what` when the data do not fit)."""

    what: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        return _from_dict(cls, data, cls.what)


# -- ellipticity accuracy ------------------------------------------------------------------------
@dataclass(frozen=True)
class LineStats:
    """One component (e1, e2, or the modulus) predicted against truth: OLS slope and intercept
    (with standard errors), RMSE, bias (mean offset) and scatter (std) of pred - true."""

    slope: Number
    slope_err: Number
    intercept: Number
    intercept_err: Number
    rmse: Number
    bias: Number
    scatter: Number


@dataclass(frozen=True)
class ModulusStats(LineStats):
    """:class:`LineStats` of abs(e), with the mean moduli and their ratio (pred / true)."""

    mean_true: Number
    mean_pred: Number
    mean_ratio: Number


@dataclass(frozen=True)
class EllipticityStats:
    """Every accuracy number of one estimator on one sample (``n_valid`` of ``n`` measured)."""

    n: int
    n_valid: int
    e1: LineStats
    e2: LineStats
    e: ModulusStats


@dataclass(frozen=True)
class EllipticityBreakdown:
    """:class:`EllipticityStats` overall, per blend multiplicity and per target-magnitude bin;
    ``vs_hsm_truth``: an HSM estimator against HSM of the clean truth."""

    all: EllipticityStats
    by_n_galaxies: dict[str, EllipticityStats]
    by_magnitude: dict[str, EllipticityStats]
    vs_hsm_truth: Optional[EllipticityStats] = None


@dataclass(frozen=True)
class Fidelity:
    """Image fidelity of one model's reconstructions: SSIM (per image, averaged over bands;
    and per band) and cosine similarity, on ``n`` images."""

    n: int
    ssim_mean: Number
    ssim_median: Number
    ssim_std: Number
    ssim_per_band: dict[str, Number]
    cosine_mean: Number
    cosine_median: Number
    cosine_std: Number


# -- shear calibration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShearFit:
    """One estimator, one component: response A, additive bias c and multiplicative bias m
    against the applied shear (1-sigma bootstrap errors), the twin pairs it rests on, and m
    against other references (``m_vs``: {reference: {"m", "m_err"}})."""

    A: Number
    A_err: Number
    c: Number
    c_err: Number
    m: Number
    m_err: Number
    n_pairs: int
    n_pairs_per_population: list[int]
    m_vs: dict[str, dict[str, Number]] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentCalibration:
    """The fits of one shear component over the populations with the other component 0."""

    g_values: list[float]
    estimators: dict[str, ShearFit]


@dataclass(frozen=True)
class ShearCalibration:
    """Both components' fits; m is taken against ``reference`` (its own m is 0)."""

    reference: str
    n_bootstrap: int
    resampling: str
    g1: ComponentCalibration
    g2: ComponentCalibration

    def component(self, name: str) -> ComponentCalibration:
        """``"g1"`` or ``"g2"``."""
        return {"g1": self.g1, "g2": self.g2}[name]


@dataclass
class ShearResult(StoredResult):
    """The shear calibration of a run: how it was measured (``meta``: populations, scenes,
    bootstrap, simulation, command), the estimators, the fits and the per-population means."""

    meta: dict[str, Any]
    estimators: dict[str, str]
    calibration: ShearCalibration
    population_means: list[dict[str, Any]]
    figure: str
    what: ClassVar[str] = "the shear result"


# -- the evaluation report -----------------------------------------------------------------------
@dataclass
class EvaluationResult(StoredResult):
    """Everything the evaluation report prints (and its ``metrics.json`` holds): fidelity of
    the models (t1, t2), flux and size residuals, ellipticity accuracy of every estimator, and the
    shear calibration once measured."""

    meta: dict[str, Any]
    conventions: dict[str, Any]
    reference_values: dict[str, float]
    stages: dict[str, str]
    estimators: dict[str, str]
    fidelity: dict[str, Fidelity]
    flux_size: dict[str, Any]
    ellipticity: dict[str, EllipticityBreakdown]
    figures: dict[str, str]
    shear: Optional[ShearResult] = None
    what: ClassVar[str] = "the evaluation metrics"

    @classmethod
    def read(cls, out: str | Path) -> EvaluationResult | None:
        """The report in ``out/metrics.json``; None when there is no report (yet)."""
        metrics = read_metrics(out)
        return cls.from_dict(metrics) if set(metrics) - {"shear"} else None


# -- the DES validation --------------------------------------------------------------------------
@dataclass(frozen=True)
class DESEstimator:
    """One estimator against the im3shape catalog."""

    description: str
    stats: EllipticityStats

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, **to_plain(self.stats)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DESEstimator:
        data = dict(data)
        return cls(data.pop("description"), _from_dict(EllipticityStats, data, "a DES estimator"))


@dataclass
class DESValidationResult:
    """What the DES validation did (settings, counts, cuts, skipped objects with reasons,
    notes) and, when objects were validated, each estimator against im3shape."""

    meta: dict[str, Any]
    settings: dict[str, Any]
    counts: dict[str, int]
    cuts: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    skipped_by_reason: dict[str, int]
    orientation: dict[str, int]
    notes: list[str]
    figures: dict[str, str]
    estimators: dict[str, DESEstimator] = field(default_factory=dict)
    normalization: Optional[dict[str, Any]] = None
    real_pixels: Optional[dict[str, Any]] = None
    """The metrics of the run on real DECam frames (``des.real_frames``), when there was one."""

    def to_dict(self) -> dict[str, Any]:
        plain = to_plain(self)
        plain["estimators"] = {n: e.to_dict() for n, e in self.estimators.items()}
        return plain

    @classmethod
    def from_dict(cls, data: Any) -> DESValidationResult:
        data = dict(data)
        estimators = {n: DESEstimator.from_dict(e) for n, e in data.pop("estimators", {}).items()}
        result = _from_dict(cls, data, "the DES validation metrics")
        result.estimators = estimators
        return result

    @classmethod
    def read(cls, out: str | Path) -> DESValidationResult | None:
        """The validation in ``out/metrics.json``; None when there is none."""
        metrics = read_metrics(out)
        return cls.from_dict(metrics) if metrics else None
