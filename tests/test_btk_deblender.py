"""Our model inside BTK: scored with BTK's matching and metrics next to BTK's SEP deblender."""

from __future__ import annotations

import btk
import numpy as np
import pytest
from surveycodex.utilities import mean_sky_level

from deblend.core.btk_deblender import VAEDeblender
from deblend.core.config import load_config
from deblend.core.stamps import cut_stamp, paste_stamp
from simulation.builder import SceneSource


@pytest.fixture(scope="module")
def blend_batch(tiny_config):
    sim = load_config(tiny_config).simulation
    return next(SceneSource(sim).drawer(seed=11, batch_size=8).generator)


def test_cut_and_paste_are_inverse_and_pad_at_edges():
    image = np.arange(2 * 9 * 9, dtype=np.float32).reshape(2, 9, 9)
    stamp = cut_stamp(image, 4.2, 3.8, 9)
    np.testing.assert_array_equal(stamp, image)
    corner = cut_stamp(image, 0.0, 0.0, 5)
    assert np.all(corner[:, :2, :] == 0) and np.all(corner[:, :, :2] == 0)
    np.testing.assert_array_equal(corner[:, 2:, 2:], image[:, :3, :3])
    canvas = np.zeros_like(image)
    paste_stamp(canvas, corner, 0, 0)
    np.testing.assert_array_equal(canvas[:, :3, :3], image[:, :3, :3])
    assert canvas[:, 3:, :].sum() == 0


def test_btk_scores_our_deblender_next_to_sep(trained_run, blend_batch):
    ours = VAEDeblender.from_run(trained_run, max_n_sources=3)
    sep = btk.deblend.SepSingleBand(max_n_sources=3, use_band=3)
    matcher = btk.match.PixelHungarianMatcher(pixel_max_sep=5.0)
    band = 3  # i
    scores = {}
    for name, deblender in (("ours", ours), ("sep", sep)):
        result = deblender(blend_batch)
        assert isinstance(result, btk.blend_batch.DeblendBatch)
        matching = matcher(blend_batch.catalog_list, result.catalog_list)
        # the central target (row 0 of each truth catalog) is found in every blend
        assert all(0 in true for true in matching.true_matches)
        true_iso = matching.match_true_arrays(blend_batch.isolated_images[:, :, band])
        predicted = result.deblended_images[:, :, 0 if name == "sep" else band]
        pred_iso = matching.match_pred_arrays(predicted)
        metric = btk.metrics.reconstruction.MSE(blend_batch.batch_size)
        scores[name] = metric(true_iso, pred_iso)
        assert np.isfinite(scores[name])
    result = ours(blend_batch)
    assert result.deblended_images.shape == (8, 3, 6, 45, 45)
    for catalog in result.catalog_list:
        assert {"ra", "dec", "x_peak", "y_peak", "e1", "e2"} <= set(catalog.colnames)
        assert np.all(np.abs(catalog["e1"]) <= 1) and np.all(np.abs(catalog["e2"]) <= 1)
    # the reconstruction is a galaxy model, not a cut of the noisy image: nothing below zero
    assert result.deblended_images.min() >= 0


def test_single_example_path_matches_batch_path(trained_run, blend_batch):
    ours = VAEDeblender.from_run(trained_run, max_n_sources=3)
    batch = ours(blend_batch)
    single = ours.deblend(2, blend_batch)
    np.testing.assert_allclose(single.deblended_images, batch.deblended_images[2], rtol=1e-5,
                               atol=1e-3)


def test_wrong_survey_is_refused(trained_run, tiny_config):
    sim = load_config(tiny_config).replace("simulation", survey="DES",
                                           label_bands=["r", "i", "z"]).simulation
    des_batch = next(SceneSource(sim).drawer(seed=1, batch_size=2).generator)
    ours = VAEDeblender.from_run(trained_run, max_n_sources=3)
    with pytest.raises(ValueError, match="bands g r i z Y"):
        ours(des_batch)


def test_btk_scores_map_deblending_too(trained_run, blend_batch):
    """The MAP mode fits each blend's detected sources together: BTK's matcher reads its
    output like any deblender's, its images are exactly Deblender.map_deblend's fitted
    sources at the detections, and its e1/e2 that fit's MAP-deblended-stamp ellipticities."""
    fitted = VAEDeblender.from_run(trained_run, max_n_sources=3, map_prior="normal",
                                   map_steps=30)
    result = fitted(blend_batch)
    matching = btk.match.PixelHungarianMatcher(pixel_max_sep=5.0)(
        blend_batch.catalog_list, result.catalog_list)
    assert all(0 in true for true in matching.true_matches)
    survey = blend_batch.survey
    sky = np.array([mean_sky_level(survey, survey.get_filter(b)).to_value("electron")
                    for b in fitted.model.bands])
    positions = [np.stack([np.asarray(c["x_peak"], float), np.asarray(c["y_peak"], float)], 1)
                 for c in result.catalog_list]
    direct = fitted.model.map_deblend(blend_batch.blend_images, positions, sky, prior="normal",
                                      steps=30)
    scale = np.abs(direct.model).max()
    np.testing.assert_allclose(result.deblended_images.sum(axis=1), direct.model, rtol=1e-4,
                               atol=1e-4 * scale)
    e = np.concatenate([np.stack([c["e1"], c["e2"]], 1) for c in result.catalog_list])
    np.testing.assert_allclose(e, direct.ellipticity_deblended, atol=1e-4)
    assert np.abs(e).max() <= 1
    start = VAEDeblender.from_run(trained_run, max_n_sources=3, map_prior="normal",
                                  map_steps=0)(blend_batch)
    assert not np.allclose(start.deblended_images, result.deblended_images, atol=1e-3 * scale)
    with pytest.raises(ValueError, match="map_prior"):
        VAEDeblender.from_run(trained_run, max_n_sources=3, map_prior="student")
    with_flow = VAEDeblender.from_run(trained_run, max_n_sources=3, map_prior="flow",
                                      map_steps=2)(blend_batch)
    assert with_flow.deblended_images.shape == (8, 3, 6, 45, 45)
