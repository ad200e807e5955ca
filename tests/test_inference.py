"""The inference API: Deblender.from_run(R).predict(raw stamps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deblend import Deblender, Prediction
from deblend.core.normalization import normalize
from deblend.core.runs import RunError, RunLayout, load_checkpoint, save_checkpoint
from simulation.dataset import open_dataset


@pytest.fixture(scope="module")
def deblender(trained_run: Path) -> Deblender:
    return Deblender.from_run(trained_run, device="cpu")


@pytest.fixture(scope="module")
def blends(tiny_dataset: Path) -> np.ndarray:
    data = open_dataset(tiny_dataset)
    return data.images("blend", data.split_indices("validation")[:10])


def test_round_trip_shapes_units_and_batching(deblender: Deblender, blends: np.ndarray) -> None:
    out = deblender.predict(blends, batch_size=4)
    assert isinstance(out, Prediction)
    assert out.reconstruction.shape == blends.shape and out.reconstruction.dtype == np.float32
    assert out.mu.shape == out.sigma.shape == (10, deblender.latent_dim)
    assert out.ellipticity.shape == (10, 2)
    assert np.array_equal(out.e1, out.ellipticity[:, 0])
    assert np.array_equal(out.e2, out.ellipticity[:, 1])
    assert np.all(np.isfinite(out.reconstruction)) and np.all(out.sigma > 0)
    assert np.all(np.abs(out.regressor_output) <= 1)  # the Tanh output, averaged over views
    # raw flux: the decoder's [0, 1] output, denormalised with the run's constants
    assert out.reconstruction.min() >= 0
    plain = deblender.predict(blends, reconstruction_views=1).reconstruction
    np.testing.assert_allclose(normalize(plain, deblender.normalization),
                               deblender.decoder(torch.from_numpy(out.mu)).detach().numpy(),
                               atol=1e-5)
    # by default, the average in raw flux of the 8 views' decodings, each mapped back
    from deblend.core.symmetry import image_from_view, image_view

    views = [image_from_view(torch.from_numpy(deblender.predict(
        np.ascontiguousarray(image_view(torch.from_numpy(blends), v).numpy()),
        reconstruction_views=1).reconstruction), v).numpy() for v in range(8)]
    scale = out.reconstruction.max()
    np.testing.assert_allclose(out.reconstruction, np.mean(views, axis=0), atol=1e-5 * scale)
    assert np.abs(out.reconstruction - plain).max() > 1e-3 * scale
    whole = deblender.predict(blends)
    np.testing.assert_allclose(whole.mu, out.mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whole.ellipticity, out.ellipticity, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("view", [1, 2, 5])
def test_regressor_is_equivariant_under_the_stamp_symmetries(deblender: Deblender,
                                                             blends: np.ndarray, view: int) -> None:
    """Rotating or flipping the stamps changes the raw ellipticity exactly as it changes e."""
    from deblend.core.symmetry import ellipticity_in_view, image_view

    def raw(images: np.ndarray) -> np.ndarray:
        return deblender.predict(images).regressor_output

    seen = image_view(torch.from_numpy(blends), view).numpy()
    expected = ellipticity_in_view(torch.from_numpy(raw(blends)), view).numpy()
    assert np.allclose(raw(np.ascontiguousarray(seen)), expected, atol=1e-5)
    # a single view is not equivariant: the average over views is what makes it so
    x = torch.from_numpy(normalize(blends, deblender.normalization))
    x_seen = torch.from_numpy(normalize(np.ascontiguousarray(seen), deblender.normalization))
    with torch.no_grad():
        single = deblender.regressor(deblender.encoder(x)[0])
        single_seen = deblender.regressor(deblender.encoder(x_seen)[0])
    assert not torch.allclose(ellipticity_in_view(single, view), single_seen, atol=1e-5)


def test_assembles_the_three_stages(deblender: Deblender, trained_run: Path) -> None:
    layout = RunLayout(trained_run)
    expected = {
        "encoder": load_checkpoint(layout.best("stage2"))["modules"]["encoder"],
        "decoder": load_checkpoint(layout.best("stage1"))["modules"]["decoder"],
        "regressor": load_checkpoint(layout.best("stage3"))["modules"]["regressor"],
    }
    for name, entry in expected.items():
        for key, value in getattr(deblender, name).state_dict().items():
            assert torch.equal(value, entry["state_dict"][key]), (name, key)
    assert deblender.bands == ("u", "g", "r", "i", "z", "y") and deblender.stamp_pixels == 45


def test_stage1_encoder_option(trained_run: Path, blends: np.ndarray) -> None:
    vae = Deblender.from_run(trained_run, stage="stage1", device="cpu")
    out = vae.predict(blends[:3])
    assert out.ellipticity is None and out.e1 is None
    assert out.reconstruction.shape == (3, 6, 45, 45)


@pytest.mark.parametrize("make_bad, message", [
    (lambda x: x[:, :5], "5 bands, the model expects 6"),
    (lambda x: x[:, :, :40, :40], "40x40 pixels, the model expects 45x45"),
    (lambda x: x[0], "3-D shape"),
    (lambda x: np.where(np.arange(45) == 7, np.nan, x), "NaN"),
    (lambda x: np.where(np.arange(45) == 7, np.inf, x), "inf"),
])
def test_bad_input_is_named(deblender: Deblender, blends: np.ndarray, make_bad,
                            message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deblender.predict(make_bad(blends))


def test_missing_or_stale_stages_are_refused(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "stage3")
    with pytest.raises(RunError, match="stage3"):
        Deblender.from_run(run)
    shutil.copytree(trained_run / "stage3", run / "stage3")
    layout = RunLayout(run)
    payload = load_checkpoint(layout.best("stage1"))
    weight = next(iter(payload["modules"]["decoder"]["state_dict"].values()))
    weight += 1.0  # stage1 changed after stage2 was trained on it
    save_checkpoint(layout.best("stage1"), payload)
    with pytest.raises(RunError, match="re-trained"):
        Deblender.from_run(run)
