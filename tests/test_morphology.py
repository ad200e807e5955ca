"""Knotty disks and off-centre bulges through BTK (issue 23, build 2): the galaxies keep their
flux and change their light profile, rotated twins stay exact rotations, and the default draws
stay BTK's own."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from deblend.core.config import MorphologyConfig, SimulationConfig
from simulation.builder import SceneSource, plan_simulation
from simulation.morphology import MORPHOLOGY_COLUMNS

KNOTTY = MorphologyConfig(knot_fraction=(0.3, 0.5), n_knots=(20, 40), bulge_offset=0.5)


def sim(catalog: Path, **changes) -> SimulationConfig:
    return SimulationConfig(catalog=str(catalog), n_samples=8, shard_size=8, btk_batch_size=4,
                            noise="none", min_neighbours=0, max_neighbours=0, rotated_twins=True,
                            seed=2, **changes)


def test_knots_and_offset_bulges_keep_the_flux_and_change_the_profile(sample_catalog) -> None:
    smooth, _ = SceneSource(sim(sample_catalog)).draw(4, 5)
    knotty, labels = SceneSource(sim(sample_catalog, morphology=KNOTTY)).draw(4, 5)
    for column in MORPHOLOGY_COLUMNS:
        assert labels[column].shape == (4,)
    assert np.all((labels["knot_fraction"] >= 0.3) & (labels["knot_fraction"] <= 0.5))
    flux_smooth = smooth.clean.sum(axis=(2, 3))  # (knots spread less far off the stamp)
    np.testing.assert_allclose(knotty.clean.sum(axis=(2, 3)), flux_smooth, rtol=0.02)
    peak = smooth.clean.max(axis=(2, 3))
    change = np.abs(knotty.clean - smooth.clean).max(axis=(2, 3)) / peak
    assert np.all(change[flux_smooth > 0] > 0.01)


def test_a_knotty_twin_is_its_original_turned_by_90_degrees(sample_catalog) -> None:
    scenes, labels = SceneSource(sim(sample_catalog, morphology=KNOTTY)).draw(4, 6)
    np.testing.assert_array_equal(labels["twin"], [0, 1, 0, 1])
    for k in (0, 2):
        original, twin = scenes.clean[k], scenes.clean[k + 1]
        peak = original.max()
        assert np.abs(twin - np.rot90(original, k=1, axes=(1, 2))).max() < 2e-4 * peak


def test_the_default_sampling_draws_no_morphology(sample_catalog) -> None:
    config = sim(sample_catalog)
    assert "morphology" not in plan_simulation(config)
    _, labels = SceneSource(config).draw(2, 5)
    assert not set(MORPHOLOGY_COLUMNS) & set(labels)
    again, _ = SceneSource(dataclasses.replace(config, morphology=None)).draw(2, 5)
    first, _ = SceneSource(config).draw(2, 5)
    np.testing.assert_array_equal(first.blend, again.blend)
    with pytest.raises(ValueError, match="knot_fraction"):
        MorphologyConfig(knot_fraction=(0.5, 0.2))


def test_the_knotty_profile_has_the_flux_of_btks_galaxy(sample_catalog) -> None:
    """Knots take their flux from the disk, the bulge moves: the profile's flux is BTK's."""
    import galsim
    from astropy.table import Table
    from btk.draw_blends import get_catsim_galaxy

    from simulation.catalogs import load_catalog
    from simulation.morphology import draw_morphology, morphology_galaxy
    from simulation.surveys import get_survey

    survey = get_survey("LSST")
    table = load_catalog(str(sample_catalog), tuple(survey.available_filters), 0, 0
                         ).get_raw_catalog()
    rows = Table(table[:20])
    for name, column in draw_morphology(KNOTTY, len(rows), np.random.default_rng(1)).items():
        rows[name] = column
    checked = 0
    for row in rows:
        if row["fluxnorm_disk"] <= 0 or row["fluxnorm_bulge"] <= 0:
            continue
        smooth = get_catsim_galaxy(row, survey.get_filter("i"), survey)
        knotty = morphology_galaxy(row, survey.get_filter("i"), survey)
        assert knotty.flux == pytest.approx(smooth.flux, rel=1e-9)
        assert isinstance(knotty, galsim.Sum)
        checked += 1
    assert checked >= 3


# -- COSMOS fits: index, size and ellipticity of real galaxies, CatSim's flux and colour --------
WITHHELD = (Path(__file__).resolve().parents[2] / "shared" / "data" / "cosmos"
            / "real_galaxy_catalog_26_extension_example.fits")
COSMOS = MorphologyConfig(knot_fraction=(0.0, 0.0), bulge_offset=0.0, cosmos_fraction=1.0)


@pytest.fixture(scope="module")
def cosmos():
    from simulation.morphology import CosmosFits, packaged_cosmos_fits

    try:
        packaged_cosmos_fits()
    except FileNotFoundError:
        pytest.skip("the COSMOS fits packaged with fpfs are not installed (.[cosmos])")
    return CosmosFits()


def test_cosmos_fits_are_picked_by_magnitude_and_keep_catsims_flux(sample_catalog, cosmos
                                                                   ) -> None:
    from simulation.morphology import COSMOS_COLUMN

    smooth, smooth_labels = SceneSource(sim(sample_catalog)).draw(8, 5)
    scenes, labels = SceneSource(sim(sample_catalog, morphology=COSMOS)).draw(8, 5)
    picked = labels[COSMOS_COLUMN]
    bright = labels["mag_i"] <= cosmos.mags[-1]
    assert np.all(picked[bright] >= 0) and np.all(picked[~bright] == -1)
    assert bright.sum() >= 4
    # the fit comes from the rows nearest in magnitude (F814W against the i band)
    fit_mags = np.array([cosmos.sample.param_cat["mag_auto"][cosmos.sample.orig_index[
        cosmos.rows[i]]] for i in picked[bright]])
    assert np.all(np.abs(fit_mags - labels["mag_i"][bright]) < 0.2)
    # the flux is BTK's for the CatSim row; the profile is the fit's, so the size changes
    flux = scenes.clean.sum(axis=(2, 3))
    np.testing.assert_allclose(flux, smooth.clean.sum(axis=(2, 3)), rtol=0.1)
    assert np.any(np.abs(labels["hsm_sigma"][bright] / smooth_labels["hsm_sigma"][bright] - 1)
                  > 0.1)
    # a rotated twin turns its COSMOS fit with it
    np.testing.assert_array_equal(picked[0::2], picked[1::2])
    for k in (0, 2, 4, 6):
        original, twin = scenes.clean[k], scenes.clean[k + 1]
        assert np.abs(twin - np.rot90(original, k=1, axes=(1, 2))).max() < 2e-4 * original.max()


def test_the_galaxies_a_benchmark_measures_on_are_withheld_from_the_fits(cosmos) -> None:
    """The conditions benchmark's 100 real COSMOS galaxies: 14 of them have a fit in fpfs's
    catalogue, and a training set withholding them cannot draw one."""
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    from simulation.morphology import CosmosFits

    if not WITHHELD.is_file():
        pytest.skip(f"COSMOS galaxies missing: {WITHHELD}")
    withheld = CosmosFits(withheld=str(WITHHELD))
    assert 0 < len(cosmos) - len(withheld) <= 100
    test = Table.read(WITHHELD, hdu=1)
    kept = withheld.sample.orig_index[withheld.rows]
    fits = SkyCoord(withheld.sample.param_cat["ra"][kept], withheld.sample.param_cat["dec"][kept],
                    unit="deg")
    _, separation, _ = SkyCoord(test["RA"], test["DEC"], unit="deg").match_to_catalog_sky(fits)
    assert separation.arcsec.min() >= 1.0


def test_a_bad_cosmos_catalogue_is_refused_before_anything_is_drawn(sample_catalog, tmp_path
                                                                    ) -> None:
    from simulation.builder import build_dataset, check_catalog

    not_fits = tmp_path / "fits.fits"
    not_fits.write_text("not a catalogue")
    for config, key in ((dataclasses.replace(COSMOS, cosmos_catalog=str(tmp_path / "none.fits")),
                         "cosmos_catalog"),
                        (dataclasses.replace(COSMOS, cosmos_catalog=str(not_fits)),
                         "cosmos_catalog"),
                        (dataclasses.replace(COSMOS, cosmos_withheld=str(not_fits)),
                         "cosmos_withheld"),
                        (dataclasses.replace(COSMOS, cosmos_withheld=str(tmp_path / "none.fits")),
                         "cosmos_withheld")):
        if key == "cosmos_withheld":
            pytest.importorskip("fpfs")
        with pytest.raises((ValueError, FileNotFoundError), match=key):
            check_catalog(sim(sample_catalog, morphology=config))
        with pytest.raises((ValueError, FileNotFoundError), match=key):
            build_dataset(sim(sample_catalog, morphology=config), tmp_path / "data",
                          progress=False, log=lambda _: None)
        assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="cosmos_fraction"):
        MorphologyConfig(cosmos_fraction=1.5)


def test_knots_without_cosmos_fits_keep_their_plan_and_columns(sample_catalog) -> None:
    from simulation.morphology import COSMOS_COLUMN

    config = sim(sample_catalog, morphology=KNOTTY)
    assert "cosmos_fraction" not in plan_simulation(config)["morphology"]
    _, labels = SceneSource(config).draw(2, 5)
    assert COSMOS_COLUMN not in labels


# -- real HST images: the training half of the real-galaxy catalogue --------------------------
REAL = MorphologyConfig(knot_fraction=(0.0, 0.0), bulge_offset=0.0, real_fraction=1.0,
                        real_catalog=str(WITHHELD))


def test_real_galaxies_come_from_the_training_half_and_keep_catsims_flux(sample_catalog
                                                                         ) -> None:
    from simulation.galsim_population import real_galaxies, real_galaxy_split
    from simulation.morphology import COSMOS_COLUMN, REAL_COLUMN, REAL_MAX_BRIGHTENING

    if not WITHHELD.is_file():
        pytest.skip(f"COSMOS galaxies missing: {WITHHELD}")
    smooth, smooth_labels = SceneSource(sim(sample_catalog)).draw(8, 5)
    scenes, labels = SceneSource(sim(sample_catalog, morphology=REAL)).draw(8, 5)
    assert COSMOS_COLUMN not in labels
    rows, target_mag = labels[REAL_COLUMN], labels["mag_i"]
    drawn = rows >= 0
    assert drawn.sum() >= 4
    mags = real_galaxies(str(WITHHELD)).mags
    training, held_out = real_galaxy_split(len(mags))
    assert np.isin(rows[drawn], training).all() and not np.isin(rows, held_out).any()
    # never more than REAL_MAX_BRIGHTENING brighter than the HST galaxy, and among the nearest
    assert np.all(target_mag[drawn] >= mags[rows[drawn]] - REAL_MAX_BRIGHTENING)
    assert np.all(np.abs(mags[rows[drawn]] - target_mag[drawn]) < 1.0)
    assert np.all(target_mag[~drawn] < mags[training].min() - REAL_MAX_BRIGHTENING)
    # CatSim's flux, the HST galaxy's light: a rotated twin is its original turned by 90 degrees
    np.testing.assert_allclose(scenes.clean.sum(axis=(2, 3))[drawn],
                               smooth.clean.sum(axis=(2, 3))[drawn], rtol=0.1)
    assert np.any(np.abs(labels["hsm_sigma"][drawn] / smooth_labels["hsm_sigma"][drawn] - 1)
                  > 0.1)
    np.testing.assert_array_equal(rows[0::2], rows[1::2])
    for k in np.flatnonzero(drawn[0::2]) * 2:
        original, twin = scenes.clean[k], scenes.clean[k + 1]
        assert np.abs(twin - np.rot90(original, k=1, axes=(1, 2))).max() < 2e-4 * original.max()


def test_real_galaxies_and_cosmos_fits_share_the_galaxies(sample_catalog) -> None:
    """With both fractions, a galaxy drawn from an HST image is not also a COSMOS fit, and the
    COSMOS picks of the galaxies that stay fits are those drawn without real galaxies."""
    from simulation.morphology import COSMOS_COLUMN, REAL_COLUMN, draw_morphology

    pytest.importorskip("fpfs")
    if not WITHHELD.is_file():
        pytest.skip(f"COSMOS galaxies missing: {WITHHELD}")
    mags = np.linspace(21.0, 25.0, 400)
    both = draw_morphology(dataclasses.replace(REAL, real_fraction=0.3, cosmos_fraction=0.5),
                           400, np.random.default_rng(4), mags)
    fits = draw_morphology(dataclasses.replace(REAL, real_fraction=0.0, cosmos_fraction=0.5),
                           400, np.random.default_rng(4), mags)
    real = both[REAL_COLUMN] >= 0
    assert 0.2 < real.mean() < 0.4
    assert np.all(both[COSMOS_COLUMN][real] == -1)
    np.testing.assert_array_equal(both[COSMOS_COLUMN][~real], fits[COSMOS_COLUMN][~real])


def test_a_bad_real_galaxy_catalogue_is_refused_before_anything_is_drawn(sample_catalog, tmp_path
                                                                         ) -> None:
    from deblend.core.config import ConfigError
    from simulation.builder import build_dataset, check_catalog

    not_fits = tmp_path / "real.fits"
    not_fits.write_text("not a catalogue")
    for path in (tmp_path / "none.fits", not_fits):
        config = sim(sample_catalog, morphology=dataclasses.replace(REAL, real_catalog=str(path)))
        with pytest.raises((ValueError, FileNotFoundError), match="real_catalog"):
            check_catalog(config)
        with pytest.raises((ValueError, FileNotFoundError), match="real_catalog"):
            build_dataset(config, tmp_path / "data", progress=False, log=lambda _: None)
        assert not (tmp_path / "data").exists()
    with pytest.raises(ConfigError, match="real_catalog"):
        MorphologyConfig(real_fraction=0.5)
    with pytest.raises(ConfigError, match="real_fraction"):
        MorphologyConfig(real_fraction=-0.1, real_catalog=str(WITHHELD))
    assert "real_fraction" not in plan_simulation(sim(sample_catalog, morphology=KNOTTY))[
        "morphology"]
