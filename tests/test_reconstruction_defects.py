"""Reconstruction defects (evaluation.reconstruction_defects): the measurements that expose a
fixed preferred orientation and a brightness-dependent flux loss, and the 8-view symmetrised
reconstruction that removes the orientation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import galsim
import numpy as np
import pytest
import torch

from deblend.core.inference import Deblender
from deblend.core.networks import Decoder, Encoder
from deblend.core.normalization import NormalizationConstants
from deblend.core.runs import DataIdentity
from deblend.core.symmetry import N_VIEWS, ellipticity_in_view, image_view
from evaluation.reconstruction_defects import (
    draw_isolated_galaxies,
    ellipticities,
    equivariance_error,
    flux_residual_by_magnitude,
    flux_residual_by_size,
    flux_slope,
    light_by_radius,
    measure_defects,
    network_frame_bias,
    optimal_snr,
    orientation_bias,
    radius_map,
    reconstruct,
    residual_by_snr,
    ring_mask,
    slope_by_aperture,
    view_biases,
    view_reconstructions,
)
from tests.conftest import parser_refusal

STAMP = 25
PIXEL = 0.2


def _untrained_deblender(seed: int = 0) -> Deblender:
    """A deblender with random (untrained) 6-band LSST-like networks: not equivariant."""
    torch.manual_seed(seed)
    bands = ("u", "g", "r", "i", "z", "y")
    data = DataIdentity("/nonexistent", "test", "LSST", bands, 45, 0.2,
                        NormalizationConstants(bands, (500.0, 6000.0, 25000.0, 21000.0, 16000.0,
                                                       9500.0)))
    return Deblender(Encoder(6, 45, 8), Decoder(6, 45, 8), None, data, "cpu")


def test_symmetrised_reconstruction_is_exactly_equivariant() -> None:
    """The 8-view average commutes with every symmetry of the stamp (up to float rounding),
    which cancels any bias fixed in the networks' frame; one view does not."""
    model = _untrained_deblender()
    x = np.random.default_rng(0).gamma(2.0, 300.0, (3, 6, 45, 45)).astype(np.float32)
    plain, sym = reconstruct(model, x, 1), reconstruct(model, x, 8)
    scale = np.abs(sym).max()
    for view in range(1, N_VIEWS):
        seen = np.ascontiguousarray(image_view(torch.from_numpy(x), view).numpy())
        expected = image_view(torch.from_numpy(sym), view).numpy()
        assert np.abs(reconstruct(model, seen, 8) - expected).max() < 1e-4 * scale
        plain_expected = image_view(torch.from_numpy(plain), view).numpy()
        assert np.abs(reconstruct(model, seen, 1) - plain_expected).max() > 1e-3 * scale
    views = view_reconstructions(model, x)
    assert views.shape == (N_VIEWS, *x.shape)
    np.testing.assert_allclose(views.mean(axis=0), sym, rtol=1e-5, atol=1e-6 * scale)
    assert equivariance_error(views) > 1e-3
    assert equivariance_error(np.repeat(sym[None], N_VIEWS, axis=0)) == 0.0
    with pytest.raises(ValueError, match="views"):
        reconstruct(model, x, 3)


def _galaxies(n_pairs: int, extra_shear=(0.0, 0.0), seed: int = 1) -> tuple[np.ndarray, ...]:
    """Twin pairs of elliptical exponentials (25x25, 0.2"/px): (images, true distortions
    of the unsheared galaxies from GalSim)."""
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for _ in range(n_pairs):
        g = rng.normal(0, 0.2, 2)
        for sign in (1.0, -1.0):  # a 90-degree rotation flips the sign of both components
            gal = galsim.Exponential(half_light_radius=0.5).shear(g1=sign * g[0], g2=sign * g[1])
            image = gal.drawImage(nx=STAMP, ny=STAMP, scale=PIXEL).array
            truth.append(ellipticities(image[None])[0])
            if extra_shear != (0.0, 0.0):
                gal = gal.shear(g1=extra_shear[0], g2=extra_shear[1])
            images.append(gal.drawImage(nx=STAMP, ny=STAMP, scale=PIXEL).array)
    return np.array(images), np.array(truth)


def test_orientation_bias_detects_an_injected_fixed_orientation() -> None:
    g = (0.01, -0.006)
    images, truth = _galaxies(30, extra_shear=g)
    bias = orientation_bias(ellipticities(images), truth)
    assert bias["n"] == 60 and bias["n_pairs"] == 30
    # a small shear g adds about 2 g (1 - e^2) to a distortion; |e| ~ 0.3 here
    assert bias["e1"]["additive"] == pytest.approx(2 * g[0], abs=0.003)
    assert bias["e2"]["additive"] == pytest.approx(2 * g[1], abs=0.003)
    clean, truth = _galaxies(30)
    null = orientation_bias(ellipticities(clean), truth)
    assert abs(null["e1"]["additive"]) < 1e-6 and abs(null["e2"]["mean"]) < 1e-6


def test_twin_pairs_separate_round_bias_from_additive_bias() -> None:
    rng = np.random.default_rng(2)
    e = rng.normal(0, 0.25, (500, 2))
    truth = np.repeat(e, 2, axis=0) * np.tile([[1.0], [-1.0]], (500, 1))
    rec = 0.9 * truth + np.array([0.004, -0.002]) + rng.normal(0, 0.01, truth.shape)
    bias = orientation_bias(rec, truth)
    for k, c in ((0, 0.004), (1, -0.002)):
        entry = bias[("e1", "e2")[k]]
        assert entry["additive"] == pytest.approx(c, abs=4 * entry["additive_error"] + 1e-4)
        assert entry["multiplicative"] == pytest.approx(-0.1, abs=0.01)
    with pytest.raises(ValueError, match="twin pairs"):
        orientation_bias(rec[:-1], truth[:-1])


def test_view_biases_find_a_bias_fixed_in_the_network_frame() -> None:
    """Reconstructions that add the same shear in every view's own frame: constant residual in
    the network frame, cancelling over views in the stamp frame."""
    g = np.array([0.012, 0.008])
    rng = np.random.default_rng(3)
    gs = rng.normal(0, 0.1, (6, 2))  # nearly round: terms in e^2 g stay below 1e-3
    clean = np.array([galsim.Exponential(half_light_radius=0.5).shear(g1=s * a, g2=s * b)
                      .drawImage(nx=STAMP, ny=STAMP, scale=PIXEL).array
                      for a, b in gs for s in (1.0, -1.0)])
    recons = []
    for view in range(N_VIEWS):
        stamp_g = ellipticity_in_view(torch.from_numpy(g), view).numpy()  # the view's g, back
        recons.append([galsim.Exponential(half_light_radius=0.5)
                       .shear(g1=s * a, g2=s * b).shear(g1=stamp_g[0], g2=stamp_g[1])
                       .drawImage(nx=STAMP, ny=STAMP, scale=PIXEL).array
                       for a, b in gs for s in (1.0, -1.0)])
    recons = np.array(recons)[:, :, None]  # (views, N, 1 band, S, S)
    rows = view_biases(recons, clean[:, None], ("r",), ("r",))
    network = np.array([[r["network_e1"]["mean"], r["network_e2"]["mean"]] for r in rows])
    stamp = np.array([[r["e1"]["mean"], r["e2"]["mean"]] for r in rows])
    assert np.all(network[:, 0] > 0.012) and np.all(network[:, 1] > 0.008)
    assert np.ptp(network, axis=0).max() < 0.002
    assert np.abs(stamp.mean(axis=0)).max() < 0.002
    fixed = network_frame_bias(recons, clean[:, None], ("r",), ("r",))
    assert fixed["n"] == 12
    assert fixed["e1"]["mean"] == pytest.approx(network[:, 0].mean(), abs=1e-9)
    assert fixed["e2"]["mean"] == pytest.approx(network[:, 1].mean(), abs=1e-9)
    unbiased = network_frame_bias(np.repeat(clean[None, :, None], N_VIEWS, axis=0),
                                  clean[:, None], ("r",), ("r",))
    assert abs(unbiased["e1"]["mean"]) < 1e-9 and abs(unbiased["e2"]["mean"]) < 1e-9


def test_flux_residual_by_magnitude_recovers_injected_deficits() -> None:
    rng = np.random.default_rng(4)
    mags = rng.uniform(20, 24, 400)
    truth = rng.uniform(1, 2, (400, 3, 5, 5)).astype(np.float32)
    deficit = -0.04 * (24 - mags)  # -16% at 20, 0 at 24
    recon = truth * (1 + deficit)[:, None, None, None]
    rows = flux_residual_by_magnitude(recon, truth, mags, (20, 22, 24))
    assert [r["n"] for r in rows] == [int((mags < 22).sum()), int((mags >= 22).sum())]
    assert rows[0]["mean"] == pytest.approx(-0.04 * 3, abs=0.01)
    assert rows[1]["mean"] == pytest.approx(-0.04 * 1, abs=0.01)
    slope = flux_slope(flux_residual_by_magnitude(recon, truth, mags))
    assert slope["slope"] == pytest.approx(0.04, abs=0.005)
    jittered = mags + rng.normal(0, 1e-3, 400)
    flat = flux_slope(flux_residual_by_magnitude(truth * 0.95, truth, jittered))
    assert abs(flat["slope"]) < 1e-3
    with pytest.raises(ValueError, match="mags"):
        flux_residual_by_magnitude(recon, truth, mags[:-1])


def test_flux_residual_by_size_separates_a_size_dependent_deficit() -> None:
    # a deficit that depends on size only: flat in magnitude within each size bin
    rng = np.random.default_rng(8)
    mags = rng.uniform(20, 24, 600)
    hlr = np.exp(rng.uniform(np.log(0.3), np.log(1.2), 600))
    hlr[:2] = (0.3, 1.2)  # both outer edges belong to a bin
    truth = rng.uniform(1, 2, (600, 3, 5, 5))
    deficit = np.where(hlr < 0.45, -0.02, np.where(hlr < 0.7, -0.08, -0.20))
    recon = truth * (1 + deficit)[:, None, None, None]
    sizes = flux_residual_by_size(recon, truth, mags, hlr)
    assert [(e["hlr_lo"], e["hlr_hi"]) for e in sizes] == [(0.3, 0.45), (0.45, 0.7), (0.7, 1.2)]
    assert sum(row["n"] for e in sizes for row in e["bins"]) == 600
    for entry, expected in zip(sizes, (-0.02, -0.08, -0.20)):
        assert [row["mean"] for row in entry["bins"]] == pytest.approx([expected] * 3, abs=1e-9)
    # pooled over sizes, each magnitude bin averages the three deficits
    pooled = flux_residual_by_magnitude(recon, truth, mags, (20, 22, 23, 24))
    assert all(-0.20 < row["mean"] < -0.02 for row in pooled)
    with pytest.raises(ValueError, match="hlr"):
        flux_residual_by_size(recon, truth, mags, hlr[:-1])


def test_gaussian_weight_is_centred_round_and_refuses_a_bad_sigma() -> None:
    from deblend.core.shapes import gaussian_weight

    weight = gaussian_weight(45, 3.0)
    assert weight[22, 22] == 1.0 and np.array_equal(weight, weight.T)
    assert weight[22, 25] == pytest.approx(np.exp(-0.5))  # one sigma from the centre
    with pytest.raises(ValueError, match="sigma"):
        ellipticities(np.ones((2, 45, 45)), "gaussian", sigma=0.0)


def _elliptical_exponentials(n: int, seed: int, stamp: int = 45) -> np.ndarray:
    """(n, S, S) GalSim exponential profiles, half-light radius 0.8", |e| up to ~0.5."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, stamp, stamp))
    for i in range(n):
        g1, g2 = rng.uniform(-0.3, 0.3, 2)
        profile = galsim.Exponential(half_light_radius=0.8, flux=1e4).shear(g1=g1, g2=g2)
        images[i] = profile.drawImage(nx=stamp, ny=stamp, scale=PIXEL).array
    return images


def test_light_and_shape_by_radius_locate_a_defect_in_the_outskirts() -> None:
    truth = _elliptical_exponentials(40, seed=6)
    wings = radius_map(45) >= 10.0
    recon = np.where(wings, 0.5 * truth, truth)  # half the light beyond 10 px, core intact
    rings = light_by_radius(recon, truth, (0.0, 5.0, 10.0, 20.0, 32.0))
    assert [r["kept"] for r in rings] == pytest.approx([1.0, 1.0, 0.5, 0.5], abs=1e-12)
    assert rings[0]["truth_per_pixel"] > rings[2]["truth_per_pixel"] > 0
    assert sum(r["n_pixels"] for r in rings) == 45 * 45
    rows = slope_by_aperture(recon, truth, (6.0, 10.0, 20.0))
    for row in rows[:2]:  # apertures inside the intact core: the truth's own shapes
        assert row["e1"]["slope"] == pytest.approx(1.0, abs=1e-9)
        assert row["e2"]["slope"] == pytest.approx(1.0, abs=1e-9)
    assert abs(rows[2]["e1"]["slope"] - 1.0) > 0.01 and abs(rows[2]["e2"]["slope"] - 1.0) > 0.01
    # galaxy-to-galaxy scatter of 10% in the light kept: the error follows it
    factors = np.random.default_rng(1).normal(1.0, 0.1, 40)
    scattered = light_by_radius(truth * factors[:, None, None], truth)
    for ring in scattered[:3]:
        assert abs(ring["kept"] - 1.0) < 4 * ring["error"]
        assert 0.3 * 0.1 / np.sqrt(40) < ring["error"] < 3 * 0.1 / np.sqrt(40)
    with pytest.raises(ValueError, match="N, S, S"):
        light_by_radius(recon[None], truth[None])


def test_residual_by_snr_is_the_ring_residual_in_units_of_the_noise() -> None:
    galaxies = draw_isolated_galaxies(8, seed=3)
    sky = galaxies.sky_levels.reshape(1, -1, 1, 1)
    sigma = np.sqrt(sky + galaxies.clean.astype(np.float64))
    snr = optimal_snr(galaxies.clean, galaxies.sky_levels)
    edges = (0.0, float(np.median(snr)), float("inf"))
    # the truth as the model: noise alone, rms 1 up to chance, equal to the floor
    exact = residual_by_snr(galaxies.clean, galaxies, edges)
    assert [r["n"] for r in exact] == [4, 4]
    for row in exact:
        assert row["median"] == pytest.approx(row["floor"], abs=1e-9)
        assert 0.9 < row["floor"] < 1.1
    # a noiseless image and a model 2 sigma too faint on every pixel: exactly 2 in the ring
    noiseless = dataclasses.replace(galaxies, noisy=galaxies.clean)
    two = residual_by_snr(galaxies.clean - 2.0 * sigma, noiseless, edges)
    assert all(r["median"] == pytest.approx(2.0, rel=1e-6) and r["floor"] == 0.0 for r in two)
    # no model at all: the brighter half leaves the larger residual, well above the noise
    empty = residual_by_snr(np.zeros_like(galaxies.clean), galaxies, edges)
    assert empty[1]["median"] > empty[0]["median"] > 1.1
    # the ring: more than 3 and at most 12 pixels from the centre
    ring = ring_mask((45, 45), 22.0, 22.0)
    assert ring[22, 22 + 4] and ring[22, 22 + 12] and not ring[22, 22 + 3]
    assert not ring[22, 22 + 13] and not ring[22, 22]
    # about any point, x the column: 3.5 px along a row is in, its transpose is far out
    off = ring_mask((45, 45), 10.5, 30.0)
    assert off[30, 14] and not off[30, 13] and not off[14, 30]
    # the S/N: sqrt(sum clean^2 / sky) over bands and pixels
    one = np.zeros((1, 2, 5, 5))
    one[0, 0, 2, 2], one[0, 1, 1, 1] = 30.0, 40.0
    assert optimal_snr(one, np.array([100.0, 400.0]))[0] == pytest.approx(np.hypot(3.0, 2.0))


def test_benchmark_measures_and_writes_its_outputs(tmp_path: Path, capsys) -> None:
    from benchmarks.reconstruction_defects import main, write_outputs

    galaxies = draw_isolated_galaxies(4, seed=0)
    assert galaxies.clean.shape == galaxies.noisy.shape == (4, 6, 45, 45)
    assert np.all((galaxies.hlr >= 0.3) & (galaxies.hlr <= 1.2))
    assert galaxies.hlr[0] == galaxies.hlr[1]  # the twin is the same galaxy turned
    assert np.all(galaxies.twin == [0, 1, 0, 1])
    assert not np.allclose(galaxies.noisy, galaxies.clean)  # BTK-like noise was added
    result = measure_defects(_untrained_deblender(), galaxies, map_prior="normal")
    assert result["n"] == 4 and set(result["plain"]["bias"]) == {"uniform", "gaussian"}
    # MAP's reconstructions are fitted to the pixels: not the encoder's decoding
    map_flux = [b["mean"] for b in result["map"]["flux"]["bins"] if b["n"]]
    plain_flux = [b["mean"] for b in result["plain"]["flux"]["bins"] if b["n"]]
    assert result["map_prior"] == "normal" and map_flux != plain_flux
    assert len(result["view_biases"]["uniform"]) == N_VIEWS
    assert result["network_frame_bias"]["gaussian"]["n"] == 4
    out = tmp_path / "defects"
    text = write_outputs(result, out, "untrained")
    assert "8-view average" in text and "slope per mag" in text and "MAP (normal prior)" in text
    assert "light kept per annulus" in text and "inside a circular aperture" in text
    assert "in units of the noise" in text and len(result["plain"]["residual_by_snr"]) == 8
    assert "true half-light radius" in text and len(result["plain"]["flux_by_size"]) == 3
    assert len(result["map"]["light_by_radius"]) == 6
    assert len(result["plain"]["slope_by_aperture"]) == 5
    assert json.loads((out / "reconstruction_defects.json").read_text())["n"] == 4
    assert (out / "flux_residual.png").stat().st_size > 0
    assert (out / "radial_profile.png").stat().st_size > 0
    assert "untrained" in (out / "report.md").read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_outputs(result, foreign, "untrained")
    assert main(["--run", str(tmp_path / "no-run"), "--n", "3"]) == 2  # odd: no twin pairs
    for mag in (["20", "16"], ["16", "nan"]):  # faint first, or not a magnitude
        assert "--mag needs two finite magnitudes, bright first" in parser_refusal(
            "benchmarks.reconstruction_defects", ["--run", "r", "--mag", *mag], capsys)
    assert main(["--run", str(tmp_path / "no-run"), "--n", "4"]) == 2  # no such run
