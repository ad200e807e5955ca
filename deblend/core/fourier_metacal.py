"""Metacalibration of images of any size by FFT: whole cells, not only stamps.

The same operation as :mod:`deblend.core.metacal` (deconvolve each band by its PSF image, shear
by ``+-delta``, reconvolve with the round Gaussian of :func:`~deblend.core.metacal.
reconvolution_sigma`), equal to its GalSim reference to ~1e-5 of the peak, but in O(n log n)
per band instead of one dense (n^2 x n^2) matrix, so that it scales to cells of hundreds of
pixels and batches over bands (torch, CPU or CUDA).

How. With D the Fourier transform of the image, P the PSF image's and G the Gaussian's, the
sheared image is ``out^(k) = D(A k) G(k) / P(A k)`` (A the shear's matrix; GalSim's
``.shear()``). Put ``Y(q) = D(q) G(A^-1 q) / P(q)``: then ``out^(k) = Y(A k)``, i.e. in real
space ``out(r) = y(c + A^-1 (r - c))`` with ``y`` the inverse FFT of Y and ``c`` the image
centre. ``y`` is smooth (the Gaussian factor is e^-30 or less at the Nyquist frequency for the
rule's sigma), so sampling it at sheared positions by band-limited (sinc) interpolation is exact
to that level. A^-1 is applied as 1-D passes: for shears along e1 (A diagonal) a resampling
matrix per axis; otherwise three shears of the coordinates, x then y then x (each row or
column shifted by a Fourier phase), whose product is A^-1.

Images are zero-padded by ``pad`` pixels (default 24: the kernel's tails and the shear's
displacement) to a fast FFT size. Outputs are on the input's grid, like
:func:`~deblend.core.metacal.metacal_images_galsim`; keep a margin around what is measured, as
there (the sheared edge brings in the zeros outside the image).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import fft as scipy_fft
from torch import Tensor

from deblend.core.metacal import (
    DEFAULT_DELTA,
    METACAL_SHEARS,
    MetacalOperator,
    check_delta,
    check_psf_images,
    reconvolution_sigmas,
    shear_matrix,
)

DEFAULT_PAD = 24
"""Zero padding (pixels per side) around an image before its FFT."""


def grid_size(pixels: int, pad: int = DEFAULT_PAD) -> int:
    """The FFT length used for an axis of ``pixels`` with ``pad`` zeros on each side."""
    return int(scipy_fft.next_fast_len(int(pixels) + 2 * int(pad), real=True))


def psf_transform(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The PSF image's (or images', (..., S, S)) Fourier transform about its centre on the
    rfft2 grid of ``shape`` (rows, columns): the PSF is wrapped so that its centre ((S-1)/2)
    falls on pixel 0, with a half-pixel phase for even S."""
    size = psf.shape[-1]
    if size > min(shape):
        raise ValueError(f"PSF images of {size} pixels do not fit a {shape} FFT grid")
    half = size // 2
    wrapped = np.zeros(psf.shape[:-2] + tuple(shape))
    wrapped[..., :size, :size] = psf
    wrapped = np.roll(wrapped, (-half, -half), axis=(-2, -1))
    transform = np.fft.rfft2(wrapped)
    offset = (size - 1) / 2.0 - half  # 0 for odd sizes, -0.5 for even ones
    if offset:
        ky = 2 * np.pi * np.fft.fftfreq(shape[0])[:, None]
        kx = 2 * np.pi * np.fft.rfftfreq(shape[1])[None, :]
        transform = transform * np.exp(-1j * offset * (kx + ky))
    return transform


def coordinate_passes(inverse: np.ndarray) -> list[tuple[str, float]] | None:
    """(x, p), (y, q), (x, r) shears of the coordinates whose product is ``inverse`` (a 2x2
    matrix of determinant 1): [[1, p], [0, 1]] [[1, 0], [q, 1]] [[1, r], [0, 1]]; None when
    ``inverse`` is diagonal (resampled axis by axis instead)."""
    q = inverse[1, 0]
    if abs(q) < 1e-12:
        return None
    return [("x", (inverse[0, 0] - 1) / q), ("y", q), ("x", (inverse[1, 1] - 1) / q)]


def resampling_matrix(size: int, scale: float, centre: float, out_slice: slice) -> np.ndarray:
    """(len(out), size) real matrix sampling a band-limited periodic signal of ``size`` points
    at centre + scale (i - centre), for the output points i of ``out_slice``."""
    points = centre + scale * (np.arange(size)[out_slice] - centre)
    k = 2 * np.pi * np.fft.fftfreq(size)
    dft = np.exp(-1j * np.outer(k, np.arange(size)))  # (k, j)
    return np.real(np.exp(1j * np.outer(points, k)) @ dft) / size


@dataclass
class FourierMetacal:
    """The five metacal operations of every band for images of any size (bands, H, W).

    Built from (bands, S, S) effective PSF images (pixel included, as datasets store them); the
    Fourier filters of each image shape are made on first use and kept."""

    psfs: np.ndarray
    delta: float = DEFAULT_DELTA
    pad: int = DEFAULT_PAD
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    target_sigma: tuple[float, ...] | None = None
    """A fixed reconvolution Gaussian per band (pixels) instead of the rule's
    (:func:`~deblend.core.metacal.chosen_sigma`)."""
    sigma: tuple[float, ...] = field(init=False)
    """Reconvolution Gaussian sigma of each band, pixels (the stamp operator's rule)."""
    _filters: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.psfs = check_psf_images(self.psfs)
        self.delta = check_delta(self.delta)
        if int(self.pad) < 8:
            raise ValueError(f"pad must be at least 8 pixels, got {self.pad!r}")
        self.sigma = reconvolution_sigmas(self.psfs, self.delta, self.target_sigma)

    @property
    def n_bands(self) -> int:
        return int(self.psfs.shape[0])

    @staticmethod
    def digest(psfs: np.ndarray, delta: float = DEFAULT_DELTA,
               target_sigma: tuple[float, ...] | None = None) -> str:
        """Identity of an operator's PSF images, ``delta`` and target (to reuse one across
        cells)."""
        return f"{MetacalOperator.digest(psfs)}-{float(delta)!r}-{target_sigma!r}"

    @property
    def complex_dtype(self) -> torch.dtype:
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    def _tensor(self, array: np.ndarray, complex_: bool = False) -> Tensor:
        return torch.as_tensor(array, device=self.device,
                               dtype=self.complex_dtype if complex_ else self.dtype)

    def filters(self, shape: tuple[int, int]) -> dict:
        """Per image shape (H, W): the grid and, per shear, the Fourier filter
        G(A^-1 q) / P(q) (bands, Hg, Wg // 2 + 1) and the resampling plan."""
        if shape in self._filters:
            return self._filters[shape]
        height, width = shape
        grid = (grid_size(height, self.pad), grid_size(width, self.pad))
        ky = 2 * np.pi * np.fft.fftfreq(grid[0])[:, None]
        kx = 2 * np.pi * np.fft.rfftfreq(grid[1])[None, :]
        inverse_psf = np.stack([1.0 / psf_transform(p, grid) for p in self.psfs])
        sigma2 = np.asarray(self.sigma)[:, None, None] ** 2
        crop = (slice(self.pad, self.pad + height), slice(self.pad, self.pad + width))
        centre = (self.pad + (width - 1) / 2.0, self.pad + (height - 1) / 2.0)  # (x, y)
        plans = {}
        for name, (s1, s2) in METACAL_SHEARS.items():
            inverse = np.linalg.inv(shear_matrix(s1 * self.delta, s2 * self.delta))
            qx = inverse[0, 0] * kx + inverse[0, 1] * ky  # A^-1 q, (x, y) components
            qy = inverse[1, 0] * kx + inverse[1, 1] * ky
            gaussian = np.exp(-0.5 * sigma2 * (qx ** 2 + qy ** 2)[None])
            passes = coordinate_passes(inverse) if name != "noshear" else []
            plan: dict = {"filter": self._tensor(gaussian * inverse_psf, complex_=True)}
            if passes is None:  # diagonal: one resampling matrix per axis, output rows only
                plan["rows"] = self._tensor(resampling_matrix(grid[0], inverse[1, 1], centre[1],
                                                                crop[0]))
                plan["cols"] = self._tensor(resampling_matrix(grid[1], inverse[0, 0], centre[0],
                                                                crop[1]))
            else:
                plan["passes"] = [(axis, self._phases(grid, centre, axis, amount))
                                  for axis, amount in passes]
            plans[name] = plan
        self._filters[shape] = {"grid": grid, "crop": crop, "plans": plans}
        return self._filters[shape]

    def _phases(self, grid: tuple[int, int], centre: tuple[float, float], axis: str,
                amount: float) -> Tensor:
        """Phase factors that sample every row (axis "x") or column ("y") at
        u + amount * (v - c_v), v the other coordinate and c its centre (``centre`` is (x, y)):
        shape (Hg, Wg//2+1) or (Hg//2+1, Wg)."""
        along, other = (1, 0) if axis == "x" else (0, 1)
        k = 2 * np.pi * np.fft.rfftfreq(grid[along])
        shift = amount * (np.arange(grid[other]) - centre[1 - other])
        phases = np.exp(1j * np.outer(shift, k))  # (other, k along)
        return self._tensor(phases if axis == "x" else phases.T, complex_=True)

    def noise_gain(self, shape: tuple[int, int]) -> np.ndarray:
        """Per band, the factor by which the noshear image's per-pixel variance of white input
        noise is multiplied (the sum of the squared real-space kernel of G / P)."""
        setup = self.filters(tuple(int(v) for v in shape))
        kernel = torch.fft.irfft2(setup["plans"]["noshear"]["filter"], s=setup["grid"])
        return (kernel.double() ** 2).sum(dim=(-2, -1)).cpu().numpy()

    def check(self, images: Tensor) -> None:
        if images.ndim not in (3, 4) or images.shape[-3] != self.n_bands:
            raise ValueError(f"images must have shape ([N,] {self.n_bands}, H, W) for these "
                             f"PSFs, got {tuple(images.shape)}")

    def _apply(self, images: Tensor) -> dict[str, Tensor]:
        height, width = images.shape[-2:]
        setup = self.filters((int(height), int(width)))
        grid, crop = setup["grid"], setup["crop"]
        padded = torch.zeros(images.shape[:-2] + grid, dtype=self.dtype, device=self.device)
        padded[..., crop[0], crop[1]] = images
        spectrum = torch.fft.rfft2(padded)
        out = {}
        for name, plan in setup["plans"].items():
            smooth = torch.fft.irfft2(spectrum * plan["filter"], s=grid)
            if "rows" in plan:
                out[name] = plan["rows"] @ smooth @ plan["cols"].T
                continue
            for axis, phases in plan["passes"]:
                dim = -1 if axis == "x" else -2
                smooth = torch.fft.irfft(torch.fft.rfft(smooth, dim=dim) * phases,
                                         n=smooth.shape[dim], dim=dim)
            out[name] = smooth[..., crop[0], crop[1]]
        return out

    @torch.inference_mode()
    def apply(self, images: np.ndarray | Tensor, noise: np.ndarray | Tensor | None = None
              ) -> dict[str, Tensor]:
        """The five metacal images (each the input's shape, on the operator's device) of raw
        images ([N,] bands, H, W); ``noise`` (same shape), an independent noise realisation,
        switches the noise correction on (rotated by 90 degrees, put through the same
        operations and rotated back: twice the noise variance, isotropic correlations)."""
        images = torch.as_tensor(images, device=self.device).to(self.dtype)
        self.check(images)
        if not torch.isfinite(images).all():
            raise ValueError("images contain non-finite pixels")
        out = self._apply(images)
        if noise is not None:
            noise = torch.as_tensor(noise, device=self.device).to(self.dtype)
            if noise.shape != images.shape:
                raise ValueError(f"noise must have the images' shape {tuple(images.shape)}, "
                                 f"got {tuple(noise.shape)}")
            if not torch.isfinite(noise).all():
                raise ValueError("noise contains non-finite pixels")
            rotated = self._apply(torch.rot90(noise, 1, dims=(-2, -1)))
            out = {name: image + torch.rot90(rotated[name], -1, dims=(-2, -1))
                   for name, image in out.items()}
        return out
