"""Atomic file output: a path is either its previous content or the whole new one, never half.

Every writer of deblend goes through :func:`atomic_output`: write to a temporary sibling, flush it
to disk, then rename it onto the final name (a rename within a directory is atomic on POSIX). On
an error the temporary file is removed and the final path is left untouched; a full disk is an
OSError (ENOSPC) naming the final path, whatever library was writing.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The errno values of a full disk (or an exhausted quota)."""


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto ``path``.

    ``suffix`` names the temporary sibling (``path`` + suffix); writers that add their own
    extension (``numpy.savez`` adds ``.npz``) pass a suffix that already ends with it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in DISK_FULL:  # write() errors name no file, h5py's name the temporary one
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path, suffix) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, suffix: str = ".tmp") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode(), suffix)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
