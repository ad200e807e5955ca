"""deblend.core.config: defaults, shipped YAML files, strict types, one-line errors naming keys."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from deblend.core.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def merged(defaults: dict, changes: dict) -> dict:
    """``defaults`` with the keys of ``changes`` (two levels deep) replaced."""
    out = copy.deepcopy(defaults)
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def assert_same(got, expected, where="config"):
    """Equal, with the same types (1 != 1.0 here) and the same key order."""
    assert type(got) is type(expected), f"{where}: {got!r} vs {expected!r}"
    if isinstance(got, dict):
        assert list(got) == list(expected), where
        for key in got:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(got, list):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


def test_defaults_round_trip():
    config = Config()
    assert config_from_dict(config.to_dict()) == config == load_config(None)
    assert hash(config_from_dict({})) == hash(config)
    assert list(config.to_dict()) == ["name", "simulation", "model", "training", "evaluation",
                                      "shear", "metacal", "map", "dense_fields", "fields",
                                      "des"]
    assert config.to_dict()["simulation"]["neighbour_shift"] == [1.0, 4.0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_their_yaml_over_the_defaults(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path)
    assert_same(config.to_dict(), merged(Config().to_dict(), raw))
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_types_are_converted_like_the_annotations():
    config = config_from_dict({"training": {"beta_kl": 0},
                               "simulation": {"neighbour_shift": [1, 2], "label_bands": ["g"]}})
    assert config.training.beta_kl == 0.0 and isinstance(config.training.beta_kl, float)
    assert_same(config.to_dict()["training"]["beta_kl"], 0.0)
    assert config.simulation.neighbour_shift == (1.0, 2.0)
    assert isinstance(config.simulation.neighbour_shift[0], float)
    assert config.simulation.label_bands == ("g",)
    nulls = config_from_dict({"simulation": {"catalog": None}, "des": {"u_over_g": None},
                              "training": {"stage1_epochs": None}, "evaluation": None})
    assert nulls == Config()


@pytest.mark.parametrize("data, message", [
    ({"simulation": {"n_samples": True}}, "'simulation.n_samples' must be an integer, got True"),
    ({"simulation": {"n_samples": 3.0}}, "'simulation.n_samples' must be an integer"),
    ({"training": {"beta_kl": False}}, "'training.beta_kl' must be a number"),
    ({"training": {"learning_rate": "1e-3"}}, "'training.learning_rate' must be a number"),
    ({"training": {"dihedral_augmentation": 1}}, "'training.dihedral_augmentation' must be true"),
    ({"simulation": {"survey": 3}}, "'simulation.survey' must be a string"),
    ({"simulation": {"foo": 1}}, "unknown config key 'simulation.foo'"),
    ({"foo": 1}, "unknown config key 'foo'"),
    ({"simulation": {"neighbour_shift": [1, 2, 3]}}, "'simulation.neighbour_shift' must have 2"),
    ({"simulation": {"shear": [0.1]}}, "'simulation.shear' must have 2 entries, got 1"),
    ({"simulation": {"label_bands": "riz"}}, "'simulation.label_bands' must be a list"),
    ({"evaluation": {"mag_edges": [22, "x"]}}, "'evaluation.mag_edges[1]' must be a number"),
    ({"simulation": {"noise": "loud"}}, "'simulation.noise' must be one of"),
    ({"model": {"decoder_output": "linear"}}, "'model.decoder_output' must be one of"),
    ({"simulation": [1, 2]}, "config section 'simulation' must be a mapping"),
    # ranges
    ({"simulation": {"stamp_pixels": 7}}, "'simulation.stamp_pixels' must be >= 9"),
    ({"simulation": {"catalog_rows": 0}}, "'simulation.catalog_rows' must be >= 1"),
    ({"simulation": {"label_bands": []}}, "'simulation.label_bands' must name at least one"),
    ({"model": {"regressor_hidden": [64, 0]}}, "'model.regressor_hidden' entries must be >= 1"),
    ({"model": {"regressor_dropout": 1.0}}, "'model.regressor_dropout' must be in [0, 1)"),
    ({"training": {"epochs": 0}}, "'training.epochs' must be >= 1"),
    ({"training": {"stage3_epochs": 0}}, "'training.stage3_epochs' must be >= 1 or null"),
    ({"training": {"early_stopping_patience": 0}}, "'training.early_stopping_patience' must be"),
    ({"training": {"num_workers": -1}}, "'training.num_workers' must be >= 0"),
    ({"training": {"min_target_e": 1.0}}, "'training.min_target_e' must be in [0, 1)"),
    ({"training": {"max_grad_norm": 0.0}}, "'training.max_grad_norm' must be > 0 or null"),
    ({"training": {"flow_max_grad_norm": -1.0}},
     "'training.flow_max_grad_norm' must be > 0 or null"),
    ({"training": {"stage1_learning_rate": 0.0}},
     "'training.stage1_learning_rate' must be > 0 or null"),
    ({"training": {"amortize_fraction": 0.0}}, "'training.amortize_fraction' must be in (0, 1]"),
    ({"training": {"amortize_fraction": 1.5}}, "'training.amortize_fraction' must be in (0, 1]"),
    ({"evaluation": {"batch_size": 0}}, "'evaluation.batch_size' must be a positive integer"),
    ({"evaluation": {"max_samples": 0}}, "'evaluation.max_samples' must be >= 1 or null"),
    ({"evaluation": {"gallery_size": -1}}, "'evaluation.gallery_size' must be >= 0"),
    ({"evaluation": {"mag_edges": [23, 22]}}, "'evaluation.mag_edges' must increase strictly"),
    ({"shear": {"chunk_scenes": 7}}, "'shear.chunk_scenes' must be even and >= 2"),
    ({"shear": {"chunk_scenes": 0}}, "'shear.chunk_scenes' must be even and >= 2"),
    ({"shear": {"n_scenes": 9}}, "'shear.n_scenes' must be even"),
    ({"shear": {"bootstrap": 1}}, "'shear.bootstrap' must be >= 2"),
    ({"simulation": {"rotated_twins": True, "n_samples": 7}},
     "'simulation.n_samples' must be even when rotated_twins is true"),
    ({"shear": {"g_values": [0.0]}}, "'shear.g_values' must hold at least two distinct"),
    ({"shear": {"g_values": [0.0, 1.0]}}, "'shear.g_values' must satisfy |g| < 1"),
    ({"metacal": {"n_scenes": 7}}, "'metacal.n_scenes' must be even and >= 4"),
    ({"metacal": {"g": 0.2}}, "'metacal.g' must be in (0, 0.1)"),
    ({"metacal": {"populations": []}}, "'metacal.populations' must name a population"),
    ({"metacal": {"galsim_psf_scales": [3.0]}}, "'metacal.galsim_psf_scales' must be"),
    ({"des": {"n_standin": 0}}, "'des.n_standin' must be >= 1"),
    ({"des": {"min_snr": -1}}, "'des.min_snr' must be >= 0"),
    ({"des": {"u_over_g": 0}}, "'des.u_over_g' must be > 0 or null"),
    ({"simulation": {"ref_band": "q"}}, "'simulation.ref_band': band 'q' is not a LSST band"),
    ({"simulation": {"survey": "DES", "ref_band": "y"}}, "band 'y' is not a DES band"),
])
def test_bad_values_are_one_line_errors_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config_from_dict(data)
    assert "\n" not in str(info.value)


def test_unknown_survey_is_left_to_the_simulation():
    assert config_from_dict({"simulation": {"survey": "HSC", "ref_band": "q"}}).simulation.survey \
        == "HSC"


def test_direct_construction_and_replace_are_checked():
    sim = Config().simulation
    with pytest.raises(ConfigError, match=re.escape("'simulation.n_samples' must be >= 1")):
        dataclasses.replace(sim, n_samples=0)
    with pytest.raises(ConfigError, match="'training.epochs' must be an integer"):
        Config().replace("training", epochs="many")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sim.n_samples = 3  # type: ignore[misc]


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation: [1, 2\n")
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(bad))} is not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("training: 3\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(section))}: config section "
                                          "'training' must be a mapping"):
        load_config(section)
    empty = tmp_path / "empty.yaml"
    empty.write_text("simulation:\n")
    assert load_config(empty) == Config()
