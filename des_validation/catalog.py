"""The im3shape shape catalog: reading (FITS or CSV, case-insensitive columns) and quality cuts.

Required columns: ``coadd_objects_id``, ``ra``, ``dec``, ``e_1``, ``e_2``, ``snr_w``; optional
``error_flag`` and ``info_flag``. Cuts, applied in this order, each counted on what the previous
ones left (SPEC 7):

1. ``valid_e``: e_1 and e_2 present: not -9999, not NaN/masked, and |e| = hypot(e_1, e_2) < 1;
2. ``snr_w``: snr_w > ``DESConfig.min_snr`` (20);
3. ``error_flag``: error_flag == 0 (when the column exists and ``require_error_flag_zero``);
4. ``info_flag``: info_flag == 0 (when the column exists and ``require_info_flag_zero``);
5. ``duplicate_id``: a repeated coadd_objects_id keeps its first row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from deblend.core.config import DESConfig

REQUIRED_COLUMNS = ("coadd_objects_id", "ra", "dec", "e_1", "e_2", "snr_w")
MISSING_VALUE = -9999.0


@dataclass(frozen=True)
class CutCount:
    """One cut: its name, rule, how many rows it removed, how many remain, whether it ran."""

    name: str
    rule: str
    removed: int
    remaining: int
    applied: bool = True


@dataclass
class CatalogSelection:
    """The catalog after the cuts, and what each cut removed."""

    table: Table
    n_input: int
    cuts: list[CutCount] = field(default_factory=list)


def read_catalog(path: str | Path) -> Table:
    """Read a FITS (first table HDU) or CSV catalog; column names are lower-cased.

    Raises ValueError naming the file for an unreadable file or a missing required column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalog not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".csv", ".csv.gz", ".txt")):
            table = Table.read(path, format="ascii.csv")
        else:
            table = _read_fits_table(path)
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"catalog {path} is unreadable: {exc}") from exc
    lower = {}
    for column in table.colnames:
        key = column.strip().lower()
        if key in lower:
            raise ValueError(f"catalog {path}: columns '{lower[key]}' and '{column}' clash "
                             f"(names are case-insensitive)")
        lower[key] = column
    for key, column in lower.items():
        if key != column:
            table.rename_column(column, key)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(f"catalog {path} lacks column '{missing[0]}' (needs "
                         f"{', '.join(REQUIRED_COLUMNS)}; case-insensitive)")
    for name in [c for c in (*REQUIRED_COLUMNS, "error_flag", "info_flag") if c in table.colnames]:
        try:
            _float_column(table, name)
        except ValueError as exc:
            raise ValueError(f"catalog {path}: {exc}") from None
    return table


def _read_fits_table(path: Path) -> Table:
    with fits.open(path, memmap=False) as hdul:
        for index, hdu in enumerate(hdul):
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                return Table.read(hdul, hdu=index)
    raise ValueError("no table HDU in the file")


def _float_column(table: Table, name: str) -> np.ndarray:
    """A column as float64 with masked entries as NaN; a clear error naming the column (and the
    first value that is not a number) otherwise."""
    column = np.ma.asarray(table[name])
    try:
        values = column.astype(np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in column.compressed() if not _is_number(v))
        raise ValueError(f"column '{name}' must hold numbers, but has {str(bad)!r}") from None
    return np.ma.filled(values, np.nan)


def _is_number(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def valid_ellipticity(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """True where (e1, e2) is a measurement: finite, not -9999, and |e| < 1."""
    e1 = np.asarray(e1, dtype=np.float64)
    e2 = np.asarray(e2, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(e1) & np.isfinite(e2) & (e1 != MISSING_VALUE) & (e2 != MISSING_VALUE)
                & (np.hypot(e1, e2) < 1.0))


def apply_cuts(table: Table, des: DESConfig) -> CatalogSelection:
    """Apply the configured cuts in order, counting the rows each removes."""
    n_input = len(table)
    keep = np.ones(n_input, bool)
    cuts: list[CutCount] = []

    def cut(name: str, rule: str, passes: np.ndarray | None) -> None:
        nonlocal keep
        if passes is None:
            cuts.append(CutCount(name, rule, 0, int(keep.sum()), applied=False))
            return
        removed = int((keep & ~passes).sum())
        keep = keep & passes
        cuts.append(CutCount(name, rule, removed, int(keep.sum())))

    cut("valid_e", "e_1, e_2 present (not -9999 / NaN) and abs(e) < 1",
        valid_ellipticity(_float_column(table, "e_1"), _float_column(table, "e_2")))
    snr = _float_column(table, "snr_w")
    with np.errstate(invalid="ignore"):
        cut("snr_w", f"snr_w > {des.min_snr:g}", np.isfinite(snr) & (snr > des.min_snr))
    for flag, required in (("error_flag", des.require_error_flag_zero),
                           ("info_flag", des.require_info_flag_zero)):
        if not required:
            cut(flag, f"{flag} == 0 (disabled by config)", None)
        elif flag not in table.colnames:
            cut(flag, f"{flag} == 0 (column absent: not applied)", None)
        else:
            values = _float_column(table, flag)
            cut(flag, f"{flag} == 0", values == 0)
    ids = np.asarray(np.ma.filled(np.ma.asarray(table["coadd_objects_id"]), -1)).astype(np.int64)
    first = np.zeros(n_input, bool)
    seen: set[int] = set()
    for k in np.flatnonzero(keep):
        if ids[k] not in seen:
            seen.add(int(ids[k]))
            first[k] = True
    cut("duplicate_id", "first row of each coadd_objects_id", first | ~keep)
    selected = table[keep]
    selected["coadd_objects_id"] = ids[keep]
    return CatalogSelection(selected, n_input, cuts)
