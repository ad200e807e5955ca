"""Benchmark: the real training loop against the bare optimisation step, and ``predict``.

``python -m benchmarks.training [--data D] [--batch-size B] [--workers W] [--repeats K]
[--cache-gib G] [--json FILE]`` measures, on the CPU with torch's default threads:

* training samples/s of stage1's real epoch loop (:meth:`training.loop.StageLoop.train_epoch`:
  DataLoader, disk reads, normalisation, forward, backward, Adam) against the bare
  forward + backward + Adam step on one in-memory batch of the same size; the ratio is the
  share of the time the loop spends on the step itself (target >= 0.9);
* galaxies/s of :meth:`deblend.Deblender.predict` (raw stamps in: normalisation, encoder,
  decoder, regressor averaged over the stamp's 8 symmetric views, denormalisation) against the
  bare encoder forward on in-memory tensors, and against the bare forward of the networks
  predict runs by default (encoder, decoder and regressor on each of the 8 views; the
  decoder costs ~3 encoders), so the second ratio is the one that shows the API's own overhead
  (normalisation, mapping views back, averaging, denormalisation; target >= 0.8).

Loop and bare step are timed alternately ``--repeats`` times and the medians reported, so that
load from other processes affects both alike. Without ``--data`` a dataset of ``--n`` samples
is generated in a temporary directory first (embedded catalog model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import emit
from deblend.core.arguments import (
    non_negative_float_arg,
    non_negative_int_arg,
    positive_int_arg,
)
from deblend.core.config import Config, config_from_dict
from deblend.core.device import keep_freed_memory
from deblend.core.normalization import normalize
from deblend.core.symmetry import N_VIEWS, image_view


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(data_dir: Path, batch_size: int = 64, workers: int = 0,
            repeats: int = 3, cache_gib: float | None = None) -> dict[str, Any]:
    """The benchmark's figures on an existing dataset (see the module docstring), in a process
    set up as ``python -m deblend.train`` sets up its own (freed memory kept for reuse)."""
    from deblend.core.inference import Deblender
    from deblend.core.runs import DataIdentity, RunLayout
    from simulation.dataset import open_dataset
    from training.distributed import DistContext
    from training.loop import StageLoop
    from training.runner import build_stage
    from training.stages import VAEStage

    keep_freed_memory()
    dataset = open_dataset(data_dir)
    identity = DataIdentity.of(dataset)
    training = {"batch_size": batch_size, "num_workers": workers, "device": "cpu", "epochs": 1}
    if cache_gib is not None:
        training["normalized_cache_gib"] = cache_gib
    config: Config = config_from_dict({"training": training})
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        layout = RunLayout(Path(run_dir))
        loop = StageLoop(build_stage(VAEStage, config, layout, identity), config, dataset, layout,
                         DistContext(), device, progress=False)
        bare = build_stage(VAEStage, config, layout, identity)
        optimizer = torch.optim.Adam(bare.model.parameters(), lr=config.training.learning_rate)
        x, y = next(iter(loop.train_loader))
        x, y = x[:batch_size].clone(), y[:batch_size].clone()
        n_batches = len(loop.train_sampler)
        samples = loop.train_sampler.num_samples()

        def bare_steps() -> None:
            bare.model.train()
            for _ in range(n_batches):
                terms = bare.losses(bare.model, x, y)
                optimizer.zero_grad(set_to_none=True)
                terms[0].backward()
                optimizer.step()

        loop.train_epoch(0)  # warm-up: worker start, first-call kernel set-up
        bare_steps()
        loop_rates, bare_rates = [], []
        for epoch in range(1, repeats + 1):
            loop.train_sampler.set_epoch(epoch)
            loop_rates.append(samples / _timed(lambda: loop.train_epoch(epoch)))
            bare_rates.append(n_batches * len(x) / _timed(bare_steps))

        deblender = Deblender(loop.task.model.encoder, loop.task.model.decoder,
                              _regressor(config), identity, device)
        raw = dataset.images("blend", dataset.split_indices("all")[:1024])
        tensors = [torch.from_numpy(normalize(raw[i:i + 256], identity.normalization))
                   for i in range(0, len(raw), 256)]

        def encoder_only() -> None:
            with torch.inference_mode():
                for batch in tensors:
                    deblender.encoder(batch)

        def networks_only() -> None:
            with torch.inference_mode():
                for batch in tensors:
                    for view in range(N_VIEWS):
                        seen = image_view(batch, view)
                        mu = deblender.encoder(seen)[0]
                        deblender.decoder(mu)
                        deblender.regressor(mu, deblender.regressor.stamp_features(seen))

        deblender.predict(raw[:256])
        encoder_only()
        networks_only()
        predict_rates, encoder_rates, network_rates = [], [], []
        for _ in range(repeats):
            predict_rates.append(len(raw) / _timed(lambda: deblender.predict(raw, batch_size=256)))
            encoder_rates.append(len(raw) / _timed(encoder_only))
            network_rates.append(len(raw) / _timed(networks_only))

    loop_rate, bare_rate = statistics.median(loop_rates), statistics.median(bare_rates)
    predict_rate, encoder_rate = statistics.median(predict_rates), statistics.median(encoder_rates)
    network_rate = statistics.median(network_rates)
    return {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "batch_size": batch_size,
        "num_workers": workers, "train_samples_per_epoch": samples, "repeats": repeats,
        "normalized_cache_gib": config.training.normalized_cache_gib,
        "loop_samples_per_s": loop_rate, "bare_step_samples_per_s": bare_rate,
        "loop_over_bare": loop_rate / bare_rate,
        "predict_galaxies_per_s": predict_rate, "encoder_galaxies_per_s": encoder_rate,
        "predict_over_encoder": predict_rate / encoder_rate,
        "networks_galaxies_per_s": network_rate,
        "predict_over_networks": predict_rate / network_rate,
        "predict_batch_size": 256,
    }


def _regressor(config: Config) -> torch.nn.Module:
    from deblend.core.networks import Regressor

    model = config.model
    return Regressor(model.latent_dim, model.regressor_hidden, model.regressor_dropout,
                     model.regressor_moments)


def run(data: str | Path | None = None, n: int = 1280, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure` on ``data``, or on a fresh ``n``-sample dataset in a temporary directory."""
    if data is not None:
        return measure(Path(data), **kwargs)
    from simulation.builder import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        sim = config_from_dict({"simulation": {"n_samples": n, "shard_size": 640,
                                               "catalog_rows": 20_000}}).simulation
        build_dataset(sim, Path(tmp) / "data", jobs=2, progress=False, log=lambda _: None)
        return measure(Path(tmp) / "data", **kwargs)


def format_table(result: dict[str, Any]) -> str:
    """The figures as a small text table."""
    rows = [
        ("stage1 loop (data loading included)", result["loop_samples_per_s"], "samples/s"),
        ("bare fwd+bwd+Adam, in-memory batch", result["bare_step_samples_per_s"], "samples/s"),
        ("  loop / bare", result["loop_over_bare"], ""),
        ("Deblender.predict (raw stamps)", result["predict_galaxies_per_s"], "galaxies/s"),
        ("bare encoder forward, in-memory", result["encoder_galaxies_per_s"], "galaxies/s"),
        ("  predict / encoder", result["predict_over_encoder"], ""),
        ("bare networks forward (8 views, 8 decodes)", result["networks_galaxies_per_s"],
         "galaxies/s"),
        ("  predict / networks", result["predict_over_networks"], ""),
    ]
    head = (f"CPU, {result['torch_threads']} torch threads, batch {result['batch_size']}, "
            f"{result['num_workers']} DataLoader workers, normalised images kept up to "
            f"{result['normalized_cache_gib']:g} GiB, median of {result['repeats']}")
    lines = [head]
    for name, value, unit in rows:
        lines.append(f"{name:<40} {value:>10.1f} {unit}" if unit else f"{name:<40} {value:>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset directory (default: generate one)")
    parser.add_argument("--n", type=positive_int_arg, default=1280,
                        help="samples to generate without --data")
    parser.add_argument("--batch-size", type=positive_int_arg, default=64)
    parser.add_argument("--workers", type=non_negative_int_arg, default=0,
                        help="DataLoader worker processes")
    parser.add_argument("--repeats", type=positive_int_arg, default=3)
    parser.add_argument("--cache-gib", type=non_negative_float_arg,
                        help="training.normalized_cache_gib (default: the config's default; "
                             "0: normalise every epoch)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.data, args.n, batch_size=args.batch_size, workers=args.workers,
                 repeats=args.repeats, cache_gib=args.cache_gib)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
