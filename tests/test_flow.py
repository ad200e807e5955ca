"""The latent flow prior (deblend.core.flow) and its training stage (training.stages.FlowStage)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from deblend.core.flow import LatentFlow, standard_normal_log_prob
from deblend.core.runs import RunLayout, build_module, load_checkpoint, module_entry
from deblend.train import main
from tests.conftest import TINY_CONFIG, TINY_EPOCHS
from training.history import read_history
from training.runner import run_stage


def banana(n: int, generator: torch.Generator) -> torch.Tensor:
    """A curved 2-D density far from N(0, I)."""
    x = torch.randn(n, 2, generator=generator)
    return torch.stack([1.5 * x[:, 0], 0.3 * x[:, 1] + 0.5 * x[:, 0] ** 2 - 1.0], dim=1)


def fit(flow: LatentFlow, steps: int = 300) -> LatentFlow:
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = -flow.log_prob(banana(256, generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval()


@pytest.mark.parametrize("transform, tolerance", [("affine_coupling", 0.01),
                                                  ("spline_coupling", 0.03)])
def test_flow_density_integrates_to_one_on_a_2d_toy(transform: str, tolerance: float) -> None:
    torch.manual_seed(0)
    flow = fit(LatentFlow(2, layers=4, hidden=(32, 32), transform=transform))
    grid = torch.linspace(-9.0, 9.0, 601)
    x, y = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        density = flow.log_prob(torch.stack([x.ravel(), y.ravel()], dim=1)).exp()
    assert abs(float(density.sum()) * float(grid[1] - grid[0]) ** 2 - 1.0) < tolerance
    # and it learned the banana: better held-out likelihood than a standard normal
    held_out = banana(4000, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert flow.log_prob(held_out).mean() > standard_normal_log_prob(held_out).mean() + 0.5


def test_flow_checkpoint_round_trip_and_bad_input() -> None:
    torch.manual_seed(0)
    flow = LatentFlow(6, layers=2, hidden=(16,)).eval()
    z = torch.randn(5, 6)
    rebuilt = build_module(module_entry(flow))
    assert torch.allclose(rebuilt.log_prob(z), flow.log_prob(z))
    assert flow.sample(3).shape == (3, 6)
    with pytest.raises(ValueError, match="latents of size 6"):
        flow.log_prob(torch.randn(5, 4))
    with pytest.raises(ValueError, match="unknown flow transform"):
        LatentFlow(6, transform="affine_autoregressive")
    assert math.isclose(float(standard_normal_log_prob(torch.zeros(1, 2))),
                        -math.log(2 * math.pi), rel_tol=1e-6)


@pytest.fixture(scope="module")
def flow_run(trained_run: Path) -> Path:
    """The tiny run, whose flow stage the session fixture trained (read-only)."""
    return trained_run


def test_flow_beats_the_normal_prior_on_held_out_latents(flow_run: Path) -> None:
    rows = read_history(RunLayout(flow_run).history("flow"))
    assert len(rows) == TINY_EPOCHS
    best = min(rows, key=lambda row: row["val_total"])
    # nats per latent dimension on the validation split, which the flow never trained on
    assert best["val_total"] < best["val_normal"] - 0.1
    payload = load_checkpoint(RunLayout(flow_run).best("flow"))
    assert payload["modules"]["flow"]["class"] == "LatentFlow"
    assert payload["parent"]["stage"] == "stage1"


def test_flow_stage_resumes_and_refuses_stale_or_existing_results(flow_run: Path,
                                                                  tmp_path: Path,
                                                                  capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(flow_run, run)
    # existing results are not overwritten without --resume / --force
    assert main(["flow", "--run", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    # more epochs: resumes from the last one
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "training": {
        **TINY_CONFIG["training"], "flow_epochs": TINY_EPOCHS + 1}}))
    from deblend.core.config import load_config

    result = run_stage("flow", run, config=load_config(config), resume=True, progress=False,
                       log=lambda _: None)
    assert result.epochs_trained == 1
    # a changed flow architecture cannot be resumed
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {"flow_layers": 2}}))
    assert main(["flow", "--run", str(run), "--config", str(config), "--resume",
                 "--no-progress"]) == 2
    assert "model.flow_layers" in capsys.readouterr().err
    # stage1 re-trained: the flow (its child) is stale and the Deblender does not use it
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**TINY_CONFIG, "training": {**TINY_CONFIG["training"],
                                                               "epochs": 1}}))
    assert main(["stage1", "--run", str(run), "--config", str(one), "--force",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["flow", "--run", str(run), "--resume", "--no-progress"]) == 2
    assert "re-trained" in capsys.readouterr().err


def test_deblender_loads_the_flow_of_its_own_stage1(flow_run: Path, tmp_path: Path) -> None:
    from deblend import Deblender

    assert Deblender.from_run(flow_run, device="cpu").flow is not None
    run = tmp_path / "run"
    shutil.copytree(flow_run, run)
    shutil.rmtree(run / "flow")
    without = Deblender.from_run(run, device="cpu")
    assert without.flow is None
    with pytest.raises(ValueError, match="deblend.train flow"):
        without.require_flow()


def test_the_flow_gradient_is_clipped_to_its_norm_only_when_asked(flow_run: Path,
                                                                   tmp_path: Path) -> None:
    """``training.flow_max_grad_norm``: a bound the gradients never reach leaves the flow as
    trained unclipped (bit for bit), even under a tiny ``max_grad_norm`` (the flow's own bound
    overrides it); a tiny one changes what it learns."""
    from deblend.core.config import load_config

    def retrained(max_norm: float, **training: float) -> dict[str, torch.Tensor]:
        run = tmp_path / f"run-{max_norm:g}-{len(training)}"
        shutil.copytree(flow_run, run)
        config = tmp_path / f"clip-{max_norm:g}-{len(training)}.yaml"
        config.write_text(yaml.safe_dump({**TINY_CONFIG, "training": {
            **TINY_CONFIG["training"], "flow_max_grad_norm": max_norm, **training}}))
        run_stage("flow", run, config=load_config(config), force=True, progress=False,
                  log=lambda _: None)
        return load_checkpoint(RunLayout(run).last("flow"))["modules"]["flow"]["state_dict"]

    unclipped = load_checkpoint(RunLayout(flow_run).last("flow"))["modules"]["flow"]["state_dict"]
    loose, tight = retrained(1e12, max_grad_norm=1e-9), retrained(1e-9)
    assert all(torch.equal(loose[k], unclipped[k]) for k in unclipped)
    assert not all(torch.equal(tight[k], unclipped[k]) for k in unclipped)


def test_a_diverging_flow_stops_with_advice_not_a_support_error(flow_run: Path,
                                                                 tmp_path: Path) -> None:
    """A flow driven to NaN (learning rate 1e6) stops the stage with the training loop's
    non-finite-loss error naming the flow's gradient bound, not with a distribution's support
    error from its NaN latents."""
    from deblend.core.config import load_config
    from deblend.core.runs import RunError

    run = tmp_path / "run"
    shutil.copytree(flow_run, run)
    config = tmp_path / "diverging.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "training": {
        **TINY_CONFIG["training"], "learning_rate": 1e6}}))
    with pytest.raises(RunError, match="loss became nan.*training.flow_max_grad_norm"):
        run_stage("flow", run, config=load_config(config), force=True, progress=False,
                  log=lambda _: None)
