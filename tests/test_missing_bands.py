"""A band missing at inference: ``Deblender.predict(available=...)`` (packaged weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deblend import Deblender

WEIGHTS = Path(__file__).resolve().parents[1] / "deblend" / "weights" / "quick"


@pytest.fixture(scope="module")
def model() -> Deblender:
    return Deblender.from_run(WEIGHTS, device="cpu")


@pytest.fixture(scope="module")
def stamps(model) -> np.ndarray:
    rng = np.random.default_rng(3)
    size = model.stamp_pixels
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    galaxy = 400.0 * np.exp(-(x ** 2 / 8.0 + y ** 2 / 4.0))
    images = galaxy[None, None] * np.linspace(0.5, 1.5, len(model.bands))[None, :, None, None]
    return (images + rng.normal(0.0, 5.0, (3, len(model.bands), size, size))).astype(np.float32)


def test_a_band_of_nan_marked_missing_is_accepted_and_read_as_zeros(model, stamps) -> None:
    y = model.bands.index("y")
    with_nan = stamps.copy()
    with_nan[:, y] = np.nan
    available = np.array([b != "y" for b in model.bands])
    got = model.predict(with_nan, views=1, reconstruction_views=1, available=available)
    zeros = stamps.copy()
    zeros[:, y] = 0.0
    want = model.predict(zeros, views=1, reconstruction_views=1)
    np.testing.assert_array_equal(got.ellipticity, want.ellipticity)
    np.testing.assert_array_equal(got.reconstruction, want.reconstruction)
    assert np.isfinite(got.reconstruction).all()
    # marked available, the NaN band is refused and named
    with pytest.raises(ValueError, match="band y"):
        model.predict(with_nan, views=1, available=np.ones(len(model.bands), bool))
    with pytest.raises(ValueError, match="band y"):
        model.predict(with_nan, views=1)


def test_availability_per_stamp(model, stamps) -> None:
    available = np.ones((3, len(model.bands)), bool)
    available[1, 0] = False  # stamp 1 lacks u
    got = model.predict(stamps, views=1, reconstruction_views=1, available=available)
    plain = model.predict(stamps, views=1, reconstruction_views=1)
    np.testing.assert_array_equal(got.ellipticity[[0, 2]], plain.ellipticity[[0, 2]])
    assert not np.array_equal(got.mu[1], plain.mu[1])


@pytest.mark.parametrize("available, message", [
    (np.ones(5, bool), "shape"),
    (np.ones((2, 6), bool), "shape"),
    (np.ones(6, int), "booleans"),
    (np.zeros(6, bool), "no band available"),
])
def test_bad_availability_masks_are_refused(model, stamps, available, message) -> None:
    with pytest.raises(ValueError, match=message):
        model.predict(stamps, views=1, available=available)


def test_an_encoder_with_availability_input_sees_which_bands_are_missing() -> None:
    """``model.availability_input``: the mask planes follow the fill rule (a band all 0 is
    missing), reach the encoder's output, and survive a checkpoint; without it the checkpoint
    keeps its former form."""
    import torch

    from deblend.core.networks import Encoder, availability_planes
    from deblend.core.runs import build_module, module_entry

    torch.manual_seed(0)
    x = torch.rand(2, 6, 45, 45) + 0.1
    x[0, 2] = 0.0
    planes = availability_planes(x)
    assert planes.shape == x.shape
    assert torch.all(planes[0, 2] == 0) and torch.all(planes[1] == 1)
    assert torch.all(planes[0, [0, 1, 3, 4, 5]] == 1)
    encoder = Encoder(6, 45, 8, availability_input=True).eval()
    nearly = x.clone()
    nearly[0, 2] = 1e-30  # the same pixels to 1e-30, but the band is there
    with torch.no_grad():
        mu_missing, _ = encoder(x)
        mu_there, _ = encoder(nearly)
        assert (mu_missing[0] - mu_there[0]).abs().max() > 1e-4
        torch.testing.assert_close(mu_missing[1], mu_there[1])
        rebuilt = build_module(module_entry(encoder)).eval()
        torch.testing.assert_close(rebuilt(x)[0], mu_missing)
    assert encoder.hparams()["availability_input"] is True
    assert "availability_input" not in Encoder(6, 45, 8).hparams()


def test_a_deblender_runs_an_encoder_with_availability_input(model, stamps) -> None:
    """The deblender compared every encoder hyper-parameter with the decoder's, so a run trained
    with ``model.availability_input`` stopped at its amortize stage (KeyError)."""
    import torch

    from deblend.core.networks import Encoder

    torch.manual_seed(1)
    encoder = Encoder(len(model.bands), model.stamp_pixels, model.encoder.latent_dim,
                      availability_input=True)
    masked = Deblender(encoder, model.decoder, None, model.data)
    available = np.ones(len(model.bands), bool)
    available[2] = False
    prediction = masked.predict(stamps, available=available)
    assert prediction.reconstruction.shape == stamps.shape
    with pytest.raises(ValueError, match="differ"):
        Deblender(Encoder(len(model.bands), model.stamp_pixels, 8, availability_input=True),
                  model.decoder, None, model.data)
