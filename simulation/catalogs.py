"""Galaxy catalogs for BTK: a real CatSim file when the config names one, else the embedded model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import btk
import numpy as np
from astropy.table import Table

REQUIRED_COLUMNS = (
    "ra", "dec", "redshift", "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn",
    "a_b", "b_b", "a_d", "b_d", "pa_bulge", "pa_disk",
)


class CatalogError(ValueError):
    """A catalog file is unreadable or lacks a column; the message names the file and column."""


def read_catsim_file(path: str | Path, bands: tuple[str, ...]) -> Table:
    """Read a CatSim-schema table (FITS, or whitespace-separated ASCII) and check its columns.

    ``bands`` are the survey's bands; each needs a ``<band>_ab`` magnitude column. DES's ``Y``
    is served by CatSim's ``y_ab`` (added as ``Y_ab``) when the file has no ``Y_ab``.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    fmt = "fits" if path.suffix.lower() in (".fits", ".fit", ".fz") or path.name.endswith(
        (".fits.gz", ".fit.gz")) else "ascii.basic"
    try:
        table = Table.read(path, format=fmt)
    except Exception as exc:  # astropy raises many types for corrupt files
        raise CatalogError(f"catalog file {path} is unreadable as {fmt}: {exc}") from exc
    return prepare_catalog_table(table, bands, source=str(path))


def prepare_catalog_table(table: Table, bands: tuple[str, ...], source: str) -> Table:
    """Check the CatSim columns, add band aliases and drop rows that cannot be drawn.

    What was dropped and why is said in ``table.meta["dropped"]`` (one line, or "" when every
    row is kept), for the caller to report."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    for band in bands:
        column = f"{band}_ab"
        if column not in table.colnames:
            if band == "Y" and "y_ab" in table.colnames:
                table[column] = table["y_ab"]
            else:
                missing.append(column)
    if missing:
        raise CatalogError(f"catalog {source} lacks column '{missing[0]}'")
    numeric = [c for c in REQUIRED_COLUMNS] + [f"{b}_ab" for b in bands]
    finite = np.ones(len(table), bool)
    for column in numeric:
        finite &= np.isfinite(np.asarray(table[column], dtype=float))
    flux = np.asarray(table["fluxnorm_bulge"]) + np.asarray(table["fluxnorm_disk"]) + np.asarray(
        table["fluxnorm_agn"])
    n_input, n_bad_values, n_no_flux = len(table), int((~finite).sum()), int(
        (finite & ~(flux > 0)).sum())
    table = table[finite & (flux > 0)]
    if len(table) == 0:
        raise CatalogError(f"catalog {source} has no row with finite values and positive flux")
    table.meta["dropped"] = (
        f"catalog {source}: {n_input - len(table)} of {n_input} rows cannot be drawn and are left "
        f"out ({n_bad_values} with a NaN or infinite value in a CatSim or magnitude column, "
        f"{n_no_flux} with no positive flux)" if len(table) < n_input else "")
    return table


def catalog_provenance(catalog_path: str | None, rows: int, seed: int) -> dict[str, Any]:
    """Where a dataset's galaxies came from (recorded in its metadata)."""
    if catalog_path is None:
        return {"source": "embedded model (simulation.catalog_model)", "rows": rows, "seed": seed}
    digest = hashlib.sha256(Path(catalog_path).read_bytes()).hexdigest()
    return {"source": "file", "path": str(Path(catalog_path).resolve()), "sha256": digest}


def load_catalog(catalog_path: str | None, bands: tuple[str, ...], rows: int, seed: int
                 ) -> btk.catalog.CatsimCatalog:
    """The BTK catalog to draw from (its provenance: :func:`catalog_provenance`)."""
    if catalog_path is not None:
        table = read_catsim_file(catalog_path, bands)
    else:
        from simulation.catalog_model import generate_catsim_catalog

        table = prepare_catalog_table(generate_catsim_catalog(rows, seed=seed), bands,
                                      source="embedded model")
    return btk.catalog.CatsimCatalog(table)
