"""Bright blobs in the lung: the solid lesions a flow trained elsewhere gives too little contrast (issue 16; not
in the paper).

A nodule is a solid ball, a consolidation's body a solid lump; the lung's own solid structures are tubes (vessels,
airway walls) and planes (the pleura, fissures). Where the intensity has a bright blob of scale σ, all three
eigenvalues of the scale-normalised Hessian σ²·∇²I are negative; along a tube one of them is near 0, across a plane
two. :func:`bright_blobness` keeps the least negative one's size, σ²·|λ3|, where all three are negative (0
elsewhere), the largest over a few scales: the dot filter of Li, Sone and Doi (Med. Phys. 30(8), 2003, "Selective
enhancement filters for nodules, vessels, and airway walls in two- and three-dimensional CT scans") in its
simplest form. It reads the CT alone, no model, so it transfers to any scanner whose healthy studies calibrate it
(``anatomy-density`` measures it per anatomical band in units of the healthy 99.9th percentile, the ``"tail"``
calibration of :mod:`.anatomy_map`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..lungs import bounding_box

# voxels (3, 5, 7 mm on the 2 mm grid): a Gaussian of scale σ answers best to a ball of radius σ·√3, so these
# cover balls of about 5–12 mm radius; larger lesions answer at 7 mm too, over their rim and body
BLOB_SIGMAS = (1.5, 2.5, 3.5)


def hessian_response(volume: np.ndarray, region: np.ndarray, sigmas, response) -> np.ndarray:
    """The largest over ``sigmas`` (voxels) of ``response(λ)``, λ the eigenvalues (ascending, ``(n, 3)``) of the
    scale-normalised Hessian σ²·∇²I at the voxels of ``region``; float32, NaN elsewhere. The Gaussian derivatives
    are taken on ``region``'s bounding box with 3σ to spare, so what lies beyond the region (the chest wall, the
    mediastinum) shapes the response at its edge as it does on the CT."""
    region = np.asarray(region) != 0
    out = np.full(np.shape(volume), np.nan, np.float32)
    if not region.any():
        return out
    pad = int(np.ceil(3 * max(sigmas))) + 1
    sl = bounding_box(region, pad)
    v, m = np.asarray(volume[sl], np.float32), region[sl]
    best = np.zeros(int(m.sum()), np.float32)
    hessian = np.empty((best.size, 3, 3), np.float32)
    for sigma in sigmas:
        for i in range(3):
            for j in range(i, 3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                d = ndimage.gaussian_filter(v, float(sigma), order=order, mode="nearest")[m]
                hessian[:, i, j] = hessian[:, j, i] = d * np.float32(sigma * sigma)
        np.maximum(best, response(np.linalg.eigvalsh(hessian)), out=best)
    sub = np.full(m.shape, np.nan, np.float32)
    sub[m] = best
    out[sl] = sub
    return out


def bright_blobness(volume: np.ndarray, region: np.ndarray, sigmas=BLOB_SIGMAS) -> np.ndarray:
    """σ²·|λ3| where all eigenvalues of the Hessian at scale σ are negative (λ1 ≤ λ2 ≤ λ3 < 0), else 0, the largest
    over ``sigmas`` (voxels), at the voxels of ``region``; float32, NaN elsewhere (:func:`hessian_response`)."""
    return hessian_response(volume, region, sigmas, lambda lam: np.where(lam[:, 2] < 0, -lam[:, 2], 0.0))
