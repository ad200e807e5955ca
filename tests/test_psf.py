"""PSFs travel with the data: survey PSF images, the "psf" metadata entry, old datasets."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import galsim
import numpy as np
import pytest

from deblend.core.config import load_config, plain
from simulation.builder import plan_simulation
from simulation.catalogs import catalog_provenance
from simulation.dataset import (
    METADATA_FILE,
    PLAN_FILE,
    PSF_CONVENTION,
    DatasetError,
    make_plan,
    open_dataset,
    plan_id,
)
from simulation.surveys import psf_images, survey_geometry

LSST_BANDS = ("u", "g", "r", "i", "z", "y")
SPEC_I_FWHM = 0.79  # arcsec, SPEC's LSST i-band PSF FWHM


def adaptive_fwhm(image: np.ndarray, pixel_scale: float) -> float:
    """FWHM (arcsec) of the Gaussian with the image's adaptive second moments."""
    moments = galsim.hsm.FindAdaptiveMom(galsim.Image(image))
    return 2.355 * moments.moments_sigma * pixel_scale


def copy_dataset(src: Path, dst: Path) -> Path:
    """A writable copy of a (read-only session) dataset."""
    shutil.copytree(src, dst)
    return dst


def edit_metadata(root: Path, change) -> None:
    path = root / METADATA_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


# -- (a) the survey's PSF images -----------------------------------------------------------------
def test_lsst_psf_images_unit_sum_centred_and_spec_fwhm():
    size = 45
    images = psf_images("LSST", LSST_BANDS, size)
    assert images.shape == (6, size, size) and images.dtype == np.float64
    assert np.allclose(images.sum(axis=(1, 2)), 1.0, atol=1e-12)
    assert images.min() >= 0
    y, x = np.indices((size, size))
    for image in images:
        assert (image * x).sum() == pytest.approx((size - 1) / 2, abs=0.01)
        assert (image * y).sum() == pytest.approx((size - 1) / 2, abs=0.01)
    pixel_scale = survey_geometry("LSST", size).pixel_scale
    fwhm = {band: adaptive_fwhm(image, pixel_scale) for band, image in zip(LSST_BANDS, images)}
    assert fwhm["i"] == pytest.approx(SPEC_I_FWHM, rel=0.10)
    assert fwhm["u"] > fwhm["y"]  # the bands differ: seeing improves to the red
    assert not np.allclose(images[0], images[-1])


def test_psf_images_even_stamp_centre_and_band_order():
    images = psf_images("LSST", ("y", "i"), 32)
    y, x = np.indices((32, 32))
    assert (images[1] * x).sum() == pytest.approx(15.5, abs=0.01)
    assert (images[1] * y).sum() == pytest.approx(15.5, abs=0.01)
    assert np.array_equal(images[1], psf_images("LSST", ("i",), 32)[0])
    images[0] += 1  # a copy: the next call is unaffected
    assert psf_images("LSST", ("y",), 32).sum() == pytest.approx(1.0)


def test_des_psf_images_use_des_bands():
    images = psf_images("DES", ("g", "Y"), 21)
    assert images.shape == (2, 21, 21)
    assert np.allclose(images.sum(axis=(1, 2)), 1.0)


@pytest.mark.parametrize("survey, bands, size, message", [
    ("LSST", ("i", "Y"), 45, "band 'Y' is not a LSST band"),
    ("LSST", ("i",), 0, "stamp_pixels must be a positive integer"),
    ("LSST", ("i",), -3, "stamp_pixels must be a positive integer"),
    ("HSC", ("i",), 45, "unknown survey 'HSC'"),
])
def test_psf_images_refuses_bad_arguments(survey, bands, size, message):
    with pytest.raises(ValueError, match=message):
        psf_images(survey, bands, size)


# -- (b) datasets carry them ---------------------------------------------------------------------
def test_new_dataset_stores_psf_in_metadata(tiny_dataset):
    meta = json.loads((tiny_dataset / METADATA_FILE).read_text())
    entry = meta["psf"]
    assert entry["bands"] == meta["bands"] and entry["pixel_scale"] == meta["pixel_scale"]
    assert entry["convention"] == PSF_CONVENTION and entry["source"] == "BTK survey LSST"
    expected = psf_images(meta["survey"], meta["bands"], meta["stamp_pixels"])
    assert np.array_equal(np.array(entry["images"]), expected)  # float64 survives JSON exactly

    data = open_dataset(tiny_dataset)
    assert data.psf_source == "dataset"
    psf = data.psf_images
    assert psf.shape == (6, 45, 45) and psf.dtype == np.float64
    assert np.array_equal(psf, expected)
    with pytest.raises(ValueError):
        psf[0, 0, 0] = 1.0  # read-only


# -- (c) old datasets ----------------------------------------------------------------------------
def test_dataset_without_psf_entry_uses_survey_definition(tiny_dataset, tmp_path):
    old = copy_dataset(tiny_dataset, tmp_path / "old")
    edit_metadata(old, lambda meta: meta.pop("psf"))
    before = (old / METADATA_FILE).read_bytes()

    data = open_dataset(old)
    assert data.psf_source == "survey definition"
    assert np.array_equal(data.psf_images,
                          psf_images("LSST", data.bands, data.stamp_pixels))
    assert data.images("blend", [0]).shape == (1, 6, 45, 45)  # the rest still reads
    assert (old / METADATA_FILE).read_bytes() == before  # old metadata is not rewritten


# -- (d) corrupt entries -------------------------------------------------------------------------
def _nan(meta):
    meta["psf"]["images"][3][22][22] = float("nan")


def _drop_band(meta):
    meta["psf"]["images"] = meta["psf"]["images"][:5]


def _negative(meta):
    meta["psf"]["images"][0] = (-np.array(meta["psf"]["images"][0])).tolist()


def _ragged(meta):
    meta["psf"]["images"][2][5] = meta["psf"]["images"][2][5][:10]


def _wrong_bands(meta):
    meta["psf"]["bands"] = ["y", "z", "i", "r", "g", "u"]


@pytest.mark.parametrize("corrupt, message", [
    (_nan, "i-band image has non-finite values"),
    (_drop_band, r"shape \(5, 45, 45\), expected \(6, 45, 45\)"),
    (_negative, "u-band image has a non-positive sum"),
    (_ragged, "not a \\(bands, S, S\\) array"),
    (_wrong_bands, "is for bands"),
])
def test_corrupt_psf_entry_is_refused_naming_the_file(tiny_dataset, tmp_path, corrupt, message):
    root = tmp_path / "bad"
    root.mkdir()
    shutil.copy(tiny_dataset / METADATA_FILE, root / METADATA_FILE)  # enough to open it
    edit_metadata(root, corrupt)
    with pytest.raises(DatasetError, match=message) as info:
        _ = open_dataset(root).psf_images
    assert str(root / METADATA_FILE) in str(info.value)


# -- (e) the identity is unchanged ---------------------------------------------------------------
def test_psf_entry_leaves_dataset_id_unchanged(tiny_dataset, tiny_config):
    sim = load_config(tiny_config).simulation
    geometry = survey_geometry(sim.survey, sim.stamp_pixels)
    provenance = catalog_provenance(sim.catalog, sim.catalog_rows, sim.catalog_seed)
    plan = make_plan(plan_simulation(sim), plain(asdict(geometry)), provenance.get("sha256"))
    assert "psf" not in plan
    meta = json.loads((tiny_dataset / METADATA_FILE).read_text())
    assert meta["dataset_id"] == plan_id(plan)
    assert plan_id(json.loads((tiny_dataset / PLAN_FILE).read_text())) == plan_id(plan)
    assert open_dataset(tiny_dataset).dataset_id == plan_id(plan)
