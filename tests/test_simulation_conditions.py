"""Observing conditions drawn per scene (issue 23, build 1): what a dataset stores reproduces its
images (knots and off-centre bulges included), the draws keep their ranges and never lose every
band, and datasets drawn without conditions keep their identity and read as the survey's nominal
conditions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import galsim
import numpy as np
import pytest
from astropy.table import Table

from deblend.core.config import (
    ConditionsConfig,
    ConfigError,
    MorphologyConfig,
    SimulationConfig,
    config_from_dict,
)
from simulation.builder import SceneSource, build_dataset, plan_simulation
from simulation.conditions import (
    NOMINAL_YEARS,
    SurveyConditions,
    conditions_of,
    nominal_fwhm,
    sky_residual,
)
from simulation.dataset import open_dataset
from simulation.labels import CATALOG_SHAPE_COLUMNS
from simulation.morphology import MORPHOLOGY_COLUMNS, morphology_galaxy
from simulation.surveys import psf_images, sky_levels


def conditions_sim(catalog: Path, morphology: MorphologyConfig | None = None,
                   **conditions: float) -> SimulationConfig:
    return SimulationConfig(catalog=str(catalog), n_samples=8, shard_size=4, btk_batch_size=2,
                            val_fraction=0.25, calibration_fraction=0.0, rotated_twins=True,
                            seed=5, conditions=ConditionsConfig(**conditions),
                            morphology=morphology)


@pytest.fixture(scope="module")
def conditions_dataset(tmp_path_factory: pytest.TempPathFactory, sample_catalog: Path) -> Path:
    root = tmp_path_factory.mktemp("conditions") / "data"
    build_dataset(conditions_sim(sample_catalog, MorphologyConfig(), band_missing=0.3,
                                 sky_residual=0.3), root, progress=False, log=lambda _: None)
    return root


def redraw_target(labels: dict[str, np.ndarray], index: int, survey, bands, pixels: int
                  ) -> np.ndarray:
    """The target of scene ``index`` drawn again by BTK from its stored labels alone (its knots
    and bulge offset too), on a BTK survey that carries the scene's stored conditions:
    (bands, S, S) electrons."""
    row = {column: float(labels[column][index]) for column in CATALOG_SHAPE_COLUMNS}
    row.update({f"{b}_ab": float(labels[f"mag_{b}"][index]) for b in bands})
    row.update(ra=0.0, dec=0.0, btk_rotation=0.0, g1=float(labels["g1"][index]),
               g2=float(labels["g2"][index]))
    row.update({column: labels[column][index] for column in MORPHOLOGY_COLUMNS})
    entry = Table([row])[0]
    images = []
    for band in bands:
        filt = survey.get_filter(band)
        galaxy = morphology_galaxy(entry, filt, survey).shear(g1=entry["g1"], g2=entry["g2"])
        images.append(galsim.Convolve(galaxy, filt.psf).drawImage(
            nx=pixels, ny=pixels, scale=survey.pixel_scale.to_value("arcsec")).array)
    return np.array(images)


def test_stored_conditions_reproduce_the_scene(conditions_dataset: Path) -> None:
    data = open_dataset(conditions_dataset)
    assert data.has_conditions
    stored = data.conditions()
    labels = data.labels()
    model = SurveyConditions(data.survey, data.bands)
    for index in (2, 5):
        conditions = conditions_of(stored, index)
        assert not np.allclose(conditions.years, NOMINAL_YEARS["LSST"])  # not the nominal sky
        survey = model.survey(conditions)
        clean = data.images("clean", [index])[0]
        redrawn = redraw_target(labels, index, survey, data.bands, data.stamp_pixels)
        peak = clean.max(axis=(1, 2))
        assert np.all(peak > 0)
        assert np.abs(redrawn - clean).max(axis=(1, 2)) / peak == pytest.approx(0, abs=1e-5)
        # the stored PSF images are those of the stored conditions
        np.testing.assert_allclose(data.psfs([index])[0],
                                   model.psf_images(conditions, data.stamp_pixels), atol=1e-7)
        # the noisy target is the clean one, plus the stored sky residual, plus Poisson noise
        # of variance sky + source per pixel at the stored sky level
        np.testing.assert_allclose(stored["sky_level"][index], model.sky_levels(survey))
        sigma = np.sqrt(stored["sky_level"][index])
        noise = data.images("noisy", [index])[0].astype(np.float64) - clean
        assert np.abs(conditions.sky_residual).max() > 0.1
        np.testing.assert_allclose(noise.mean(axis=(1, 2)) / sigma, conditions.sky_residual,
                                   atol=0.1)
        noise -= sky_residual(clean.shape[1:], conditions.sky_residual,
                              conditions.sky_residual_angle, sigma, (data.stamp_pixels - 1) / 2)
        sky = (noise**2 - clean).mean(axis=(1, 2))
        np.testing.assert_allclose(sky, stored["sky_level"][index], rtol=0.12)


def test_a_scene_under_conditions_differs_from_the_nominal_one(sample_catalog: Path) -> None:
    """The conditions act on the images: the same scene seed drawn under conditions has other
    fluxes (depth) and another PSF size than the nominal scene."""
    sim = conditions_sim(sample_catalog, band_missing=0.0)
    varied, _ = SceneSource(sim).draw(2, 3)
    nominal, _ = SceneSource(dataclasses.replace(sim, conditions=None)).draw(2, 3)
    flux_ratio = varied.clean.sum(axis=(2, 3)) / nominal.clean.sum(axis=(2, 3))
    expected = varied.conditions["years"] / NOMINAL_YEARS["LSST"]
    np.testing.assert_allclose(flux_ratio, expected, rtol=1e-3)
    assert varied.psf.shape == (2, 6, sim.stamp_pixels, sim.stamp_pixels)
    assert not np.allclose(varied.psf[0], psf_images("LSST", "ugrizy", sim.stamp_pixels),
                           atol=1e-4)


def test_conditions_are_reproducible_and_twins_share_them(sample_catalog: Path) -> None:
    sim = conditions_sim(sample_catalog)
    first, labels = SceneSource(sim).draw(4, 9)
    again, _ = SceneSource(sim).draw(4, 9)
    for name in first.conditions:
        np.testing.assert_array_equal(first.conditions[name], again.conditions[name])
    np.testing.assert_array_equal(first.blend, again.blend)
    np.testing.assert_array_equal(labels["twin"], [0, 1, 0, 1])
    for name, column in first.conditions.items():
        np.testing.assert_array_equal(column[0], column[1])
        if name in ("psf_fwhm", "psf_g1", "years", "sky_level"):
            assert not np.array_equal(column[1], column[2])


def test_conditions_keep_their_ranges_and_never_drop_every_band() -> None:
    config = ConditionsConfig(psf_fwhm=(0.6, 1.2), psf_fwhm_band_scatter=0.05, psf_g_max=0.05,
                              depth_years=(1.0, 10.0), depth_band_scatter=0.2, band_missing=0.3)
    model = SurveyConditions("LSST")
    rng = np.random.default_rng(0)
    draws = [model.draw(config, rng) for _ in range(2000)]
    r = model.bands.index("r")
    fwhm_r = np.array([d.psf_fwhm[r] for d in draws])
    assert 0.6 * 0.95 <= fwhm_r.min() < 0.65 and 1.15 < fwhm_r.max() <= 1.2 * 1.05
    ratio = np.array([d.psf_fwhm / model.nominal_fwhm for d in draws])
    assert np.all(ratio.max(axis=1) / ratio.min(axis=1) <= 1.05 / 0.95 + 1e-12)
    g = np.array([np.hypot(d.psf_g1, d.psf_g2) for d in draws])
    assert g.max() <= 0.05 and g.max() > 0.049
    years = np.array([d.years for d in draws])
    assert years.min() >= np.exp(-0.2) and years.max() <= 10 * np.exp(0.2)
    missing = np.array([~d.available for d in draws])
    assert missing.mean() == pytest.approx(0.3, abs=0.02)
    sparse = ConditionsConfig(band_missing=0.99)
    assert all(model.draw(sparse, rng).available.sum() >= 1 for _ in range(500))


def test_a_dataset_without_conditions_keeps_its_identity_and_reads_as_nominal(
        tiny_dataset: Path) -> None:
    assert "conditions" not in plan_simulation(SimulationConfig())
    assert "conditions" in plan_simulation(SimulationConfig(conditions=ConditionsConfig()))
    data = open_dataset(tiny_dataset)
    assert not data.has_conditions
    stored = data.conditions()
    assert stored["years"].shape == (data.n_samples, len(data.bands))
    np.testing.assert_array_equal(stored["years"], NOMINAL_YEARS["LSST"])
    np.testing.assert_allclose(stored["psf_fwhm"][3], nominal_fwhm("LSST", data.bands))
    np.testing.assert_allclose(stored["sky_level"][7], sky_levels("LSST", data.bands))
    assert stored["available"].all()
    np.testing.assert_array_equal(data.psfs([0, 9])[1], data.psf_images)


def test_conditions_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"simulation\.conditions\.depth_years"):
        config_from_dict({"simulation": {"conditions": {"depth_years": [0.0, 10.0]}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'simulation\.conditions\.fwhm'"):
        config_from_dict({"simulation": {"conditions": {"fwhm": [0.6, 1.0]}}})
    with pytest.raises(ConfigError, match=r"simulation\.conditions\.band_missing"):
        config_from_dict({"simulation": {"conditions": {"band_missing": 1.0}}})


def test_training_inputs_lack_the_bands_a_scene_lacks(conditions_dataset: Path) -> None:
    """Stages 1-3 see an unavailable band as inference fills it (0); targets keep every band."""
    from deblend.core.normalization import normalize
    from training.data import BatchReader

    data = open_dataset(conditions_dataset)
    available = data.conditions()["available"].astype(bool)
    assert (~available).any() and available.any()
    indices = np.arange(data.n_samples)
    full = normalize(data.images("blend", indices), data.normalization)
    clean = normalize(data.images("clean", indices), data.normalization)
    inputs, targets = BatchReader(conditions_dataset, "blend", "clean",
                                  fill_unavailable=True)[indices]
    inputs = inputs.numpy()
    assert np.all(inputs[~available] == 0)
    np.testing.assert_array_equal(inputs[available], full[available])
    np.testing.assert_array_equal(targets.numpy(), clean)
    unfilled, _ = BatchReader(conditions_dataset, "blend", "clean")[indices]
    np.testing.assert_array_equal(unfilled.numpy(), full)


def test_benchmark_populations_are_drawn_at_nominal_conditions(sample_catalog: Path) -> None:
    """A run trained under conditions is benchmarked on the survey's nominal sky: its BTK shear
    pairs are those of the same config without conditions (they used to take each scene's
    conditions while metacal deconvolved the nominal PSF: m = -0.29 for every estimator)."""
    from simulation.shear_pairs import draw_noiseless_pairs

    varied = conditions_sim(sample_catalog)
    pairs = draw_noiseless_pairs("btk", 4, 1, (0.02, 0.0), neighbours=True, sim=varied)
    nominal = draw_noiseless_pairs("btk", 4, 1, (0.02, 0.0), neighbours=True,
                                   sim=dataclasses.replace(varied, conditions=None))
    np.testing.assert_array_equal(pairs.plus_blend, nominal.plus_blend)
    np.testing.assert_array_equal(pairs.psfs, nominal.psfs)
