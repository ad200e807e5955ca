"""Tests for deblend.core.networks and deblend.core.losses (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from deblend.core.losses import LossTerms, beta_vae_loss, kl_divergence, regression_loss
from deblend.core.networks import (
    DECODER_OUTPUTS,
    SIGMOID_FLOOR,
    VAE,
    Decoder,
    Encoder,
    FlooredSigmoid,
    Regressor,
    VAEOutput,
    encoder_spatial_sizes,
    flattened_size,
    reparameterize,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def test_spatial_arithmetic() -> None:
    assert encoder_spatial_sizes(45) == [45, 23, 12, 6, 3]
    assert flattened_size(45) == 256 * 3 * 3
    assert flattened_size(64) == 256 * 4 * 4


@pytest.mark.parametrize("n_bands", [6, 5])
@pytest.mark.parametrize("latent_dim", [16, 32])
def test_vae_output_shapes(n_bands: int, latent_dim: int) -> None:
    vae = VAE(n_bands, 45, latent_dim)
    x = torch.rand(3, n_bands, 45, 45)
    out = vae(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == (3, n_bands, 45, 45)
    assert out.mu.shape == (3, latent_dim)
    assert out.logvar.shape == (3, latent_dim)
    assert out.z.shape == (3, latent_dim)

    mu, logvar = Encoder(n_bands, 45, latent_dim)(x)
    assert mu.shape == logvar.shape == (3, latent_dim)
    assert Decoder(n_bands, 45, latent_dim)(torch.randn(3, latent_dim)).shape == (3, n_bands, 45, 45)
    reg = Regressor(latent_dim)
    assert reg(mu).shape == (3, 2)


@pytest.mark.parametrize("stamp_size", [32, 45, 64])
def test_other_stamp_sizes(stamp_size: int) -> None:
    vae = VAE(4, stamp_size, 8)
    out = vae(torch.rand(2, 4, stamp_size, stamp_size))
    assert out.x_hat.shape == (2, 4, stamp_size, stamp_size)


@pytest.mark.parametrize("output", DECODER_OUTPUTS)
def test_decoder_output_in_unit_interval(output: str) -> None:
    dec = Decoder(6, output=output)
    x_hat = dec(10.0 * torch.randn(8, 32))  # large latents push the sigmoid to its tails
    assert x_hat.min() >= 0.0
    assert x_hat.max() <= 1.0


def test_floored_sigmoid_reaches_the_sky_with_a_finite_slope() -> None:
    """SPEC's sigmoid has slope ~its own value near 0 (the pedestal's cause); the floored one
    is exactly 0 below a finite input, rises from there with slope ~SIGMOID_FLOOR, and
    approaches 1 only asymptotically."""
    y = torch.linspace(-30.0, 30.0, 60001, requires_grad=True)
    out = FlooredSigmoid()(y)
    out.sum().backward()
    first = int(torch.nonzero(out > 0)[0])
    assert -6.0 < y[first].item() < -4.0  # sigmoid(y) = a / (1 + a), y ~ -4.6
    assert torch.equal(out[:first].detach(), torch.zeros(first))
    assert y.grad[first].item() == pytest.approx(SIGMOID_FLOOR, rel=0.05)
    assert torch.all(torch.diff(out.detach()[first:]) >= 0)
    assert out.max().item() <= 1.0  # 1 only where float32 rounds sigmoid to 1, as for SPEC's
    floor_seen = torch.sigmoid(torch.tensor(-8.0))  # 3.4e-4: where SPEC's decoders settle
    assert y.grad[first].item() > 25 * (floor_seen * (1 - floor_seen)).item()


@pytest.mark.parametrize("output", DECODER_OUTPUTS)
def test_decoder_output_layer_and_checkpoint_parameters(output: str) -> None:
    dec = Decoder(6, output=output)
    expected = nn.Sigmoid if output == "sigmoid" else FlooredSigmoid
    assert isinstance(list(dec.deconv)[-1], expected)
    params = dec.hparams()
    # SPEC's sigmoid stores no 'output', so checkpoints from before the option still load.
    assert ("output" in params) == (output != "sigmoid")
    rebuilt = Decoder(**params)
    rebuilt.load_state_dict(dec.state_dict())
    z = torch.randn(3, 32)
    assert torch.equal(dec.eval()(z), rebuilt.eval()(z))
    assert VAE(6, decoder_output=output).decoder.output == output
    with pytest.raises(ValueError, match="decoder output"):
        Decoder(6, output="linear")


def test_regressor_output_in_range() -> None:
    reg = Regressor(32, dropout=0.1)
    pred = reg(100.0 * torch.randn(16, 32))
    assert pred.shape == (16, 2)
    assert pred.min() >= -1.0
    assert pred.max() <= 1.0


def test_eval_mode_is_deterministic_and_train_mode_samples() -> None:
    vae = VAE(6)
    x = torch.rand(2, 6, 45, 45)
    vae.eval()
    out = vae(x)
    assert torch.equal(out.z, out.mu)
    vae.train()
    out = vae(x)
    assert not torch.allclose(out.z, out.mu)
    out = vae(x, deterministic=True)
    assert torch.equal(out.z, out.mu)


def test_reparameterize_statistics() -> None:
    mu = torch.full((20000, 2), 1.5)
    logvar = torch.full((20000, 2), math.log(0.25))
    z = reparameterize(mu, logvar)
    assert torch.allclose(z.mean(0), torch.tensor([1.5, 1.5]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([0.5, 0.5]), atol=0.02)
    assert torch.equal(reparameterize(mu, logvar, deterministic=True), mu)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def test_wrong_channel_count_raises() -> None:
    enc = Encoder(6)
    with pytest.raises(ValueError, match=r"expected 6 channels.*got 5"):
        enc(torch.rand(2, 5, 45, 45))
    with pytest.raises(ValueError, match=r"expected 6 channels.*got 5"):
        VAE(6)(torch.rand(2, 5, 45, 45))


def test_wrong_spatial_size_raises() -> None:
    enc = Encoder(5, stamp_size=45)
    with pytest.raises(ValueError, match=r"expected spatial size 45x45.*got 44x44"):
        enc(torch.rand(2, 5, 44, 44))
    with pytest.raises(ValueError, match=r"expected spatial size 45x45.*got 45x46"):
        enc(torch.rand(2, 5, 45, 46))


def test_wrong_ndim_and_latent_size_raise() -> None:
    with pytest.raises(ValueError, match="4-D"):
        Encoder(6)(torch.rand(6, 45, 45))
    with pytest.raises(ValueError, match=r"\(N, 32\).*\(2, 16\)"):
        Decoder(6, latent_dim=32)(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        Regressor(32)(torch.randn(2, 16))


def test_bad_constructor_args_raise() -> None:
    with pytest.raises(ValueError):
        Encoder(0)
    with pytest.raises(ValueError):
        Regressor(32, dropout=1.0)


# ---------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------


def test_encoder_architecture() -> None:
    enc = Encoder(6)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert convs[0].in_channels == 6
    for c in convs:
        assert c.stride == (2, 2)
        assert c.kernel_size == (3, 3)
        assert c.padding == (1, 1)
    assert sum(isinstance(m, nn.PReLU) for m in enc.modules()) == 4
    assert not any(isinstance(m, (nn.ReLU, nn.LeakyReLU)) for m in enc.modules())
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert all(l.in_features == 256 * 3 * 3 and l.out_features == 32 for l in linears)


def test_decoder_architecture() -> None:
    dec = Decoder(5)
    tconvs = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(tconvs) == 4
    assert [t.in_channels for t in tconvs] == [256, 128, 64, 32]
    assert [t.out_channels for t in tconvs] == [128, 64, 32, 5]
    assert all(t.stride == (2, 2) and t.kernel_size == (3, 3) for t in tconvs)
    assert sum(isinstance(m, nn.PReLU) for m in dec.modules()) == 3
    assert sum(isinstance(m, nn.Sigmoid) for m in dec.modules()) == 1
    # Last layer of the conv stack is the Sigmoid, directly after the last ConvTranspose2d.
    seq = list(dec.deconv)
    assert isinstance(seq[-1], nn.Sigmoid) and isinstance(seq[-2], nn.ConvTranspose2d)
    fcs = [m for m in dec.modules() if isinstance(m, nn.Linear)]
    assert len(fcs) == 1 and fcs[0].in_features == 32 and fcs[0].out_features == 256 * 9


def test_regressor_architecture() -> None:
    reg = Regressor(16, dropout=0.25)
    linears = [m for m in reg.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 128), (128, 64), (64, 32), (32, 2)]
    drops = [m for m in reg.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.25 for d in drops)
    assert sum(isinstance(m, nn.PReLU) for m in reg.modules()) == 3
    assert isinstance(list(reg.modules())[-1], nn.Tanh)


def test_rebuild_from_hparams_and_network_shape() -> None:
    vae = VAE(5, 45, 16)
    reg = Regressor(16, hidden=(64, 32), dropout=0.2)
    vae2 = VAE(**vae.hparams())
    reg2 = Regressor(**reg.hparams())
    vae2.load_state_dict(vae.state_dict())
    reg2.load_state_dict(reg.state_dict())
    vae.eval(), vae2.eval(), reg.eval(), reg2.eval()
    x = torch.rand(2, 5, 45, 45)
    assert torch.equal(vae(x).x_hat, vae2(x).x_hat)
    assert torch.equal(reg(vae(x).mu), reg2(vae2(x).mu))


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def test_kl_zero_at_prior() -> None:
    mu = torch.zeros(4, 8)
    logvar = torch.zeros(4, 8)
    assert kl_divergence(mu, logvar).item() == 0.0


def test_kl_hand_computation() -> None:
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # sample 0: 0.5 * [(1 + 1 - 0 - 1) + (0 + 2 - ln2 - 1)] = 0.5 * (2 - ln2)
    # sample 1: 0.5 * [(0 + 1 - 0 - 1) + (4 + 1 - 0 - 1)] = 2
    s0 = 0.5 * (2.0 - math.log(2.0))
    s1 = 2.0
    assert kl_divergence(mu, logvar, reduction="none").tolist() == pytest.approx([s0, s1])
    assert kl_divergence(mu, logvar).item() == pytest.approx((s0 + s1) / 2)
    assert kl_divergence(mu, logvar, reduction="sum").item() == pytest.approx(s0 + s1)


def test_kl_matches_torch_distributions() -> None:
    mu = torch.randn(7, 16, dtype=torch.float64)
    logvar = torch.randn(7, 16, dtype=torch.float64)
    sigma = torch.exp(0.5 * logvar)
    ref = torch_kl(Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(dim=1)
    assert torch.allclose(kl_divergence(mu, logvar, reduction="none"), ref)
    assert torch.allclose(kl_divergence(mu, logvar), ref.mean())


def test_beta_vae_loss_terms() -> None:
    x = torch.rand(3, 6, 45, 45)
    x_hat = torch.rand(3, 6, 45, 45)
    mu = torch.randn(3, 32)
    logvar = torch.randn(3, 32)
    terms = beta_vae_loss(x, x_hat, mu, logvar, beta_kl=0.5)
    assert isinstance(terms, LossTerms)
    assert terms.total.dim() == terms.reconstruction.dim() == terms.kl.dim() == 0
    # per-galaxy sum of squared errors over bands and pixels, averaged over the batch
    per_galaxy = ((x - x_hat) ** 2).sum(dim=(1, 2, 3))
    assert torch.allclose(terms.reconstruction, per_galaxy.mean())
    assert torch.allclose(terms.reconstruction, F.mse_loss(x_hat, x) * 6 * 45 * 45, rtol=1e-4)
    assert torch.allclose(terms.kl, kl_divergence(mu, logvar))
    assert torch.allclose(terms.total, terms.reconstruction + 0.5 * terms.kl)
    default = beta_vae_loss(x, x_hat, mu, logvar)
    assert torch.allclose(default.total, default.reconstruction + 1e-3 * default.kl)
    with pytest.raises(ValueError):
        beta_vae_loss(x, x_hat[:, :5], mu, logvar)


def test_regression_loss() -> None:
    pred = torch.tensor([[0.1, -0.2], [0.5, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    expected = (0.01 + 0.04 + 0.25 + 0.25) / 4
    assert regression_loss(pred, target).item() == pytest.approx(expected)
    assert torch.allclose(regression_loss(pred, target), F.mse_loss(pred, target))
    with pytest.raises(ValueError):
        regression_loss(pred, target[:, :1])


# ---------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------


def _toy_batch(n: int = 4, n_bands: int = 6, size: int = 45) -> torch.Tensor:
    """Gaussian blobs with band-dependent amplitude, values in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = []
    for i in range(n):
        cx, cy, w = 18 + 3 * i, 26 - 2 * i, 3.0 + i
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w**2))
        imgs.append(torch.stack([blob * (0.5 + 0.1 * b) for b in range(n_bands)]))
    return torch.stack(imgs).float()


def test_overfit_tiny_batch_reduces_loss() -> None:
    vae = VAE(6, 45, 32)
    x = _toy_batch()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def eval_loss() -> float:
        vae.eval()
        with torch.no_grad():
            out = vae(x)
            return beta_vae_loss(x, out.x_hat, out.mu, out.logvar).total.item()

    initial = eval_loss()
    vae.train()
    for _ in range(30):
        opt.zero_grad()
        out = vae(x)
        loss = beta_vae_loss(x, out.x_hat, out.mu, out.logvar).total
        loss.backward()
        opt.step()
    final = eval_loss()
    assert final < 0.5 * initial, (initial, final)


def test_regressor_overfits() -> None:
    reg = Regressor(8, dropout=0.0)
    mu = torch.randn(16, 8)
    target = 0.8 * torch.rand(16, 2) - 0.4
    opt = torch.optim.Adam(reg.parameters(), lr=1e-3)
    initial = regression_loss(reg(mu), target).item()
    for _ in range(100):
        opt.zero_grad()
        loss = regression_loss(reg(mu), target)
        loss.backward()
        opt.step()
    assert regression_loss(reg(mu), target).item() < 0.5 * initial


def test_gradient_flows_to_all_parameters() -> None:
    vae = VAE(6, 45, 32)
    reg = Regressor(32)
    x = torch.rand(4, 6, 45, 45)
    out = vae(x)
    loss = beta_vae_loss(x, out.x_hat, out.mu, out.logvar).total
    loss = loss + regression_loss(reg(out.mu), torch.zeros(4, 2).uniform_(-0.5, 0.5))
    loss.backward()
    for name, p in list(vae.named_parameters()) + [("reg." + n, p) for n, p in reg.named_parameters()]:
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
