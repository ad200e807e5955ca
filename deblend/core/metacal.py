"""Metacalibration images of multi-band stamps (Huff & Mandelbaum 2017; Sheldon & Huff 2017).

For each band of each stamp, the image is deconvolved by its PSF, sheared by ``+-delta`` on each
component, and reconvolved with a round Gaussian, giving the five images of
:data:`METACAL_SHEARS`. An estimator ``e`` measured on them gives the per-object response
``R_ij = (e_i(+delta_j) - e_i(-delta_j)) / (2 delta)``, and a population's shear is
``g_hat = <R>^-1 <e(noshear)>`` (SPEC 6).

Conventions. Stamps are raw flux per pixel in the pixel frame (x = array axis 1, y = axis 0),
centred at ((W-1)/2, (H-1)/2) like GalSim's images; the shears are reduced shears g (GalSim's
``shear(g1, g2)``). The PSF of each band is an *image* (the effective PSF: PSF convolved with the
pixel, unit sum, centred like the stamps, as datasets store it), interpolated with Lanczos-15.

Reconvolution rule. The sheared images are reconvolved with the narrowest round Gaussian whose
Fourier transform nowhere exceeds the modulus of the PSF image's, on the stamp's Fourier grid and
for every one of the five sheared grids (:func:`reconvolution_sigma`), or with a fixed round
Gaussian no narrower than that (``metacal.target_psf_fwhm``: one PSF for every image, whatever
its seeing; :func:`chosen_sigma`). The ratio (Gaussian / PSF)
is then at most 1 everywhere: no Fourier mode of the noise is amplified, and the PSF image's
noise floor at high k (the truncated wings, ~1e-4) cannot leak in. (A PSF dilated by 1 + 2 delta,
the other usual rule, amplifies that floor by 10 to 200 at the Nyquist frequency for BTK's PSF
images, and GalSim's results then depend on its accuracy settings at the 10% level.) For BTK's
LSST PSFs (FWHM 0.83-0.97") the Gaussian's FWHM is 1.24-1.36".

Two implementations of the same operation:

- :func:`metacal_images_galsim`, the reference: GalSim ``InterpolatedImage`` objects, exact and
  slow (about 0.02 s per band and stamp);
- :class:`deblend.core.fourier_metacal.FourierMetacal`, the same operation by FFT for images of
  any size (whole cells);
- :class:`MetacalOperator`, the fast path: the operation is linear in the image, so for each band
  and shear it is one (H W x H W) real matrix, built once from the PSF image by evaluating the
  exact Fourier transform of every input pixel at the sheared frequencies, and applied to whole
  batches as one matrix product (torch, CPU or CUDA). It matches GalSim to ~1e-5 of the peak on
  noisy stamps (``tests/test_metacal.py``).

Noise correction: an independent noise field of the stamps' noise, rotated by 90 degrees, put
through the same operations and rotated back, is added to every image; its anisotropic
correlations cancel those of the stamps' own sheared noise, at the price of twice the noise
variance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import galsim
import numpy as np
import torch
from torch import Tensor

from deblend.core.arguments import METACAL_DELTA, POSITIVE_FLOAT

METACAL_SHEARS: dict[str, tuple[float, float]] = {
    "noshear": (0.0, 0.0), "1p": (1.0, 0.0), "1m": (-1.0, 0.0), "2p": (0.0, 1.0),
    "2m": (0.0, -1.0)}
"""The five metacal images and the shear each applies, in units of ``delta``."""
DEFAULT_DELTA = 0.01
RULE_GRID = 64
"""Fourier grid size (per axis) on which the reconvolution rule is checked."""
INTERPOLANT = "lanczos15"
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
"""FWHM of a Gaussian in units of its sigma."""
REFERENCE_PAD_FACTOR = 8
"""GalSim ``InterpolatedImage`` zero padding of the reference: its default (4) leaves k-space
interpolation errors of ~6e-5 of the peak in the sheared images of 100-pixel cells; 8 gives
~5e-6 (against the exact transform that :mod:`deblend.core.fourier_metacal` evaluates)."""


# -- checks ---------------------------------------------------------------------------------------
def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 0.1) (:data:`~deblend.core.arguments.METACAL_DELTA`, the rule
    of ``metacal.delta``), or a ValueError naming it."""
    return METACAL_DELTA.require(delta, "delta")


def check_psf_images(psfs: np.ndarray, n_bands: int | None = None) -> np.ndarray:
    """``psfs`` as float64 (bands, S, S) with finite values and a positive sum per band."""
    psfs = np.asarray(psfs, dtype=np.float64)
    if psfs.ndim != 3 or psfs.shape[1] != psfs.shape[2]:
        raise ValueError(f"PSF images must have shape (bands, S, S), got {psfs.shape}")
    if n_bands is not None and psfs.shape[0] != n_bands:
        raise ValueError(f"{psfs.shape[0]} PSF images for {n_bands} bands: one PSF per band")
    if not np.isfinite(psfs).all():
        raise ValueError("PSF images contain non-finite pixels")
    if (psfs.sum(axis=(1, 2)) <= 0).any():
        raise ValueError("every PSF image must have a positive sum")
    return psfs / psfs.sum(axis=(1, 2), keepdims=True)


def check_stamps(stamps: np.ndarray) -> np.ndarray:
    """``stamps`` as float64 (N, bands, H, W) with finite pixels."""
    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 4:
        raise ValueError(f"stamps must have shape (N, bands, H, W), got {stamps.shape}")
    if not np.isfinite(stamps).all():
        raise ValueError("stamps contain non-finite pixels")
    return stamps


def shear_matrix(g1: float, g2: float) -> np.ndarray:
    """GalSim's area-preserving 2x2 matrix of the reduced shear (g1, g2)."""
    return np.asarray(galsim.Shear(g1=g1, g2=g2).getMatrix(), dtype=np.float64)


# -- Fourier transforms of pixel images -------------------------------------------------------
def fourier_grid(size: int) -> np.ndarray:
    """Angular frequencies (rad/pixel) of a ``size``-point FFT, in FFT order."""
    return 2.0 * np.pi * np.fft.fftfreq(size)


def pixel_transform(image: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Exact Fourier transform sum_xy I(x, y) exp(-i (kx x + ky y)) of a pixel image at
    arbitrary frequencies (rad/pixel, arrays of one shape), about the image centre."""
    size_y, size_x = image.shape
    x = np.arange(size_x) - (size_x - 1) / 2.0
    y = np.arange(size_y) - (size_y - 1) / 2.0
    phase_x = np.exp(-1j * kx[..., None] * x)
    phase_y = np.exp(-1j * ky[..., None] * y)
    return np.einsum("...x,...y,yx->...", phase_x, phase_y, image, optimize=True)


def sheared_psf_transforms(psf: np.ndarray, grid: int, delta: float) -> dict[str, np.ndarray]:
    """The PSF image's Fourier transform at the sheared frequencies A_s k of each metacal
    shear s, for k on the (grid x grid) FFT grid (rows ky, columns kx)."""
    k = fourier_grid(grid)
    kx, ky = np.meshgrid(k, k)
    out = {}
    for name, (s1, s2) in METACAL_SHEARS.items():
        a = shear_matrix(s1 * delta, s2 * delta)
        out[name] = pixel_transform(psf, a[0, 0] * kx + a[0, 1] * ky, a[1, 0] * kx + a[1, 1] * ky)
    return out


def reconvolution_sigma(psf: np.ndarray, delta: float = DEFAULT_DELTA) -> float:
    """Sigma (pixels) of the round Gaussian reconvolution PSF for one band's PSF image: the
    smallest sigma whose Gaussian exp(-k^2 sigma^2 / 2) stays at or below |PSF(A_s k)| at every
    non-zero k of a :data:`RULE_GRID`-point Fourier grid and for every metacal shear s (see the
    module's docstring). The grid is fixed so that the rule depends on the PSF alone."""
    psf = check_psf_images(np.asarray(psf)[None])[0]
    return _sigma_from(sheared_psf_transforms(psf, RULE_GRID, check_delta(delta)))


def chosen_sigma(rule: float, target: float | None) -> float:
    """The reconvolution sigma (pixels) of one band: the rule's when ``target`` is None, else
    ``target`` (a fixed round Gaussian, ``metacal.target_psf_fwhm``), refused when narrower than
    the rule allows (it would amplify the noise where the PSF's transform is below it)."""
    if target is None:
        return rule
    target = POSITIVE_FLOAT.require(target, "target sigma")
    if target < rule * (1 - 1e-9):
        raise ValueError(f"the metacal target PSF (Gaussian FWHM {target * FWHM_PER_SIGMA:.3f} px) "
                         f"is narrower than this PSF allows ({rule * FWHM_PER_SIGMA:.3f} px): "
                         f"choose a wider target (metacal.target_psf_fwhm, --target-psf-fwhm)")
    return float(target)


def reconvolution_sigmas(psfs: np.ndarray, delta: float = DEFAULT_DELTA,
                         target_sigma: Sequence[float] | None = None) -> tuple[float, ...]:
    """Each band's reconvolution sigma (pixels) for (bands, S, S) PSF images: the rule's, or
    the band's ``target_sigma`` (:func:`chosen_sigma`: refused where narrower than the rule)."""
    targets = per_band_targets(target_sigma, len(psfs))
    return tuple(chosen_sigma(reconvolution_sigma(p, delta), t) for p, t in zip(psfs, targets))


def target_sigmas(target_fwhm: float | Sequence[float] | None, n_bands: int,
                  pixel_scale: float) -> tuple[float, ...] | None:
    """Per-band reconvolution sigmas (pixels) of a target PSF FWHM (arcsec): one value for
    every band or one per band; None stays None (the rule)."""
    if target_fwhm is None:
        return None
    values = ([float(target_fwhm)] * n_bands if np.ndim(target_fwhm) == 0
              else [float(v) for v in target_fwhm])  # type: ignore[union-attr]
    return per_band_targets([v / FWHM_PER_SIGMA / pixel_scale for v in values], n_bands)


def per_band_targets(target_sigma: Sequence[float] | None, n_bands: int
                     ) -> tuple[float | None, ...]:
    """``target_sigma`` checked to give one value per band (None: the rule in every band)."""
    if target_sigma is None:
        return (None,) * n_bands
    targets = tuple(float(v) for v in target_sigma)
    if len(targets) != n_bands:
        raise ValueError(f"{len(targets)} target sigmas for {n_bands} bands")
    return targets


def _sigma_from(transforms: dict[str, np.ndarray]) -> float:
    """:func:`reconvolution_sigma` from the PSF's transforms on the :data:`RULE_GRID` grid."""
    floor = np.min([np.abs(t) for t in transforms.values()], axis=0)
    k = fourier_grid(RULE_GRID)
    k2 = k[None, :] ** 2 + k[:, None] ** 2
    nonzero = k2 > 0
    needed = -2.0 * np.log(np.clip(floor[nonzero], 1e-300, 1.0)) / k2[nonzero]
    return float(np.sqrt(needed.max()))


# -- the fast path: one matrix per band and shear ----------------------------------------------
def check_margin(input_pixels: int, stamp_pixels: int) -> int:
    """The margin (pixels on each side) of input stamps around the output stamp, or a
    ValueError when the input is smaller or the two sizes differ in parity."""
    if input_pixels < stamp_pixels or (input_pixels - stamp_pixels) % 2:
        raise ValueError(f"input stamps of {input_pixels} pixels cannot be cropped to "
                         f"{stamp_pixels}: they must be at least as large, with an even "
                         f"difference (a margin on each side)")
    return (input_pixels - stamp_pixels) // 2


def operator_matrices(psf: np.ndarray, stamp_pixels: int, delta: float, grid: int,
                      input_pixels: int | None = None, target_sigma: float | None = None,
                      dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, float]:
    """(5, out^2, in^2) matrices M_s (``dtype``, float32 or float64) with
    crop(metacal_s(image)).ravel() = M_s @ image.ravel(), for square input stamps of
    ``input_pixels`` (default ``stamp_pixels``) whose central ``stamp_pixels`` are kept, one
    band's PSF image; and the reconvolution sigma (the rule's, or ``target_sigma``:
    :func:`chosen_sigma`).

    Column r is the metacal image of a unit pixel at r: its Fourier transform at the sheared
    frequency A k is exp(-i (A k) . r), divided by the PSF's at A k and multiplied by the
    Gaussian's at k; the inverse FFT on a (grid x grid) torus gives the output pixels (``grid``
    must leave room for the kernel's tails on both sides of the input stamp). The FFTs run at
    the precision of ``dtype`` (complex64 for float32: 1.7-3 times faster than complex128,
    matrices equal to 3e-7 of their largest element); the phases k . r are reduced modulo
    2 pi in float64 before they are rounded (which halves that error).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"operator matrices are float32 or float64, not {dtype}")
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    n = input_pixels or stamp_pixels
    crop = slice((n - stamp_pixels) // 2, (n + stamp_pixels) // 2)
    centre = (n - 1) / 2.0
    transforms = sheared_psf_transforms(psf, grid, delta)
    sigma = chosen_sigma(_sigma_from(transforms if grid == RULE_GRID else
                                     sheared_psf_transforms(psf, RULE_GRID, delta)), target_sigma)
    k = fourier_grid(grid)
    gaussian = np.exp(-0.5 * sigma ** 2 * (k[None, :] ** 2 + k[:, None] ** 2))
    rows, cols = np.mgrid[0:n, 0:n]
    positions = np.stack([cols.ravel() - centre, rows.ravel() - centre])  # (2, n^2), (x, y)
    out = torch.empty((len(METACAL_SHEARS), stamp_pixels ** 2, n * n), dtype=dtype)
    for i, (name, psf_k) in enumerate(transforms.items()):
        s1, s2 = METACAL_SHEARS[name]
        sheared = shear_matrix(s1 * delta, s2 * delta) @ positions + centre  # (x', y') absolute
        ratio = torch.from_numpy(gaussian / psf_k).to(complex_dtype)
        for start in range(0, n * n, 512):
            part = slice(start, start + 512)
            phase_x = _unit_phases(-k[None, :] * sheared[0, part][:, None], dtype)
            phase_y = _unit_phases(-k[None, :] * sheared[1, part][:, None], dtype)
            spectrum = phase_y[:, :, None] * phase_x[:, None, :] * ratio
            images = torch.fft.ifft2(spectrum).real[:, :n, :n][:, crop, crop]
            out[i, :, part] = images.reshape(images.shape[0], -1).T
    return out.numpy(), sigma


def _unit_phases(angles: np.ndarray, dtype: torch.dtype) -> Tensor:
    """exp(i angles) as a complex tensor of ``dtype``'s precision, the float64 angles reduced
    modulo 2 pi before they are rounded to it."""
    reduced = torch.from_numpy(np.remainder(angles, 2.0 * np.pi)).to(dtype)
    return torch.polar(torch.ones_like(reduced), reduced)


@dataclass(frozen=True)
class MetacalOperator:
    """The five metacal operations of every band, as matrices applied to batches of stamps.

    ``matrices`` is (bands, in^2, 5 out^2): the product of a band's flattened input stamps
    (``input_pixels`` on a side) with it gives the five images of :data:`METACAL_SHEARS` side by
    side, each cropped to its central ``stamp_pixels``. A margin (input larger than the output)
    keeps the stamp's edge out of the result: metacal shears the edge too, and the sheared edge
    brings in the zeros outside the stamp (for a 1% shear, a pixel moves by up to 0.3 px at the
    edge of a 45-pixel stamp, and the reconvolution spreads it by a few pixels).
    """

    matrices: Tensor
    sigma: tuple[float, ...]
    """Reconvolution Gaussian sigma of each band, pixels."""
    delta: float
    stamp_pixels: int
    """Side of the output images."""
    input_pixels: int
    """Side of the input stamps (>= ``stamp_pixels``, same parity)."""
    psf_digest: str
    """SHA-256 (first 16 hex) of the normalised PSF images the operator was built from."""

    @classmethod
    def build(cls, psfs: np.ndarray, stamp_pixels: int, delta: float = DEFAULT_DELTA, *,
              input_pixels: int | None = None, grid: int | None = None,
              target_sigma: Sequence[float] | None = None,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> MetacalOperator:
        """Operator for (bands, S, S) PSF images, output stamps of ``stamp_pixels`` and input
        stamps of ``input_pixels`` (default the same; larger keeps a margin, see the class).
        ``target_sigma`` (pixels, one per band): a fixed reconvolution Gaussian instead of the
        rule's (:func:`chosen_sigma`).

        ``grid`` (default: input + 16 pixels rounded up to even, at least 64) is the FFT size on
        which the columns are computed, at the precision of ``dtype`` (float32 below, for
        bfloat16 too); building a float32 band costs about 0.8 s for 45-pixel inputs and 4 s for
        65 on 2 CPU cores.
        """
        digest = cls.digest(psfs)
        psfs = check_psf_images(psfs)
        delta = check_delta(delta)
        n = int(stamp_pixels)
        n_in = n if input_pixels is None else int(input_pixels)
        if n < 3:
            raise ValueError(f"stamp_pixels must be at least 3, got {stamp_pixels!r}")
        check_margin(n_in, n)
        grid = max(RULE_GRID, n_in + 16 + (n_in % 2)) if grid is None else int(grid)
        targets = per_band_targets(target_sigma, len(psfs))
        blocks, sigmas = [], []
        for psf, target in zip(psfs, targets):
            m, sigma = operator_matrices(psf, n, delta, grid, n_in, target,
                                         dtype=torch.float64 if dtype == torch.float64
                                         else torch.float32)  # (5, out, in)
            blocks.append(torch.from_numpy(m.transpose(2, 0, 1).reshape(n_in * n_in, -1)))
            sigmas.append(sigma)
        return cls(torch.stack(blocks).to(device=device, dtype=dtype), tuple(sigmas), delta, n,
                   n_in, digest)

    @staticmethod
    def digest(psfs: np.ndarray) -> str:
        """Identity of PSF images as given to :meth:`build` (what :attr:`psf_digest` holds)."""
        return hashlib.sha256(check_psf_images(psfs).tobytes()).hexdigest()[:16]

    @property
    def n_bands(self) -> int:
        return int(self.matrices.shape[0])

    def _apply(self, stamps: Tensor) -> Tensor:
        """(N, bands, in, in) -> (5, N, bands, out, out)."""
        n, bands, h, w = stamps.shape
        size = self.stamp_pixels
        flat = stamps.to(self.matrices.dtype).permute(1, 0, 2, 3).reshape(bands, n, h * w)
        out = torch.bmm(flat, self.matrices).reshape(bands, n, len(METACAL_SHEARS), size, size)
        return out.permute(2, 1, 0, 3, 4)

    def check(self, stamps: Tensor) -> None:
        shape = tuple(stamps.shape)
        size = self.input_pixels
        if len(shape) != 4 or shape[1] != self.n_bands or shape[2:] != (size, size):
            raise ValueError(f"stamps must have shape (N, {self.n_bands}, {size}, {size}) for "
                             f"this operator, got {shape}")

    @torch.inference_mode()
    def apply(self, stamps: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The five metacal images (each (N, bands, out, out), on the operator's device) of raw
        stamps (N, bands, in, in); ``noise`` (same shape), an independent noise realisation,
        switches the noise correction on."""
        stamps = torch.as_tensor(stamps, device=self.matrices.device)
        self.check(stamps)
        if not torch.isfinite(stamps).all():
            raise ValueError("stamps contain non-finite pixels")
        images = self._apply(stamps)
        if noise is not None:
            noise = torch.as_tensor(noise, device=self.matrices.device)
            if noise.shape != stamps.shape:
                raise ValueError(f"noise must have the stamps' shape {tuple(stamps.shape)}, got "
                                 f"{tuple(noise.shape)}")
            rotated = self._apply(torch.rot90(noise, 1, dims=(2, 3)))
            images = images + torch.rot90(rotated, -1, dims=(3, 4))
        return {name: images[i] for i, name in enumerate(METACAL_SHEARS)}


def metacal_images(stamps: np.ndarray, psfs: np.ndarray, delta: float = DEFAULT_DELTA,
                   noise: np.ndarray | None = None, margin: int = 0) -> dict[str, np.ndarray]:
    """The five metacal images (float64 numpy, each (N, bands, H - 2 margin, W - 2 margin)) of
    raw stamps, with the fast operator built for this call (see :class:`MetacalOperator` to reuse
    one); ``margin`` pixels are cropped from each side of the result."""
    stamps = check_stamps(stamps)
    psfs = check_psf_images(psfs, stamps.shape[1])
    if stamps.shape[2] != stamps.shape[3]:
        raise ValueError(f"stamps must be square, got {stamps.shape[2]}x{stamps.shape[3]}")
    operator = MetacalOperator.build(psfs, stamps.shape[2] - 2 * margin, delta,
                                     input_pixels=stamps.shape[2], dtype=torch.float64)
    images = operator.apply(torch.from_numpy(stamps),
                            None if noise is None else torch.from_numpy(
                                np.asarray(noise, dtype=np.float64)))
    return {name: image.numpy() for name, image in images.items()}


# -- the reference: GalSim ----------------------------------------------------------------------
def metacal_images_galsim(stamps: np.ndarray, psfs: np.ndarray, pixel_scale: float,
                          delta: float = DEFAULT_DELTA, noise: np.ndarray | None = None
                          ) -> dict[str, np.ndarray]:
    """The same five images as :func:`metacal_images`, made with GalSim objects.

    Each stamp and PSF image becomes an ``InterpolatedImage`` (Lanczos-15, padded by
    :data:`REFERENCE_PAD_FACTOR`); the stamp is
    deconvolved by the PSF, sheared, convolved with the Gaussian of :func:`reconvolution_sigma`
    and drawn with ``method="no_pixel"`` (the PSF images already hold the pixel).
    ``pixel_scale`` (arcsec) only sets GalSim's units: the result does not depend on it.
    """
    stamps = check_stamps(stamps)
    psfs = check_psf_images(psfs, stamps.shape[1])
    delta = check_delta(delta)
    POSITIVE_FLOAT.require(pixel_scale, "pixel_scale")
    images = _galsim_metacal(stamps, psfs, pixel_scale, delta)
    if noise is None:
        return images
    noise = np.asarray(noise, dtype=np.float64)
    if noise.shape != stamps.shape:
        raise ValueError(f"noise must have the stamps' shape {stamps.shape}, got {noise.shape}")
    rotated = _galsim_metacal(np.rot90(noise, 1, axes=(2, 3)), psfs, pixel_scale, delta)
    return {name: image + np.rot90(rotated[name], -1, axes=(2, 3))
            for name, image in images.items()}


def _galsim_metacal(stamps: np.ndarray, psfs: np.ndarray, pixel_scale: float, delta: float
                    ) -> dict[str, np.ndarray]:
    height, width = stamps.shape[2:]
    out = {name: np.empty_like(stamps) for name in METACAL_SHEARS}
    for band, psf_image in enumerate(psfs):
        psf = galsim.InterpolatedImage(galsim.Image(psf_image, scale=pixel_scale),
                                       x_interpolant=INTERPOLANT,
                                       pad_factor=REFERENCE_PAD_FACTOR)
        sigma = reconvolution_sigma(psf_image, delta) * pixel_scale
        inverse, reconvolved = galsim.Deconvolve(psf), galsim.Gaussian(sigma=sigma)
        for n in range(stamps.shape[0]):
            image = galsim.InterpolatedImage(galsim.Image(stamps[n, band], scale=pixel_scale),
                                             x_interpolant=INTERPOLANT,
                                             pad_factor=REFERENCE_PAD_FACTOR)
            intrinsic = galsim.Convolve(image, inverse)
            for name, (s1, s2) in METACAL_SHEARS.items():
                sheared = intrinsic.shear(g1=s1 * delta, g2=s2 * delta)
                out[name][n, band] = galsim.Convolve(sheared, reconvolved).drawImage(
                    nx=width, ny=height, scale=pixel_scale, method="no_pixel",
                    dtype=np.float64).array
    return out


# -- responses and shear -------------------------------------------------------------------------
def metacal_response(e: dict[str, np.ndarray], delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Per-object 2x2 responses (N, 2, 2) from an estimator's (N, 2) outputs on the images."""
    columns = [(np.asarray(e[f"{j}p"], float) - np.asarray(e[f"{j}m"], float)) / (2.0 * delta)
               for j in (1, 2)]
    return np.stack(columns, axis=-1)


def population_shear(e_noshear: np.ndarray, response: np.ndarray) -> np.ndarray:
    """The shear of a population: g_hat = <R>^-1 <e>, from (N, 2) estimates on the noshear
    images and (N, 2, 2) per-object responses (objects with a NaN are left out)."""
    e_noshear, response = np.asarray(e_noshear, float), np.asarray(response, float)
    good = np.isfinite(e_noshear).all(axis=1) & np.isfinite(response).all(axis=(1, 2))
    if not good.any():
        raise ValueError("no object has a finite estimate and response")
    return np.linalg.solve(response[good].mean(axis=0), e_noshear[good].mean(axis=0))
