"""Neural networks of the deblending pipeline: beta-VAE encoder/decoder and ellipticity regressor.

Conventions
-----------
* Images are channel-first float tensors of shape ``(N, n_bands, H, W)`` with
  ``H == W == stamp_size``, each band normalised to roughly ``[0, 1]``.
* Latent vectors have shape ``(N, latent_dim)``.
* Ellipticities are ``(N, 2)`` tensors ``(e1, e2)`` in ``[-1, 1]``.

Every network is built from plain ints only (``n_bands``, ``stamp_size``,
``latent_dim``, plus ``hidden``/``dropout``/``moment_scales`` for the regressor), and exposes
``hparams()`` returning exactly those constructor arguments, so a checkpoint
can store them and rebuild the module with ``Cls(**hparams)`` before loading
the ``state_dict``.

Architecture (see the spec):

* Encoder: 4 x [Conv2d(3x3, stride 2, padding 1) + PReLU] with 32/64/128/256
  filters, flatten, then two parallel dense heads giving ``mu`` and ``logvar``
  of the diagonal Gaussian ``q(z|x)``.  For a 45x45 stamp the spatial size goes
  45 -> 23 -> 12 -> 6 -> 3.
* Decoder: Linear(latent -> 256 * s * s) reshaped to the encoder's last feature
  map ``(256, s, s)``, then 4 ConvTranspose2d(3x3, stride 2, padding 1)
  256 -> 128 -> 64 -> 32 -> n_bands with PReLU between (none after the last),
  then the output: SPEC's Sigmoid (``output="sigmoid"``), or a sigmoid that reaches
  0 exactly (``output="floored_sigmoid"``: see :class:`Decoder`).  The transposed
  convolutions' ``output_padding`` is chosen per layer so that they retrace the
  encoder's sizes exactly (3 -> 6 -> 12 -> 23 -> 45), which makes the spec's
  final bilinear interpolation to ``stamp_size`` an identity for every stamp size:
  it is therefore not applied.
* Regressor: [Linear + PReLU + Dropout] x (128, 64, 32), then Linear(2) + Tanh, on mu (and,
  optionally, the stamp's weighted moments: :mod:`deblend.core.stamp_moments`).

PReLU layers have one learnable slope per channel (conv) / per unit (dense).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from deblend.core.stamp_moments import FEATURES_PER_SCALE, check_scales, stamp_moments

__all__ = [
    "ENCODER_CHANNELS",
    "KERNEL_SIZE",
    "STRIDE",
    "PADDING",
    "conv_output_size",
    "encoder_spatial_sizes",
    "flattened_size",
    "reparameterize",
    "Encoder",
    "DECODER_OUTPUTS",
    "SIGMOID_FLOOR",
    "FlooredSigmoid",
    "Decoder",
    "VAE",
    "VAEOutput",
    "Regressor",
]

#: Output channels of the encoder's four convolutions (the decoder mirrors them).
ENCODER_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)
KERNEL_SIZE: int = 3
STRIDE: int = 2
PADDING: int = 1


# ---------------------------------------------------------------------------
# Shape arithmetic
# ---------------------------------------------------------------------------


def conv_output_size(
    size: int, kernel_size: int = KERNEL_SIZE, stride: int = STRIDE, padding: int = PADDING
) -> int:
    """Spatial output size of a Conv2d: ``floor((size + 2p - k) / s) + 1``."""
    out = (size + 2 * padding - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(
            f"convolution (kernel={kernel_size}, stride={stride}, padding={padding}) "
            f"on size {size} gives non-positive output size {out}"
        )
    return out


def encoder_spatial_sizes(stamp_size: int, n_layers: int = len(ENCODER_CHANNELS)) -> list[int]:
    """Spatial sizes through the encoder, input first: 45 -> ``[45, 23, 12, 6, 3]``."""
    _check_positive_int("stamp_size", stamp_size)
    sizes = [stamp_size]
    for _ in range(n_layers):
        sizes.append(conv_output_size(sizes[-1]))
    return sizes


def flattened_size(stamp_size: int) -> int:
    """Number of features after flattening the encoder's last conv output (256*3*3 for 45)."""
    s = encoder_spatial_sizes(stamp_size)[-1]
    return ENCODER_CHANNELS[-1] * s * s


def _transpose_output_padding(in_size: int, target: int) -> int:
    """``output_padding`` making ConvTranspose2d(k=3, s=2, p=1) map ``in_size`` to ``target``."""
    base = (in_size - 1) * STRIDE - 2 * PADDING + KERNEL_SIZE
    op = target - base
    if not 0 <= op < STRIDE:
        raise ValueError(f"cannot map size {in_size} to {target} with a stride-{STRIDE} transposed conv")
    return op


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------
# Reparameterisation
# ---------------------------------------------------------------------------


def reparameterize(mu: Tensor, logvar: Tensor, deterministic: bool = False) -> Tensor:
    """Sample ``z = mu + sigma * eps`` with ``sigma = exp(logvar / 2)``, ``eps ~ N(0, I)``.

    ``mu``, ``logvar``: ``(N, latent_dim)``.  With ``deterministic=True`` returns ``mu``.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    if deterministic:
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# ---------------------------------------------------------------------------
# Encoder / decoder / VAE
# ---------------------------------------------------------------------------


class _StampNetwork(nn.Module):
    """A network between ``(N, n_bands, S, S)`` stamps and ``(N, latent_dim)`` latents; its
    constructor arguments are its :meth:`hparams`."""

    def __init__(self, n_bands: int, stamp_size: int, latent_dim: int) -> None:
        super().__init__()
        _check_positive_int("n_bands", n_bands)
        _check_positive_int("stamp_size", stamp_size)
        _check_positive_int("latent_dim", latent_dim)
        self.n_bands = n_bands
        self.stamp_size = stamp_size
        self.latent_dim = latent_dim

    def hparams(self) -> dict[str, int]:
        """Constructor arguments (plain ints) for checkpointing."""
        return {"n_bands": self.n_bands, "stamp_size": self.stamp_size, "latent_dim": self.latent_dim}


class Encoder(_StampNetwork):
    """Convolutional encoder ``x (N, n_bands, S, S) -> (mu, logvar)``, each ``(N, latent_dim)``.

    With ``availability_input`` the first convolution also sees one constant plane per band,
    1 where the band is available and 0 where it is missing. The mask follows from the fill rule
    of a missing band (``deblend.core.inference.fill_missing_bands``, training's band dropout
    and unavailable bands): a band whose pixels are all exactly 0 is missing, as no observed
    band is."""

    def __init__(self, n_bands: int, stamp_size: int = 45, latent_dim: int = 32,
                 availability_input: bool = False) -> None:
        super().__init__(n_bands, stamp_size, latent_dim)
        self.availability_input = bool(availability_input)
        self.spatial_sizes = encoder_spatial_sizes(stamp_size)  # e.g. [45, 23, 12, 6, 3]
        self.flat_dim = flattened_size(stamp_size)

        layers: list[nn.Module] = []
        in_ch = 2 * n_bands if self.availability_input else n_bands
        for out_ch in ENCODER_CHANNELS:
            layers.append(nn.Conv2d(in_ch, out_ch, KERNEL_SIZE, stride=STRIDE, padding=PADDING))
            layers.append(nn.PReLU(out_ch))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.fc_mu = nn.Linear(self.flat_dim, latent_dim)
        self.fc_logvar = nn.Linear(self.flat_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: ``(N, n_bands, stamp_size, stamp_size)`` -> ``(mu, logvar)``, each ``(N, latent_dim)``."""
        _check_image(x, self.n_bands, self.stamp_size, "Encoder")
        if self.availability_input:
            x = torch.cat([x, availability_planes(x)], dim=1)
        h = self.features(x).flatten(start_dim=1)
        return self.fc_mu(h), self.fc_logvar(h)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments for checkpointing (``availability_input`` only when set, so
        that checkpoints written before it keep their form)."""
        extra = {"availability_input": True} if self.availability_input else {}
        return {**super().hparams(), **extra}

    def sample(self, mu: Tensor, logvar: Tensor, deterministic: bool | None = None) -> Tensor:
        """Reparameterised ``z``; ``deterministic=None`` means ``z = mu`` in eval mode, sampled in train mode."""
        if deterministic is None:
            deterministic = not self.training
        return reparameterize(mu, logvar, deterministic=deterministic)

    reparameterize = sample


def availability_planes(x: Tensor) -> Tensor:
    """(N, n_bands, H, W) constant planes of ``x`` (N, n_bands, H, W): 1 for a band with a
    non-zero pixel (available), 0 for a band that is all 0 (missing, by the fill rule)."""
    present = (x != 0).flatten(start_dim=2).any(dim=-1).to(x.dtype)
    return present[:, :, None, None].expand_as(x)


#: Output layers the decoder can end with (:class:`Decoder`).
DECODER_OUTPUTS: tuple[str, ...] = ("sigmoid", "floored_sigmoid")
#: Where the ``floored_sigmoid`` output reaches 0: ``sigmoid(y) = a / (1 + a)``, with slope ~``a``.
SIGMOID_FLOOR: float = 0.01


class FlooredSigmoid(nn.Module):
    """``max(0, (1 + a) sigmoid(y) - a)`` with ``a`` = :data:`SIGMOID_FLOOR`: a sigmoid that
    reaches 0 at a finite input, with slope ``~a`` just above it, is exactly 0 below it, and
    still approaches 1 only asymptotically."""

    def forward(self, y: Tensor) -> Tensor:
        return torch.relu(torch.sigmoid(y) * (1.0 + SIGMOID_FLOOR) - SIGMOID_FLOOR)


class Decoder(_StampNetwork):
    """Transposed-conv decoder ``z (N, latent_dim) -> x_hat (N, n_bands, S, S)`` in ``[0, 1]``
    (normalised units, SPEC 3).

    ``output="sigmoid"`` is SPEC's output. A sigmoid reaches the normalised sky (0) only
    asymptotically, and the MSE gradient through it vanishes there (its slope is about its own
    value): trained decoders keep a floor of about 4e-4 over the whole stamp (about 3 electrons
    per pixel), which adds up to +20% to the flux of the faintest galaxies and makes uniform-
    weight moments rounder. ``output="floored_sigmoid"`` (:class:`FlooredSigmoid`) reaches the
    sky exactly, with a finite slope above it, and keeps the sigmoid's top: the bright cores,
    which tanh(asinh) sends towards 1 where its inverse diverges, stay finite in electrons.
    Two other outputs were tried on the quick run and dropped: the identity (free to reach 1,
    it overshoots the cores of bright galaxies by factors of tens once mapped back) and the
    floored sigmoid without the clip at 0 (its slightly negative, noisy background ruins
    uniform-weight moments: RMSE 0.96 against truth).
    """

    def __init__(self, n_bands: int, stamp_size: int = 45, latent_dim: int = 32,
                 output: str = "sigmoid") -> None:
        super().__init__(n_bands, stamp_size, latent_dim)
        if output not in DECODER_OUTPUTS:
            raise ValueError(f"decoder output must be one of {DECODER_OUTPUTS}, got {output!r}")
        self.output = output

        enc_sizes = encoder_spatial_sizes(stamp_size)  # [45, 23, 12, 6, 3]
        self.start_size = enc_sizes[-1]
        self.start_channels = ENCODER_CHANNELS[-1]
        self.fc = nn.Linear(latent_dim, flattened_size(stamp_size))

        # Channels 256 -> 128 -> 64 -> 32 -> n_bands; sizes retrace the encoder in reverse.
        out_channels = list(reversed(ENCODER_CHANNELS[:-1])) + [n_bands]
        rev_sizes = list(reversed(enc_sizes))  # [3, 6, 12, 23, 45]
        layers: list[nn.Module] = []
        in_ch = self.start_channels
        for i, out_ch in enumerate(out_channels):
            op = _transpose_output_padding(rev_sizes[i], rev_sizes[i + 1])
            layers.append(
                nn.ConvTranspose2d(
                    in_ch, out_ch, KERNEL_SIZE, stride=STRIDE, padding=PADDING, output_padding=op
                )
            )
            if i < len(out_channels) - 1:
                layers.append(nn.PReLU(out_ch))
            in_ch = out_ch
        layers.append(nn.Sigmoid() if output == "sigmoid" else FlooredSigmoid())
        self.deconv = nn.Sequential(*layers)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments for checkpointing; ``output`` only where it is not SPEC's
        sigmoid, so checkpoints written before the option existed still load."""
        params: dict[str, Any] = dict(super().hparams())
        if self.output != "sigmoid":
            params["output"] = self.output
        return params

    def forward(self, z: Tensor) -> Tensor:
        """``z``: ``(N, latent_dim)`` -> ``x_hat``: ``(N, n_bands, stamp_size, stamp_size)``."""
        _check_vector(z, self.latent_dim, "Decoder", "z")
        h = self.fc(z).view(-1, self.start_channels, self.start_size, self.start_size)
        return self.deconv(h)


class VAEOutput(NamedTuple):
    """Result of :meth:`VAE.forward`.

    x_hat: ``(N, n_bands, S, S)`` reconstruction in normalised units;
    mu, logvar, z: ``(N, latent_dim)``.
    """

    x_hat: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


class VAE(nn.Module):
    """beta-VAE = :class:`Encoder` + :class:`Decoder`, built from plain ints."""

    def __init__(self, n_bands: int, stamp_size: int = 45, latent_dim: int = 32,
                 decoder_output: str = "sigmoid", availability_input: bool = False) -> None:
        super().__init__()
        self.encoder = Encoder(n_bands, stamp_size, latent_dim, availability_input)
        self.decoder = Decoder(n_bands, stamp_size, latent_dim, decoder_output)

    @property
    def n_bands(self) -> int:
        return self.encoder.n_bands

    @property
    def stamp_size(self) -> int:
        return self.encoder.stamp_size

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def hparams(self) -> dict[str, int]:
        """Constructor arguments (plain ints) for checkpointing."""
        return self.encoder.hparams()

    def forward(self, x: Tensor, deterministic: bool | None = None) -> VAEOutput:
        """``x``: ``(N, n_bands, S, S)`` -> :class:`VAEOutput`.

        ``z`` is sampled in train mode and equals ``mu`` in eval mode, unless
        ``deterministic`` is given explicitly.
        """
        mu, logvar = self.encoder(x)
        z = self.encoder.sample(mu, logvar, deterministic=deterministic)
        return VAEOutput(self.decoder(z), mu, logvar, z)


# ---------------------------------------------------------------------------
# Regressor
# ---------------------------------------------------------------------------


class Regressor(nn.Module):
    """MLP ``mu (N, latent_dim) -> (e1, e2)`` of shape ``(N, 2)`` in ``[-1, 1]``.

    Hidden blocks are Linear + PReLU + Dropout(``dropout``); output Linear(2) + Tanh. With
    ``moment_scales`` (Gaussian weight sigmas, pixels; ``model.regressor_moments``) the first
    layer also reads the Gaussian-weighted moments of the normalised stamp mu came from
    (:mod:`deblend.core.stamp_moments`): callers pass :meth:`stamp_features` of that stamp.
    """

    def __init__(
        self, latent_dim: int = 32, hidden: Sequence[int] = (128, 64, 32), dropout: float = 0.1,
        moment_scales: Sequence[float] = (),
    ) -> None:
        super().__init__()
        _check_positive_int("latent_dim", latent_dim)
        hidden = tuple(hidden)
        for h in hidden:
            _check_positive_int("hidden units", h)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.dropout = float(dropout)
        self.moment_scales = check_scales(moment_scales)
        self.n_features = FEATURES_PER_SCALE * len(self.moment_scales)

        layers: list[nn.Module] = []
        in_f = latent_dim + self.n_features
        for units in hidden:
            layers += [nn.Linear(in_f, units), nn.PReLU(units), nn.Dropout(self.dropout)]
            in_f = units
        layers += [nn.Linear(in_f, 2), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (plain ints / list / float) for checkpointing
        (``moment_scales`` only when set, so that older checkpoints keep their form)."""
        extra = {"moment_scales": list(self.moment_scales)} if self.moment_scales else {}
        return {"latent_dim": self.latent_dim, "hidden": list(self.hidden),
                "dropout": self.dropout, **extra}

    @property
    def reads_stamps(self) -> bool:
        """Whether :meth:`forward` needs the stamps' features beside mu."""
        return bool(self.moment_scales)

    def stamp_features(self, stamps: Tensor) -> Tensor:
        """``(N, n_features)`` inputs from normalised stamps ``(N, bands, S, S)``: those mu was
        encoded from (``(N, 0)`` when the regressor reads mu alone)."""
        return stamp_moments(stamps, self.moment_scales)

    def forward(self, mu: Tensor, features: Tensor | None = None) -> Tensor:
        """``mu``: ``(N, latent_dim)`` (and ``features``, :meth:`stamp_features` of the stamps mu
        came from, when :attr:`reads_stamps`) -> ``(N, 2)`` ellipticities ``(e1, e2)`` in
        ``[-1, 1]``."""
        _check_vector(mu, self.latent_dim, "Regressor", "mu")
        if self.reads_stamps:
            if features is None:
                raise ValueError("Regressor: this regressor reads the stamps' weighted moments "
                                 "(moment_scales): pass stamp_features(stamps)")
            _check_vector(features, self.n_features, "Regressor", "features")
            if features.shape[0] != mu.shape[0]:
                raise ValueError(f"Regressor: {features.shape[0]} feature rows for "
                                 f"{mu.shape[0]} latents")
            mu = torch.cat([mu, features.to(mu.dtype)], dim=1)
        return self.net(mu)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _check_image(x: Tensor, n_bands: int, stamp_size: int, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{who}: expected a 4-D input (N, n_bands, H, W), got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if x.shape[1] != n_bands:
        raise ValueError(
            f"{who}: expected {n_bands} channels (bands), got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if tuple(x.shape[2:]) != (stamp_size, stamp_size):
        raise ValueError(
            f"{who}: expected spatial size {stamp_size}x{stamp_size}, "
            f"got {x.shape[2]}x{x.shape[3]} (input shape {tuple(x.shape)})"
        )


def _check_vector(v: Tensor, dim: int, who: str, name: str) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 2 or v.shape[1] != dim:
        raise ValueError(
            f"{who}: expected {name} of shape (N, {dim}) (latent size {dim}), got shape {tuple(v.shape)}"
        )
