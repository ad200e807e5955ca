"""Dense BTK fields (simulation.dense_fields): tiny fields of 20" with 3-5 galaxies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from surveycodex.utilities import mag2counts, mean_sky_level

from deblend.core.config import Config, config_from_dict
from deblend.core.outputs import MARKER
from deblend.core.shapes import moments_ellipticity, second_moments
from simulation.dense_fields import (
    CHUNK_DIR,
    METADATA_FILE,
    DenseFieldsError,
    FieldBatch,
    chunk_name,
    draw_fields,
    generate_fields,
    main,
    open_fields,
)
from simulation.surveys import get_survey

FIELD_ARCSEC, N_FIELDS, MIN_GAL, MAX_GAL, SEED = 20.0, 3, 3, 5, 11


def tiny_fields_config(catalog: Path, **dense: object) -> Config:
    return config_from_dict({
        "name": "tiny-fields",
        "simulation": {"catalog": str(catalog)},
        "dense_fields": {"field_arcsec": FIELD_ARCSEC, "min_galaxies": MIN_GAL,
                         "max_galaxies": MAX_GAL, "n_fields": N_FIELDS, "max_mag": 25.3,
                         "seed": SEED, **dense},
    })


@pytest.fixture(scope="module")
def config(sample_catalog: Path) -> Config:
    return tiny_fields_config(sample_catalog)


@pytest.fixture(scope="module")
def fields(config: Config) -> FieldBatch:
    return draw_fields(config.simulation, config.dense_fields)


@pytest.fixture(scope="module")
def generated(config: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fields on disk in two chunks (2 + 1 fields); copy before changing."""
    root = tmp_path_factory.mktemp("dense") / "fields"
    generate_fields(config, root, progress=False, chunk_size=2, log=lambda _: None)
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "fields"
    shutil.copytree(root, target)
    return target


def assert_same(a: FieldBatch, b: FieldBatch) -> None:
    for name in ("images", "noiseless", "isolated", "n_galaxies", "sky_levels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.bands, a.pixel_scale, a.survey, a.noise) == (b.bands, b.pixel_scale, b.survey, b.noise)
    assert len(a.truth) == len(b.truth)
    for ta, tb in zip(a.truth, b.truth):
        assert ta.colnames == tb.colnames
        for column in ta.colnames:
            np.testing.assert_array_equal(ta[column], tb[column], err_msg=column)


def test_shapes_counts_and_sky_levels(fields: FieldBatch) -> None:
    side = round(FIELD_ARCSEC / 0.2)
    assert fields.bands == ("u", "g", "r", "i", "z", "y") and fields.pixel_scale == 0.2
    assert fields.images.shape == (N_FIELDS, 6, side, side) and fields.images.dtype == np.float32
    assert fields.noiseless.shape == fields.images.shape
    assert fields.isolated.shape == (N_FIELDS, MAX_GAL, 6, 45, 45)
    assert np.all((fields.n_galaxies >= MIN_GAL) & (fields.n_galaxies <= MAX_GAL))
    assert [len(t) for t in fields.truth] == list(fields.n_galaxies)
    assert fields.mask.sum() == fields.n_galaxies.sum()
    assert np.all(fields.isolated[~fields.mask] == 0)  # padding rows
    assert np.all(fields.isolated[fields.mask].sum(axis=(-3, -2, -1)) > 0)
    survey = get_survey("LSST")
    expected = [mean_sky_level(survey, survey.get_filter(b)).to_value("electron")
                for b in fields.bands]
    np.testing.assert_allclose(fields.sky_levels, expected, rtol=1e-12)
    for table in fields.truth:
        assert np.all(table["mag"] <= 25.3)
        np.testing.assert_array_equal(table["mag"], table["mag_i"])


def test_positions_follow_btk_convention_and_margin(fields: FieldBatch) -> None:
    side = fields.images.shape[-1]
    margin_px = 3.0 / fields.pixel_scale
    for i, table in enumerate(fields.truth):
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        assert np.all((x >= margin_px - 1) & (x <= side - margin_px))
        assert np.all((y >= margin_px - 1) & (y <= side - margin_px))
        # the isolated galaxy's light centroid sits at (x, y): x is the column, y the row
        m = second_moments(fields.isolated[i, :len(table)].astype(np.float64).sum(axis=1))
        inside = ~np.asarray(table["clipped"])
        centre = 45 // 2
        dx = x - np.floor(x + 0.5)
        dy = y - np.floor(y + 0.5)
        np.testing.assert_allclose(m.x0[inside] - centre, dx[inside], atol=0.1)
        np.testing.assert_allclose(m.y0[inside] - centre, dy[inside], atol=0.1)


def test_truth_fluxes_and_shapes(fields: FieldBatch) -> None:
    survey = get_survey("LSST")
    ratios = []
    for i, table in enumerate(fields.truth):
        n = len(table)
        stamps = fields.isolated[i, :n].astype(np.float64)
        np.testing.assert_allclose(table["flux"], stamps.sum(axis=(-2, -1)), rtol=1e-6)
        assert np.all(table["field_flux"] >= table["flux"] * (1 - 1e-6))
        inside = ~np.asarray(table["clipped"])
        if inside.any():  # stamp inside the field: it holds nearly all the galaxy's light
            assert np.all(table["flux"][inside] > 0.9 * table["field_flux"][inside])
        for b, band in enumerate(fields.bands):
            catalog = np.array([mag2counts(m, survey, survey.get_filter(band)).to_value("electron")
                                for m in table[f"mag_{band}"]])
            ratios.append(table["field_flux"][:, b] / catalog)
        label = stamps[:, [fields.bands.index(b) for b in ("r", "i", "z")]].sum(axis=1)
        e1, e2 = moments_ellipticity(label)
        np.testing.assert_allclose(table["e1"], e1, atol=1e-9)
        np.testing.assert_allclose(table["e2"], e2, atol=1e-9)
        assert np.all(np.hypot(table["e1"], table["e2"]) < 1)
        noiseless = stamps.sum(axis=0)
        assert np.all(noiseless >= 0)
    ratios = np.concatenate(ratios)
    assert abs(np.median(ratios) - 1) < 0.02  # the field holds the catalog's flux
    assert np.all((ratios > 0.7) & (ratios < 1.0001))


def test_noise_has_btk_variance(fields: FieldBatch) -> None:
    assert fields.noise == "all"
    noise = fields.images.astype(np.float64) - fields.noiseless
    for b, sky in enumerate(fields.sky_levels):
        empty = fields.noiseless[:, b] < 1e-3 * np.sqrt(sky)
        assert empty.sum() > 5000
        values = noise[:, b][empty]
        assert abs(values.mean()) < 5 * np.sqrt(sky / values.size)  # sky-subtracted
        assert values.var() / sky == pytest.approx(1.0, abs=0.05)
        # everywhere: variance = sky + source (Poisson)
        chi2 = (noise[:, b] ** 2 / (sky + fields.noiseless[:, b])).mean()
        assert chi2 == pytest.approx(1.0, abs=0.05)


def test_reproducible_from_the_seed(config: Config, fields: FieldBatch) -> None:
    assert_same(draw_fields(config.simulation, config.dense_fields), fields)
    other = draw_fields(config.simulation, config.dense_fields, n=1, seed=SEED + 1)
    assert not np.array_equal(other.images[0], fields.images[0])
    first = draw_fields(config.simulation, config.dense_fields, n=1)
    np.testing.assert_array_equal(first.images[0], fields.images[0])


def test_generated_fields_match_the_drawn_ones(generated: Path, fields: FieldBatch) -> None:
    assert_same(open_fields(generated), fields)
    meta = json.loads((generated / METADATA_FILE).read_text())
    assert meta["n_fields"] == N_FIELDS and len(meta["plan"]["chunks"]) == 2
    assert meta["sky_levels"] == pytest.approx(list(fields.sky_levels))
    assert (generated / MARKER).read_text().strip() == "dense-fields"


def test_resume_after_a_deleted_chunk(generated: Path, config: Config, tmp_path: Path) -> None:
    root = copy_of(generated, tmp_path)
    kept, lost = root / CHUNK_DIR / chunk_name(0), root / CHUNK_DIR / chunk_name(1)
    before = kept.stat()
    lost.unlink()
    with pytest.raises(DenseFieldsError, match="chunk-00001.h5 is missing"):
        open_fields(root)
    messages: list[str] = []
    generate_fields(config, root, progress=False, chunk_size=2, log=messages.append)
    assert any("1 of 2 chunks already complete" in m for m in messages)
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_same(open_fields(root), open_fields(generated))


def test_refuses_a_foreign_directory(generated: Path, config: Config, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not a deblend dense-fields directory"):
            generate_fields(config, foreign, progress=False, force=force, log=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "keep me"

    root = copy_of(generated, tmp_path)
    other = config.replace("dense_fields", seed=SEED + 1)
    with pytest.raises(DenseFieldsError, match=r"another config .*dense_fields\.seed"):
        generate_fields(other, root, progress=False, chunk_size=2, log=lambda _: None)
    assert_same(open_fields(root), open_fields(generated))  # untouched
    generate_fields(other, root, progress=False, chunk_size=2, force=True, log=lambda _: None)
    replaced = open_fields(root)
    assert json.loads((root / METADATA_FILE).read_text())["plan"]["dense_fields"]["seed"] == SEED + 1
    assert not np.array_equal(replaced.images, open_fields(generated).images)


def test_clear_errors_on_corrupt_or_missing_files(generated: Path, config: Config,
                                                  tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_fields(tmp_path / "nowhere")
    root = copy_of(generated, tmp_path)
    chunk = root / CHUNK_DIR / chunk_name(1)
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 3])
    with pytest.raises(DenseFieldsError, match=r"chunk-00001\.h5 is unreadable"):
        open_fields(root)
    generate_fields(config, root, progress=False, chunk_size=2, log=lambda _: None)  # redrawn
    assert_same(open_fields(root), open_fields(generated))

    with h5py.File(chunk, "a") as handle:
        del handle["truth/e1"]
    with pytest.raises(DenseFieldsError, match=r"chunk-00001\.h5 lacks the truth column 'truth/e1'"):
        open_fields(root)
    with h5py.File(chunk, "a") as handle:
        del handle["isolated"]
    with pytest.raises(DenseFieldsError, match=r"lacks the array 'isolated'"):
        open_fields(root)

    (root / METADATA_FILE).write_text('{"plan": ')
    with pytest.raises(DenseFieldsError, match=r"metadata\.json is unreadable"):
        open_fields(root)
    generate_fields(config, root, progress=False, chunk_size=2, log=lambda _: None)  # repaired
    assert_same(open_fields(root), open_fields(generated))


def test_bad_settings_are_refused(sample_catalog: Path) -> None:
    narrow = tiny_fields_config(sample_catalog, field_arcsec=5.0)
    with pytest.raises(ValueError, match="dense_fields.field_arcsec"):
        draw_fields(narrow.simulation, narrow.dense_fields, n=1)
    faint = tiny_fields_config(sample_catalog, max_mag=15.0)
    with pytest.raises(ValueError, match="dense_fields.max_mag"):
        draw_fields(faint.simulation, faint.dense_fields, n=1)


def test_command_line(sample_catalog: Path, generated: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "fields.yaml"
    config_path.write_text(yaml.safe_dump(tiny_fields_config(sample_catalog).to_dict()))
    out = tmp_path / "cli"
    assert main(["--config", str(config_path), "--out", str(out), "--n", "1",
                 "--no-progress"]) == 0
    assert "dense fields complete" in capsys.readouterr().out
    np.testing.assert_array_equal(open_fields(out).images[0], open_fields(generated).images[0])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    assert main(["--config", str(config_path), "--out", str(foreign), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(foreign) in err[0]
