"""Issue 24, classes 3 and 4: positions outside the scene are refused, never folded into it; the
public API takes the config's rules (one rule each) and answers empty input with empty results.

Tiny untrained networks (15-pixel stamps, 4 latents): these tests check arguments and shapes,
not the quality of a fit.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from deblend.core.btk_deblender import VAEDeblender
from deblend.core.cell_measure import measure_cells
from deblend.core.cells import CellImage
from deblend.core.config import ConfigError, config_from_dict
from deblend.core.detection import detect_around_target, detect_sources
from deblend.core.flow import LatentFlow
from deblend.core.inference import Deblender
from deblend.core.map_deblend import MapPrediction
from deblend.core.map_fit import (
    SceneModel,
    SceneSources,
    fit_scenes,
    normal_log_prior,
    render_scene,
)
from deblend.core.metadetect import MetadetectSettings, aperture_snr, measure_cell, metadetect_shear
from deblend.core.networks import Decoder, Encoder, Regressor
from deblend.core.normalization import NormalizationConstants
from deblend.core.runs import DataIdentity
from deblend.core.stamps import cut_stamp, cut_stamps, paste_stamp

SIZE, LATENT = 15, 4
LSST = ("u", "g", "r", "i", "z", "y")


def tiny_deblender(bands: tuple[str, ...], regressor: bool = True) -> Deblender:
    torch.manual_seed(0)
    n = len(bands)
    data = DataIdentity("tiny", "tiny", "LSST", bands, SIZE, 0.2,
                        NormalizationConstants(bands, (100.0,) * n))
    return Deblender(Encoder(n, SIZE, LATENT), Decoder(n, SIZE, LATENT),
                     Regressor(LATENT, (8,)) if regressor else None, data,
                     flow=LatentFlow(LATENT, 1, (8,)))


@pytest.fixture(scope="module")
def model() -> Deblender:
    return tiny_deblender(("r", "i"))


@pytest.fixture(scope="module")
def lsst_model() -> Deblender:
    return tiny_deblender(LSST)


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 2, 30, 30)).astype(np.float32)


PSFS = np.pad(np.ones((2, 1, 1)), ((0, 0), (5, 5), (5, 5)))
SETTINGS = MetadetectSettings(stamp_pixels=SIZE, detection_bands=("r", "i"))


def blank_cell() -> CellImage:
    """A cell of faint noise: nothing to detect."""
    noise = np.random.default_rng(1).normal(size=(2, 40, 40)) * 0.01
    return CellImage(noise, np.full((2, 40, 40), 1e-4), PSFS)


# -- class 3: positions outside the scene ---------------------------------------------------------
@pytest.mark.parametrize("xy", [(-5.0, 10.0), (30.0, 10.0), (10.0, 29.6)])
def test_map_deblend_refuses_positions_outside_the_scene(model, scenes, xy) -> None:
    positions = [np.array([[10.0, 10.0]]), np.array([[12.0, 12.0], xy])]
    with pytest.raises(ValueError, match=r"positions: source 1 of scene 1 .* 30 x 30 pixels"):
        model.map_deblend(scenes, positions, prior="normal", steps=1)
    # a source near the edge (its nearest pixel in the scene) is fitted, in its own scene
    out = model.map_deblend(scenes, [np.array([[0.2, 29.4]]), np.zeros((0, 2))],
                            prior="normal", steps=1)
    assert (out.x.tolist(), out.y.tolist()) == ([0], [29])
    assert out.model[1].sum() == 0


def test_render_scene_refuses_sources_outside_the_scene() -> None:
    stamps = torch.ones(1, 1, 1, 5, 5)
    sources = SceneSources.from_lists([torch.tensor([[-1.0, 4.0]])])  # folded into row 3 before
    with pytest.raises(ValueError, match=r"source 0 of scene 0 .* \(-1, 4\) is outside the "
                                         r"scene of 11 x 9"):
        render_scene(stamps, sources, 9, 11)


def test_fit_scenes_refuses_sources_outside_the_scene(model) -> None:
    sources = SceneSources.from_lists([torch.tensor([[3.0, 40.0]])])
    with pytest.raises(ValueError, match="outside the scene of 30 x 30"):
        fit_scenes(SceneModel(model.decoder, model.normalization), torch.zeros(1, 2, 30, 30),
                   sources, torch.zeros(1, 1, LATENT), torch.ones(2), normal_log_prior, steps=1)


def test_cut_stamp_refuses_a_centre_outside_the_image() -> None:
    image = np.ones((2, 9, 9))
    assert cut_stamp(image, 8.4, 0.0, 5)[:, 2, 2].tolist() == [1.0, 1.0]  # edge: zero-padded
    with pytest.raises(ValueError, match=r"\(x, y\) = \(-3, 4\) is outside the image of 9 x 9"):
        cut_stamp(image, -3.0, 4.0, 5)


def test_cut_stamps_names_the_position_outside_the_image() -> None:
    with pytest.raises(ValueError, match=r"positions\[1\] .* outside the image of 9 x 6"):
        cut_stamps(np.ones((6, 9)), np.array([[4.0, 4.0], [4.0, 6.0]]), 3)


def test_paste_stamp_refuses_a_centre_outside_the_canvas() -> None:
    canvas = np.zeros((9, 9))
    with pytest.raises(ValueError, match="outside the image of 9 x 9"):
        paste_stamp(canvas, np.ones((5, 5)), 10, 4)
    assert canvas.sum() == 0


def test_aperture_snr_refuses_positions_outside_the_image() -> None:
    with pytest.raises(ValueError, match="outside the image"):
        aperture_snr(np.ones((20, 20)), np.array([[-8.0, 5.0]]), 1.0)


def test_detect_around_target_refuses_a_target_outside_the_scenes() -> None:
    with pytest.raises(ValueError, match=r"target \(x, y\) = \(40, 10\) is outside the image "
                                         r"of 31 x 31"):
        detect_around_target(np.zeros((1, 6, 31, 31)), "LSST", LSST, (40.0, 10.0))


# -- class 4: the config's rules, empty inputs ----------------------------------------------------
def test_predict_refuses_views_that_are_not_counts(model) -> None:
    stamps = np.zeros((1, 2, SIZE, SIZE), np.float32)
    with pytest.raises(ValueError, match="views must be one of 1, 2, 4 or 8, got True"):
        model.predict(stamps, views=True)
    with pytest.raises(ValueError, match="reconstruction_views must be"):
        model.predict(stamps, reconstruction_views=2.0)


@pytest.mark.parametrize("kwargs, name", [({"batch_size": 0}, "batch_size"),
                                          ({"batch_size": -1}, "batch_size"),
                                          ({"views": 3}, "views"),
                                          ({"reconstruction_views": 0}, "reconstruction_views")])
def test_metacal_refuses_bad_batching_even_without_stamps(model, kwargs, name) -> None:
    for n in (0, 2):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            model.metacal(np.zeros((n, 2, SIZE, SIZE), np.float32), PSFS, **kwargs)


def test_metacal_of_no_stamp_is_five_empty_predictions(model) -> None:
    out = model.metacal(np.zeros((0, 2, SIZE + 4, SIZE + 4), np.float32), PSFS,
                        keep_inputs=True)
    assert sorted(out.images) == sorted(["noshear", "1p", "1m", "2p", "2m"])
    assert out.images["1p"].reconstruction.shape == (0, 2, SIZE, SIZE)
    assert out.inputs["2m"].shape == (0, 2, SIZE, SIZE)
    assert out.ellipticity.shape == (0, 2) and out.response.shape == (0, 2, 2)


def test_metacal_operator_refuses_zero_input_pixels(model) -> None:
    with pytest.raises(ValueError, match="input_pixels must be a positive integer, got 0"):
        model.metacal_operator(PSFS, input_pixels=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"posterior_samples": -3}, "posterior_samples must be 0 .* or an integer >= 2"),
    ({"posterior_samples": 1}, "posterior_samples must be 0 .* or an integer >= 2"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"sky_levels": np.ones(3)}, r"sky_levels must have shape \(2,\) or \(2, 2\)"),
])
def test_map_deblend_takes_the_map_config_rules(model, scenes, kwargs, message) -> None:
    positions = [np.array([[10.0, 10.0]])] * 2
    with pytest.raises(ValueError, match=message):
        model.map_deblend(scenes, positions, prior="normal", **kwargs)


def test_map_deblend_refuses_a_posterior_without_a_regressor(scenes) -> None:
    plain = tiny_deblender(("r", "i"), regressor=False)
    with pytest.raises(ValueError, match="posterior_samples > 0 needs a regressor"):
        plain.map_deblend(scenes, [np.array([[10.0, 10.0]])] * 2, prior="normal", steps=1,
                          posterior_samples=5)


def assert_no_source(out: MapPrediction, n_scenes: int) -> None:
    for field in fields(out):
        value = getattr(out, field.name)
        if field.name in ("model", "objective", "view"):
            assert value.shape[-4 if field.name == "model" else -1] == n_scenes, field.name
        elif isinstance(value, np.ndarray):
            assert value.shape[0] == 0, field.name
    assert out.latent.shape == (0, LATENT) and out.reconstruction.shape == (0, 2, SIZE, SIZE)
    assert out.ellipticity_deblended.shape == (0, 2)
    assert out.posterior.mean.shape == (0, 2)


def test_map_deblend_of_no_scene_is_empty(model, scenes) -> None:
    out = model.map_deblend(scenes[:0], [], prior="normal", steps=1, posterior_samples=3)
    assert_no_source(out, 0)
    assert out.model.shape == (0, 2, 30, 30)


def test_map_deblend_of_scenes_without_sources_is_empty(model, scenes) -> None:
    out = model.map_deblend(scenes, [np.zeros((0, 2))] * 2, prior="normal", steps=1,
                            posterior_samples=3)
    assert_no_source(out, 2)


def test_map_deblend_blames_a_constant_scene_not_an_argument_never_given(model, scenes) -> None:
    flat = scenes.copy()
    flat[1, 1] = 7.0
    with pytest.raises(ValueError, match="scene 1 band 1 has no pixel variance") as error:
        model.map_deblend(flat, [np.array([[15.0, 15.0]])] * 2, prior="normal", steps=1)
    assert "must be positive" not in str(error.value)


def test_fit_scenes_refuses_negative_steps(model) -> None:
    sources = SceneSources.from_lists([torch.tensor([[3.0, 4.0]])])
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        fit_scenes(SceneModel(model.decoder, model.normalization), torch.zeros(1, 2, 30, 30),
                   sources, torch.zeros(1, 1, LATENT), torch.ones(2), normal_log_prior, steps=-1)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_n_sources": 0}, "max_n_sources must be a positive integer"),
    ({"thresh": -1.0}, "thresh must be a finite number > 0"),
    ({"min_area": 0}, "min_area must be a positive integer"),
    ({"map_prior": "normal", "map_steps": -1}, "map_steps must be an integer >= 0"),
    ({"map_steps": 5}, "map_steps has no effect without a map_prior"),
])
def test_btk_plugin_takes_the_map_config_rules(lsst_model, kwargs, message) -> None:
    kwargs = {"max_n_sources": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        VAEDeblender(lsst_model, **kwargs)


@pytest.mark.parametrize("map_prior", [None, "normal"])
def test_btk_plugin_on_an_empty_batch_gives_empty_images(lsst_model, map_prior) -> None:
    import btk
    from astropy.table import Table
    from btk.blend_batch import BlendBatch

    survey = btk.survey.get_surveys("LSST")
    batch = BlendBatch(0, 3, 31 * 0.2, survey, np.zeros((0, 6, 31, 31)),
                       np.zeros((0, 3, 6, 31, 31)), [Table() for _ in range(0)], [])
    out = VAEDeblender(lsst_model, 3, map_prior=map_prior)(batch)
    assert out.deblended_images.shape == (0, 3, 6, 31, 31) and out.catalog_list == []


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": -1.0}, "threshold must be a finite number > 0"),
    ({"min_area": 0}, "min_area must be a positive integer"),
    ({"max_sources": 0}, "max_sources must be a positive integer"),
])
def test_detect_sources_takes_the_map_config_rules(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        detect_sources(np.zeros((1, 6, 31, 31)), "LSST", LSST, **kwargs)


@pytest.mark.parametrize("kwargs, message", [({"views": 3}, "views must be one of"),
                                             ({"batch_size": 0}, "batch_size must be"),
                                             ({"seed": -1}, "seed must be an integer >= 0")])
def test_measure_cells_refuses_bad_arguments_even_without_detections(model, kwargs,
                                                                     message) -> None:
    with pytest.raises(ValueError, match=message):
        model.measure_cells([blank_cell()], SETTINGS, **kwargs)


@pytest.mark.parametrize("per_object", [True, False])
def test_measure_cells_of_no_cell_is_an_empty_catalogue(model, per_object) -> None:
    empty = measure_cells(model, [], SETTINGS, per_object=per_object, peers={"peer": len})
    blank = measure_cells(model, [blank_cell()], SETTINGS, per_object=per_object,
                          peers={"peer": lambda s: np.zeros((len(s), 2))})
    assert len(empty) == len(blank) == 0
    assert empty.colnames == blank.colnames
    assert [empty[c].dtype for c in empty.colnames] == [blank[c].dtype for c in blank.colnames]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_snr": float("nan")}, "min_snr must be a finite number >= 0"),
    ({"min_snr": -1.0}, "min_snr must be a finite number >= 0"),
    ({"deblend_contrast": 2.0}, r"deblend_contrast must be a number in \[0, 1\]"),
])
def test_metadetect_settings_check_every_number(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MetadetectSettings(**kwargs)


def test_measure_cell_refuses_a_negative_seed() -> None:
    settings = MetadetectSettings(stamp_pixels=SIZE, detection_bands=("r", "i"),
                                  noise_correction=False)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        measure_cell(blank_cell(), ("r", "i"), {"e": len}, settings, seed=-1)


def test_metadetect_shear_refuses_a_bad_delta() -> None:
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 0.1\)"):
        metadetect_shear(None, "deblend", delta=0.0)


def test_metacal_delta_is_a_number_as_in_the_config(model) -> None:
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 0.1\), got '0.05'"):
        model.metacal(np.zeros((1, 2, SIZE, SIZE), np.float32), PSFS, delta="0.05")


def _says(message: str) -> str:
    """What a refusal says the value must be (a config or a library message)."""
    return message.split("must be ", 1)[1].split(", got")[0]


@pytest.mark.parametrize("section, key, value, call", [
    ("map", "steps", -1, lambda m, s: m.map_deblend(s, [[]] * 2, prior="normal", steps=-1)),
    ("map", "learning_rate", 0.0,
     lambda m, s: m.map_deblend(s, [[]] * 2, prior="normal", learning_rate=0.0)),
    ("map", "batch_size", 0, lambda m, s: m.map_deblend(s, [[]] * 2, prior="normal",
                                                        batch_size=0)),
    ("map", "posterior_samples", 1,
     lambda m, s: m.map_deblend(s, [[]] * 2, prior="normal", posterior_samples=1)),
    ("map", "seed", -1, lambda m, s: m.map_deblend(s, [[]] * 2, prior="normal", seed=-1)),
    ("map", "detection_threshold", -1.0,
     lambda m, s: detect_sources(np.zeros((1, 6, 9, 9)), "LSST", LSST, threshold=-1.0)),
    ("map", "max_sources", 0,
     lambda m, s: detect_sources(np.zeros((1, 6, 9, 9)), "LSST", LSST, max_sources=0)),
    ("metacal", "views", 3, lambda m, s: m.predict(np.zeros((1, 2, SIZE, SIZE)), views=3)),
    ("fields", "views", 3, lambda m, s: m.measure_cells([blank_cell()], SETTINGS, views=3)),
    ("fields", "seed", -1, lambda m, s: m.measure_cells([blank_cell()], SETTINGS, seed=-1)),
    ("evaluation", "batch_size", 0,
     lambda m, s: m.predict(np.zeros((1, 2, SIZE, SIZE)), batch_size=0)),
])
def test_config_and_api_share_each_rule(model, scenes, section, key, value, call) -> None:
    with pytest.raises(ConfigError) as config:
        config_from_dict({section: {key: value}})
    with pytest.raises(ValueError) as api:
        call(model, scenes)
    assert f"'{section}.{key}' must be" in str(config.value)
    assert _says(str(config.value)) == _says(str(api.value))
