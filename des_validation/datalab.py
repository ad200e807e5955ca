"""NOIRLab Astro Data Lab access for the DES validation data (needs internet).

The im3shape catalog (DES SV, joined to Gold for positions, with the cuts of
:mod:`des_validation.catalog` in the ADQL query) through the TAP service, and five-band DES DR1
coadd cutouts through Simple Image Access, downloaded resumably with retries; offline, the first
request fails at once with a clear error. ``python -m des_validation.fetch`` is the command line
(its help has the details).
"""

from __future__ import annotations

import csv
import io
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from deblend.core.atomic import atomic_output, write_bytes_atomic, write_text_atomic
from deblend.core.config import DESConfig
from des_validation.cutouts import DES_BANDS, fits_problem

TAP_URL = "https://datalab.noirlab.edu/tap"
SIA_URL = "https://datalab.noirlab.edu/sia/des_dr1"
IM3SHAPE_TABLE = "des_sva1.gold_im3shape"
GOLD_TABLE = "des_sva1.gold_catalog"
USER_AGENT = "deblend-des-validation/0.1 (python urllib)"


class NetworkError(OSError):
    """A request failed after every retry (or the service cannot be reached at all)."""


# -- pure functions: what would be asked -----------------------------------------------------------
def build_query(des: DESConfig = DESConfig(), limit: int | None = None,
                im3shape_table: str = IM3SHAPE_TABLE, gold_table: str = GOLD_TABLE,
                ra_column: str = "ra", dec_column: str = "dec") -> str:
    """ADQL text of the catalog query: im3shape joined to Gold, with the configured cuts."""
    where = [
        "s.e_1 IS NOT NULL", "s.e_2 IS NOT NULL",
        "s.e_1 <> -9999", "s.e_2 <> -9999",
        "s.e_1 * s.e_1 + s.e_2 * s.e_2 < 1",
        f"s.snr_w > {des.min_snr:g}",
    ]
    if des.require_error_flag_zero:
        where.append("s.error_flag = 0")
    if des.require_info_flag_zero:
        where.append("s.info_flag = 0")
    top = f"TOP {int(limit)} " if limit else ""
    return (
        f"SELECT {top}s.coadd_objects_id, g.{ra_column} AS ra, g.{dec_column} AS dec, "
        f"s.e_1, s.e_2, s.snr_w, s.error_flag, s.info_flag\n"
        f"FROM {im3shape_table} AS s\n"
        f"JOIN {gold_table} AS g ON s.coadd_objects_id = g.coadd_objects_id\n"
        f"WHERE " + "\n  AND ".join(where) + "\n"
        "ORDER BY s.coadd_objects_id"
    )


def tap_request(query: str, tap_url: str = TAP_URL) -> str:
    """URL of the synchronous TAP request running ``query`` with CSV output."""
    params = {"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "csv", "QUERY": query}
    return f"{tap_url.rstrip('/')}/sync?{urllib.parse.urlencode(params)}"


def sia_request(ra: float, dec: float, size_arcsec: float, sia_url: str = SIA_URL) -> str:
    """URL of the SIA (v1) query for images covering (ra, dec), cutouts of ``size_arcsec``."""
    size_deg = size_arcsec / 3600.0
    params = {"POS": f"{ra:.7f},{dec:.7f}", "SIZE": f"{size_deg:.7f}",
              "FORMAT": "image/fits", "VERB": "2"}
    return f"{sia_url}?{urllib.parse.urlencode(params)}"


@dataclass(frozen=True)
class CutoutRequest:
    """One file to download: object, band, URL and destination name."""

    object_id: int
    band: str
    url: str

    @property
    def filename(self) -> str:
        return f"{self.object_id}_{self.band}.fits"


def parse_sia_response(votable_bytes: bytes) -> list[dict[str, object]]:
    """Rows of an SIA VOTable response as dicts (lower-case column names)."""
    from astropy.io.votable import parse_single_table

    table = parse_single_table(io.BytesIO(votable_bytes)).to_table()
    rows = []
    for row in table:
        rows.append({name.lower(): _plain(row[name]) for name in table.colnames})
    return rows


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    return value.decode() if isinstance(value, bytes) else value


def select_cutouts(object_id: int, rows: Sequence[dict[str, object]],
                   bands: Sequence[str] = DES_BANDS) -> tuple[list[CutoutRequest], list[str]]:
    """The coadd image cutout of each band among SIA rows, and the bands with none.

    Keeps rows with ``proctype == "Stack"`` and ``prodtype == "image"`` whose ``obs_bandpass``
    names the band (case-insensitive); with several, the longest ``exptime`` wins.
    """
    requests, missing = [], []
    for band in bands:
        candidates = [r for r in rows
                      if str(r.get("proctype", "")).lower() == "stack"
                      and str(r.get("prodtype", "")).lower() == "image"
                      and str(r.get("obs_bandpass", "")).strip().split(" ")[0].lower()
                      == band.lower()
                      and r.get("access_url")]
        if not candidates:
            missing.append(band)
            continue
        best = max(candidates, key=lambda r: _as_float(r.get("exptime")))
        requests.append(CutoutRequest(int(object_id), band, str(best["access_url"])))
    return requests, missing


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("-inf")


def read_catalog_csv(text: str) -> list[dict[str, str]]:
    """Rows of the TAP CSV answer (lower-case keys); a clear error if it is not the expected one."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise NetworkError("the catalog query returned nothing")
    fields = [f.strip().lower() for f in reader.fieldnames]
    needed = ("coadd_objects_id", "ra", "dec", "e_1", "e_2", "snr_w")
    if any(f not in fields for f in needed):
        raise NetworkError(f"the catalog query returned columns {fields[:8]}, not "
                           f"{', '.join(needed)} (an error message from the service?)")
    return [{k.strip().lower(): v for k, v in row.items()} for row in reader]


# -- network -------------------------------------------------------------------------------------
Getter = Callable[[str, float], bytes]


def urllib_get(url: str, timeout: float) -> bytes:
    """GET ``url`` and return the body (raises urllib/socket errors)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def get_with_retries(get: Getter, url: str, retries: int, timeout: float,
                     backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """``get(url)`` with up to ``retries`` further attempts after failures (exponential wait)."""
    attempt = 0
    while True:
        try:
            return get(url, timeout)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if attempt >= retries or _unreachable(exc):
                raise NetworkError(f"{_short(url)}: {_reason(exc)}") from exc
            sleep(backoff * (2 ** attempt))
            attempt += 1


def _unreachable(exc: BaseException) -> bool:
    """Errors that retrying will not fix at once: no DNS, refused connection, no route."""
    reason = getattr(exc, "reason", exc)
    text = str(reason).lower()
    return any(s in text for s in ("name or service not known", "nodename nor servname",
                                   "temporary failure in name resolution", "connection refused",
                                   "network is unreachable", "no route to host",
                                   "no address associated"))


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", exc))


def _short(url: str) -> str:
    """The URL without its query string (ADQL in a URL is unreadable)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def kept_cutout(path: Path, log: Callable[[str], None] = print) -> bool:
    """Whether ``path`` is a whole FITS file fetched earlier, to keep; a damaged one (truncated
    by an interrupted copy, a full disk or a sync tool) is said and counts as absent."""
    if not path.is_file():
        return False
    problem = fits_problem(path)
    if problem:
        log(f"cutout {path} is a {problem}: downloading it again")
    return not problem


def download(get: Getter, request: CutoutRequest, directory: Path, retries: int,
             timeout: float, sleep: Callable[[float], None] = time.sleep,
             log: Callable[[str], None] = print) -> bool:
    """Download one cutout to ``directory/request.filename`` via a ``.part`` file.

    Returns False (nothing done) when the file already exists whole: finished files are kept,
    damaged ones replaced (:func:`kept_cutout`).
    """
    final = directory / request.filename
    if kept_cutout(final, log):
        return False
    body = get_with_retries(get, request.url, retries, timeout, sleep=sleep)
    if not body.startswith(b"SIMPLE"):
        raise NetworkError(f"{_short(request.url)}: the answer is not a FITS file")
    write_bytes_atomic(final, body, suffix=".part")
    return True


def fetch(out: Path, des: DESConfig, limit: int | None, size_arcsec: float, retries: int,
          timeout: float, get: Getter | None = None, tap_url: str = TAP_URL,
          sia_url: str = SIA_URL, query_options: dict[str, str] | None = None,
          log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> int:
    """Run the whole fetch into ``out``; returns the number of objects with all five bands."""
    get = get or urllib_get
    created = not out.exists()
    query = build_query(des, limit, **(query_options or {}))
    catalog_path = out / "catalog.csv"
    try:
        text = _kept_catalog(catalog_path, log)
        if text is not None:
            log(f"using the catalog already fetched: {catalog_path}")
        else:
            log(f"querying {tap_url} (DES SV im3shape x Gold, cuts in the query)")
            text = get_with_retries(get, tap_request(query, tap_url), retries, timeout,
                                    sleep=sleep).decode("utf-8", "replace")
            rows = read_catalog_csv(text)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "query.adql", query + "\n")
            text = text if text.endswith("\n") else text + "\n"  # its end marks it whole
            write_text_atomic(catalog_path, text, suffix=".part")
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    rows = read_catalog_csv(text)
    if limit:
        rows = rows[:limit]
    log(f"{len(rows)} objects in the catalog")
    cutout_dir = out / "cutouts"
    cutout_dir.mkdir(exist_ok=True)
    failures: list[tuple[str, str, str]] = []
    complete = 0
    for k, row in enumerate(rows):
        object_id = int(float(row["coadd_objects_id"]))
        if all(kept_cutout(cutout_dir / f"{object_id}_{b}.fits", lambda _: None)
               for b in DES_BANDS):
            complete += 1
            continue
        try:
            answer = get_with_retries(get, sia_request(float(row["ra"]), float(row["dec"]),
                                                       size_arcsec, sia_url),
                                      retries, timeout, sleep=sleep)
            requests, missing = select_cutouts(object_id, parse_sia_response(answer))
            for band in missing:
                failures.append((str(object_id), band, "no coadd image of this band"))
            failed = 0
            for request in requests:
                try:
                    download(get, request, cutout_dir, retries, timeout, sleep=sleep, log=log)
                except NetworkError as exc:  # the other bands still come
                    failures.append((str(object_id), request.band, str(exc)))
                    failed += 1
            if not missing and not failed:
                complete += 1
        except (NetworkError, ValueError) as exc:
            failures.append((str(object_id), "", str(exc)))
        if (k + 1) % 50 == 0:
            log(f"{k + 1} / {len(rows)} objects")
    _write_failures(out / "fetch_failures.csv", failures)
    log(f"{complete} of {len(rows)} objects have all five bands in {cutout_dir}; "
        f"{len(failures)} failures listed in {out / 'fetch_failures.csv'}")
    return complete


def _kept_catalog(path: Path, log: Callable[[str], None]) -> str | None:
    """The text of the catalog fetched earlier, or None when there is none or it is damaged
    (cut short: no final newline, a short row or missing columns; then said, to query again)."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        rows = read_catalog_csv(text)
        if not text.endswith("\n") or any(None in row.values() for row in rows):
            raise ValueError("cut short")
    except (OSError, ValueError, NetworkError) as exc:
        log(f"the catalog {path} is unreadable ({exc}): querying it again")
        return None
    return text


def _write_failures(path: Path, failures: Iterable[tuple[str, str, str]]) -> None:
    with atomic_output(path, suffix=".part") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["coadd_objects_id", "band", "reason"])
        writer.writerows(failures)
