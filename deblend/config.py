"""The one configuration system of deblend: YAML files over embedded defaults.

A config is a YAML mapping with one section per part of the pipeline (``simulation``,
``model``, ``training``, ``evaluation``, ``shear``, ``des``). Every key has an embedded
default, so an empty file (or no file) is a valid config. Unknown keys and values of the
wrong type are errors whose message names the key, e.g. ``simulation.max_neighbours``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or value is unreadable, unknown or malformed; the message names the key."""


@dataclass(frozen=True)
class SimulationConfig:
    """How scenes are drawn with BTK (SPEC section 2). Lengths in arcsec, magnitudes AB."""

    survey: str = "LSST"
    """Survey name known to surveycodex/BTK: "LSST" (u g r i z y, 0.2") or "DES" (g r i z Y)."""
    catalog: Optional[str] = None
    """Path of a CatSim-schema FITS/ASCII table; None uses the embedded statistical model."""
    catalog_rows: int = 200_000
    """Rows drawn from the embedded catalog model (ignored when ``catalog`` is set)."""
    catalog_seed: int = 0
    stamp_pixels: int = 45
    min_neighbours: int = 0
    max_neighbours: int = 2
    neighbour_shift: tuple[float, float] = (1.0, 4.0)
    """Radial range (arcsec) of the neighbours' offsets from the target; uniform in radius."""
    target_max_mag: float = 25.3
    """Targets are drawn from galaxies brighter than this in ``ref_band``."""
    neighbour_max_mag: float = 27.0
    ref_band: str = "i"
    """Band that defines 'brightest' and the magnitude cuts."""
    label_bands: tuple[str, ...] = ("r", "i", "z")
    """Bands summed (in electrons) to form the image whose moments give the e1/e2 labels."""
    noise: Literal["all", "background", "galaxy", "none"] = "all"
    random_rotation: bool = True
    """Rotate every galaxy by a uniform random position angle (BTK's augment_data)."""
    shear: tuple[float, float] = (0.0, 0.0)
    """Constant reduced shear (g1, g2) applied to every galaxy before the PSF."""
    rotated_twins: bool = False
    """Follow every scene by its 90-degree-rotated twin (same galaxies, rotated together)."""
    n_samples: int = 2000
    shard_size: int = 500
    btk_batch_size: int = 50
    val_fraction: float = 0.1
    """Fraction of the samples held out for validation (the last ones)."""
    calibration_fraction: float = 0.1
    """Fraction held out, between training and validation, to measure the stage-3 regressor's
    response (:mod:`deblend.response`); no network trains on it and no report evaluates on it."""
    seed: int = 0
    norm_beta: float = 2.5
    """beta of the SPEC 3 normalisation tanh(asinh(beta x / <max>))."""
    norm_reference: Literal["blend", "noisy", "clean"] = "blend"
    """Image set whose per-band mean image maximum (training split) sets the constants."""


@dataclass(frozen=True)
class ModelConfig:
    """Network hyper-parameters (SPEC section 4)."""

    latent_dim: int = 32
    regressor_hidden: tuple[int, ...] = (128, 64, 32)
    regressor_dropout: float = 0.1


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings shared by the three stages (SPEC section 5)."""

    batch_size: int = 64
    epochs: int = 40
    stage1_epochs: Optional[int] = None
    stage2_epochs: Optional[int] = None
    stage3_epochs: Optional[int] = None
    learning_rate: float = 1e-4
    beta_kl: float = 1e-3
    min_target_e: float = 0.0
    """Train only on targets whose label |e| exceeds this (the report used 0.1)."""
    dihedral_augmentation: bool = True
    """Show every training sample in a random one of the stamp's 8 symmetric views (90-degree
    rotations and flips, :mod:`deblend.symmetry`); targets and labels follow exactly."""
    stage2_init: Literal["stage1", "scratch"] = "stage1"
    early_stopping_patience: Optional[int] = None
    num_workers: int = 0
    device: str = "auto"
    mixed_precision: bool = False
    seed: int = 0

    def epochs_for(self, stage: str) -> int:
        """Number of epochs of ``stage`` ("stage1", "stage2" or "stage3")."""
        specific = getattr(self, f"{stage}_epochs")
        return self.epochs if specific is None else specific


@dataclass(frozen=True)
class EvaluationConfig:
    """Validation-set evaluation settings."""

    max_samples: Optional[int] = None
    """Evaluate at most this many validation samples (the first ones); None: all of them."""
    gallery_size: int = 8
    batch_size: int = 256
    mag_edges: tuple[float, ...] = (22.0, 23.0, 24.0)
    """Interior edges of the target-magnitude bins (``simulation.ref_band``) of the breakdowns."""
    seed: int = 0
    """Seed of the gallery's choice of samples."""


@dataclass(frozen=True)
class ShearConfig:
    """Shear-calibration populations (SPEC section 6)."""

    g_values: tuple[float, ...] = (-0.02, 0.0, 0.02)
    n_scenes: int = 2000
    """Scenes per applied shear (twins included)."""
    bootstrap: int = 200
    seed: int = 1000
    shared_galaxies: bool = True
    """Every shear population draws the same scenes (same seed); only the shear differs, so the
    shape and noise of the galaxies largely cancel in the response (common random numbers)."""
    chunk_scenes: int = 200
    """Scenes simulated and cached per chunk (even); an interrupted run resumes chunk by chunk."""


@dataclass(frozen=True)
class DESConfig:
    """DES validation settings (SPEC section 7)."""

    min_snr: float = 20.0
    """Catalog cut: keep snr_w > min_snr."""
    require_error_flag_zero: bool = True
    require_info_flag_zero: bool = True
    u_strategy: Literal["zeros", "g_copy", "g_extrapolate"] = "zeros"
    """How the model's u band (absent from DES) is filled; see des_validation.prepare."""
    u_over_g: Optional[float] = None
    """u/g flux ratio for g_extrapolate; None measures it on the training data (flux labels)."""
    resample: bool = True
    """Resample DES pixels to the model's pixel scale (GalSim) before the crop."""
    normalization: Literal["des", "training"] = "des"
    catalog_ellipticity: Literal["shear", "distortion"] = "shear"
    """Convention of the catalog's e_1/e_2: im3shape's |e| = (a-b)/(a+b) ("shear") is converted
    to the distortion (a^2-b^2)/(a^2+b^2) that deblend's labels and regressor use."""
    n_standin: int = 300
    standin_seed: int = 2000
    standin_target_max_mag: float = 23.5
    """Target magnitude limit (ref band) of the DES-like stand-in: a shape catalog's depth."""


@dataclass(frozen=True)
class Config:
    """A whole pipeline configuration."""

    name: str = "default"
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    shear: ShearConfig = field(default_factory=ShearConfig)
    des: DESConfig = field(default_factory=DESConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-serialisable) nested dict; tuples become lists."""
        return plain(dataclasses.asdict(self))

    def replace(self, section: str, **changes: Any) -> "Config":
        """A copy with some keys of one section changed (validated like a file)."""
        data = self.to_dict()
        data[section].update(changes)
        return config_from_dict(data)


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (JSON/YAML-ready)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation and convert lists to tuples."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}' may not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {annotation!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take defaults)."""
    config = _build(Config, data or {}, "")
    validate(config)
    return config


def load_config(path: str | Path | None) -> Config:
    """Read a YAML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return config_from_dict({})
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def validate(config: Config) -> None:
    """Check value ranges that types alone cannot express."""
    sim = config.simulation
    checks = [
        (sim.stamp_pixels >= 9, "simulation.stamp_pixels", "must be >= 9"),
        (0 <= sim.min_neighbours <= sim.max_neighbours, "simulation.min_neighbours",
         "must satisfy 0 <= min_neighbours <= max_neighbours"),
        (0 <= sim.neighbour_shift[0] <= sim.neighbour_shift[1], "simulation.neighbour_shift",
         "must be [min, max] with 0 <= min <= max"),
        (sim.n_samples >= 1, "simulation.n_samples", "must be >= 1"),
        (sim.shard_size >= 1, "simulation.shard_size", "must be >= 1"),
        (sim.btk_batch_size >= 1, "simulation.btk_batch_size", "must be >= 1"),
        (0.0 <= sim.val_fraction < 1.0, "simulation.val_fraction", "must be in [0, 1)"),
        (0.0 <= sim.calibration_fraction < 1.0 - sim.val_fraction,
         "simulation.calibration_fraction", "must be in [0, 1 - simulation.val_fraction)"),
        (sim.norm_beta > 0, "simulation.norm_beta", "must be > 0"),
        (all(abs(g) < 1 for g in sim.shear), "simulation.shear", "components must satisfy |g| < 1"),
        (not sim.rotated_twins or sim.shard_size % 2 == 0, "simulation.shard_size",
         "must be even when rotated_twins is true"),
        (not sim.rotated_twins or sim.btk_batch_size % 2 == 0, "simulation.btk_batch_size",
         "must be even when rotated_twins is true"),
        (config.model.latent_dim >= 1, "model.latent_dim", "must be >= 1"),
        (config.training.batch_size >= 1, "training.batch_size", "must be >= 1"),
        (config.training.learning_rate > 0, "training.learning_rate", "must be > 0"),
        (config.training.beta_kl >= 0, "training.beta_kl", "must be >= 0"),
        (config.shear.n_scenes >= 2, "shear.n_scenes", "must be >= 2"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
