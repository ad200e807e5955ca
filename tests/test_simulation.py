"""Scenes, labels and the dataset format (simulation issue)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import galsim
import h5py
import numpy as np
import pytest
import torch

from deblend.core.config import ConfigError, config_from_dict, load_config
from deblend.core.normalization import NormalizationConstants, denormalize, normalize
from deblend.core.shapes import hsm_shapes, moments_ellipticity, second_moments
from simulation.builder import SceneSource, build_dataset
from simulation.catalogs import CatalogError, read_catsim_file
from simulation.dataset import DatasetError, open_dataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "catsim_sample_100.fits"
pytestmark = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"sample catalog missing: {SAMPLE}")


def small_sim(**changes):
    """A small simulation config on the 100 real CatSim rows."""
    base = {"catalog": str(SAMPLE), "n_samples": 24, "shard_size": 8, "btk_batch_size": 8}
    base.update(changes)
    return config_from_dict({"simulation": base}).simulation


def file_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "shards").glob("*.h5"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim") / "data"
    build_dataset(small_sim(), root, progress=False)
    return root


def test_images_shapes_dtypes_and_metadata(dataset):
    data = open_dataset(dataset)
    assert data.bands == ("u", "g", "r", "i", "z", "y")
    assert data.pixel_scale == pytest.approx(0.2)
    for name in ("clean", "noisy", "blend"):
        images = data.images(name, np.arange(data.n_samples))
        assert images.shape == (24, 6, 45, 45) and images.dtype == np.float32
        assert np.all(np.isfinite(images))
    labels = data.labels()
    assert all(len(v) == 24 for v in labels.values())
    assert labels["neighbour_dx"].shape == (24, 2)
    split = data.meta["split"]
    assert (split["n_train"], split["n_calibration"], split["n_validation"]) == (20, 2, 2)
    assert np.array_equal(data.split_indices("train"), np.arange(20))
    assert np.array_equal(data.split_indices("calibration"), [20, 21])
    assert np.array_equal(data.split_indices("validation"), [22, 23])
    assert data.meta["catalog"]["source"] == "file"
    assert set(labels["n_galaxies"]) <= {1, 2, 3} and labels["n_galaxies"].max() > 1
    # clean targets are noiseless and positive; noise makes the other two differ
    clean = data.images("clean", np.arange(24))
    assert clean.min() >= 0
    assert not np.allclose(clean, data.images("noisy", np.arange(24)))


def test_target_is_centred_and_brightest(dataset):
    data = open_dataset(dataset)
    clean = data.images("clean", np.arange(data.n_samples)).sum(axis=1)
    moments = second_moments(clean)
    assert np.allclose(moments.x0, 22.0, atol=0.05) and np.allclose(moments.y0, 22.0, atol=0.05)
    labels = data.labels()
    neighbour = labels["neighbour_mag"]
    has = np.isfinite(neighbour)
    assert np.all(neighbour[has] > np.repeat(labels["mag_i"][:, None], 2, axis=1)[has])
    radius = np.hypot(labels["neighbour_dx"], labels["neighbour_dy"])[has]
    assert np.all((radius >= 1.0) & (radius <= 4.0))


def test_noiseless_blend_is_target_plus_neighbours():
    source = SceneSource(small_sim(noise="none"))
    batch = source.drawer(seed=5, batch_size=8, keep_isolated=True).draw()
    neighbours = batch.isolated[:, 1:].sum(axis=1)
    np.testing.assert_allclose(batch.blend - neighbours, batch.clean, atol=1e-2, rtol=1e-5)
    np.testing.assert_array_equal(batch.noisy, batch.clean)


def test_noisy_isolated_is_clean_plus_zero_mean_noise():
    """In expectation noisy == clean: the mean residual is consistent with zero."""
    source = SceneSource(small_sim())
    batch = source.drawer(seed=9, batch_size=16).draw()
    residual = (batch.noisy - batch.clean).astype(np.float64)
    per_band_sigma = residual.std(axis=(0, 2, 3))
    mean = residual.mean(axis=(0, 2, 3))
    n_pixels = residual[:, 0].size
    assert np.all(np.abs(mean) < 5 * per_band_sigma / np.sqrt(n_pixels))
    assert np.all(per_band_sigma > 10)  # LSST sky noise: tens of electrons per pixel


@pytest.mark.parametrize("e_true, beta_deg", [(0.3, 0.0), (0.5, 30.0), (0.2, 110.0)])
def test_moment_labels_agree_with_hsm_on_known_profiles(e_true, beta_deg):
    shear = galsim.Shear(e=e_true, beta=beta_deg * galsim.degrees)
    profile = galsim.Gaussian(sigma=3.0).shear(shear)
    image = profile.drawImage(nx=61, ny=61, scale=1.0, method="no_pixel").array
    e1, e2 = moments_ellipticity(image)
    hsm = hsm_shapes(image)
    assert e1 == pytest.approx(shear.e1, abs=2e-3) and e2 == pytest.approx(shear.e2, abs=2e-3)
    assert hsm.ok[0]
    assert hsm.e1[0] == pytest.approx(e1, abs=5e-3) and hsm.e2[0] == pytest.approx(e2, abs=5e-3)


def test_labels_agree_with_hsm_on_simulated_targets(dataset):
    labels = open_dataset(dataset).labels()
    ok = labels["hsm_ok"].astype(bool)
    assert ok.mean() > 0.9
    # Different weights (uniform vs adaptive Gaussian) give close, not equal, distortions.
    assert np.corrcoef(labels["e1"][ok], labels["hsm_e1"][ok])[0, 1] > 0.9
    assert np.corrcoef(labels["e2"][ok], labels["hsm_e2"][ok])[0, 1] > 0.9


def test_normalisation_round_trips_numpy_and_torch(dataset):
    data = open_dataset(dataset)
    constants = data.normalization
    assert len(constants.max_values) == 6 and constants.beta == 2.5
    raw = data.images("blend", np.arange(8)).astype(np.float64)
    x = normalize(raw, constants)
    assert np.all(np.abs(x) < 1)
    np.testing.assert_allclose(denormalize(x, constants), raw, rtol=1e-9, atol=1e-6)
    t = torch.from_numpy(raw)
    torch.testing.assert_close(denormalize(normalize(t, constants), constants), t, rtol=1e-9,
                               atol=1e-6)
    # the stored constants are the training split's mean per-band image maximum
    train = data.split_indices("train")
    expected = data.images("blend", train).max(axis=(2, 3)).mean(axis=0)
    np.testing.assert_allclose(constants.max_values, expected, rtol=1e-6)


def test_normalisation_rejects_wrong_band_count():
    constants = NormalizationConstants(("g", "r"), (1.0, 2.0))
    with pytest.raises(ValueError, match="3 bands"):
        normalize(np.ones((1, 3, 5, 5)), constants)
    with pytest.raises(ValueError, match="band 'r'"):
        NormalizationConstants(("g", "r"), (1.0, float("nan")))


def test_same_seed_same_bytes_any_jobs_and_pieces(tmp_path, dataset):
    reference = file_digests(dataset)
    build_dataset(small_sim(), tmp_path / "two_jobs", jobs=2, progress=False)
    assert file_digests(tmp_path / "two_jobs") == reference
    # cluster-style pieces: nothing is finalised until the last piece ran
    pieces = tmp_path / "pieces"
    assert build_dataset(small_sim(), pieces, shard=0, num_shards=2, progress=False,
                         log=lambda s: None) is None
    assert not (pieces / "metadata.json").exists()
    data = build_dataset(small_sim(), pieces, shard=1, num_shards=2, progress=False)
    assert data is not None and file_digests(pieces) == reference
    other = tmp_path / "other_seed"
    build_dataset(small_sim(seed=1), other, progress=False)
    assert file_digests(other) != reference


def test_resume_after_damage_gives_identical_dataset(tmp_path, dataset):
    root = tmp_path / "damaged"
    build_dataset(small_sim(), root, progress=False)
    (root / "metadata.json").unlink()
    shard1 = root / "shards" / "shard-00001.h5"
    shard1.write_bytes(shard1.read_bytes()[:5000])  # truncated: must not count as whole
    (root / "shards" / "shard-00002.h5").unlink()
    (root / "shards" / "shard-00002.h5.tmp").write_bytes(b"half-written")
    messages = []
    build_dataset(small_sim(), root, progress=False, log=messages.append)
    assert "resuming: 1 of 3 shards already complete" in messages
    assert file_digests(root) == file_digests(dataset)


def test_kill_and_resume_via_cli_gives_identical_dataset(tmp_path, dataset):
    config = tmp_path / "c.yaml"
    config.write_text(f"simulation:\n  catalog: {SAMPLE}\n  n_samples: 24\n  shard_size: 8\n"
                      f"  btk_batch_size: 8\n")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "simulation.generate", "--config", str(config), "--out",
               str(out), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "shards" / "shard-00000.h5").exists() and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert file_digests(out) == file_digests(dataset)
    assert json.loads((out / "metadata.json").read_text())["dataset_id"] == \
        json.loads((dataset / "metadata.json").read_text())["dataset_id"]


def test_existing_dataset_is_not_overwritten_without_force(tmp_path, dataset):
    config = tmp_path / "c.yaml"
    config.write_text(f"simulation:\n  catalog: {SAMPLE}\n  n_samples: 8\n  shard_size: 8\n"
                      f"  btk_batch_size: 8\n")
    from simulation.generate import main

    out = tmp_path / "d"
    args = ["--config", str(config), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    before = file_digests(out)
    # the refusal as a user meets it: the command's exit status and one line on stderr
    again = subprocess.run([sys.executable, "-m", "simulation.generate", *args, "--seed", "4"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2
    assert "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert file_digests(out) == before
    assert main([*args, "--seed", "4", "--force"]) == 0 and file_digests(out) != before


def test_des_config_gives_five_bands_at_des_pixel(tmp_path):
    config = load_config(ROOT / "configs" / "des.yaml")
    sim = config.replace("simulation", catalog=str(SAMPLE), n_samples=8, shard_size=8,
                         btk_batch_size=8).simulation
    data = build_dataset(sim, tmp_path / "des", progress=False)
    assert data.survey == "DES" and data.bands == ("g", "r", "i", "z", "Y")
    assert data.pixel_scale == pytest.approx(0.263, abs=1e-3)
    assert data.images("blend", np.arange(8)).shape == (8, 5, 45, 45)
    assert np.all(data.labels()["flux_Y"] > 0)
    years = data.conditions()["years"]  # each scene its own depth, at most DES's 6 years
    assert data.has_conditions and np.ptp(years) > 0 and years.max() <= 6.0 * np.exp(0.2)


def test_rotated_twins_flip_ellipticity_and_shear_is_recorded():
    source = SceneSource(small_sim(rotated_twins=True, noise="none", shear=(0.02, -0.01)))
    _, labels = source.draw(16, seed=3)
    assert np.array_equal(labels["twin"], np.tile([0, 1], 8))
    # a 90-degree rotation maps (e1, e2) -> (-e1, -e2) before shear; the shear adds the same
    # response to both, so the pair mean carries the shear and the difference the shape
    mean_e1 = 0.5 * (labels["e1"][0::2] + labels["e1"][1::2])
    assert np.all(np.abs(mean_e1) < 0.06) and mean_e1.mean() > 0
    assert np.all(labels["g1"] == np.float32(0.02)) and np.all(labels["g2"] == np.float32(-0.01))


def test_catalog_errors_name_the_problem(tmp_path):
    from astropy.table import Table

    table = Table.read(SAMPLE)
    table.remove_column("a_d")
    broken = tmp_path / "no_a_d.fits"
    table.write(broken)
    with pytest.raises(CatalogError, match="'a_d'"):
        read_catsim_file(broken, ("u", "g", "r", "i", "z", "y"))
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(SAMPLE.read_bytes()[:3000])
    with pytest.raises(CatalogError, match="corrupt.fits"):
        read_catsim_file(corrupt, ("i",))
    with pytest.raises(CatalogError, match="not found"):
        read_catsim_file(tmp_path / "nope.fits", ("i",))
    # DES's Y band is served from CatSim's y_ab
    des = read_catsim_file(SAMPLE, ("g", "r", "i", "z", "Y"))
    assert np.array_equal(des["Y_ab"], des["y_ab"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="simulation.max_neighbour"):
        config_from_dict({"simulation": {"max_neighbour": 2}})
    with pytest.raises(ConfigError, match="simulation.n_samples"):
        config_from_dict({"simulation": {"n_samples": "many"}})
    with pytest.raises(ConfigError, match="simulation.calibration_fraction"):
        config_from_dict({"simulation": {"val_fraction": 0.5, "calibration_fraction": 0.5}})
    with pytest.raises(ConfigError, match="training.dihedral_augmentation"):
        config_from_dict({"training": {"dihedral_augmentation": "sometimes"}})
    with pytest.raises(ValueError, match="unknown survey 'HSC'"):
        SceneSource(small_sim(survey="HSC"))
    with pytest.raises(ValueError, match="band 'u' is not a DES band"):
        SceneSource(small_sim(survey="DES", label_bands=["u"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_incomplete_or_missing_dataset_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nothing")
    root = tmp_path / "half"
    build_dataset(small_sim(), root, shard=0, num_shards=3, progress=False, log=lambda s: None)
    with pytest.raises(DatasetError, match="unfinished"):
        open_dataset(root)


def test_memory_is_bounded_by_memmaps(dataset):
    """Images come from numpy memory maps of the shard files, not from loaded copies."""
    data = open_dataset(dataset)
    data.images("blend", [0])
    maps = list(data._maps.values())
    assert maps and all(isinstance(m, np.memmap) for m in maps)
    with h5py.File(data.shards[0].path) as handle:
        assert handle["blend"].chunks is None and handle["blend"].compression is None
    assert os.path.getsize(data.shards[0].path) >= maps[0].nbytes
