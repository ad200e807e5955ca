"""What every command line of deblend shares: process settings, and one clear line on errors.

Library code raises; only a command's ``main``, wrapped in :func:`fail_cleanly`, turns an expected
error into ``error: <message>`` on one line and exit status 2, and an interruption into a hint to
run the same command again. Process-wide settings (the malloc policy, matplotlib's file-only
backend) are made here, by the commands, never by importing a library module.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from deblend.core.device import keep_freed_memory

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError,
                   KeyError)


def configure_process() -> None:
    """Settings a command makes for its whole process: freed heap pages are kept for reuse
    (:func:`deblend.core.device.keep_freed_memory`) and matplotlib draws to files only."""
    import matplotlib

    matplotlib.use("Agg")
    keep_freed_memory()


def fail_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main``: process settings first; expected errors print ``error: <message>`` on
    one line and return 2; Ctrl-C returns 130 with a hint to resume.

    Messages from libraries (h5py, astropy) may span lines; they are joined into one.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        configure_process()
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
