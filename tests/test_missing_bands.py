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
