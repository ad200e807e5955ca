"""Validated arguments: one check per kind of number, for every command line and the library.

The command lines use the ``*_arg`` functions as argparse types (a bad value is a usage error
naming the option); the library's public functions call the ``require_*`` checks (a bad value
is a ValueError naming the argument), so ``predict(batch_size=-1)`` and ``--jobs 0`` are refused
by the same rule.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class NumberRule:
    """What a kind of number must be: its Python type, its test and how to say it."""

    kind: type
    holds: Callable[[Any], bool]
    says: str

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)):
            return False
        numeric = (int, np.integer) if self.kind is int else (int, float, np.integer,
                                                                np.floating)
        return isinstance(value, numeric) and self.holds(value)

    def require(self, value: Any, name: str) -> Any:
        """``value`` as ``kind``; ValueError naming ``name`` when it breaks the rule."""
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.says}, got {value!r}")
        return self.kind(value)

    def argparse_type(self, text: str) -> Any:
        """For ``add_argument(type=...)``: the parsed value, or a usage error saying the rule."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self.says}, got {text}")
        return value


POSITIVE_INT = NumberRule(int, lambda v: v >= 1, "a positive integer")
"""Sizes, counts, worker processes."""
NON_NEGATIVE_INT = NumberRule(int, lambda v: v >= 0, "an integer >= 0")
"""Indices, retries, seeds."""
POSITIVE_FLOAT = NumberRule(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
"""Pixel scales, sizes in arcsec, time-outs, learning rates, detection thresholds."""
NON_NEGATIVE_FLOAT = NumberRule(float, lambda v: math.isfinite(v) and v >= 0,
                                "a finite number >= 0")
"""Cuts that may be switched off with 0 (a minimum S/N)."""
FINITE_FLOAT = NumberRule(float, math.isfinite, "a finite number")
"""Cuts on quantities of either sign (a minimum size ratio)."""
FRACTION = NumberRule(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
"""Contrasts and fractions."""
VIEW_COUNTS = (1, 2, 4, 8)
"""How many symmetric views the regressor may be averaged over (the first 1, 2, 4 or 8)."""
VIEWS = NumberRule(int, lambda v: v in VIEW_COUNTS, "one of 1, 2, 4 or 8")
"""Symmetric views (``views``, ``reconstruction_views``; config ``metacal.views``,
``fields.views``)."""
POSTERIOR_SAMPLES = NumberRule(int, lambda v: v == 0 or v >= 2,
                               "0 (no posterior) or an integer >= 2")
"""Laplace posterior draws per source (``map.posterior_samples``)."""
METACAL_DELTA = NumberRule(float, lambda v: 0 < v < 0.1, "a number in (0, 0.1)")
"""The metacal shear step (``metacal.delta``)."""


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1; ValueError naming ``name`` otherwise."""
    return POSITIVE_INT.require(value, name)


positive_int_arg = POSITIVE_INT.argparse_type
non_negative_int_arg = NON_NEGATIVE_INT.argparse_type
positive_float_arg = POSITIVE_FLOAT.argparse_type
non_negative_float_arg = NON_NEGATIVE_FLOAT.argparse_type


def add_target_psf_fwhm(parser: argparse.ArgumentParser, help_text: str) -> None:
    """A ``--target-psf-fwhm ARCSEC [ARCSEC ...]`` option: one FWHM for every band or one per
    band (read it with :func:`target_psf_fwhm`)."""
    parser.add_argument("--target-psf-fwhm", type=positive_float_arg, nargs="+",
                        metavar="ARCSEC", help=help_text)


def add_deblend_contrast(parser: argparse.ArgumentParser, default: float) -> None:
    """A ``--deblend-contrast C`` option: SEP's deblending contrast of metadetection's
    detection, in [0, 1] (None when not given: the walk's ``default``, which the help states;
    the caller passes :data:`deblend.core.metadetect.DEBLEND_CONTRAST`, which this bottom
    module cannot import)."""
    parser.add_argument("--deblend-contrast", type=FRACTION.argparse_type, metavar="C",
                        help=f"SEP's deblending contrast of the detection, in [0, 1] (default "
                             f"{default:g}; 1e-5 splits fainter neighbours off bright galaxies, "
                             "python -m benchmarks.detection_contrast says what else it does)")


def target_psf_fwhm(values: list[float] | None) -> float | tuple[float, ...] | None:
    """The value of :func:`add_target_psf_fwhm`'s option as the config's
    ``metacal.target_psf_fwhm`` holds it: one float, a tuple per band, or None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
