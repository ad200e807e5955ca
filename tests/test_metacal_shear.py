"""Metacalibrated shear against the applied shear: the bias fit, the selection response, the
estimators on a trained deblender, and the benchmark's outputs and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from deblend.core.metacal import METACAL_SHEARS
from evaluation.metacal_shear import Measured, selected_shear, shear_bias

DELTA = 0.01


def toy_population(n: int, g: np.ndarray, m: float, c: np.ndarray, seed: int = 0
                   ) -> tuple[Measured, Measured]:
    """Twin pairs with per-object responses R_i (measured with noise), intrinsic shapes
    cancelling in pairs, and an estimator e = (1 + m) R g + c + e_int at +g and at -g (same
    objects, same noise)."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.3, 1.2, n)[:, None, None] * np.eye(2)
    e_int = rng.normal(0.0, 0.3, (n // 2, 2))
    e_int = np.repeat(e_int, 2, axis=0) * np.tile([1.0, -1.0], n // 2)[:, None]
    noise = rng.normal(0.0, 0.005, (n, 2))
    kept = {name: np.ones(n, bool) for name in METACAL_SHEARS}

    def measured(sign: float) -> Measured:
        e = (1 + m) * np.einsum("nij,j->ni", r, sign * g) + c + e_int + noise
        return Measured(e, r + rng.normal(0.0, 0.1, r.shape), kept)  # R measured with noise

    return measured(1.0), measured(-1.0)


def test_shear_bias_recovers_a_known_multiplicative_and_additive_bias():
    g = np.array([0.02, 0.02])
    plus, minus = toy_population(2000, g, m=0.01, c=np.array([0.0, 0.0]))
    bias = shear_bias(plus, minus, g, delta=DELTA, n_bootstrap=100)
    assert (np.abs(bias.m - 0.01) < 3 * bias.m_err).all()
    assert (bias.m_err > 0).all() and (bias.m_err < 0.01).all()
    assert bias.n_scenes == 2000 and bias.kept_fraction == 1.0
    unbiased = shear_bias(*toy_population(2000, g, m=0.0, c=np.array([0.003, -0.002])), g,
                          delta=DELTA, n_bootstrap=100)
    assert (np.abs(unbiased.m) < 3 * unbiased.m_err).all()
    # a 2% bias is far outside the errors: the fit can fail
    assert (np.abs(shear_bias(*toy_population(2000, g, m=0.02, c=np.zeros(2)), g, delta=DELTA,
                              n_bootstrap=100).m) > 0.01).all()
    mean_r = 0.75
    assert unbiased.c[0] == pytest.approx(0.003 / mean_r, rel=0.15)
    assert unbiased.c[1] == pytest.approx(-0.002 / mean_r, rel=0.15)


def test_shear_bias_refuses_what_it_cannot_measure():
    g = np.array([0.02, 0.02])
    plus, minus = toy_population(20, g, 0.0, np.zeros(2))
    with pytest.raises(ValueError, match="both components"):
        shear_bias(plus, minus, [0.02, 0.0], delta=DELTA)
    with pytest.raises(ValueError, match="even number"):
        shear_bias(plus, Measured(minus.e[:10], minus.response[:10],
                                  {k: v[:10] for k, v in minus.kept.items()}), g, delta=DELTA)
    with pytest.raises(ValueError, match="fewer than two"):
        shear_bias(plus, minus, g, delta=DELTA, subset=np.arange(20) < 2)


def test_the_selection_response_removes_the_bias_of_a_cut():
    """A cut |e1| < 0.2 made on each metacal image's own measurement: without its response the
    shear is biased by tens of percent; with R_sel it is right."""
    rng = np.random.default_rng(3)
    n, g = 200_000, np.array([0.02, 0.0])
    e_int = rng.normal(0.0, 0.25, (n // 2, 2))
    e = np.concatenate([e_int, -e_int]) + g  # response 1; the pairs cancel the shape noise
    sheared = {name: e + DELTA * np.array(s) for name, s in METACAL_SHEARS.items()}
    kept = {name: np.abs(v[:, 0]) < 0.2 for name, v in sheared.items()}
    response = np.broadcast_to(np.eye(2), (n, 2, 2)).copy()
    weights = np.ones(n)
    with_selection = selected_shear(e, response, kept, weights, DELTA)
    ignoring = selected_shear(e, response, {k: kept["noshear"] for k in kept}, weights, DELTA)
    assert with_selection[0] == pytest.approx(0.02, rel=0.03)
    assert abs(ignoring[0] / 0.02 - 1) > 0.2


@pytest.fixture(scope="module")
def model(trained_run):
    from deblend import Deblender

    return Deblender.from_run(trained_run, device="cpu")


@pytest.fixture(scope="module")
def pairs(trained_run):
    from deblend.core.config import Config
    from simulation.shear_pairs import draw_shear_pairs

    return draw_shear_pairs("galsim", 4, 7, (0.02, 0.02), neighbours=True,
                            sim=Config().simulation)


def test_every_estimator_gives_e_and_its_response(model, pairs):
    from evaluation.metacal_shear import METACAL_ESTIMATORS, measure_metacal

    measured = measure_metacal(model, pairs.plus, pairs.psfs,
                               correction_noise=pairs.correction_noise,
                               sky_variance=pairs.sky_variance, views=2)
    assert set(measured) == set(METACAL_ESTIMATORS)
    for name, m in measured.items():
        assert m.e.shape == (4, 2) and m.response.shape == (4, 2, 2), name
        assert set(m.kept) == set(METACAL_SHEARS)
        ok = m.kept["noshear"]
        assert np.isfinite(m.response[ok]).all(), name
        if name in ("blend_gauss", "blend_hsm", "anacal"):  # the tiny run's networks learnt
            # nothing yet; image estimators have a positive response on the diagonal
            assert (np.nanmean(m.response[:, [0, 1], [0, 1]], axis=0) > 0.1).all(), name
    with pytest.raises(ValueError, match="unknown estimators"):
        measure_metacal(model, pairs.plus, pairs.psfs, correction_noise=None,
                        sky_variance=pairs.sky_variance, estimators=["nope"])


def test_the_metacal_step_delta_is_the_one_asked_for(model, pairs):
    """``delta`` reaches the metacal images: AnaCal's analytic e does not depend on it, but the
    blend estimators' finite-difference responses move with a step twice as large (they ignored
    ``metacal.delta`` and used 0.01 whatever the config said)."""
    from evaluation.metacal_shear import measure_metacal

    kwargs = dict(correction_noise=None, sky_variance=pairs.sky_variance, views=1,
                  estimators=["blend_gauss", "anacal"])
    small = measure_metacal(model, pairs.plus, pairs.psfs, **kwargs)
    large = measure_metacal(model, pairs.plus, pairs.psfs, delta=0.02, **kwargs)
    assert np.array_equal(small["anacal"].e, large["anacal"].e)
    assert not np.allclose(small["blend_gauss"].response, large["blend_gauss"].response,
                           rtol=1e-6, atol=0)
    assert np.allclose(small["blend_gauss"].response, large["blend_gauss"].response, rtol=0.2,
                       atol=0.02)  # still the same response to a few percent


def test_anacal_corrects_its_noise_bias_with_metacals_correction_noise(model, pairs):
    """With metacal's correction noise, AnaCal gets each label band's central field of it (its
    own noise correction); without, it corrects nothing, as before."""
    from deblend.core.stamps import central
    from evaluation.anacal_peer import anacal_shapes
    from evaluation.metacal_shear import LABEL_BANDS, measure_metacal

    def anacal(noise):
        return measure_metacal(model, pairs.plus, pairs.psfs, correction_noise=noise,
                               sky_variance=pairs.sky_variance, views=1,
                               estimators=["anacal"])["anacal"]

    corrected, plain = anacal(pairs.correction_noise), anacal(None)
    size, bands = model.stamp_pixels, list(model.bands)
    expected = sum(anacal_shapes(
        central(pairs.plus[:, b], size).astype(np.float64), central(pairs.psfs[b], size),
        float(pairs.sky_variance[b]), model.data.pixel_scale,
        noise=central(pairs.correction_noise[:, b], size)).e
        for b in map(bands.index, LABEL_BANDS))
    np.testing.assert_allclose(corrected.e, expected, rtol=1e-6, atol=1e-9)
    assert np.abs(corrected.e - plain.e).max() > 1e-3


def test_an_snr_cut_is_made_on_every_metacal_image_for_every_estimator(model, pairs):
    from evaluation.metacal_shear import LABEL_BANDS, measure_metacal, weighted_snr

    plain = measure_metacal(model, pairs.plus, pairs.psfs, correction_noise=None,
                            sky_variance=pairs.sky_variance, views=1,
                            estimators=["blend_gauss", "anacal"])
    assert all(m.kept["noshear"].all() for m in plain.values())
    mc = model.metacal(pairs.plus, pairs.psfs, views=1, keep_inputs=True)
    bands = list(model.bands)
    variance = sum(pairs.sky_variance[bands.index(b)] for b in LABEL_BANDS)
    snr = {name: weighted_snr(image[:, [bands.index(b) for b in LABEL_BANDS]].sum(axis=1),
                              variance) for name, image in mc.inputs.items()}
    threshold = float(np.median(snr["noshear"]))
    cut = measure_metacal(model, pairs.plus, pairs.psfs, correction_noise=None,
                          sky_variance=pairs.sky_variance, views=1,
                          estimators=["blend_gauss", "anacal"], min_snr=threshold)
    for m in cut.values():
        for name in METACAL_SHEARS:
            np.testing.assert_array_equal(m.kept[name], snr[name] >= threshold)
    assert 0 < cut["anacal"].kept["noshear"].sum() < 4


def test_deblender_metacal_checks_its_inputs(model, pairs, trained_run):
    with pytest.raises(ValueError, match="one PSF per band"):
        model.metacal(pairs.plus, pairs.psfs[:3])
    with pytest.raises(ValueError, match="views"):
        model.metacal(pairs.plus, pairs.psfs, views=3)
    with pytest.raises(ValueError, match="noise must have"):
        model.metacal(pairs.plus, pairs.psfs, noise=pairs.correction_noise[:2])
    out = model.metacal(pairs.plus[:2], pairs.psfs, views=1, keep_inputs=True)
    assert out.ellipticity.shape == (2, 2) and out.response.shape == (2, 2, 2)
    assert set(out.inputs) == set(METACAL_SHEARS)
    # the noshear image is the stamp reconvolved with a wider PSF: same flux, lower peak
    stamp, noshear = pairs.plus[:2].astype(float), out.inputs["noshear"].astype(float)
    np.testing.assert_allclose(noshear.sum(axis=(2, 3)), stamp.sum(axis=(2, 3)),
                               rtol=0.02, atol=50 * 45)
    # without decoding: the same e and R, no reconstruction
    bare = model.metacal(pairs.plus[:2], pairs.psfs, views=1, reconstruct=False)
    assert bare.images["noshear"].reconstruction is None
    np.testing.assert_array_equal(bare.response, out.response)
    # the same PSFs reuse the operator, in any Deblender of the process
    from deblend import Deblender

    operator = model.metacal_operator(pairs.psfs)
    assert model.metacal_operator(pairs.psfs) is operator
    assert Deblender.from_run(trained_run, device="cpu").metacal_operator(pairs.psfs) is operator
    # cutouts with a margin give model-sized metacal images; odd margins are refused
    padded = np.pad(pairs.plus[:2], ((0, 0), (0, 0), (4, 4), (4, 4)))
    assert model.metacal(padded, pairs.psfs, views=1).images["1p"].reconstruction.shape == \
        pairs.plus[:2].shape
    with pytest.raises(ValueError, match="or larger by an even number"):
        model.metacal(padded[:, :, 1:, 1:], pairs.psfs, views=1)


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "bench.yaml"
    path.write_text(yaml.safe_dump({"metacal": {
        "populations": ["galsim"], "neighbours": [True], "n_scenes": 4, "chunk_scenes": 2,
        "bootstrap": 10, "views": 1, "galsim_psf_scales": [1.0]}}))
    return path


def test_the_benchmark_writes_its_outputs_and_resumes_from_its_cache(trained_run, bench_config,
                                                                     tmp_path):
    from benchmarks.shear import main

    out = tmp_path / "mc"
    assert main(["--run", str(trained_run), "--config", str(bench_config), "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metacal_shear"]
    result = metrics["variants"]["galsim_blended"]
    assert result["n_scenes"] == 4
    assert set(result["estimators"]) >= {"regressor", "blend_hsm", "anacal"}
    assert metrics["applied_g"] == [0.02, 0.02]
    for r in result["estimators"].values():
        assert {"m1", "m1_err", "c2", "c2_err", "n_scenes", "bins"} <= set(r)
    report = (out / "report.md").read_text()
    assert "against the applied shear" in report and "AnaCal" in report
    assert "noise correction on (metacal's, and AnaCal's own with the same noise)" in report
    assert (out / "fig_metacal_shear.png").stat().st_size > 1000
    chunks = sorted((out / "cache").glob("*.npz"))
    assert len(chunks) == 2
    # an existing result is kept unless forced
    assert main(["--run", str(trained_run), "--config", str(bench_config), "--out", str(out),
                 "--no-progress"]) == 2
    # an interruption after the first chunk: the rerun measures only the missing one
    (out / "metrics.json").unlink()
    chunks[1].unlink()
    first = chunks[0].stat().st_mtime_ns
    assert main(["--run", str(trained_run), "--config", str(bench_config), "--out", str(out),
                 "--no-progress"]) == 0
    assert chunks[0].stat().st_mtime_ns == first and chunks[1].is_file()
    again = json.loads((out / "metrics.json").read_text())["metacal_shear"]
    assert again["variants"] == metrics["variants"]  # the same scenes and noise: the same numbers
    # a larger run reuses the smaller one's chunks and measures only the new ones
    stamps = [c.stat().st_mtime_ns for c in chunks]
    assert main(["--run", str(trained_run), "--config", str(bench_config), "--out", str(out),
                 "--n-scenes", "6", "--force", "--no-progress"]) == 0
    assert [c.stat().st_mtime_ns for c in chunks] == stamps
    assert len(list((out / "cache").glob("*.npz"))) == 3
    larger = json.loads((out / "metrics.json").read_text())["metacal_shear"]
    assert larger["variants"]["galsim_blended"]["n_scenes"] == 6


def test_the_benchmark_refuses_a_foreign_directory_and_unknown_estimators(trained_run, tmp_path,
                                                                           bench_config):
    from benchmarks.shear import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["--run", str(trained_run), "--config", str(bench_config), "--out",
                 str(foreign), "--no-progress"]) == 2
    assert (foreign / "notes.txt").read_text() == "mine"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"metacal": {"estimators": ["regressor", "ksb"]}}))
    assert main(["--run", str(trained_run), "--config", str(bad), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
