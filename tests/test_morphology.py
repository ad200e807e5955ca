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
