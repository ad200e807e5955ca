"""The embedded CatSim population model (simulation.catalog_model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from scipy import stats

from simulation.catalog_model import (
    CATSIM_COLUMNS,
    COLOUR_BOUNDS,
    DEFAULT_PARAMETERS,
    I_MAG_BRIGHT,
    I_MAG_FAINT,
    Z_MAX,
    Z_MIN,
    fit_parameters,
    generate_catsim_catalog,
    main,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "catsim_sample_100.fits"
KS_ROWS = 20_000
KS_P_MIN = 0.01


@pytest.fixture(scope="module")
def catalog() -> Table:
    return generate_catsim_catalog(20_000, seed=11)


@pytest.fixture(scope="module")
def sample() -> Table:
    if not SAMPLE.is_file():
        pytest.skip(f"real CatSim sample not found at {SAMPLE} (shared data absent)")
    return Table.read(SAMPLE)


def _arrays(table: Table) -> dict[str, np.ndarray]:
    return {name: np.asarray(table[name], dtype=float) for name in CATSIM_COLUMNS}


# ------------------------------------------------------------------------------- schema -----
def test_columns_in_order_with_catsim_dtypes(catalog: Table) -> None:
    assert tuple(catalog.colnames) == CATSIM_COLUMNS
    assert len(catalog) == 20_000
    assert catalog["galtileid"].dtype == np.int64
    assert len(np.unique(catalog["galtileid"])) == len(catalog)
    for name in CATSIM_COLUMNS[1:]:
        assert catalog[name].dtype == np.float64, name
        assert np.all(np.isfinite(catalog[name])), name


def test_components_are_valid_for_btk(catalog: Table) -> None:
    d = _arrays(catalog)
    disk, bulge = d["fluxnorm_disk"] > 0, d["fluxnorm_bulge"] > 0
    assert np.all(d["fluxnorm_disk"] >= 0) and np.all(d["fluxnorm_bulge"] >= 0)
    assert np.all(disk | bulge), "a galaxy with neither disk nor bulge flux"
    assert np.all(d["fluxnorm_agn"] == 0)
    # a >= b > 0 for a present component, zeros for an absent one (CatSim's convention).
    for present, a, b in ((disk, "a_d", "b_d"), (bulge, "a_b", "b_b")):
        assert np.all(d[a][present] >= d[b][present]), a
        assert np.all(d[b][present] > 0), b
        assert np.all(d[a][~present] == 0) and np.all(d[b][~present] == 0), a
    # BTK asserts pa_disk == pa_bulge whenever both components have flux.
    both = disk & bulge
    assert both.sum() > 1000
    assert np.array_equal(d["pa_disk"][both], d["pa_bulge"][both])
    for pa, present in (("pa_disk", disk), ("pa_bulge", bulge)):
        assert np.all((d[pa] >= 0) & (d[pa] < 360)), pa
        assert np.all(d[pa][~present] == 0), pa
    # CatSim-like mix: ~30% with a bulge, ~1% pure bulges, the rest pure disks.
    assert 0.22 < bulge.mean() < 0.38
    assert 0.002 < (bulge & ~disk).mean() < 0.03


def test_ranges_and_magnitude_dependences(catalog: Table) -> None:
    d = _arrays(catalog)
    i = d["i_ab"]
    assert np.all((i >= I_MAG_BRIGHT) & (i <= I_MAG_FAINT))
    assert np.all((d["redshift"] >= Z_MIN) & (d["redshift"] <= Z_MAX))
    colours = [d["u_ab"] - d["g_ab"], d["g_ab"] - d["r_ab"], d["r_ab"] - d["i_ab"],
               d["i_ab"] - d["z_ab"], d["z_ab"] - d["y_ab"]]
    for colour, (lo, hi) in zip(colours, COLOUR_BOUNDS):
        assert np.all((colour >= lo) & (colour <= hi))
    bright, faint = i < 24.5, i > 26.5
    assert bright.sum() > 1000 and faint.sum() > 1000
    # Fainter galaxies lie further, are smaller and less often have a bulge.
    assert np.median(d["redshift"][faint]) > np.median(d["redshift"][bright]) + 0.2
    disk = d["fluxnorm_disk"] > 0
    assert np.median(d["a_d"][faint & disk]) < 0.85 * np.median(d["a_d"][bright & disk])
    assert (d["fluxnorm_bulge"][faint] > 0).mean() < (d["fluxnorm_bulge"][bright] > 0).mean()
    # Positions fill a small patch with ra >= 0 and dec <= 0.
    assert np.all(d["ra"] >= 0) and np.all(d["dec"] <= 0)
    assert np.ptp(d["ra"]) < 1.0 and np.ptp(d["dec"]) < 1.0


def test_max_i_mag_truncates_the_counts() -> None:
    table = generate_catsim_catalog(3000, seed=2, max_i_mag=25.3)
    assert len(table) == 3000
    assert table["i_ab"].max() <= 25.3
    assert table["i_ab"].min() >= I_MAG_BRIGHT
    # The truncated CDF keeps the counts' shape: most galaxies near the limit.
    assert np.median(table["i_ab"]) > 24.0
    with pytest.raises(ValueError):
        generate_catsim_catalog(10, max_i_mag=10.0)
    with pytest.raises(ValueError):
        generate_catsim_catalog(10, max_i_mag=float("nan"))


@pytest.mark.parametrize("n_rows", [0, -5])
def test_rejects_fewer_than_one_row(n_rows: int) -> None:
    with pytest.raises(ValueError):
        generate_catsim_catalog(n_rows)


def test_single_row() -> None:
    table = generate_catsim_catalog(1, seed=4)
    assert len(table) == 1 and tuple(table.colnames) == CATSIM_COLUMNS


# -------------------------------------------------------------------------- determinism -----
def test_same_seed_gives_identical_table() -> None:
    first, second = generate_catsim_catalog(2000, seed=123), generate_catsim_catalog(2000, seed=123)
    for name in CATSIM_COLUMNS:
        assert np.array_equal(first[name], second[name]), name


def test_different_seeds_differ() -> None:
    first, second = generate_catsim_catalog(2000, seed=1), generate_catsim_catalog(2000, seed=2)
    for name in ("i_ab", "redshift", "g_ab", "pa_disk", "ra"):
        assert not np.array_equal(first[name], second[name]), name
    assert not np.allclose(np.sort(first["i_ab"]), np.sort(second["i_ab"]))


# -------------------------------------------------------------------------- calibration -----
def _ks_quantities(table: Table) -> dict[str, np.ndarray]:
    d = _arrays(table)
    disk = d["fluxnorm_disk"] > 0
    return {
        "i_ab": d["i_ab"],
        "redshift": d["redshift"],
        "log10_a_d": np.log10(d["a_d"][disk]),
        "disk_axis_ratio": d["b_d"][disk] / d["a_d"][disk],
        "g-r": d["g_ab"] - d["r_ab"],
        "r-i": d["r_ab"] - d["i_ab"],
    }


@pytest.mark.parametrize("seed", [0, 7])
def test_one_point_distributions_match_the_real_sample(sample: Table, seed: int) -> None:
    real = _ks_quantities(sample)
    model = _ks_quantities(generate_catsim_catalog(KS_ROWS, seed=seed))
    pvalues = {key: stats.ks_2samp(model[key], real[key]).pvalue for key in real}
    failing = {key: p for key, p in pvalues.items() if not p > KS_P_MIN}
    assert not failing, f"KS p-values <= {KS_P_MIN}: {failing} (all: {pvalues})"


def test_a_cruder_model_would_fail_the_ks_check(sample: Table) -> None:
    """The KS check has teeth: shifting the counts by half a magnitude is detected."""
    real = np.asarray(sample["i_ab"], dtype=float)
    model = np.asarray(generate_catsim_catalog(KS_ROWS, seed=0, max_i_mag=27.0)["i_ab"])
    assert stats.ks_2samp(model, real).pvalue < KS_P_MIN


def test_fit_parameters_reproduces_the_shipped_constants(sample: Table) -> None:
    fitted = dataclasses.asdict(fit_parameters(sample))
    shipped = dataclasses.asdict(DEFAULT_PARAMETERS)
    assert fitted.keys() == shipped.keys()
    for name, value in shipped.items():
        got = np.asarray(fitted[name], dtype=float)
        want = np.asarray(value, dtype=float)
        assert got.shape == want.shape, name
        assert np.allclose(got, want, rtol=0.02, atol=0.01), (name, got, want)


def test_fit_parameters_rejects_a_table_without_the_schema() -> None:
    with pytest.raises(ValueError, match="lacks"):
        fit_parameters(Table({"i_ab": [24.0, 25.0]}))


# --------------------------------------------------------------------------------- BTK ------
def test_generated_catalog_draws_in_btk() -> None:
    btk = pytest.importorskip("btk")
    catalog = btk.catalog.CatsimCatalog(generate_catsim_catalog(2000, seed=5))
    sampling = btk.sampling_functions.DefaultSampling(stamp_size=9.0, max_number=2, max_mag=25.3)
    generator = btk.draw_blends.CatsimGenerator(catalog, sampling, btk.survey.get_surveys("LSST"),
                                                batch_size=4)
    batch = next(generator)
    images = np.asarray(batch.blend_images)
    assert images.shape == (4, 6, 45, 45)
    assert np.all(np.isfinite(images))
    assert images.sum() > 0
    isolated = np.asarray(batch.isolated_images)
    assert np.all(isolated.sum(axis=(2, 3, 4))[:, 0] > 0)  # every blend's first galaxy has flux


# --------------------------------------------------------------------------------- CLI ------
def test_cli_writes_fits_and_refuses_to_overwrite(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.fits"
    assert main(["--n", "50", "--seed", "3", "--out", str(out)]) == 0
    written = Table.read(out)
    expected = generate_catsim_catalog(50, seed=3)
    assert tuple(written.colnames) == CATSIM_COLUMNS
    for name in CATSIM_COLUMNS:
        assert np.array_equal(np.asarray(written[name]), np.asarray(expected[name])), name
    before = out.read_bytes()
    assert main(["--n", "10", "--seed", "4", "--out", str(out)]) != 0
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["--n", "10", "--seed", "4", "--out", str(out), "--force"]) == 0
    assert len(Table.read(out)) == 10


def test_cli_calibrate_prints_the_constants(sample: Table,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--calibrate", str(SAMPLE)]) == 0
    printed = capsys.readouterr().out
    assert "COUNTS_BRIGHT_SLOPE = " in printed
    assert "COLOUR_CORRELATION = " in printed
