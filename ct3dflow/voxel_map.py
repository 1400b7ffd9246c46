"""A voxel-level alternative to the paper's Log P map: local log-likelihood terms, depth-aware z-scores.

The paper gives each inference window one number, the patch log-likelihood ℓ_p, and blurs those numbers
into the Log P map (:mod:`ct3dflow.scoring`). On our phantoms that map does not separate sick from healthy
studies with a small CPU-trained model (docs/RESULTS.md): ℓ_p sums over every voxel of a window, so a
lesion of a few cm³ moves it less than the anatomy in the window does (outside air, chest wall), and the
full likelihood of a flow rewards smooth tissue.

This module keeps the flow and the inference grid, and changes what is mapped:

1. :func:`voxel_log_p_volume` — for every window the per-voxel terms of :func:`ct3dflow.flow.local.
   local_log_prob` (by default the coarsest latent, ``part="top_latent"``), averaged over the windows that
   cover a voxel, so each voxel's value comes from the patches around it and not from a 24³ sum.
2. :class:`DepthReference` — healthy lungs are not alike from the pleura inwards (partial-volume with the
   chest wall at the edge), so the healthy median and spread are taken per band of depth into the
   permissive lung mask (distance to its border, in voxels), from healthy *validation* studies only.
3. :func:`typicality_volume` — voxels whose smoothed map is atypical on *either* side, ``|z| > τ``,
   26-connected components under ``v_min`` dropped; the study is abnormal when that volume exceeds T.
   Two-sided, because the coarse latent of ground glass is *more* likely than healthy lung (a typicality
   test in the sense of Nalisnick et al. 2019).

The choice of σ, τ, v_min and T follows the paper's protocol (validation split only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .patches import extract_patches
from .scoring import abnormal_volume, scoring_windows

DEFAULT_DEPTH_BINS = (0.0, 2.0, 4.0, 6.0, 9.0, 13.0)  # voxels from the permissive-mask border


def voxel_log_p_volume(
    glow,
    volume: np.ndarray,
    permissive: np.ndarray,
    size: int,
    stride: int,
    part: str = "top_latent",
    batch_size: int = 32,
    device="cpu",
) -> np.ndarray:
    """Per-voxel local log-likelihood terms of ``volume`` (float32, NaN where no window reaches).

    Windows are those of :func:`ct3dflow.scoring.patch_log_likelihoods` (the grid of ``size``/``stride``,
    only windows touching ``permissive``); a voxel's value is the mean over the windows that cover it.
    """
    import torch

    from .flow.local import local_log_prob

    vol, vol_p, before, corners = scoring_windows(volume, permissive, size, stride)
    total = np.zeros(vol_p.shape, dtype=np.float64)
    count = np.zeros(vol_p.shape, dtype=np.int32)
    glow.eval()
    for s in range(0, len(corners), batch_size):
        c = corners[s : s + batch_size]
        x = torch.from_numpy(extract_patches(vol_p, c, size)[:, None]).to(device)
        maps = local_log_prob(glow, x, part=part).to("cpu", torch.float64).numpy()
        for (z, y, w), m in zip(c, maps, strict=True):
            total[z : z + size, y : y + size, w : w + size] += m
            count[z : z + size, y : y + size, w : w + size] += 1
    out = np.full(vol_p.shape, np.nan, dtype=np.float32)
    np.divide(total, count, out=out, where=count > 0, casting="unsafe")
    crop = tuple(slice(b, b + n) for b, n in zip(before, vol.shape, strict=True))
    return out[crop]


def smooth_in_mask(voxel_map: np.ndarray, mask: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Normalised Gaussian convolution of ``voxel_map`` inside ``mask`` (NaN outside the mask)."""
    m = (np.asarray(mask) != 0) & np.isfinite(voxel_map)
    if sigma_vox <= 0:
        return np.where(m, voxel_map, np.nan).astype(np.float32)
    w = m.astype(np.float32)
    num = ndimage.gaussian_filter(np.where(m, voxel_map, 0.0).astype(np.float32), sigma_vox)
    den = ndimage.gaussian_filter(w, sigma_vox)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m, num / np.maximum(den, 1e-6), np.nan).astype(np.float32)


def depth_bands(mask: np.ndarray, bins=DEFAULT_DEPTH_BINS) -> np.ndarray:
    """Band index (0 … len(bins)−1) of each voxel's depth into ``mask`` (−1 outside)."""
    m = np.asarray(mask) != 0
    depth = ndimage.distance_transform_edt(m)
    band = np.digitize(depth, np.asarray(bins, dtype=np.float64)[1:])
    return np.where(m, band, -1)


@dataclass
class DepthReference:
    """Healthy median and robust spread (1.4826·MAD) of a smoothed voxel map, per depth band."""

    bins: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTH_BINS))
    median: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, maps, masks, bins=DEFAULT_DEPTH_BINS) -> DepthReference:
        """From the smoothed maps and permissive masks of healthy validation studies."""
        per_band: list[list[np.ndarray]] = [[] for _ in bins]
        for v, m in zip(maps, masks, strict=True):
            band = depth_bands(m, bins)
            for b in range(len(bins)):
                sel = (band == b) & np.isfinite(v)
                per_band[b].append(np.asarray(v[sel], dtype=np.float64))
        med, scale = [], []
        for b, parts in enumerate(per_band):
            vals = np.concatenate(parts) if parts else np.zeros(0)
            if vals.size < 10:
                raise ValueError(f"depth band {b} has {vals.size} healthy voxels; need more healthy studies")
            mu = float(np.median(vals))
            sd = float(1.4826 * np.median(np.abs(vals - mu)))
            med.append(mu)
            scale.append(sd if sd > 0 else float(vals.std() or 1.0))
        return cls(list(map(float, bins)), med, scale)

    def z(self, smoothed: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """z-score of every voxel against the healthy band at its depth (NaN outside ``mask``)."""
        band = depth_bands(mask, self.bins)
        med = np.asarray(self.median)[np.clip(band, 0, None)]
        scale = np.asarray(self.scale)[np.clip(band, 0, None)]
        return np.where(band >= 0, (smoothed - med) / scale, np.nan).astype(np.float32)

    def to_dict(self) -> dict:
        return {"bins": self.bins, "median": self.median, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> DepthReference:
        return cls([float(v) for v in d["bins"]], [float(v) for v in d["median"]], [float(v) for v in d["scale"]])


def typicality_volume(z_map: np.ndarray, mask: np.ndarray, tau: float, v_min_cm3: float, spacing):
    """Volume (cm³) and mask of voxels in ``mask`` with ``|z| > τ``, components under ``v_min`` dropped."""
    with np.errstate(invalid="ignore"):
        neg_abs = np.where(np.isfinite(z_map), -np.abs(z_map), np.inf)
    return abnormal_volume(neg_abs, mask, -float(tau), v_min_cm3, spacing)
