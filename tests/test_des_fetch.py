"""des_validation.fetch without the network: query text, requests, resumable downloads, offline."""

from __future__ import annotations

import io
import urllib.error
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.io.votable import from_table
from astropy.table import Table

from deblend.core.config import DESConfig
from des_validation import datalab as fetch_module
from des_validation.cutouts import DES_BANDS, read_cutouts
from des_validation.datalab import (
    CutoutRequest,
    NetworkError,
    build_query,
    download,
    fetch,
    get_with_retries,
    parse_sia_response,
    select_cutouts,
    sia_request,
    tap_request,
)
from des_validation.fetch import main
from des_validation.standin_cutouts import make_wcs


def test_query_text_has_the_join_and_the_cuts() -> None:
    query = build_query(DESConfig(), limit=25)
    assert query.startswith("SELECT TOP 25 ")
    assert "FROM des_sva1.gold_im3shape AS s" in query
    assert "JOIN des_sva1.gold_catalog AS g ON s.coadd_objects_id = g.coadd_objects_id" in query
    for clause in ("s.e_1 <> -9999", "s.e_2 <> -9999", "s.e_1 IS NOT NULL",
                   "s.e_1 * s.e_1 + s.e_2 * s.e_2 < 1", "s.snr_w > 20", "s.error_flag = 0",
                   "s.info_flag = 0"):
        assert clause in query
    for column in ("s.coadd_objects_id", "g.ra AS ra", "g.dec AS dec", "s.e_1", "s.e_2",
                   "s.snr_w"):
        assert column in query
    relaxed = build_query(DESConfig(min_snr=15, require_info_flag_zero=False))
    assert "TOP" not in relaxed and "s.snr_w > 15" in relaxed and "info_flag = 0" not in relaxed
    custom = build_query(DESConfig(), im3shape_table="a.b", gold_table="c.d", ra_column="ra_j2000")
    assert "FROM a.b AS s" in custom and "JOIN c.d AS g" in custom and "g.ra_j2000 AS ra" in custom


def test_tap_and_sia_urls() -> None:
    query = build_query(DESConfig(), limit=3)
    url = tap_request(query)
    parts = urllib.parse.urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://datalab.noirlab.edu/tap/sync"
    params = dict(urllib.parse.parse_qsl(parts.query))
    assert params == {"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "csv", "QUERY": query}
    sia = urllib.parse.urlsplit(sia_request(70.5, -50.25, 15.0))
    assert sia.netloc == "datalab.noirlab.edu" and sia.path == "/sia/des_dr1"
    params = dict(urllib.parse.parse_qsl(sia.query))
    assert params["POS"] == "70.5000000,-50.2500000"
    assert float(params["SIZE"]) == pytest.approx(15.0 / 3600, abs=1e-7)
    assert params["FORMAT"] == "image/fits"


def sia_votable(object_id: int, bands=DES_BANDS) -> bytes:
    """A canned SIA answer: for each band a coadd image (two exposures for g), a weight map and
    a single-epoch image."""
    rows = []
    for band in bands:
        for exptime in ((900.0, 1200.0) if band == "g" else (900.0,)):
            rows.append((f"https://example.org/cut/{object_id}/{band}/{int(exptime)}", band,
                         "Stack", "image", exptime))
        rows.append((f"https://example.org/weight/{object_id}/{band}", band, "Stack", "weight",
                     900.0))
        rows.append((f"https://example.org/se/{object_id}/{band}", band, "InstCal", "image",
                     90.0))
    table = Table(rows=rows, names=("access_url", "obs_bandpass", "proctype", "prodtype",
                                    "exptime"))
    buffer = io.BytesIO()
    from_table(table).to_xml(buffer)
    return buffer.getvalue()


def test_sia_answer_to_cutout_requests() -> None:
    rows = parse_sia_response(sia_votable(42))
    requests, missing = select_cutouts(42, rows)
    assert missing == []
    assert [r.band for r in requests] == list(DES_BANDS)
    assert requests[0].url == "https://example.org/cut/42/g/1200"  # longest coadd exposure
    assert requests[4].url == "https://example.org/cut/42/Y/900"
    assert requests[4].filename == "42_Y.fits"
    _, missing = select_cutouts(42, parse_sia_response(sia_votable(42, bands=("g", "r"))))
    assert missing == ["i", "z", "Y"]


def fits_bytes(value: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    header = make_wcs(70.0, -50.0, (20, 20), 0.263).to_header()
    fits.PrimaryHDU(np.full((20, 20), value, np.float32), header=header).writeto(buffer)
    return buffer.getvalue()


def test_retries_then_success_and_unreachable_fails_at_once() -> None:
    calls, waits = [], []

    def flaky(url: str, timeout: float) -> bytes:
        calls.append(url)
        if len(calls) < 3:
            raise urllib.error.URLError("timed out")
        return b"ok"

    assert get_with_retries(flaky, "https://x/y", retries=3, timeout=1, sleep=waits.append) == b"ok"
    assert len(calls) == 3 and waits == [2.0, 4.0]

    def offline(url: str, timeout: float) -> bytes:
        calls.append(url)
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    calls.clear()
    with pytest.raises(NetworkError, match="Name or service not known"):
        get_with_retries(offline, "https://x/y?q=1", retries=5, timeout=1, sleep=waits.append)
    assert len(calls) == 1


def test_download_is_atomic_and_resumable(tmp_path: Path) -> None:
    request = CutoutRequest(7, "r", "https://example.org/7/r")
    got = []
    assert download(lambda url, t: got.append(url) or fits_bytes(), request, tmp_path, 0, 1)
    assert (tmp_path / "7_r.fits").is_file() and not list(tmp_path.glob("*.part"))
    assert not download(lambda url, t: got.append(url) or fits_bytes(), request, tmp_path, 0, 1)
    assert len(got) == 1  # the finished file is kept, nothing fetched again
    with pytest.raises(NetworkError, match="not a FITS"):
        download(lambda url, t: b"<html>error</html>", CutoutRequest(8, "r", "u"), tmp_path, 0, 1)
    assert not (tmp_path / "8_r.fits").exists()


class FakeDataLab:
    """Answers TAP, SIA and cutout URLs like the service would; can fail chosen URLs."""

    def __init__(self, ids: list[int], fail: set[str] = frozenset()) -> None:
        self.ids = ids
        self.fail = set(fail)
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> bytes:
        self.calls.append(url)
        if any(f in url for f in self.fail):
            raise urllib.error.URLError("timed out")
        if "/tap/sync" in url:
            lines = ["coadd_objects_id,ra,dec,e_1,e_2,snr_w,error_flag,info_flag"]
            lines += [f"{i},{70 + k * 0.01},-50.0,0.1,-0.2,40.0,0,0"
                      for k, i in enumerate(self.ids)]
            return ("\n".join(lines) + "\n").encode()
        if "/sia/" in url:
            ra = float(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["POS"]
                       .split(",")[0])
            return sia_votable(self.ids[round((ra - 70) / 0.01)])
        return fits_bytes(float(len(self.calls)))


def test_fetch_with_a_fake_service_resumes(tmp_path: Path) -> None:
    out = tmp_path / "des"
    service = FakeDataLab([101, 102, 103], fail={"/cut/102/i/"})
    complete = fetch(out, DESConfig(), None, 15.0, retries=1, timeout=1, get=service,
                     log=lambda _: None, sleep=lambda _: None)
    assert complete == 2
    assert (out / "catalog.csv").is_file() and "SELECT" in (out / "query.adql").read_text()
    assert "102" in (out / "fetch_failures.csv").read_text()
    found = read_cutouts(out / "cutouts")
    assert [c.object_id for c in found.cutouts] == [101, 103]
    assert found.skipped[0].object_id == 102 and "missing band i" in found.skipped[0].reason
    # second run: the catalog and finished cutouts are kept; only 102's missing band is fetched
    service2 = FakeDataLab([101, 102, 103])
    assert fetch(out, DESConfig(), None, 15.0, retries=1, timeout=1, get=service2,
                 log=lambda _: None, sleep=lambda _: None) == 3
    assert not any("/tap/" in c for c in service2.calls)
    downloads = [c for c in service2.calls if "/cut/" in c]
    assert downloads == ["https://example.org/cut/102/i/900"]


def test_fetch_offline_fails_cleanly_and_leaves_nothing(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    out = tmp_path / "des"

    def no_network(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(fetch_module, "urllib_get", no_network)
    assert main(["--out", str(out), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot fetch DES data") and "internet" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fetch_refused_connection_fails_fast(tmp_path: Path, capsys) -> None:
    """A real socket to a closed local port: the offline path without any monkeypatching."""
    out = tmp_path / "des"
    assert main(["--out", str(out), "--tap-url", "http://127.0.0.1:9/tap", "--retries", "3",
                 "--timeout", "5"]) == 2
    assert "cannot fetch DES data" in capsys.readouterr().err
    assert not out.exists()


def test_print_query_fetches_nothing(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "x"), "--print-query", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "SELECT TOP 2" in text and "https://datalab.noirlab.edu/tap/sync?" in text
    assert not (tmp_path / "x").exists()
