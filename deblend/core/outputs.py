"""The one rule for output directories: deblend replaces only what it wrote, and says so.

Every command that writes a whole directory marks it with a :data:`MARKER` file naming the kind
of output ("run", "des-standin", "des-validation"). ``--force`` replaces a directory only when it
carries the marker of that kind; any other non-empty directory is refused, with or without
``--force``, so a mistyped ``--out`` never costs a user their files. Callers check with
:func:`claim_directory` after validating their inputs and before writing anything; directories
built aside (``<out>.tmp``) are swapped in by :func:`replace_directory` only once complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from deblend.core.atomic import write_text_atomic

MARKER = ".deblend"


def is_ours(path: str | Path, kind: str) -> bool:
    """Whether ``path`` is a directory that deblend wrote as a ``kind`` output."""
    marker = Path(path) / MARKER
    try:
        return marker.is_file() and marker.read_text().strip() == kind
    except OSError:
        return False


def mark(path: str | Path, kind: str) -> None:
    """Mark the directory ``path`` as deblend's ``kind`` output."""
    write_text_atomic(Path(path) / MARKER, f"{kind}\n")


def refuse_foreign(path: str | Path, kind: str,
                   legacy: Callable[[Path], bool] | None = None) -> bool:
    """Whether ``path`` holds deblend's ``kind`` output (True) or is absent or empty (False);
    FileExistsError, naming the directory, when it holds anything else.

    ``legacy`` recognises a ``kind`` output written before outputs were marked; such a
    directory is marked now.
    """
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another --out")
    if not any(path.iterdir()):
        return False
    if is_ours(path, kind):
        return True
    if legacy is not None and not (path / MARKER).exists() and legacy(path):
        mark(path, kind)
        return True
    raise FileExistsError(f"{path} exists and is not a deblend {kind} directory (no {MARKER} "
                          f"file): choose another --out (--force only replaces deblend's own "
                          f"output)")


def claim_directory(path: str | Path, kind: str, force: bool) -> bool:
    """Whether ``path`` already holds a ``kind`` output (to replace with ``force``); False when
    it is absent or empty. Raises FileExistsError, naming the directory, when it holds something
    else (:func:`refuse_foreign`), or a ``kind`` output without ``force``."""
    if not refuse_foreign(path, kind):
        return False
    if not force:
        raise FileExistsError(f"{path} already holds a {kind}; pass --force to replace it")
    return True


def replace_directory(built: Path, out: Path, kind: str) -> None:
    """Put the finished directory ``built`` in place of ``out`` (claimed by
    :func:`claim_directory`), marked as ``kind``."""
    mark(built, kind)
    if out.exists():
        shutil.rmtree(out)
    os.replace(built, out)
