"""The one configuration system of deblend: YAML files over embedded defaults.

A config is a YAML mapping with one section per part of the pipeline (``simulation``,
``model``, ``training``, ``evaluation``, ``shear``, ``metacal``, ``map``, ``dense_fields``,
``des``). Every key has an embedded
default, so an empty file (or no file) is a valid config. Each section is a frozen pydantic
dataclass: pydantic does the type checking (strictly: a bool or a string is not a number; an
integer is accepted for a float and stored as a float; YAML lists become tuples), and each
section's ``_check_ranges`` validator checks what types alone cannot express. Unknown keys,
wrong types and out-of-range values raise a :class:`ConfigError` whose one-line message names
the dotted key, e.g. ``simulation.max_neighbours``, whether the config comes from a file
(:func:`load_config`), a dict (:func:`config_from_dict`, :meth:`Config.replace`) or is built
directly (``SimulationConfig(...)``, ``dataclasses.replace``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import pydantic.dataclasses
import yaml
from pydantic import (
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from deblend.core.arguments import (
    METACAL_DELTA,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    POSTERIOR_SAMPLES,
    VIEWS,
    NumberRule,
)


class ConfigError(ValueError):
    """A config file or value is unreadable, unknown or malformed; the message names the key."""


_SURVEY_BANDS = {"LSST": ("u", "g", "r", "i", "z", "y"), "DES": ("g", "r", "i", "z", "Y")}
"""Bands of the surveys known to deblend (as surveycodex names them). The band keys of a config
with another survey name are not checked here: simulation.surveys refuses the survey itself."""

_PYDANTIC = ConfigDict(extra="forbid")


def _section(prefix: str) -> Callable[[type], type]:
    """Class decorator: a frozen pydantic dataclass whose errors are :class:`ConfigError` s.

    ``prefix`` ("simulation", ...; "" for the whole :class:`Config`) is prepended to the key
    named by the errors of a direct construction (``SimulationConfig(n_samples="x")``).
    """

    def decorate(cls: type) -> type:
        cls = pydantic.dataclasses.dataclass(frozen=True, config=_PYDANTIC)(cls)
        validated_init = cls.__init__

        @functools.wraps(validated_init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                validated_init(self, *args, **kwargs)
            except ValidationError as exc:
                raise _config_error(exc, cls, prefix) from None

        cls.__init__ = __init__
        return cls

    return decorate


def _require(checks: list[tuple[bool, str, str]]) -> None:
    """Raise for the first ``(ok, key, message)`` that is not ok."""
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")


def _obeys(rule: NumberRule, value: Any, key: str) -> tuple[bool, str, str]:
    """A :func:`_require` check by the library's own rule (:mod:`deblend.core.arguments`), for
    the keys that a public function's argument mirrors: one rule for both."""
    return rule.accepts(value), key, f"must be {rule.says}"


def _target_fwhm(value: float | tuple[float, ...] | None, key: str) -> tuple[bool, str, str]:
    """A :func:`_require` check of a target PSF FWHM key: None, or positive values (arcsec)."""
    return value is None or all(v > 0 for v in as_tuple(value)), key, "must be positive (arcsec)"


def _at_least(value: int | None, minimum: int) -> bool:
    """``value >= minimum``, or ``value`` is None (the key's "not set")."""
    return value is None or value >= minimum


@_section("simulation.conditions")
class ConditionsConfig:
    """Observing conditions drawn per training scene (:mod:`simulation.conditions`).

    Each scene draws an r-band PSF FWHM uniformly in ``psf_fwhm`` (arcsec, the PSF profile
    without the pixel); every band's PSF is the survey's dilated by that FWHM over the survey's
    r-band FWHM, times a per-band factor uniform in 1 +- ``psf_fwhm_band_scatter``. The PSF is
    then sheared by a reduced shear g_psf uniform in the disc |g_psf| <= ``psf_g_max`` (pixel
    frame, one per scene, every band). Depth: a number of survey years log-uniform in
    ``depth_years`` per scene, times a per-band factor exp(U(-s, s)), s =
    ``depth_band_scatter``; exposure time, source counts and sky level all scale as years over
    the survey's full depth (LSST 10 years, DES 6). Each band is missing with probability
    ``band_missing`` (never all: one is then kept at random); a missing band is drawn as any
    other and flagged unavailable, for training to fill as inference does. A sky-subtraction
    residual, a constant of a level uniform in +-``sky_residual`` sky sigma plus a gradient of
    that level per half stamp in a uniform direction, is added per band to the noisy images (not
    to the clean target). Rotated twins share their conditions.
    """

    psf_fwhm: tuple[StrictFloat, StrictFloat] = (0.6, 1.2)
    psf_fwhm_band_scatter: StrictFloat = 0.05
    psf_g_max: StrictFloat = 0.05
    depth_years: tuple[StrictFloat, StrictFloat] = (1.0, 10.0)
    depth_band_scatter: StrictFloat = 0.2
    band_missing: StrictFloat = 0.1
    sky_residual: StrictFloat = 0.0

    @model_validator(mode="after")
    def _check_ranges(self) -> ConditionsConfig:
        _require([
            (0 < self.psf_fwhm[0] <= self.psf_fwhm[1], "simulation.conditions.psf_fwhm",
             "must be [min, max] arcsec with 0 < min <= max"),
            (0 <= self.psf_fwhm_band_scatter < 0.5, "simulation.conditions.psf_fwhm_band_scatter",
             "must be in [0, 0.5)"),
            (0 <= self.psf_g_max < 0.5, "simulation.conditions.psf_g_max", "must be in [0, 0.5)"),
            (0 < self.depth_years[0] <= self.depth_years[1], "simulation.conditions.depth_years",
             "must be [min, max] years with 0 < min <= max"),
            (0 <= self.depth_band_scatter <= 2, "simulation.conditions.depth_band_scatter",
             "must be in [0, 2]"),
            (0 <= self.band_missing < 1, "simulation.conditions.band_missing",
             "must be in [0, 1)"),
            (0 <= self.sky_residual <= 5, "simulation.conditions.sky_residual",
             "must be in [0, 5] sky sigma"),
        ])
        return self


@_section("simulation.morphology")
class MorphologyConfig:
    """Galaxy morphologies beyond CatSim's smooth bulge + disk (:mod:`simulation.morphology`).

    Per galaxy: a fraction of its disk's flux, uniform in ``knot_fraction``, moves into
    star-forming knots (``galsim.RandomKnots``, a count uniform in ``n_knots``, spread like the
    disk and sheared with it), and its bulge (with its AGN) sits off the disk's centre by up to
    ``bulge_offset`` disk half-light radii (uniform in the disc, in the galaxy's frame, so that it
    turns with the galaxy).

    With ``cosmos_fraction`` > 0, that fraction of the galaxies brighter than the COSMOS fits'
    limit (F814W ~ 25.2, matched to the ``ref_band`` magnitude) takes instead the Sersic or
    bulge + disk profile fitted to a real COSMOS galaxy of about its magnitude: index, size and
    ellipticity come jointly from one fit, the flux and colour stay the CatSim row's.

    With ``real_fraction`` > 0, that fraction of the galaxies is drawn instead from the real HST
    images of the GalSim real-galaxy catalogue ``real_catalog`` (``galsim.RealGalaxy``: the
    image deconvolved by its HST PSF, background pedestal removed, HST noise kept), but only
    from its even rows: the odd rows are held out for the conditions benchmark's real-galaxy
    row (``simulation.galsim_population.real_galaxy_split``). Flux and colour stay the CatSim
    row's; a galaxy is never drawn more than 1 mag brighter than its catalogue magnitude.
    """

    knot_fraction: tuple[StrictFloat, StrictFloat] = (0.0, 0.3)
    n_knots: tuple[StrictInt, StrictInt] = (10, 100)
    bulge_offset: StrictFloat = 0.1
    cosmos_fraction: StrictFloat = 0.0
    cosmos_catalog: StrictStr | None = None
    """GalSim parametric-fit catalogue (the ``*_fits.fits`` schema: ``sersicfit``, ``bulgefit``,
    ``hlr``, ``use_bulgefit``, ``mag_auto``, ``ra``/``dec``); None: the ~81,000 COSMOS fits
    packaged with fpfs (``pip install -e .[cosmos]``)."""
    cosmos_withheld: StrictStr | None = None
    """A GalSim real-galaxy catalogue (``RA``/``DEC`` columns, degrees) whose galaxies no training
    scene may show: fits within 1" of any of them are left out (e.g. the 100 COSMOS galaxies
    the conditions benchmark measures on)."""
    real_fraction: StrictFloat = 0.0
    real_catalog: StrictStr | None = None
    """GalSim real-galaxy catalogue (``real_galaxy_catalog_*.fits``, its image and PSF files
    beside it) whose training half ``real_fraction`` draws from."""

    @model_validator(mode="after")
    def _check_ranges(self) -> MorphologyConfig:
        _require([
            (0 <= self.knot_fraction[0] <= self.knot_fraction[1] <= 1,
             "simulation.morphology.knot_fraction", "must be [min, max] with 0 <= min <= max <= 1"),
            (1 <= self.n_knots[0] <= self.n_knots[1], "simulation.morphology.n_knots",
             "must be [min, max] with 1 <= min <= max"),
            (0 <= self.bulge_offset <= 2, "simulation.morphology.bulge_offset",
             "must be in [0, 2] disk half-light radii"),
            (0 <= self.cosmos_fraction <= 1, "simulation.morphology.cosmos_fraction",
             "must be in [0, 1]"),
            (0 <= self.real_fraction <= 1, "simulation.morphology.real_fraction",
             "must be in [0, 1]"),
            (self.real_fraction == 0 or self.real_catalog is not None,
             "simulation.morphology.real_catalog", "must be set when real_fraction > 0"),
        ])
        return self


@_section("simulation.bright")
class BrightTargetsConfig:
    """Bright, large targets (:class:`simulation.sampling.CentralTargetSampling`): a
    ``fraction`` of the scenes' targets is brightened to a ``ref_band`` magnitude uniform in
    ``mag`` (every band by the same amount, so its colours are kept), and its bulge and disk
    half-light radii grow by 10^(0.4 ``size_slope`` dm) for a brightening of dm magnitudes, the
    size-luminosity relation R ~ L^size_slope of bright galaxies (a COSMOS fit is picked at the
    new magnitude, so its size follows the fits' own relation). CatSim's number counts give
    almost no target brighter than i ~ 20, whose peak pixels are then far above the
    normalisation constants: without them the networks never see a galaxy like the bright real
    DES one (README, "Real DES pixels"). A target already brighter than its drawn magnitude is
    left as it is."""

    fraction: StrictFloat = 0.2
    mag: tuple[StrictFloat, StrictFloat] = (16.0, 21.0)
    size_slope: StrictFloat = 0.3

    @model_validator(mode="after")
    def _check_ranges(self) -> BrightTargetsConfig:
        _require([
            (0 < self.fraction <= 1, "simulation.bright.fraction", "must be in (0, 1]"),
            (self.mag[0] <= self.mag[1], "simulation.bright.mag", "must be [min, max] with "
             "min <= max"),
            (0 <= self.size_slope <= 1, "simulation.bright.size_slope", "must be in [0, 1]"),
        ])
        return self


@_section("simulation")
class SimulationConfig:
    """How scenes are drawn with BTK (SPEC section 2). Lengths in arcsec, magnitudes AB."""

    survey: StrictStr = "LSST"
    """Survey name known to surveycodex/BTK: "LSST" (u g r i z y, 0.2") or "DES" (g r i z Y)."""
    catalog: StrictStr | None = None
    """Path of a CatSim-schema FITS/ASCII table; None uses the embedded statistical model."""
    catalog_rows: StrictInt = 200_000
    """Rows drawn from the embedded catalog model (ignored when ``catalog`` is set)."""
    catalog_seed: StrictInt = 0
    stamp_pixels: StrictInt = 45
    min_neighbours: StrictInt = 0
    max_neighbours: StrictInt = 2
    neighbour_shift: tuple[StrictFloat, StrictFloat] = (1.0, 4.0)
    """Radial range (arcsec) of the neighbours' offsets from the target; uniform in radius."""
    target_max_mag: StrictFloat = 25.3
    """Targets are drawn from galaxies brighter than this in ``ref_band``."""
    neighbour_max_mag: StrictFloat = 27.0
    ref_band: StrictStr = "i"
    """Band that defines 'brightest' and the magnitude cuts."""
    label_bands: tuple[StrictStr, ...] = ("r", "i", "z")
    """Bands summed (in electrons) to form the image whose moments give the e1/e2 labels."""
    noise: Literal["all", "background", "galaxy", "none"] = "all"
    random_rotation: StrictBool = True
    """Rotate every galaxy by a uniform random position angle (BTK's augment_data)."""
    shear: tuple[StrictFloat, StrictFloat] = (0.0, 0.0)
    """Constant reduced shear (g1, g2) applied to every galaxy before the PSF."""
    rotated_twins: StrictBool = False
    """Follow every scene by its 90-degree-rotated twin (same galaxies, rotated together)."""
    stamp_centre: Literal["truth", "detection"] = "truth"
    """Where stamps are centred: on the target's true position, or on the nearest pixel of its
    detection in the blend, as metadetection cuts them (:mod:`simulation.centring`)."""
    n_samples: StrictInt = 2000
    shard_size: StrictInt = 500
    btk_batch_size: StrictInt = 50
    val_fraction: StrictFloat = 0.1
    """Fraction of the samples held out for validation (the last ones)."""
    calibration_fraction: StrictFloat = 0.1
    """Fraction held out, between training and validation, to measure the stage-3 regressor's
    response (:mod:`deblend.core.response`); no network trains on it and no report evaluates on
    it."""
    seed: StrictInt = 0
    norm_beta: StrictFloat = 2.5
    """beta of the SPEC 3 normalisation tanh(asinh(beta x / <max>))."""
    norm_reference: Literal["blend", "noisy", "clean"] = "blend"
    """Image set whose per-band mean image maximum (training split) sets the constants."""
    norm_flux_scale: StrictBool = False
    """Per-stamp flux scale (:mod:`deblend.core.normalization`): every stamp brighter than the
    constants is divided by its own peak over them before the transform, and the networks'
    outputs multiplied back, so that a galaxy hundreds of times brighter than the constants is
    not flattened by tanh. Stored with the constants (so with every model)."""
    bright: BrightTargetsConfig | None = None
    """Bright, large targets in a fraction of the scenes; None: CatSim's counts alone."""
    morphology: MorphologyConfig | None = None
    """Knotty disks and off-centre bulges; None: CatSim's smooth bulge + disk (BTK's)."""
    conditions: ConditionsConfig | None = None
    """Observing conditions drawn per scene (PSF, depth, missing bands); None: the survey's
    nominal ones for every scene (its PSFs, full depth, every band)."""
    target_psf_fwhm: StrictFloat | tuple[StrictFloat, ...] | None = None
    """Homogenisation (issue 23, choice (a)): every stored image is deconvolved by its scene's
    PSF and reconvolved to a round Gaussian of this FWHM (arcsec; one value, or one per band),
    with metacal's correction noise, and the labels are measured on the result
    (:mod:`deblend.core.homogenize`). The networks then see what metacal's noshear image with
    that target is, whatever the seeing; metacal reconvolves to the model's target by default.
    It must be at least as wide as every scene's PSF allows. None: images at the survey's
    PSFs."""

    @model_validator(mode="after")
    def _check_ranges(self) -> SimulationConfig:
        _require([
            (self.catalog_rows >= 1, "simulation.catalog_rows", "must be >= 1"),
            (self.stamp_pixels >= 9, "simulation.stamp_pixels", "must be >= 9"),
            (0 <= self.min_neighbours <= self.max_neighbours, "simulation.min_neighbours",
             "must satisfy 0 <= min_neighbours <= max_neighbours"),
            (0 <= self.neighbour_shift[0] <= self.neighbour_shift[1],
             "simulation.neighbour_shift", "must be [min, max] with 0 <= min <= max"),
            (len(self.label_bands) >= 1, "simulation.label_bands", "must name at least one band"),
            (self.n_samples >= 1, "simulation.n_samples", "must be >= 1"),
            _target_fwhm(self.target_psf_fwhm, "simulation.target_psf_fwhm"),
            (self.shard_size >= 1, "simulation.shard_size", "must be >= 1"),
            (self.btk_batch_size >= 1, "simulation.btk_batch_size", "must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "simulation.val_fraction", "must be in [0, 1)"),
            (0.0 <= self.calibration_fraction < 1.0 - self.val_fraction,
             "simulation.calibration_fraction", "must be in [0, 1 - simulation.val_fraction)"),
            (self.norm_beta > 0, "simulation.norm_beta", "must be > 0"),
            (all(abs(g) < 1 for g in self.shear), "simulation.shear",
             "components must satisfy |g| < 1"),
            (not self.rotated_twins or self.shard_size % 2 == 0, "simulation.shard_size",
             "must be even when rotated_twins is true"),
            (not self.rotated_twins or self.n_samples % 2 == 0, "simulation.n_samples",
             "must be even when rotated_twins is true"),
            (not self.rotated_twins or self.btk_batch_size % 2 == 0, "simulation.btk_batch_size",
             "must be even when rotated_twins is true"),
        ])
        bands = _SURVEY_BANDS.get(self.survey)
        if (bands is not None and isinstance(self.target_psf_fwhm, tuple)
                and len(self.target_psf_fwhm) != len(bands)):
            raise ConfigError(f"config key 'simulation.target_psf_fwhm': {len(self.target_psf_fwhm)} "
                              f"values for the {len(bands)} {self.survey} bands")
        if bands is not None:
            for key, names in (("ref_band", (self.ref_band,)), ("label_bands", self.label_bands)):
                unknown = [b for b in names if b not in bands]
                if unknown:
                    raise ConfigError(
                        f"config key 'simulation.{key}': band '{unknown[0]}' is not a "
                        f"{self.survey} band (bands: {' '.join(bands)})")
        return self


def as_tuple(value: float | tuple[float, ...]) -> tuple[float, ...]:
    """One value or a tuple of them, as a tuple."""
    return value if isinstance(value, tuple) else (value,)


@_section("model")
class ModelConfig:
    """Network hyper-parameters (SPEC section 4)."""

    latent_dim: StrictInt = 32
    decoder_output: Literal["floored_sigmoid", "sigmoid"] = "floored_sigmoid"
    """The decoder's last layer (:class:`deblend.core.networks.Decoder`): ``sigmoid`` is
    SPEC's, whose floor leaves a pedestal of about 3 electrons per pixel; ``floored_sigmoid``
    reaches the sky (0) exactly, with a finite slope."""
    availability_input: StrictBool = False
    """The encoders also see a per-band availability mask (one constant plane per band, 1 where
    the band is available, 0 where it is missing: all 0 by the fill rule of a missing band,
    :class:`deblend.core.networks.Encoder`); False: the images alone."""
    regressor_hidden: tuple[StrictInt, ...] = (128, 64, 32)
    regressor_dropout: StrictFloat = 0.1
    regressor_moments: tuple[StrictFloat, ...] = ()
    """Gaussian weight sigmas (pixels) of the stamp moments the regressor reads beside mu
    (:mod:`deblend.core.stamp_moments`); empty: mu alone (SPEC 4). README, "The regressor reads
    the stamp's moments", measures what they do on real galaxy profiles."""
    flow_transform: Literal["affine_coupling", "spline_coupling"] = "affine_coupling"
    """The latent prior's bijection (pyro.distributions.transforms): coupling layers, whose
    density and inverse are each one pass (:mod:`deblend.core.flow`)."""
    flow_layers: StrictInt = 6
    flow_hidden: tuple[StrictInt, ...] = (128, 128)

    @model_validator(mode="after")
    def _check_ranges(self) -> ModelConfig:
        _require([
            (self.latent_dim >= 1, "model.latent_dim", "must be >= 1"),
            (1 <= self.flow_layers <= 32, "model.flow_layers", "must be in [1, 32]"),
            (len(self.flow_hidden) >= 1 and all(h >= 1 for h in self.flow_hidden),
             "model.flow_hidden", "must be a non-empty list of entries >= 1"),
            (all(h >= 1 for h in self.regressor_hidden), "model.regressor_hidden",
             "entries must be >= 1"),
            (0.0 <= self.regressor_dropout < 1.0, "model.regressor_dropout", "must be in [0, 1)"),
            (all(POSITIVE_FLOAT.accepts(s) for s in self.regressor_moments),
             "model.regressor_moments", "entries must be finite and > 0 (pixels)"),
        ])
        return self


@_section("training")
class TrainingConfig:
    """Optimisation settings shared by the three stages (SPEC section 5)."""

    batch_size: StrictInt = 64
    epochs: StrictInt = 40
    stage1_epochs: StrictInt | None = None
    stage2_epochs: StrictInt | None = None
    stage3_epochs: StrictInt | None = None
    flow_epochs: StrictInt | None = None
    max_grad_norm: StrictFloat | None = None
    """Clip every stage's gradient (the whole batch's, all parameters) to this L2 norm
    (``torch.nn.utils.clip_grad_norm_``) before each step; None: unclipped. Each epoch's median
    and largest norm before clipping are in the stage's ``history.csv``, the scale to set it
    from. Scenes under many conditions (bright galaxies at 1-year depth and without a band)
    give rare batches whose gradient is hundreds of times the median: one can throw a stage to
    NaN at learning rate 1e-3."""
    flow_max_grad_norm: StrictFloat | None = None
    """The flow stage's own bound (overrides ``max_grad_norm`` for it); None: ``max_grad_norm``.
    Latents with far tails (bright galaxies, a range of depths) otherwise blow its coupling
    layers up to NaN within a few epochs."""
    amortize_epochs: StrictInt | None = None
    amortize_chunk: StrictInt = 500
    """Blends whose MAP targets are fitted and cached together (about 20 s on 2 CPU cores);
    under DDP the processes share the chunks."""
    amortize_fraction: StrictFloat = 1.0
    """Fraction of each split (training, validation) the amortize stage fits MAP targets for
    and trains on: the first samples of the split (a dataset's samples are drawn independently,
    so its first ones are a fair subset). The MAP targets cost about 50 ms per blend on 2 CPU
    cores; 1: the whole split."""
    amortized_map: StrictBool = False
    """Train the ``amortize`` stage (an encoder that outputs the flow-MAP latent of its input,
    :mod:`training.map_targets`) and the regressor on its latents instead of stage2's."""
    learning_rate: StrictFloat = 1e-4
    stage1_learning_rate: StrictFloat | None = None
    """Stage1's (the VAE on isolated galaxies, trained from scratch); null: learning_rate. Its
    loss sits on a plateau (reconstruction near 7-8 in the quick config) before it drops to about
    2; a higher rate, with the gradient clipped (``max_grad_norm``), gets there in fewer epochs
    (README: "The quick job's time budget")."""
    amortize_learning_rate: StrictFloat | None = None
    """The amortize stage's (it fine-tunes the trained stage2 encoder); null: learning_rate."""
    beta_kl: StrictFloat = 1e-3
    min_target_e: StrictFloat = 0.0
    """Train only on targets whose label |e| exceeds this (the report used 0.1)."""
    dihedral_augmentation: StrictBool = True
    """Show every training sample in a random one of the stamp's 8 symmetric views (90-degree
    rotations and flips, :mod:`deblend.core.symmetry`); targets and labels follow exactly."""
    band_dropout: StrictFloat = 0.0
    """Probability that a training input of stage1, stage2 or stage3 has one of its bands
    (uniformly chosen) set to 0, as ``Deblender.predict(available=...)`` fills a missing band;
    targets keep every band. 0: never (and no random number is drawn)."""
    stage2_init: Literal["stage1", "scratch"] = "stage1"
    early_stopping_patience: StrictInt | None = None
    num_workers: StrictInt = 0
    normalized_cache_gib: StrictFloat = 2.0
    """Memory (GiB, per loader process) for the normalised training and validation images of a
    stage, kept after their first read so that later epochs copy them instead of reading and
    normalising them again (same values); a split that does not fit is read every epoch
    (training first, then validation in what is left). 0: never kept."""
    device: StrictStr = "auto"
    mixed_precision: StrictBool = False
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainingConfig:
        _require([
            (self.batch_size >= 1, "training.batch_size", "must be >= 1"),
            (self.epochs >= 1, "training.epochs", "must be >= 1"),
            *[(_at_least(getattr(self, f"stage{i}_epochs"), 1), f"training.stage{i}_epochs",
               "must be >= 1 or null") for i in (1, 2, 3)],
            (_at_least(self.flow_epochs, 1), "training.flow_epochs", "must be >= 1 or null"),
            *[(norm is None or norm > 0, f"training.{key}", "must be > 0 or null")
              for key, norm in (("max_grad_norm", self.max_grad_norm),
                                ("flow_max_grad_norm", self.flow_max_grad_norm))],
            (_at_least(self.amortize_epochs, 1), "training.amortize_epochs",
             "must be >= 1 or null"),
            (self.amortize_chunk >= 1, "training.amortize_chunk", "must be >= 1"),
            (0.0 < self.amortize_fraction <= 1.0, "training.amortize_fraction",
             "must be in (0, 1]"),
            (self.learning_rate > 0, "training.learning_rate", "must be > 0"),
            *[(rate is None or rate > 0, f"training.{key}", "must be > 0 or null")
              for key, rate in (("stage1_learning_rate", self.stage1_learning_rate),
                                ("amortize_learning_rate", self.amortize_learning_rate))],
            (self.beta_kl >= 0, "training.beta_kl", "must be >= 0"),
            (0.0 <= self.band_dropout <= 1.0, "training.band_dropout", "must be in [0, 1]"),
            (0.0 <= self.min_target_e < 1.0, "training.min_target_e", "must be in [0, 1)"),
            (_at_least(self.early_stopping_patience, 1), "training.early_stopping_patience",
             "must be >= 1 or null"),
            (self.num_workers >= 0, "training.num_workers", "must be >= 0"),
            (self.normalized_cache_gib >= 0, "training.normalized_cache_gib", "must be >= 0"),
        ])
        return self


@_section("evaluation")
class EvaluationConfig:
    """Validation-set evaluation settings."""

    max_samples: StrictInt | None = None
    """Evaluate at most this many validation samples (the first ones); None: all of them."""
    gallery_size: StrictInt = 8
    batch_size: StrictInt = 256
    mag_edges: tuple[StrictFloat, ...] = (22.0, 23.0, 24.0)
    """Interior edges of the target-magnitude bins (``simulation.ref_band``) of the breakdowns."""
    seed: StrictInt = 0
    """Seed of the gallery's choice of samples."""

    @model_validator(mode="after")
    def _check_ranges(self) -> EvaluationConfig:
        edges = self.mag_edges
        _require([
            (_at_least(self.max_samples, 1), "evaluation.max_samples", "must be >= 1 or null"),
            (self.gallery_size >= 0, "evaluation.gallery_size", "must be >= 0"),
            _obeys(POSITIVE_INT, self.batch_size, "evaluation.batch_size"),
            (all(a < b for a, b in itertools.pairwise(edges)), "evaluation.mag_edges",
             "must increase strictly"),
        ])
        return self


@_section("shear")
class ShearConfig:
    """Shear-calibration populations (SPEC section 6)."""

    g_values: tuple[StrictFloat, ...] = (-0.02, 0.0, 0.02)
    n_scenes: StrictInt = 2000
    """Scenes per applied shear (twins included)."""
    bootstrap: StrictInt = 200
    seed: StrictInt = 1000
    shared_galaxies: StrictBool = True
    """Every shear population draws the same scenes (same seed); only the shear differs, so the
    shape and noise of the galaxies largely cancel in the response (common random numbers)."""
    chunk_scenes: StrictInt = 200
    """Scenes simulated and cached per chunk (even); an interrupted run resumes chunk by chunk."""

    @model_validator(mode="after")
    def _check_ranges(self) -> ShearConfig:
        _require([
            (len(set(self.g_values)) >= 2, "shear.g_values",
             "must hold at least two distinct values"),
            (all(abs(g) < 1 for g in self.g_values), "shear.g_values",
             "must satisfy |g| < 1"),
            (self.n_scenes >= 2, "shear.n_scenes", "must be >= 2"),
            (self.n_scenes % 2 == 0, "shear.n_scenes", "must be even (rotated twin pairs)"),
            (self.bootstrap >= 2, "shear.bootstrap", "must be >= 2"),
            (self.chunk_scenes >= 2 and self.chunk_scenes % 2 == 0, "shear.chunk_scenes",
             "must be even and >= 2"),
        ])
        return self


@_section("metacal")
class MetacalConfig:
    """The metacalibrated shear benchmark (:mod:`evaluation.metacal_benchmark`, SPEC 6).

    Every variant (population x with/without neighbours) draws ``n_scenes`` scenes (90-degree
    twins included), each at +g and at -g with the same galaxies, positions and noise; the
    applied shear is (g, g). Populations: "btk" (the training simulation's catalog and code) and
    "galsim" (drawn directly with GalSim, another galaxy population and PSF widths, that no
    network saw)."""

    populations: tuple[Literal["btk", "galsim"], ...] = ("btk", "galsim")
    neighbours: tuple[StrictBool, ...] = (False, True)
    n_scenes: StrictInt = 2000
    chunk_scenes: StrictInt = 100
    """Scenes measured and cached per chunk (even); an interrupted run resumes chunk by chunk."""
    g: StrictFloat = 0.02
    delta: StrictFloat = 0.01
    """Metacal shear step."""
    target_psf_fwhm: StrictFloat | tuple[StrictFloat, ...] | None = None
    """FWHM (arcsec) of the round Gaussian every metacal image of the stamp benchmarks (metacal,
    conditions, MAP comparison) is reconvolved to: one value for every band or one per band
    (homogenisation: one PSF whatever the seeing). None: the model's own target
    (``simulation.target_psf_fwhm``) if it has one, else each band's narrowest Gaussian its PSF
    allows (wider under worse seeing). A target narrower than a PSF allows is refused when met.
    The field benchmark and the real DES frames of the DES validation use it too, and the run
    keeps it: ``Deblender.from_run`` reads it as the model's default (``deblend measure``,
    ``python -m des_validation.real``; ``--target-psf-fwhm`` overrides)."""
    views: StrictInt = 8
    """Symmetric views the regressor is averaged over (a constant orientation preference of the
    network cancels from 2 on)."""
    noise_correction: StrictBool = True
    """Add a metacalibrated 90-degree-rotated noise field (doubles the noise the networks see)."""
    estimators: tuple[StrictStr, ...] = ("regressor", "recon_gauss", "recon_hsm", "blend_gauss",
                                         "blend_hsm", "anacal")
    min_snr: StrictFloat | None = None
    """A cut on every estimator: the Gaussian-weighted S/N of the blend (label bands) measured on
    each metacal image, with its selection response; None: no cut."""
    margin_pixels: StrictInt = 10
    """Scenes are drawn this many pixels larger on each side than the model's stamp; metacal
    runs on the larger stamp and its images are cropped, which keeps the sheared stamp edge out
    of what the estimators see (without it the regressor's m1 was -0.020 +- 0.006)."""
    hold_sky_plane: StrictBool = False
    """Metacal shears each stamp less its fitted sky plane (a constant and a gradient per band,
    :mod:`deblend.core.sky_plane`) and adds the plane back unsheared to the five images: a
    sky-subtraction residual is left in what the networks see, as the real shear left it, but
    not sheared into a false response (a 0.3-sigma residual biased the conditions model's m by
    about -0.008 without it). The stamp benchmarks (metacal, conditions, MAP comparison) use it;
    the cells of metadetection (field benchmark, ``deblend measure``, real DES frames) hold one
    plane per cell (:func:`deblend.core.metadetect.cell_plane`)."""
    galsim_psf_scales: tuple[StrictFloat, ...] = (0.9, 1.0, 1.1)
    """PSF width factors of the galsim population, taken in turn by its chunks."""
    bootstrap: StrictInt = 200
    seed: StrictInt = 3000

    @model_validator(mode="after")
    def _check_ranges(self) -> MetacalConfig:
        _require([
            (len(self.populations) >= 1, "metacal.populations", "must name a population"),
            (len(self.neighbours) >= 1, "metacal.neighbours", "must hold true and/or false"),
            (self.n_scenes >= 4 and self.n_scenes % 2 == 0, "metacal.n_scenes",
             "must be even and >= 4"),
            (self.chunk_scenes >= 2 and self.chunk_scenes % 2 == 0, "metacal.chunk_scenes",
             "must be even and >= 2"),
            (0 < self.g < 0.1, "metacal.g", "must be in (0, 0.1)"),
            _obeys(METACAL_DELTA, self.delta, "metacal.delta"),
            _obeys(VIEWS, self.views, "metacal.views"),
            _target_fwhm(self.target_psf_fwhm, "metacal.target_psf_fwhm"),
            (0 <= self.margin_pixels <= 50, "metacal.margin_pixels", "must be in [0, 50]"),
            (all(0.5 <= s <= 2 for s in self.galsim_psf_scales) and self.galsim_psf_scales,
             "metacal.galsim_psf_scales", "must be non-empty factors in [0.5, 2]"),
            (self.bootstrap >= 2, "metacal.bootstrap", "must be >= 2"),
        ])
        return self


@_section("map")
class MapConfig:
    """MAP deblending of whole scenes (:mod:`deblend.core.map_fit`) and its comparison report
    (:mod:`evaluation.map_comparison`): every detected source's latent is fitted under the
    pixel likelihood (sky + Poisson variance) plus the latent prior."""

    enabled: StrictBool = False
    """Run the comparison as a step of the main job (``RUN/map_deblending/``)."""
    steps: StrictInt = 40
    """Adam steps from the deblender encoder's latents (:data:`deblend.core.map_fit.DEFAULT_STEPS`;
    on quick validation blends 40 give what 60 give, MADNESS's choice, at two thirds of the
    cost)."""
    learning_rate: StrictFloat = 0.05
    priors: tuple[Literal["normal", "flow"], ...] = ("normal", "flow")
    detection_band: StrictStr = "i"
    detection_threshold: StrictFloat = 1.5
    """SEP threshold in units of the background rms (BTK's SepSingleBand)."""
    max_sources: StrictInt = 20
    n_blends: StrictInt = 200
    """Validation blends of the comparison."""
    posterior_samples: StrictInt = 200
    """Laplace-approximation samples per source for the ellipticity intervals (0: none)."""
    batch_size: StrictInt = 32
    """Scenes fitted together."""
    seed: StrictInt = 4000

    @model_validator(mode="after")
    def _check_ranges(self) -> MapConfig:
        _require([
            _obeys(NON_NEGATIVE_INT, self.steps, "map.steps"),
            _obeys(POSITIVE_FLOAT, self.learning_rate, "map.learning_rate"),
            (len(self.priors) >= 1, "map.priors", "must name a prior"),
            _obeys(POSITIVE_FLOAT, self.detection_threshold, "map.detection_threshold"),
            _obeys(POSITIVE_INT, self.max_sources, "map.max_sources"),
            (self.n_blends >= 1, "map.n_blends", "must be >= 1"),
            _obeys(POSTERIOR_SAMPLES, self.posterior_samples, "map.posterior_samples"),
            _obeys(POSITIVE_INT, self.batch_size, "map.batch_size"),
            _obeys(NON_NEGATIVE_INT, self.seed, "map.seed"),
        ])
        return self


@_section("dense_fields")
class DenseFieldsConfig:
    """BTK fields larger and denser than the training stamps (MADNESS's test scenes), deblended
    whole (:mod:`simulation.dense_fields`)."""

    field_arcsec: StrictFloat = 41.0
    min_galaxies: StrictInt = 8
    max_galaxies: StrictInt = 15
    n_fields: StrictInt = 20
    max_mag: StrictFloat = 25.3
    """Faintest galaxy (ref band) placed in a field."""
    seed: StrictInt = 5000

    @model_validator(mode="after")
    def _check_ranges(self) -> DenseFieldsConfig:
        _require([
            (5.0 <= self.field_arcsec <= 200.0, "dense_fields.field_arcsec",
             "must be in [5, 200] arcsec"),
            (1 <= self.min_galaxies <= self.max_galaxies, "dense_fields.min_galaxies",
             "must be >= 1 and <= dense_fields.max_galaxies"),
            (self.n_fields >= 1, "dense_fields.n_fields", "must be >= 1"),
        ])
        return self


@_section("fields")
class FieldsConfig:
    """Shear from pixels: metadetection on constant-shear fields at LSST density, cut into
    cells (:mod:`evaluation.field_shear`; ``python -m benchmarks.fields``)."""

    enabled: StrictBool = True
    """Run it as a step of the main job (``RUN/fields/``)."""
    populations: tuple[Literal["btk", "galsim"], ...] = ("btk", "galsim")
    n_fields: StrictInt = 20
    """Field sets (+g, -g and their twins) per population and sheared component."""
    field_pixels: StrictInt = 300
    """Side of a field (300 LSST pixels = 1 arcmin)."""
    cell: StrictInt = 100
    """Owned square of a cell, pixels."""
    margin: StrictInt = 40
    """Pixels read around each cell (>= half the model's stamp, and AnaCal's 16)."""
    g: StrictFloat = 0.02
    views: StrictInt = 2
    """Symmetric views of the regressor: with 1, its preferred orientation is an additive bias
    (c2 = -0.024 +- 0.007 on 4 BTK field sets of the quick model; 2 views cancel it)."""
    anacal: StrictBool = True
    """Measure AnaCal with its own detection on the same fields."""
    seed: StrictInt = 6000

    @model_validator(mode="after")
    def _check_ranges(self) -> FieldsConfig:
        _require([
            (len(self.populations) >= 1, "fields.populations", "must name a population"),
            (self.n_fields >= 1, "fields.n_fields", "must be >= 1"),
            (self.field_pixels >= 64, "fields.field_pixels", "must be >= 64"),
            (self.cell >= 16, "fields.cell", "must be >= 16"),
            (self.margin >= 16, "fields.margin", "must be >= 16"),
            (0 < self.g < 0.2, "fields.g", "must be in (0, 0.2)"),
            _obeys(VIEWS, self.views, "fields.views"),
            _obeys(NON_NEGATIVE_INT, self.seed, "fields.seed"),
        ])
        return self


@_section("des")
class DESConfig:
    """DES validation settings (SPEC section 7)."""

    min_snr: StrictFloat = 20.0
    """Catalog cut: keep snr_w > min_snr."""
    require_error_flag_zero: StrictBool = True
    require_info_flag_zero: StrictBool = True
    u_strategy: Literal["zeros", "g_copy", "g_extrapolate"] = "zeros"
    """How the model's u band (absent from DES) is filled; see des_validation.prepare."""
    u_over_g: StrictFloat | None = None
    """u/g flux ratio for g_extrapolate; None measures it on the training data (flux labels)."""
    resample: StrictBool = True
    """Resample DES pixels to the model's pixel scale (GalSim) before the crop."""
    normalization: Literal["des", "training"] = "des"
    catalog_ellipticity: Literal["shear", "distortion"] = "shear"
    """Convention of the catalog's e_1/e_2: im3shape's |e| = (a-b)/(a+b) ("shear") is converted
    to the distortion (a^2-b^2)/(a^2+b^2) that deblend's labels and regressor use."""
    n_standin: StrictInt = 300
    standin_seed: StrictInt = 2000
    standin_target_max_mag: StrictFloat = 23.5
    """Target magnitude limit (ref band) of the DES-like stand-in: a shape catalog's depth."""
    real_frames: StrictStr | None = None
    """A directory of real DECam frames (image, weight, mask, PSFEx per band, as
    ``../shared/data/des_decam``) that the DES validation also measures
    (:mod:`des_validation.real_pixels`), linked from its report; a directory that is not there
    is left out with a note (the data are optional); null: none."""

    @model_validator(mode="after")
    def _check_ranges(self) -> DESConfig:
        _require([
            (self.min_snr >= 0, "des.min_snr", "must be >= 0"),
            (self.u_over_g is None or self.u_over_g > 0, "des.u_over_g", "must be > 0 or null"),
            (self.n_standin >= 1, "des.n_standin", "must be >= 1"),
        ])
        return self


@_section("")
class Config:
    """A whole pipeline configuration."""

    name: StrictStr = "default"
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    shear: ShearConfig = field(default_factory=ShearConfig)
    metacal: MetacalConfig = field(default_factory=MetacalConfig)
    map: MapConfig = field(default_factory=MapConfig)
    dense_fields: DenseFieldsConfig = field(default_factory=DenseFieldsConfig)
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    des: DESConfig = field(default_factory=DESConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-serialisable) nested dict; tuples become lists."""
        return plain(dataclasses.asdict(self))

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed (validated like a file)."""
        data = self.to_dict()
        data[section].update(changes)
        return config_from_dict(data)


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")
_CONFIG_ADAPTER = TypeAdapter(Config)


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (JSON/YAML-ready)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
}
_ERROR_ORDER = {"unexpected_keyword_argument": 0, "value_error": 2}
"""Which of pydantic's errors is reported: unknown keys, then types, then ranges."""


def _config_error(exc: ValidationError, root: type, prefix: str) -> ConfigError:
    """The first of pydantic's errors, as one :class:`ConfigError` line naming the dotted key."""
    error = min(exc.errors(include_url=False), key=lambda e: _ERROR_ORDER.get(e["type"], 1))
    kind, loc, value = error["type"], error["loc"], error.get("input")
    if kind == "value_error" and isinstance(error["ctx"]["error"], ConfigError):
        return ConfigError(str(error["ctx"]["error"]))
    if kind in ("unexpected_keyword_argument", "invalid_key"):  # invalid_key: not a string
        key = ".".join(filter(None, [_dotted(prefix, loc[:-1]), str(loc[-1])]))
        known = sorted(f.name for f in dataclasses.fields(_annotation(root, loc[:-1])))
        return ConfigError(f"unknown config key '{key}' (known: {', '.join(known)})")
    key = _dotted(prefix, loc)
    if kind in ("dataclass_type", "dataclass_args_type"):
        section = key or "top level"
        return ConfigError(f"config section '{section}' must be a mapping, got {value!r}")
    if kind == "literal_error":
        return ConfigError(f"config key '{key}' must be one of {error['ctx']['expected']}, "
                           f"got {value!r}")
    if kind == "too_long" or (kind == "missing" and loc and isinstance(loc[-1], int)):
        # a fixed-length tuple: the error sits on the whole list, or on its first missing entry
        tuple_loc = loc if kind == "too_long" else loc[:-1]
        key = key if kind == "too_long" else key.rsplit("[", 1)[0]
        entries = len(typing.get_args(_annotation(root, tuple_loc)))
        return ConfigError(f"config key '{key}' must have {entries} entries, got {len(value)}")
    if kind in _TYPE_MESSAGES:
        return ConfigError(f"config key '{key}' {_TYPE_MESSAGES[kind]}, got {value!r}")
    return ConfigError(f"config key '{key}': {error['msg']}, got {value!r}")


def _dotted(prefix: str, loc: tuple[Any, ...]) -> str:
    """``("simulation", "neighbour_shift", 0)`` -> ``simulation.neighbour_shift[0]``."""
    key = prefix
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def _annotation(root: type, loc: tuple[Any, ...]) -> Any:
    """Type annotation of the key at ``loc`` (field names) below the dataclass ``root``."""
    annotation: Any = root
    for name in loc:
        annotation = typing.get_type_hints(annotation)[name]
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1:
            annotation = options[0]  # an optional section: ``X | None``
    return annotation


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take defaults)."""
    data = data or {}
    if isinstance(data, dict):  # an empty section (``simulation:`` in YAML) takes the defaults
        data = {k: {} if v is None and k in _SECTIONS else v for k, v in data.items()}
    try:
        return _CONFIG_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _config_error(exc, Config, "") from None


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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text (YAML) file: {exc}") from exc
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
