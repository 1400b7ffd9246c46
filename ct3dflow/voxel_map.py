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


# ------------------------------------------------------------------------------------ decision
@dataclass
class VoxelOperatingPoint:
    """The decision of the voxel map: σ (voxels), τ (|z| against the healthy depth bands), v_min and T (cm³),
    with the healthy :class:`DepthReference` it is relative to and how the map was computed (``part``,
    ``stride``). Stored as ``operating_point.json`` with ``"map": "voxel"``, which tells it apart from the
    paper's patch-map :class:`ct3dflow.scoring.OperatingPoint`."""

    sigma_vox: float
    tau_z: float
    v_min_cm3: float
    threshold_cm3: float
    reference: DepthReference
    part: str = "top_latent"
    stride: int = 6

    def z_map(self, voxel_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.reference.z(smooth_in_mask(voxel_map, mask, self.sigma_vox), mask)

    def abnormal(self, voxel_map: np.ndarray, mask: np.ndarray, spacing):
        """``(abnormal_volume_cm3, abnormal mask, z map)`` of one study."""
        z = self.z_map(voxel_map, mask)
        vol, ab = typicality_volume(z, mask, self.tau_z, self.v_min_cm3, spacing)
        return vol, ab, z

    def to_dict(self) -> dict:
        return {"map": "voxel", "part": self.part, "stride": int(self.stride), "sigma_vox": float(self.sigma_vox),
                "tau_z": float(self.tau_z), "v_min_cm3": float(self.v_min_cm3),
                "threshold_cm3": float(self.threshold_cm3), "reference": self.reference.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> VoxelOperatingPoint:
        if d.get("map") != "voxel":
            raise ValueError("not a voxel-map operating point (no \"map\": \"voxel\"); it is the paper's patch map")
        return cls(float(d["sigma_vox"]), float(d["tau_z"]), float(d["v_min_cm3"]), float(d["threshold_cm3"]),
                   DepthReference.from_dict(d["reference"]), str(d.get("part", "top_latent")),
                   int(d.get("stride", 6)))


DEFAULT_SPACE = {"sigma_vox": [1.0, 2.0], "tau_z": [2.0, 3.0, 4.0, 5.0, 6.0], "v_min_cm3": [0.0, 1.0, 5.0]}


def voxel_grid_search(maps, masks, spacings, labels, space: dict | None = None, part: str = "top_latent",
                      stride: int = 6):
    """σ, τ, v_min on validation studies, as :func:`ct3dflow.evaluation.grid_search` does for the patch map.

    ``maps`` are the raw voxel maps of :func:`voxel_log_p_volume`; the healthy reference is refitted for each
    σ from the studies with label 0 among them. Objective: validation AUROC of the abnormal volume, F1
    breaking ties; T is read off the validation ROC (best F1). Returns ``(VoxelOperatingPoint, trials)``.
    """
    import pandas as pd

    from .metrics import choose_threshold, patient_metrics

    space = {**DEFAULT_SPACE, **(space or {})}
    y = np.asarray(labels, dtype=int)
    masks = [np.asarray(m) != 0 for m in masks]
    healthy = np.flatnonzero(y == 0)
    if healthy.size == 0 or (y == 1).sum() == 0:
        raise ValueError("the validation split needs healthy and abnormal studies to choose an operating point")
    trials, refs = [], {}
    for sigma in space["sigma_vox"]:
        smoothed = [smooth_in_mask(v, m, sigma) for v, m in zip(maps, masks, strict=True)]
        refs[sigma] = ref = DepthReference.fit([smoothed[i] for i in healthy], [masks[i] for i in healthy])
        zs = [ref.z(s, m) for s, m in zip(smoothed, masks, strict=True)]
        for tau in space["tau_z"]:
            for vmin in space["v_min_cm3"]:
                vols = np.array([typicality_volume(z, m, tau, vmin, sp)[0]
                                 for z, m, sp in zip(zs, masks, spacings, strict=True)])
                thr = float(np.clip(choose_threshold(y, vols, criterion="f1"), 0.0, np.inf))
                m = patient_metrics(y, vols, thr)
                auroc = 0.5 if not np.isfinite(m["auroc"]) else float(m["auroc"])
                trials.append({"sigma_vox": float(sigma), "tau_z": float(tau), "v_min_cm3": float(vmin),
                               "threshold_cm3": thr, "auroc": auroc, "f1": float(m["f1"]),
                               "accuracy": float(m["accuracy"]), "objective": auroc + 1e-3 * float(m["f1"])})
    df = pd.DataFrame(trials).sort_values("objective", ascending=False, kind="stable").reset_index(drop=True)
    b = df.iloc[0]
    op = VoxelOperatingPoint(float(b["sigma_vox"]), float(b["tau_z"]), float(b["v_min_cm3"]),
                             float(b["threshold_cm3"]), refs[float(b["sigma_vox"])], part, int(stride))
    return op, df
