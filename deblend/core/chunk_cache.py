"""The per-chunk result cache of long measurements (shear calibration, metacal benchmark).

Each chunk is one ``.npz`` file holding its arrays and the key of what made it (a hash of the
settings, chunk and model): a file whose key differs counts as absent and is measured again; so
does one that cannot be read (truncated by a full disk, an interrupted copy or a sync tool), with
a warning naming it. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deblend.core.atomic import atomic_output


def chunk_key(payload: dict[str, Any]) -> str:
    """A short stable hash of JSON-able ``payload`` (what a chunk depends on)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def without_defaults(payload: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``payload`` less each key of ``defaults`` whose value is that default: a setting added
    after caches were written enters the key only when it differs from the value every earlier
    chunk was made with, so those chunks stay valid."""
    return {key: value for key, value in payload.items()
            if key not in defaults or value != defaults[key]}


def read_chunk(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cached chunk made with ``key``, or None (absent, other key, unreadable:
    then with a warning naming the file, which the caller measures again and replaces)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            return {k: npz[k] for k in npz.files if k != "key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        warnings.warn(f"cached chunk {path} is unreadable ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())}): measuring it again to replace it",
                      stacklevel=2)
        return None


def write_chunk(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Cache ``arrays`` under ``key``, atomically."""
    with atomic_output(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, key=np.array(key), **arrays)


def join_chunks(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Consecutive chunks' arrays, concatenated column by column."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
