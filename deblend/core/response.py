"""Response calibration of the stage-3 ellipticity regressor.

A regressor trained with an MSE loss returns the posterior mean of e given the latent mu, which is
shrunk toward the population mean wherever mu is noisy (faint targets, heavy blends): its linear
response to the true ellipticity is well below 1 (about 0.65 on quick), and so is its response to
shear (m ~ -0.4). As image-simulation calibrations do in the field, the response is measured once
on simulations that no network trained on, the dataset's ``calibration`` split, as the
least-squares fit (distortions, pixel frame)

    e_raw = R e_true + c,      R: 2x2 response matrix, c: additive offset,

and removed from every later prediction:  e = R^-1 (e_raw - c).  The calibrated e has unit
response on average over the calibration population (R is an average, not per object), at the
price of more scatter than the shrunk raw output: MSE grows from var(e)(1 - R) to about
var(e)(1/R - 1) per component. Calibrated values are not clipped, so means stay linear; a few
extreme ones can exceed |e| = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_RESPONSE = 0.1
"""Smallest diagonal response worth inverting; below it the regressor has not learned e."""


class ResponseError(ValueError):
    """A response that cannot (or should not) be fitted or inverted."""


@dataclass(frozen=True)
class Response:
    """Linear response ``e_raw = matrix @ e_true + offset`` of an ellipticity estimator."""

    matrix: np.ndarray
    """(2, 2) response R; R[i, j] = d e_raw_i / d e_true_j."""
    offset: np.ndarray
    """(2,) additive offset c."""
    matrix_err: np.ndarray
    """(2, 2) standard errors of R (ordinary least squares)."""
    n: int
    """Number of objects the fit used."""
    scatter: np.ndarray | None = None
    """(2,) standard deviation of ``e_raw`` about ``R e_true + c`` per component (raw units): the
    regressor's own error, which a posterior of its output adds (None in responses stored
    before it was measured)."""

    def calibrate(self, e_raw: np.ndarray) -> np.ndarray:
        """``R^-1 (e_raw - c)`` for ``e_raw`` of shape (N, 2); float32."""
        e_raw = np.asarray(e_raw, dtype=np.float64)
        if e_raw.ndim != 2 or e_raw.shape[1] != 2:
            raise ValueError(f"expected ellipticities of shape (N, 2), got {e_raw.shape}")
        return ((e_raw - self.offset) @ np.linalg.inv(self.matrix).T).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and ints (for checkpoints and metrics JSON)."""
        out = {"matrix": self.matrix.tolist(), "offset": self.offset.tolist(),
               "matrix_err": self.matrix_err.tolist(), "n": self.n}
        if self.scatter is not None:
            out["scatter"] = self.scatter.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Response":
        scatter = d.get("scatter")
        return cls(np.asarray(d["matrix"], np.float64), np.asarray(d["offset"], np.float64),
                   np.asarray(d["matrix_err"], np.float64), int(d["n"]),
                   None if scatter is None else np.asarray(scatter, np.float64))


def fit_response(e_raw: np.ndarray, e_true: np.ndarray) -> Response:
    """Least-squares response of ``e_raw`` (N, 2) to ``e_true`` (N, 2) over finite rows.

    Raises :class:`ResponseError` with fewer than 10 usable objects, or when a diagonal response
    is below :data:`MIN_RESPONSE` (an untrained or broken regressor: inverting it would only
    amplify noise).
    """
    e_raw = np.asarray(e_raw, dtype=np.float64)
    e_true = np.asarray(e_true, dtype=np.float64)
    if e_raw.shape != e_true.shape or e_raw.ndim != 2 or e_raw.shape[1] != 2:
        raise ValueError(f"expected two (N, 2) arrays, got {e_raw.shape} and {e_true.shape}")
    good = np.isfinite(e_raw).all(axis=1) & np.isfinite(e_true).all(axis=1)
    n = int(good.sum())
    if n < 10:
        raise ResponseError(f"cannot fit the response on {n} objects (need at least 10)")
    design = np.hstack([e_true[good], np.ones((n, 1))])          # (n, 3): e1, e2, 1
    coef, _, rank, _ = np.linalg.lstsq(design, e_raw[good], rcond=None)
    if rank < 3:
        raise ResponseError("cannot fit the response: the true ellipticities have no spread")
    residual = e_raw[good] - design @ coef
    sigma2 = (residual ** 2).sum(axis=0) / max(n - 3, 1)         # per output component
    unscaled = np.linalg.inv(design.T @ design)
    matrix = coef[:2].T                                          # R[i, j]: output i, truth j
    matrix_err = np.sqrt(np.outer(sigma2, np.diag(unscaled)[:2]))
    response = Response(matrix, coef[2].copy(), matrix_err, n, np.sqrt(sigma2))
    diagonal = np.diag(matrix)
    if (diagonal < MIN_RESPONSE).any():
        raise ResponseError(f"response R11 = {diagonal[0]:.3f}, R22 = {diagonal[1]:.3f} is below "
                            f"{MIN_RESPONSE}: the regressor has not learned the ellipticity")
    return response
