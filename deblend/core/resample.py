"""Survey images moved onto the model's pixel grid, with GalSim.

A band whose pixels differ from the model's (another pixel scale: DES 0.263", HSC 0.168"; or
another exposure's pointing, rotation or CCD) is resampled: its pixel values (counts per pixel)
become a ``galsim.InterpolatedImage`` in the band's local WCS at its centre, and that profile is
drawn on the output grid with ``method="no_pixel"``. The quintic interpolant kept a galaxy's
flux and adaptive moments from 0.168" to 0.2" best of GalSim's (flux, size and e to 3e-4;
Lanczos-3 to 1e-3, cubic to 1.4e-3; tests/test_resample.py). The image
already holds the pixel response, and its effective PSF is resampled the same way
(:meth:`BandResampler.psf`), so image and PSF stay consistent. Counts are kept (an object's flux
is the same on both grids).

**Output grid** (:class:`OutputGrid`): the reference band's pixel axes and centre at the model's
pixel scale. Output pixel p (0-based, x = column) is reference pixel
``c_ref + (p - c_out) * s`` with ``s = model scale / reference scale``; its astropy WCS is the
reference WCS with CRPIX moved and the CD matrix scaled by s, exact (a TPV distortion acts on
the intermediate coordinates after the CD matrix, which do not change; SIP is refused).

**Geometry.** Each band is placed with its centre's exact sky position; within the band the
local WCS at its centre is used, an affine approximation that is refused
(:data:`AFFINE_TOLERANCE_PIXELS`) when the image is large enough for the true WCS to depart from
it: split such an image into smaller tiles.

**Noise.** Interpolation lowers the per-pixel variance and correlates neighbouring pixels. The
variance map is the input variance carried to the output grid (linear interpolation, as a
field) times the variance of unit white noise resampled the same way (measured, over the band's
own sub-pixel phases). Its correlation between pixels is not modelled.

**Masks and edges.** A masked input pixel reaches every output pixel whose kernel touches it,
and output pixels whose kernel runs off the input image have no data: both are masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import galsim
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

INTERPOLANT = "quintic"
KERNEL_RADIUS = 3
"""Input pixels on each side that the quintic interpolant reads."""
AFFINE_TOLERANCE_PIXELS = 0.02
"""Largest offset (input pixels) at the image corners between a band's WCS and its local
affine approximation at the centre."""
NOISE_SEED = 20261205
"""Seed of the white noise whose resampled variance scales the variance map."""


def galsim_wcs(header: fits.Header, where: str) -> galsim.BaseWCS:
    """The GalSim WCS of a FITS header (TAN, TPV, SIP...); ValueError naming ``where``."""
    try:
        return galsim.GSFitsWCS(header=header)
    except Exception as exc:  # galsim raises GalSimError, KeyError... on odd headers
        raise ValueError(f"cannot read the WCS of {where} with GalSim: {type(exc).__name__}: "
                         f"{exc}") from exc


def _centre(shape: tuple[int, int]) -> np.ndarray:
    """0-based (x, y) of the centre of an image of ``shape`` (rows, columns)."""
    return np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])


def _galsim_position(xy: np.ndarray) -> galsim.PositionD:
    """GalSim's 1-based image position of 0-based (x, y)."""
    return galsim.PositionD(float(xy[0]) + 1.0, float(xy[1]) + 1.0)


def _jacobian(wcs: galsim.BaseWCS, xy: np.ndarray) -> np.ndarray:
    """2x2 matrix d(u, v)/d(x, y) (arcsec per pixel) of ``wcs`` at 0-based (x, y)."""
    return wcs.local(_galsim_position(xy)).getMatrix()


def check_affine(wcs: galsim.BaseWCS, shape: tuple[int, int], where: str) -> None:
    """Refuse an image whose corners the local affine WCS at its centre misplaces by more
    than :data:`AFFINE_TOLERANCE_PIXELS`."""
    centre = _centre(shape)
    centre_coord = wcs.toWorld(_galsim_position(centre))
    inverse = np.linalg.inv(_jacobian(wcs, centre))
    worst = 0.0
    for x in (0.0, shape[1] - 1.0):
        for y in (0.0, shape[0] - 1.0):
            u, v = centre_coord.project(wcs.toWorld(_galsim_position(np.array([x, y]))),
                                        projection="gnomonic")
            affine = centre + inverse @ np.array([u / galsim.arcsec, v / galsim.arcsec])
            worst = max(worst, float(np.hypot(*(affine - [x, y]))))
    if worst > AFFINE_TOLERANCE_PIXELS:
        raise ValueError(f"{where}: its WCS departs from an affine one by {worst:.3f} pixels "
                         f"at the corners (more than {AFFINE_TOLERANCE_PIXELS}): split the "
                         f"image into smaller tiles to resample it")


@dataclass(frozen=True)
class OutputGrid:
    """The model's pixel grid over a reference band's image (module docstring)."""

    shape: tuple[int, int]
    jacobian: np.ndarray
    """d(u, v)/d(x, y), arcsec per output pixel."""
    centre: galsim.CelestialCoord
    """Sky position of the output image's centre (that of the reference image)."""
    wcs: WCS
    """astropy WCS of the output pixels."""
    pixel_scale: float
    """arcsec per output pixel."""

    @classmethod
    def over(cls, header: fits.Header, shape: tuple[int, int], pixel_scale: float,
             where: str) -> "OutputGrid":
        """The grid at ``pixel_scale`` (arcsec) over the image of ``header`` and ``shape``."""
        wcs = galsim_wcs(header, where)
        check_affine(wcs, shape, where)
        centre = _centre(shape)
        local = _jacobian(wcs, centre)
        reference_scale = float(np.sqrt(abs(np.linalg.det(local))))
        s = pixel_scale / reference_scale
        out_shape = (max(1, int(round(shape[0] / s))), max(1, int(round(shape[1] / s))))
        out_centre = _centre(out_shape)
        astropy_wcs = WCS(header).deepcopy()
        if astropy_wcs.sip is not None:
            raise ValueError(f"{where}: SIP distortion acts on pixel coordinates and cannot be "
                             f"carried to a resampled grid; give a TAN or TPV WCS")
        crpix0 = np.asarray(astropy_wcs.wcs.crpix, np.float64) - 1.0
        astropy_wcs.wcs.crpix = out_centre + (crpix0 - centre) / s + 1.0
        if astropy_wcs.wcs.has_cd():
            astropy_wcs.wcs.cd = astropy_wcs.wcs.cd * s
        else:
            astropy_wcs.wcs.cdelt = astropy_wcs.wcs.cdelt * s
        astropy_wcs.pixel_shape = (out_shape[1], out_shape[0])
        return cls(out_shape, local * s, wcs.toWorld(_galsim_position(centre)), astropy_wcs,
                   pixel_scale)


class BandResampler:
    """One band's pixels -> the :class:`OutputGrid` (module docstring)."""

    def __init__(self, wcs: galsim.BaseWCS, shape: tuple[int, int], grid: OutputGrid,
                 where: str) -> None:
        check_affine(wcs, shape, where)
        self.shape, self.grid, self.where = shape, grid, where
        self.centre = _centre(shape)
        self.local = _jacobian(wcs, self.centre)
        u, v = grid.centre.project(wcs.toWorld(_galsim_position(self.centre)),
                                   projection="gnomonic")
        # where the band's centre falls, in output pixels from the output centre
        self.offset = np.linalg.solve(grid.jacobian, [u / galsim.arcsec, v / galsim.arcsec])
        self._to_native = np.linalg.solve(self.local, grid.jacobian)
        self._noise_factor: float | None = None

    def native_position(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """0-based input pixel (x, y) under output pixel (x, y): (2, ...) array."""
        p = np.stack(np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64)))
        d = p - (_centre(self.grid.shape) + self.offset).reshape((2,) + (1,) * (p.ndim - 1))
        return self.centre.reshape((2,) + (1,) * (p.ndim - 1)) + np.tensordot(
            self._to_native, d, axes=1)

    def profile(self, values: np.ndarray, interpolant: str = INTERPOLANT
                ) -> galsim.InterpolatedImage:
        """Values on the input grid as a GalSim profile in the band's local WCS, its origin at
        the image's centre (counts per pixel: ``normalization="flux"``)."""
        image = galsim.Image(np.ascontiguousarray(values, np.float64),
                             wcs=galsim.JacobianWCS(*self.local.ravel()))
        return galsim.InterpolatedImage(image, x_interpolant=interpolant,
                                        calculate_stepk=False, calculate_maxk=False)

    def draw(self, values: np.ndarray, shape: tuple[int, int] | None = None,
             interpolant: str = INTERPOLANT) -> np.ndarray:
        """Counts-per-pixel ``values`` (input grid; masked pixels must be 0) drawn on an output
        image of ``shape`` (default: the grid's) centred like the output grid (the band's
        centre at :attr:`offset` from its centre)."""
        shape = self.grid.shape if shape is None else shape
        out = galsim.Image(shape[1], shape[0], wcs=galsim.JacobianWCS(*self.grid.jacobian.ravel()))
        offset = self.offset + _centre(self.grid.shape) - _centre(shape)
        self.profile(values, interpolant).drawImage(out, method="no_pixel", offset=tuple(offset))
        return out.array.astype(np.float64)

    @property
    def area_ratio(self) -> float:
        """Output over input pixel area."""
        return float(abs(np.linalg.det(self.grid.jacobian) / np.linalg.det(self.local)))

    def noise_factor(self) -> float:
        """Variance of unit white noise after resampling (interior pixels)."""
        if self._noise_factor is None:
            noise = np.random.default_rng(NOISE_SEED).standard_normal(self.shape)
            out = self.draw(noise)
            inside = ~self.outside
            self._noise_factor = float(np.var(out[inside])) if inside.sum() > 100 else \
                self.area_ratio ** 2
        return self._noise_factor

    def variance(self, variance: np.ndarray, masked: np.ndarray) -> np.ndarray:
        """Per-pixel variance (input units squared) -> output variance, inf where masked or
        off the image (module docstring)."""
        field = np.where(masked, np.median(variance[~masked]), variance)
        carried = self.draw(field, interpolant="linear") / self.area_ratio
        out = np.clip(carried, 0.0, None) * self.noise_factor()
        return np.where(self.masked(masked), np.inf, out)

    @cached_property
    def grid_native(self) -> np.ndarray:
        """(2, H, W) input pixel (x, y) under every output pixel (:meth:`native_position`)."""
        ys, xs = np.indices(self.grid.shape)
        return self.native_position(xs, ys)

    @cached_property
    def outside(self) -> np.ndarray:
        """Output pixels whose kernel runs off the input image."""
        x, y = self.grid_native
        r = KERNEL_RADIUS
        return ((x < r - 0.5) | (y < r - 0.5) | (x > self.shape[1] - r - 0.5)
                | (y > self.shape[0] - r - 0.5))

    def masked(self, masked: np.ndarray) -> np.ndarray:
        """Output pixels that a masked input pixel reaches, or off the image."""
        reach = ndimage.binary_dilation(masked, np.ones((2 * KERNEL_RADIUS + 1,) * 2, bool))
        x, y = self.grid_native
        col = np.clip(np.rint(x).astype(int), 0, self.shape[1] - 1)
        row = np.clip(np.rint(y).astype(int), 0, self.shape[0] - 1)
        return reach[row, col] | self.outside

    def psf(self, native: np.ndarray, pixels: int) -> np.ndarray:
        """A unit-sum effective PSF image on the input grid (odd square, centred on its central
        pixel) -> the same on the output grid, ``pixels`` wide (odd)."""
        out = self.profile(native).drawImage(
            nx=pixels, ny=pixels, wcs=galsim.JacobianWCS(*self.grid.jacobian.ravel()),
            method="no_pixel").array.astype(np.float64)
        return out / out.sum()


def resample_to_scale(values: np.ndarray, scale_in: float, scale_out: float,
                      shape: tuple[int, int] | None = None) -> np.ndarray:
    """An image on square ``scale_in`` pixels (arcsec) drawn on square ``scale_out`` pixels,
    same centre and axes, counts kept; ``shape`` of the output (default: the same field)."""
    header = fits.Header({"NAXIS": 2, "NAXIS1": values.shape[1], "NAXIS2": values.shape[0],
                          "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                          "CRPIX1": (values.shape[1] + 1) / 2.0,
                          "CRPIX2": (values.shape[0] + 1) / 2.0, "CRVAL1": 150.0,
                          "CRVAL2": 2.0, "CD1_1": -scale_in / 3600.0, "CD1_2": 0.0,
                          "CD2_1": 0.0, "CD2_2": scale_in / 3600.0})
    grid = OutputGrid.over(header, values.shape, scale_out, "image")
    band = BandResampler(galsim_wcs(header, "image"), values.shape, grid, "image")
    return band.draw(values, shape)
