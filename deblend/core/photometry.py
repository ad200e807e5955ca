"""Forced photometry of the deblended sources: per-band amplitudes of the reconstructions fitted
jointly to the pixels (the step between the networks and the catalogue).

The decoder's reconstruction of a source is its shape and colour as the networks see them, and
its flux is a network output too: regressed towards the training population, it is biased
(the DES model's reconstructions of bright simulated galaxies are 12% faint in r, the
bright real DES galaxy's 13-19% in g r z: README, "Forced photometry"). Holding each
reconstruction's morphology fixed, the flux the pixels ask for is linear in one amplitude per
source and band:

    d_b(p) = sum_k a_kb T_kb(p) + noise,        minimise  sum_p w_b(p) (d_b - sum_k a_kb T_kb)^2

over a_kb >= 0, with T_kb the reconstruction of source k in band b pasted at its detection
(:func:`~deblend.core.stamps.paste_stamp`) and w_b = 1 / variance the inverse noise variance per
pixel (masked pixels, of infinite variance, carry no weight). Overlapping sources are fitted
together, so a blend's light is shared as their templates say (what scarlet does for its SEDs;
here the morphologies are the networks'). The fitted flux of source k in band b is a_kb times
its template's flux. A source whose template is zero in a band, or a band with no weighted
pixel under it (a missing band), keeps a_kb = 1: the pixels say nothing there.

Units are the images' (the model's units: electrons of the model's survey); the templates and the
images share the pixel grid (pixel frame, centres at integers).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import nnls
from scipy.sparse.csgraph import connected_components

from deblend.core.stamps import check_centre, overlap, paste_stamp

RIDGE = 1e-10
"""Relative ridge added to the normal matrix's diagonal, so that two identical templates (two
detections of one source) still give a finite answer (their light shared between them)."""


def fit_amplitudes(images: np.ndarray, variance: np.ndarray, templates: np.ndarray,
                   positions: np.ndarray) -> np.ndarray:
    """(K, bands) non-negative amplitudes a_kb of the (K, bands, S, S) ``templates`` pasted at
    the (K, 2) pixel ``positions`` (x, y; each template centred on the nearest pixel) that best
    fit the (bands, H, W) ``images`` under the per-pixel ``variance`` (same shape; infinite or
    NaN where masked), jointly per band (module docstring)."""
    images = np.asarray(images, np.float64)
    variance = np.asarray(variance, np.float64)
    templates = np.asarray(templates, np.float64)
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    if images.ndim != 3 or variance.shape != images.shape:
        raise ValueError(f"images (bands, H, W) and a variance of the same shape expected, got "
                         f"{images.shape} and {variance.shape}")
    if templates.ndim != 4 or len(templates) != len(positions) \
            or templates.shape[1] != len(images):
        raise ValueError(f"templates (K, {len(images)}, S, S) for {len(positions)} positions "
                         f"expected, got {templates.shape}")
    if not np.isfinite(templates).all():
        raise ValueError("templates hold non-finite pixels")
    weight = np.where(np.isfinite(variance) & (variance > 0), 1.0 / np.where(
        variance > 0, variance, 1.0), 0.0)
    if (~np.isfinite(images) & (weight > 0)).any():
        raise ValueError("images hold non-finite pixels of finite variance (mask them with "
                         "infinite variance)")
    data = np.where(weight > 0, images, 0.0)
    for k, (x, y) in enumerate(positions):
        check_centre(x, y, images.shape, f"positions[{k}]")
    amplitudes = np.ones((len(positions), len(images)))
    if len(positions) == 0:
        return amplitudes
    centres = np.floor(positions + 0.5).astype(int)
    for b in range(len(images)):
        amplitudes[:, b] = _fit_band(data[b], weight[b], templates[:, b], centres)
    return amplitudes


def _fit_band(data: np.ndarray, weight: np.ndarray, templates: np.ndarray,
              centres: np.ndarray) -> np.ndarray:
    """The amplitudes of one band (:func:`fit_amplitudes`): the normal equations over the
    templates' footprints, one group of overlapping templates at a time, each solved by NNLS on
    the Cholesky factor of its normal matrix."""
    height, width = data.shape
    pixel_index = np.arange(height * width).reshape(height, width)
    rows, cols, values = [], [], []
    for k, (template, (cx, cy)) in enumerate(zip(templates, centres)):
        window = overlap(int(cx), int(cy), template.shape, data.shape)
        if window is None:
            continue
        box = template[window[1]]
        keep = (box != 0) & (weight[window[0]] > 0)
        rows.append(pixel_index[window[0]][keep])
        cols.append(np.full(int(keep.sum()), k))
        values.append(box[keep])
    out = np.ones(len(templates))
    if not rows:
        return out
    pixel, source, value = (np.concatenate(v) for v in (rows, cols, values))
    a = sparse.csr_matrix((value, (pixel, source)), shape=(height * width, len(templates)))
    w = weight.ravel()
    gram = (a.T @ a.multiply(w[:, None])).tocsr()
    rhs = a.T @ (w * data.ravel())
    informed = gram.diagonal() > 0
    n_groups, group = connected_components(gram, directed=False)
    for g in range(n_groups):
        members = np.flatnonzero((group == g) & informed)
        if len(members) == 0:
            continue
        normal = gram[members][:, members].toarray()
        normal += RIDGE * np.diag(np.diag(normal))
        try:
            factor = np.linalg.cholesky(normal)
        except np.linalg.LinAlgError:  # not positive definite in floating point: the pixels
            weighted = a[:, members].multiply(np.sqrt(w)[:, None]).tocsr()
            used = np.flatnonzero(weighted.getnnz(axis=1))
            out[members] = nnls(weighted[used].toarray(),
                                np.sqrt(w[used]) * data.ravel()[used])[0]
            continue
        out[members] = nnls(factor.T, np.linalg.solve(factor, rhs[members]))[0]
    return out


def fitted_scene(shape: tuple[int, ...], templates: np.ndarray, positions: np.ndarray,
                 amplitudes: np.ndarray) -> np.ndarray:
    """(bands, H, W) sum of the ``templates`` scaled by their ``amplitudes`` (K, bands) and
    pasted at ``positions`` (the model image the fit describes; raw units)."""
    scene = np.zeros(shape, np.float64)
    for template, a, (x, y) in zip(np.asarray(templates, np.float64),
                                   np.asarray(amplitudes, np.float64),
                                   np.asarray(positions, np.float64).reshape(-1, 2)):
        cx, cy = check_centre(x, y, shape)
        paste_stamp(scene, template * a[:, None, None], cx, cy)
    return scene


__all__ = ["RIDGE", "fit_amplitudes", "fitted_scene"]
