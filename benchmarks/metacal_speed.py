"""Benchmark: metacalibrated shapes against bare ``predict`` and against AnaCal, in one run.

``python -m benchmarks.metacal_speed [--n N] [--device D] [--repeats K] [--json FILE]`` draws
``N`` six-band LSST stamps (GalSim bulge+disk galaxies with noise, BTK's PSFs) and measures
galaxies per second, with torch's default threads, of
- ``Deblender.predict`` with the regressor on 1 view, without decoding (the bare network cost
  of e for one image);
- the metacal operator alone (five images, with the noise correction: ten matrix products);
- ``Deblender.metacal``: the operator plus the regressor on the five images (1 view, no
  decoding), i.e. e and R per galaxy, the estimator of the shear benchmark at ``metacal.views = 1``;
- the same at 8 views (what the shear benchmark runs by default);
- AnaCal (``evaluation.anacal_peer``) on the three label bands, each with its own PSF, as the
  shear benchmark runs it, in one process and in two processes (the 2-core rate).
The networks have their initial weights (speed does not depend on them). Each measurement is
repeated ``--repeats`` times, interleaved, and the median reported; the ratios are measured in the
same run. The operator is built once beforehand (its build time is reported apart).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from typing import Any

import numpy as np
import torch

from benchmarks import emit
from deblend.core.arguments import positive_int_arg


def stamps_and_psfs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` noisy six-band stamps (electrons), the PSF images and the sky variances."""
    import galsim

    from simulation.surveys import get_survey, psf_images

    survey = get_survey("LSST")
    bands = tuple(survey.available_filters)
    rng = np.random.default_rng(seed)
    base = np.empty((min(n, 64), len(bands), 45, 45))
    for i in range(base.shape[0]):
        galaxy = galsim.Add(galsim.DeVaucouleurs(half_light_radius=0.3, flux=0.3),
                            galsim.Exponential(half_light_radius=0.8, flux=0.7)).shear(
            e1=rng.uniform(-0.4, 0.4), e2=rng.uniform(-0.4, 0.4)) * 4e4
        for b, band in enumerate(bands):
            base[i, b] = galsim.Convolve(galaxy, survey.get_filter(band).psf).drawImage(
                nx=45, ny=45, scale=0.2).array
    stamps = np.resize(base, (n, *base.shape[1:]))
    sky = np.full(len(bands), 1600.0)
    stamps = stamps + rng.normal(0.0, 40.0, stamps.shape)
    return stamps.astype(np.float32), psf_images("LSST", bands, 45), sky


def untrained_deblender(stamps: np.ndarray, device: str):
    """A Deblender with the default networks' initial weights, normalised on ``stamps``."""
    from deblend.core.config import Config
    from deblend.core.inference import Deblender
    from deblend.core.networks import Decoder, Encoder, Regressor
    from deblend.core.normalization import NormalizationConstants
    from deblend.core.runs import DataIdentity

    model = Config().model
    bands = ("u", "g", "r", "i", "z", "y")
    norm = NormalizationConstants(bands, tuple(float(v) for v in stamps.max(axis=(2, 3)).mean(0)))
    identity = DataIdentity("<benchmark>", "<benchmark>", "LSST", bands, 45, 0.2, norm)
    torch.manual_seed(0)
    encoder = Encoder(len(bands), 45, model.latent_dim)
    decoder = Decoder(len(bands), 45, model.latent_dim, model.decoder_output)
    regressor = Regressor(model.latent_dim, model.regressor_hidden, model.regressor_dropout)
    return Deblender(encoder, decoder, regressor, identity, device)


def _anacal_rate_part(args: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    from evaluation.metacal_shear import anacal_measurement

    stamps, psfs, sky = args
    started = time.perf_counter()
    anacal_measurement(stamps, psfs, sky, ("u", "g", "r", "i", "z", "y"), 0.2)
    return time.perf_counter() - started


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def run(n: int = 1024, device: str = "cpu", repeats: int = 3) -> dict[str, Any]:
    """The benchmark's figures (see the module docstring)."""
    from deblend.core.inference import release_metacal_operators
    from evaluation.metacal_shear import anacal_measurement

    stamps, psfs, sky = stamps_and_psfs(n)
    noise = np.random.default_rng(1).normal(0.0, 40.0, stamps.shape).astype(np.float32)
    model = untrained_deblender(stamps, device)
    release_metacal_operators()  # time a build, not an operator kept from earlier work
    build = _timed(lambda: model.metacal_operator(psfs))
    operator = model.metacal_operator(psfs)
    x, field = torch.from_numpy(stamps).to(model.device), torch.from_numpy(noise).to(model.device)

    def operator_only() -> None:
        for start in range(0, n, 256):
            images = operator.apply(x[start:start + 256], field[start:start + 256])
            images["noshear"].cpu()

    work = {
        "predict_1_view": lambda: model.predict(stamps, views=1, reconstruct=False),
        "metacal_operator": operator_only,
        "metacal_regressor_1_view": lambda: model.metacal(stamps, psfs, noise=noise, views=1,
                                                          reconstruct=False),
        "metacal_regressor_8_views": lambda: model.metacal(stamps, psfs, noise=noise, views=8,
                                                           reconstruct=False),
        "anacal_1_process": lambda: anacal_measurement(stamps, psfs, sky, model.bands, 0.2),
    }
    context = multiprocessing.get_context("fork")
    halves = [(stamps[: n // 2], psfs, sky), (stamps[n // 2:], psfs, sky)]
    rates: dict[str, list[float]] = {name: [] for name in [*work, "anacal_2_processes"]}
    with context.Pool(2) as pool:
        pool.map(_anacal_rate_part, [(stamps[:8], psfs, sky)] * 2)  # warm both workers
        for _ in range(repeats):
            for name, job in work.items():
                rates[name].append(n / _timed(job))
            rates["anacal_2_processes"].append(
                n / _timed(lambda: pool.map(_anacal_rate_part, halves)))
    result: dict[str, Any] = {name: statistics.median(r) for name, r in rates.items()}
    result.update({
        "device": str(model.device), "torch_threads": torch.get_num_threads(), "n": n,
        "repeats": repeats, "operator_build_seconds": build,
        "metacal_over_anacal_2_cores": result["metacal_regressor_1_view"]
        / result["anacal_2_processes"],
        "metacal_over_predict": result["metacal_regressor_1_view"] / result["predict_1_view"],
        "metacal_8_views_over_anacal_2_cores": result["metacal_regressor_8_views"]
        / result["anacal_2_processes"],
    })
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [("Deblender.predict, 1 view", "predict_1_view"),
            ("metacal operator (5 images + noise corr.)", "metacal_operator"),
            ("Deblender.metacal, 1 view (e and R)", "metacal_regressor_1_view"),
            ("Deblender.metacal, 8 views", "metacal_regressor_8_views"),
            ("AnaCal r+i+z, 1 process", "anacal_1_process"),
            ("AnaCal r+i+z, 2 processes", "anacal_2_processes")]
    lines = [f"{'measure (' + result['device'] + ')':46s} {'galaxies/s':>12s}", "-" * 60]
    lines += [f"{name:46s} {result[key]:12.1f}" for name, key in rows]
    lines += ["", f"{'metacal 1 view / AnaCal (2 cores)':46s} "
                  f"{result['metacal_over_anacal_2_cores']:12.2f}  target >= 1",
              f"{'metacal 8 views / AnaCal (2 cores)':46s} "
              f"{result['metacal_8_views_over_anacal_2_cores']:12.2f}",
              f"{'metacal 1 view / predict 1 view':46s} {result['metacal_over_predict']:12.2f}",
              f"(operator built once in {result['operator_build_seconds']:.1f} s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metacal_speed",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int_arg, default=1024, help="stamps per measurement")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--repeats", type=positive_int_arg, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.n, args.device, args.repeats)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
