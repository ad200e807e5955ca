"""Shared command-line behaviour: one clear line and a non-zero exit for expected errors."""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError,
                   KeyError)


def fail_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main``: expected errors print ``error: <message>`` on one line, exit status 2.

    Messages from libraries (h5py, astropy) may span lines; they are joined into one.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130
        except EXPECTED_ERRORS as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
            return 2

    return wrapper
