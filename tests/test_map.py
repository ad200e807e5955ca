"""MAP deblending of scenes (deblend.core.map_fit, map_deblend), detection, Laplace posteriors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deblend import Deblender
from deblend.core.detection import detect_around_target, detect_sources, with_target
from deblend.core.map_fit import SceneModel, SceneSources, fit_scenes, render_scene
from deblend.core.posterior import (
    EllipticityPosterior,
    decoder_jacobian,
    laplace_precision,
    laplace_samples,
    prior_hessian,
)
from deblend.core.stamps import paste_stamp
from deblend.core.symmetry import (
    ellipticity_in_view,
    image_from_view,
    image_view,
    position_from_view,
)
from simulation.dataset import open_dataset


def test_render_scene_pastes_every_stamp_like_paste_stamp() -> None:
    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(2, 3, 2, 7, 7)).astype(np.float32)
    # every stamp overhangs the scene but one; their centres lie in it (others are refused)
    positions = [np.array([[0.2, 0.4], [10.0, 5.6], [4.0, 4.0]]), np.array([[10.4, 12.3]])]
    expected = np.zeros((2, 2, 13, 11), np.float32)
    for i, p in enumerate(positions):
        for k, (x, y) in enumerate(np.floor(p + 0.5).astype(int)):
            paste_stamp(expected[i], stamps[i, k], x, y)
    sources = SceneSources.from_lists([torch.from_numpy(p) for p in positions])
    rendered = render_scene(torch.from_numpy(stamps), sources, 13, 11)
    assert sources.mask.tolist() == [[True, True, True], [True, False, False]]
    np.testing.assert_allclose(rendered.numpy(), expected, atol=1e-5)


@pytest.fixture(scope="module")
def model(trained_run: Path) -> Deblender:
    return Deblender.from_run(trained_run, device="cpu")


def test_map_recovers_the_latents_of_a_scene_drawn_by_the_decoder(model: Deblender,
                                                                 tiny_dataset: Path) -> None:
    """Two overlapping sources, 5 pixels apart, drawn by the decoder itself from known latents:
    the fit from perturbed latents finds the scene and each source again."""
    data = open_dataset(tiny_dataset)
    clean = data.images("clean", data.split_indices("validation")[:2])
    z_true = torch.from_numpy(model.predict(clean, views=1, reconstruct=False).mu)[None]
    scene_model = SceneModel(model.decoder, model.normalization)
    sources = SceneSources.from_lists([torch.tensor([[30.0, 30.0], [35.0, 33.0]])])
    with torch.no_grad():
        truth = scene_model.stamps(z_true)
        scene = render_scene(truth, sources, 64, 64)
    sky = torch.full((len(model.bands),), 1.0)
    start = z_true + 0.5 * torch.randn(z_true.shape, generator=torch.Generator().manual_seed(0))
    # a flat prior: the tiny run's latents lie far out (|z| ~ 30), where N(0, I) would pull
    fit = fit_scenes(scene_model, scene, sources, start, sky,
                     lambda z: z.new_zeros(z.shape[:-1]), steps=300, learning_rate=0.05)
    assert fit.objective[-1, 0] < fit.objective[0, 0]

    def error(stamps: torch.Tensor, k: int) -> float:
        return float((stamps[:, k] - truth[:, k]).norm() / truth[:, k].norm())

    with torch.no_grad():
        start_stamps = scene_model.stamps(start)
    # each source's own image is found again (a 5-pixel separation: they overlap heavily)
    for k in (0, 1):
        assert error(fit.stamps, k) < 0.02 < error(start_stamps, k)
    assert float((fit.z - z_true).norm()) < 0.8 * float((start - z_true).norm())


def test_map_deblend_on_blends_with_detections(model: Deblender, tiny_dataset: Path) -> None:
    data = open_dataset(tiny_dataset)
    indices = data.split_indices("validation")[:6]
    blends = data.images("blend", indices)
    found = detect_sources(blends, data.survey, data.bands)
    positions = [with_target(p, (22, 22)) for p in found]
    out = model.map_deblend(blends, positions, prior="normal", steps=15, posterior_samples=20,
                            batch_size=4)  # two batches of scenes
    n_sources = sum(len(p) for p in positions)
    assert out.latent.shape == (n_sources, model.latent_dim) and out.scene.shape == (n_sources,)
    assert out.reconstruction.shape == (n_sources, len(data.bands), 45, 45)
    assert out.model.shape == blends.shape and out.flux.shape == (n_sources, len(data.bands))
    first = np.cumsum([0] + [len(p) for p in positions])[:-1]
    assert (out.x[first] == 22).all() and (out.y[first] == 22).all()
    assert (out.objective[1] <= out.objective[0]).all()  # the fit never ends worse than it began
    assert out.ellipticity.shape == (n_sources, 2) and np.abs(out.ellipticity).max() <= 1
    # the target's MAP-deblended stamp is the blend minus every other source's fitted model
    others = out.model - out.reconstruction[first]
    np.testing.assert_allclose(out.deblended[first], blends - others, rtol=1e-5,
                               atol=1e-5 * np.abs(blends).max())
    assert out.deblended.shape == out.reconstruction.shape
    np.testing.assert_allclose(out.ellipticity_deblended,
                               model.predict(out.deblended, reconstruct=False).ellipticity)
    assert np.abs(out.ellipticity_deblended - out.ellipticity).max() > 1e-3
    low, high = out.posterior.intervals[0.68][..., 0], out.posterior.intervals[0.68][..., 1]
    assert (low <= out.posterior.mean).all() and (out.posterior.mean <= high).all()
    assert (out.posterior.intervals[0.95][..., 0] <= low + 1e-6).all()
    # zero steps: the MAP latents are the stage2 encoder's on each source's stamp, as seen in
    # the view its scene is fitted in (scene i in view i)
    start = model.map_deblend(blends, positions, prior="normal", steps=0)
    assert start.view.tolist() == list(range(6))
    np.testing.assert_allclose(start.latent, start.initial_latent)
    viewed = np.stack([image_view(torch.from_numpy(b), v).numpy()
                       for b, v in zip(blends, start.view)])
    np.testing.assert_allclose(start.latent[first], model.predict(viewed, views=1).mu, atol=1e-5)


def test_each_scene_is_fitted_in_its_view_and_mapped_back(model: Deblender,
                                                         tiny_dataset: Path) -> None:
    """Scene 0 is fitted as it is, scene v in view v: giving as scene v the image whose view v is
    scene 0 must give scene 0's fit, mapped back into scene v's frame (a 51 x 51 scene with
    two sources off-centre, so a wrong position or orientation anywhere shows)."""
    data = open_dataset(tiny_dataset)
    blend = data.images("blend", data.split_indices("validation")[:1])[0]
    scene = np.zeros((len(model.bands), 51, 51), np.float32)
    scene[:, 2:47, 5:50] = blend
    xy = np.array([[27.0, 24.0], [20.0, 30.0]])  # the blend's centre, and a second source
    views = range(4)
    scenes = [scene] + [image_from_view(torch.from_numpy(scene), v).numpy() for v in views[1:]]
    positions = [xy] + [position_from_view(xy, v, 51, 51) for v in views[1:]]
    out = model.map_deblend(np.stack(scenes), positions, prior="normal", steps=10)
    assert out.view.tolist() == list(views)
    raw = out.ellipticity if out.ellipticity_raw is None else out.ellipticity_raw
    for v in views[1:]:
        rows = out.scene == v
        np.testing.assert_allclose(out.latent[rows], out.latent[out.scene == 0], atol=2e-4)
        back = image_from_view(torch.from_numpy(out.reconstruction[out.scene == 0]), v).numpy()
        np.testing.assert_allclose(out.reconstruction[rows], back, rtol=1e-3,
                                   atol=1e-3 * np.abs(back).max())
        np.testing.assert_allclose(
            out.model[v], image_from_view(torch.from_numpy(out.model[0]), v).numpy(),
            rtol=1e-3, atol=1e-3 * np.abs(out.model[0]).max())
        assert np.stack([out.x[rows], out.y[rows]], 1).tolist() == positions[v].tolist()
        e0 = torch.from_numpy(raw[out.scene == 0])
        np.testing.assert_allclose(raw[rows], ellipticity_in_view(e0, v).numpy(), atol=1e-4)
    # a quarter turn changes the sign of e: the mapping is real
    assert np.abs(raw[out.scene == 1] - raw[out.scene == 0]).max() > 1e-3


def test_non_finite_gradients_are_not_followed_and_are_reported(model: Deblender,
                                                                tiny_dataset: Path,
                                                                monkeypatch) -> None:
    """A prior whose gradient is infinite at 0 (sqrt|z|): the scene starting there keeps its
    start and is flagged, the other one is fitted; map_deblend warns when a prior misbehaves."""
    data = open_dataset(tiny_dataset)
    clean = data.images("clean", data.split_indices("validation")[:1])
    scene_model = SceneModel(model.decoder, model.normalization)
    sources = SceneSources.from_lists([torch.tensor([[22.0, 22.0]])] * 2)
    images = torch.from_numpy(np.concatenate([clean, clean]))
    z0 = torch.from_numpy(model.predict(clean, views=1, reconstruct=False).mu)[None].repeat(2, 1, 1)
    z0[1] = 0.0
    fit = fit_scenes(scene_model, images, sources, z0, torch.full((len(model.bands),), 1.0),
                     lambda z: -z.abs().sqrt().sum(-1), steps=5, learning_rate=0.05)
    assert fit.nonfinite_gradient.tolist() == [False, True]
    assert torch.equal(fit.z[1], z0[1]) and not torch.equal(fit.z[0], z0[0])
    blends = data.images("blend", data.split_indices("validation")[:3])
    positions = [np.array([[22.0, 22.0]])] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a well-behaved prior: no warning
        model.map_deblend(blends, positions, prior="normal", steps=3)
    monkeypatch.setattr(model.require_flow(), "log_prob", lambda z: z.sum(-1) * float("inf"))
    with pytest.warns(RuntimeWarning, match="3 of 3 scenes had a non-finite"):
        out = model.map_deblend(blends, positions, prior="flow", steps=3)
    np.testing.assert_allclose(out.latent, out.initial_latent)


def test_map_deblend_refuses_bad_input(model: Deblender) -> None:
    scenes = np.zeros((2, len(model.bands), 50, 50), np.float32)
    positions = [np.array([[25.0, 25.0]])] * 2
    with pytest.raises(ValueError, match="bands"):
        model.map_deblend(scenes[:, 1:], positions, prior="normal")
    bad = scenes.copy()
    bad[1, 2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.map_deblend(bad, positions, prior="normal")
    with pytest.raises(ValueError, match="one \\(K, 2\\) array per scene"):
        model.map_deblend(scenes, positions[:1], prior="normal")
    with pytest.raises(ValueError, match="sky_levels"):
        model.map_deblend(scenes, positions, np.zeros(len(model.bands)), prior="normal")
    with pytest.raises(ValueError, match="prior must be"):
        model.map_deblend(scenes, positions, prior="student")


def test_detection_finds_separated_sources(model: Deblender, tiny_dataset: Path) -> None:
    data = open_dataset(tiny_dataset)
    clean = data.images("clean", data.split_indices("validation")[:1])[0]
    scene = np.zeros((1, len(data.bands), 80, 80), np.float32)
    paste_stamp(scene[0], clean * 50, 20, 25)
    paste_stamp(scene[0], clean * 50, 60, 55)
    scene += np.random.default_rng(0).normal(0, 1.0, scene.shape).astype(np.float32)
    found = detect_sources(scene, data.survey, data.bands)[0]
    assert len(found) == 2
    order = np.argsort(found[:, 0])
    np.testing.assert_allclose(found[order], [[20, 25], [60, 55]], atol=1.5)
    with pytest.raises(ValueError, match="detection band"):
        detect_sources(scene, data.survey, data.bands, detection_band="Y")
    np.testing.assert_allclose(with_target(found, (60.3, 55.2)), [[60.3, 55.2], found[order[0]]])
    # the known target first, in place of its own detection, then the other source
    around = detect_around_target(scene, data.survey, data.bands, (60.3, 55.2))
    assert len(around) == 1
    np.testing.assert_allclose(around[0], [[60.3, 55.2], found[order[0]]])


def test_laplace_intervals_cover_a_known_gaussian_posterior() -> None:
    """Linear decoder, Gaussian noise and N(0, I) prior: the posterior is exactly Gaussian, so
    the 68% and 95% intervals of a linear read-out must cover the truth that often."""
    generator = torch.Generator().manual_seed(0)
    n, pixels, dim, sigma = 3000, 20, 3, 2.0
    matrix = torch.randn(pixels, dim, generator=generator, dtype=torch.float64)
    z_true = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    data = z_true @ matrix.T + sigma * torch.randn(n, pixels, generator=generator,
                                                   dtype=torch.float64)
    weights = torch.full((n, pixels), sigma ** -2, dtype=torch.float64)
    jacobian = decoder_jacobian(lambda z: z @ matrix.T, torch.zeros(n, dim, dtype=torch.float64))
    prior = prior_hessian(lambda z: -0.5 * z.pow(2).sum(-1), torch.zeros(n, dim,
                                                                          dtype=torch.float64))
    np.testing.assert_allclose(prior.numpy(), np.broadcast_to(np.eye(dim), (n, dim, dim)))
    precision = laplace_precision(jacobian, weights, prior)
    z_map = torch.linalg.solve(precision, (jacobian.transpose(1, 2)
                                           @ (data * weights)[..., None]))[..., 0]
    readout = torch.tensor([[1.0, 0.5], [0.0, 1.0], [-0.3, 0.2]], dtype=torch.float64)
    samples = laplace_samples(z_map, precision, 400, generator) @ readout
    coverage = EllipticityPosterior.from_samples(samples.numpy()).coverage(
        (z_true @ readout).numpy())
    np.testing.assert_allclose(coverage[0.68], 0.68, atol=0.03)
    np.testing.assert_allclose(coverage[0.95], 0.95, atol=0.015)
    # a posterior too narrow by 2x covers far less: the check can fail
    narrow = laplace_samples(z_map, 4 * precision, 400, generator) @ readout
    assert (EllipticityPosterior.from_samples(narrow.numpy()).coverage(
        (z_true @ readout).numpy())[0.68] < 0.5).all()


def test_map_report_with_shear_on_the_tiny_run(trained_run: Path, tiny_dataset: Path,
                                              tiny_config: Path, tmp_path: Path) -> None:
    """The comparison report end to end: blends, MAP's shear bias through metacal, PNG."""
    from deblend.core.config import load_config
    from evaluation.map_report import REPORT_FILE, run_map_comparison

    config = load_config(tiny_config)
    config = config.replace("map", steps=3, posterior_samples=4, batch_size=4).replace(
        "metacal", bootstrap=4, margin_pixels=4)
    metrics = run_map_comparison(trained_run, config, tmp_path, data=open_dataset(tiny_dataset),
                                 n_blends=4, n_fields=0, shear_scenes=4, log=lambda _: None)
    assert set(metrics["blends"]) == {"encoder", "map_normal", "map_flow"}
    for name in ("map_normal", "map_flow"):
        bias = metrics["shear"][name]["regressor"]
        assert bias["n_scenes"] == 4 and np.isfinite([bias["m1"], bias["m1_err"]]).all()
    report = (tmp_path / REPORT_FILE).read_text()
    assert "Shear bias against the applied shear" in report and "map_flow" in report
    assert (tmp_path / "flux_by_magnitude.png").read_bytes()[:4] == b"\x89PNG"


def test_posterior_samples_carry_the_regressor_scatter_and_its_calibration() -> None:
    from deblend.core.map_deblend import calibrated_samples
    from deblend.core.response import Response

    matrix, offset = np.array([[0.5, 0.0], [0.0, 0.8]]), np.array([0.02, -0.01])
    response = Response(matrix, offset, np.zeros((2, 2)), 1000, np.array([0.04, 0.08]))
    raw = np.broadcast_to(np.array([0.12, -0.09]), (4000, 3, 2))  # a latent posterior of width 0
    generator = torch.Generator().manual_seed(0)
    samples = calibrated_samples(raw, response, generator)
    assert samples.shape == raw.shape
    # centred on the calibrated value, as wide as the scatter in calibrated units
    np.testing.assert_allclose(samples.mean(axis=0), [[0.2, -0.1]] * 3, atol=0.006)
    np.testing.assert_allclose(samples.std(axis=0), [[0.08, 0.1]] * 3, rtol=0.05)
    # without a measured scatter: the calibrated draws themselves
    bare = calibrated_samples(raw, Response(matrix, offset, np.zeros((2, 2)), 1000), generator)
    np.testing.assert_allclose(bare, np.broadcast_to([0.2, -0.1], raw.shape), atol=1e-6)
