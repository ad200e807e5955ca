"""scarlet2 as a peer deblender (evaluation.scarlet2_peer) on a GalSim-drawn two-galaxy blend."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("scarlet2")

import galsim
import numpy as np

from deblend.core.shapes import moments_ellipticity
from evaluation.scarlet2_peer import model_ellipticity, scarlet2_deblend
from simulation.scenes import add_btk_noise

SCALE = 0.2  # arcsec per pixel
SIZE = 41
BANDS = ("r", "i")
SKY = np.array([200.0, 300.0])  # electrons per pixel
PSF = galsim.Moffat(beta=2.5, fwhm=0.8)
# two well-separated elliptical galaxies of different colours: pixel (x = column, y = row),
# fluxes per band (electrons), sigma (arcsec), distortion (e1, e2)
GALAXIES = [
    {"x": 12, "y": 26, "flux": (4e4, 6e4), "sigma": 0.45, "e": (0.3, 0.0)},
    {"x": 29, "y": 13, "flux": (5e4, 2.5e4), "sigma": 0.35, "e": (0.0, -0.25)},
]


def psf_images(size: int = 25) -> np.ndarray:
    image = PSF.drawImage(nx=size, ny=size, scale=SCALE).array.astype(np.float64)
    return np.stack([image / image.sum()] * len(BANDS))


def draw_galaxy(galaxy: dict) -> np.ndarray:
    """(bands, SIZE, SIZE) noiseless PSF-convolved galaxy, electrons."""
    centre = (SIZE - 1) / 2
    profile = galsim.Gaussian(sigma=galaxy["sigma"]).shear(e1=galaxy["e"][0], e2=galaxy["e"][1])
    out = []
    for flux in galaxy["flux"]:
        image = galsim.Convolve(profile.withFlux(flux), PSF).drawImage(
            nx=SIZE, ny=SIZE, scale=SCALE, offset=(galaxy["x"] - centre, galaxy["y"] - centre))
        out.append(image.array.astype(np.float64))
    return np.stack(out)


@pytest.fixture(scope="module")
def scene() -> dict:
    isolated = np.stack([draw_galaxy(g) for g in GALAXIES])  # (2, bands, H, W)
    clean = isolated.sum(axis=0)
    noisy = np.stack([add_btk_noise(clean[b], float(SKY[b]), seed=11 + b, noise="all")
                      for b in range(len(BANDS))])
    positions = [(g["x"], g["y"]) for g in GALAXIES]
    result = scarlet2_deblend(noisy, psf_images(), positions, SKY, BANDS, max_iter=400)[0]
    return {"isolated": isolated, "clean": clean, "noisy": noisy, "result": result}


def test_recovers_each_flux_and_the_image(scene: dict) -> None:
    result = scene["result"]
    assert len(result.sources) == 2
    for source, galaxy in zip(result.sources, GALAXIES):
        assert (source.x, source.y) == (galaxy["x"], galaxy["y"])
        truth = np.array(galaxy["flux"])
        np.testing.assert_allclose(source.flux, truth, rtol=0.03)
        np.testing.assert_allclose(source.observed_flux, truth, rtol=0.03)
        assert source.model.shape == (len(BANDS), SIZE, SIZE)
    total = np.sum([s.model for s in result.sources], axis=0)
    clean = scene["clean"]
    assert np.linalg.norm(total - clean) / np.linalg.norm(clean) < 0.05
    assert 0.5 < result.chi2 < 1.5
    assert result.steps >= 1 and result.cpu_seconds > 0 and result.wall_seconds > 0


def test_models_are_deblended_and_keep_their_shapes(scene: dict) -> None:
    result = scene["result"]
    for k, (source, galaxy) in enumerate(zip(result.sources, GALAXIES)):
        # each model carries its own galaxy, not the other one
        own = scene["isolated"][k]
        other = scene["isolated"][1 - k]
        assert np.sum(source.model * own) > 10 * np.sum(source.model * other)
        # a stamp centred on the source: its brightest pixel is the central one (+-1)
        stamp = source.stamp(45)
        assert stamp.shape == (len(BANDS), 45, 45)
        row, col = np.unravel_index(np.argmax(stamp.sum(axis=0)), (45, 45))
        assert abs(row - 22) <= 1 and abs(col - 22) <= 1
        # moment distortion of the reconvolved model ~ that of the noiseless galaxy
        e1, e2 = model_ellipticity(source.model[None], BANDS, BANDS)
        t1, t2 = moments_ellipticity(own.sum(axis=0)[None])
        assert abs(e1[0] - t1[0]) < 0.05 and abs(e2[0] - t2[0]) < 0.05
    # galaxy 0 is elongated along x (e1 > 0), galaxy 1 along the diagonal y = -x (e2 < 0)
    assert model_ellipticity(result.sources[0].model[None], BANDS, BANDS)[0][0] > 0.05
    assert model_ellipticity(result.sources[1].model[None], BANDS, BANDS)[1][0] < -0.03


def test_bad_input_is_refused() -> None:
    image = np.zeros((len(BANDS), SIZE, SIZE))
    good = {"psfs": psf_images(), "positions": [(20, 20)], "sky_levels": SKY, "bands": BANDS}
    with pytest.raises(ValueError, match="bands"):
        scarlet2_deblend(np.zeros((3, SIZE, SIZE)), **good)
    nan = image.copy()
    nan[0, 5, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        scarlet2_deblend(nan, **good)
    with pytest.raises(ValueError, match="odd"):
        scarlet2_deblend(image, **{**good, "psfs": psf_images(24)})
    with pytest.raises(ValueError, match="must lie in"):
        scarlet2_deblend(image, **{**good, "positions": [(SIZE + 3, 20)]})
    with pytest.raises(ValueError, match="no source position"):
        scarlet2_deblend(image, **{**good, "positions": []})
    with pytest.raises(ValueError, match="sky_levels"):
        scarlet2_deblend(image, **{**good, "sky_levels": np.array([200.0])})


def test_missing_scarlet2_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scarlet2", None)  # import scarlet2 -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        scarlet2_deblend(np.ones((len(BANDS), SIZE, SIZE)), psf_images(), [(20, 20)], SKY, BANDS)
