"""Validated arguments: one check per kind of number, for every command line and the library.

The command lines use the ``*_arg`` functions as argparse types (a bad value is a usage error
naming the option); the library's public functions call the ``require_*`` checks (a bad value
is a ValueError naming the argument), so ``predict(batch_size=-1)`` and ``--jobs 0`` are refused
by the same rule.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import numpy as np


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (sizes, counts, worker processes); ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def require_non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0 (indices, retries, seeds); ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def require_positive_float(value: Any, name: str) -> float:
    """``value`` as a finite float > 0 (pixel scales, sizes in arcsec, time-outs)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _argparse_type(parse: Callable[[str], Any], check: Callable[[Any, str], Any]
                   ) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(parse(text), "it")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("it must", "must")) from None

    convert.__name__ = check.__name__.replace("require_", "")
    return convert


positive_int_arg = _argparse_type(int, require_positive_int)
non_negative_int_arg = _argparse_type(int, require_non_negative_int)
positive_float_arg = _argparse_type(float, require_positive_float)
