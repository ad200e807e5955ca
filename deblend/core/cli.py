"""What every command line of deblend shares: process settings, and one clear line on errors.

Library code raises; only a command's ``main``, wrapped in :func:`fail_cleanly`, turns an expected
error into ``error: <message>`` on one line and exit status 2, and an interruption into a hint to
run the same command again. Process-wide settings (the malloc policy, matplotlib's file-only
backend) are made here, by the commands, never by importing a library module.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from deblend.core.atomic import DISK_FULL
from deblend.core.device import keep_freed_memory

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError,
                   KeyError)


def configure_process() -> None:
    """Settings a command makes for its whole process: freed heap pages are kept for reuse
    (:func:`deblend.core.device.keep_freed_memory`) and matplotlib draws to files only."""
    import matplotlib

    matplotlib.use("Agg")
    keep_freed_memory()


TRACEBACK_VARIABLE = "DEBLEND_TRACEBACK"
"""Set it (to anything) to see the traceback of an unexpected error instead of its one line."""


def error_text(exc: BaseException) -> str:
    """What an expected error says to a user: its message (a KeyError's without quotes), and
    for a full disk "disk full", the file and what to do."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"disk full{where} ({exc.strerror or os.strerror(exc.errno)}): free some space "
                f"and run the same command again")
    return str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)


def fail_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main``: process settings first; expected errors (bad input, missing or
    existing files) print ``error: <message>`` on one line and return 2; any other error prints
    one line too, with its type, and returns 1 (``DEBLEND_TRACEBACK=1`` shows the traceback);
    Ctrl-C returns 130 with a hint to resume.

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
            print(f"error: {' '.join(error_text(exc).split())}", file=sys.stderr)
            return 2
        except Exception as exc:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())} (an unexpected "
                  f"error: set {TRACEBACK_VARIABLE}=1 for its traceback)", file=sys.stderr)
            return 1

    return wrapper
