"""The paper's map: one log-likelihood per window, blurred into the Log P map (DESIGN §4.8).

* **Predictor**: ``model.log_prob`` of every scored window (:class:`PatchScores`); any model with that
  method works, the flow's exact likelihood or a baseline's proxy (the AE row of Table 1).
* **Merger** (the Log P map): ``LogP(v) = Σp G_σ(v − c_p) ℓ_p / Σp G_σ(v − c_p)``, computed by trilinearly
  splatting ``ℓ_p`` and ``1`` at the window centres into two volumes, Gaussian-filtering both (truncated
  at ``truncate·σ``) and dividing. Where the denominator is (numerically) zero — farther than the
  truncation radius from every centre — the value of the *nearest* centre is used, the σ → 0 limit. The
  map is therefore a convex combination of window values everywhere, NaN outside the permissive mask.
* **Reference and level**: τ is in standard deviations of the window log-likelihoods of the healthy
  validation studies (all their scored windows pooled): ``level = mean + τ_z · sd``. Window values do not
  depend on σ, so neither does the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .grid import WindowGrid, window_grid
from .kind import DEFAULT_PRECISION, MapKind, use_bf16


@dataclass
class PatchScores:
    """Log-likelihoods of the scored windows of one study.

    ``corners`` (m, 3) int64 and ``centres`` (m, 3) float64 are in the study's own voxel coordinates
    ``(z, y, x)`` (corners may be negative where the volume was padded); ``centres = corners + (size − 1)/2``.
    ``log_p`` (m,) float64 is the natural-log density of each window; ``shape`` the study's shape.
    """

    corners: np.ndarray
    centres: np.ndarray
    log_p: np.ndarray
    size: int = 48
    stride: int = 38
    shape: tuple = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(len(self.log_p))

    def save(self, path) -> Path:
        """A compressed ``.npz`` (no pickles); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez_compressed(f, corners=np.asarray(self.corners, np.int64),
                                centres=np.asarray(self.centres, np.float64), log_p=np.asarray(self.log_p, np.float64),
                                size=int(self.size), stride=int(self.stride), shape=np.asarray(self.shape, np.int64))
        return path

    @classmethod
    def load(cls, path) -> PatchScores:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(np.asarray(z["corners"], np.int64).reshape(-1, 3),
                       np.asarray(z["centres"], np.float64).reshape(-1, 3),
                       np.asarray(z["log_p"], np.float64).reshape(-1), int(z["size"]), int(z["stride"]),
                       tuple(int(s) for s in np.asarray(z["shape"]).reshape(-1)))


def patch_log_likelihoods(model, grid: WindowGrid, batch_size: int = 16, device="cpu",
                          bf16: bool = False) -> PatchScores:
    """``model.log_prob`` of every window of ``grid`` (in eval mode, no gradients; the mode is restored).
    ``bf16``: under bf16 autocast (a flow keeps its log-dets and latent in float32; an autoencoder's squared
    error is summed in float32)."""
    import torch

    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    out = np.empty(len(grid), dtype=np.float64)
    i = 0
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(bf16)):
            for c, x in grid.batches(batch_size):
                lp = model.log_prob(torch.from_numpy(x).to(device)).float()
                out[i : i + len(c)] = lp.detach().to("cpu", torch.float64).numpy().reshape(-1)
                i += len(c)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return PatchScores(grid.study_corners, grid.study_centres, out, grid.size, grid.stride, grid.shape)


# ------------------------------------------------------------------------------------------ the map
def _finite_log_p(log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace −inf by the lowest finite value, +inf by the highest; returns (values, usable)."""
    lp = np.asarray(log_p, dtype=np.float64).reshape(-1).copy()
    usable = ~np.isnan(lp)
    fin = np.isfinite(lp)
    if fin.any():
        lp[np.isneginf(lp)] = lp[fin].min()
        lp[np.isposinf(lp)] = lp[fin].max()
    else:
        usable &= False
    return lp, usable


def _splat(shape, centres: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear splat of ``values`` and of unit weights at ``centres`` (clipped into the volume)."""
    num = np.zeros(int(np.prod(shape)), dtype=np.float64)
    den = np.zeros_like(num)
    c = np.clip(centres, 0, np.asarray(shape, dtype=np.float64) - 1)
    f = np.floor(c).astype(np.int64)
    t = c - f
    hi = np.asarray(shape, dtype=np.int64) - 1
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                d = np.array([dz, dy, dx])
                idx = np.minimum(f + d, hi)
                w = np.prod(np.where(d == 1, t, 1.0 - t), axis=1)
                flat = np.ravel_multi_index(idx.T, shape)
                np.add.at(num, flat, w * values)
                np.add.at(den, flat, w)
    return num.reshape(shape), den.reshape(shape)


def log_p_map(shape, centres: np.ndarray, log_p: np.ndarray, sigma_vox: float, mask: np.ndarray | None = None,
              truncate: float = 4.0) -> np.ndarray:
    """The Log P map on a ``shape`` (z, y, x) grid, float32 (module docstring). Voxels beyond the truncation
    radius of every centre get the nearest centre's value; voxels outside ``mask`` (when given) are NaN;
    −inf window values count as the lowest finite one, NaN ones are ignored."""
    shape = tuple(int(s) for s in shape)
    lp, usable = _finite_log_p(log_p)
    cen = np.asarray(centres, dtype=np.float64).reshape(-1, 3)[usable]
    lp = lp[usable]
    if len(lp) == 0:
        raise ValueError("no finite patch log-likelihood to build a Log P map from")
    num, den = _splat(shape, cen, lp)
    if sigma_vox and sigma_vox > 0:
        kw = dict(sigma=float(sigma_vox), mode="constant", cval=0.0, truncate=float(truncate))
        num = ndimage.gaussian_filter(num, **kw)
        den = ndimage.gaussian_filter(den, **kw)
    floor = 1e-12 * math.exp(-0.5 * float(truncate) ** 2)  # underflow guard: one patch at the truncation radius
    ok = den > floor
    out = np.empty(shape, dtype=np.float64)
    out[ok] = num[ok] / den[ok]
    if not ok.all():  # nearest window centre, via a distance transform of the (rounded) centre voxels
        seed_num = np.zeros(shape, dtype=np.float64)
        seed_cnt = np.zeros(shape, dtype=np.float64)
        r = np.clip(np.rint(cen).astype(np.int64), 0, np.asarray(shape) - 1)
        flat = np.ravel_multi_index(r.T, shape)
        np.add.at(seed_num.reshape(-1), flat, lp)
        np.add.at(seed_cnt.reshape(-1), flat, 1.0)
        idx = ndimage.distance_transform_edt(seed_cnt == 0, return_distances=False, return_indices=True)
        out[~ok] = (seed_num[tuple(idx)] / seed_cnt[tuple(idx)])[~ok]
    np.clip(out, lp.min(), lp.max(), out=out)  # keep the convex-combination bound exactly
    out = out.astype(np.float32)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != shape:
            raise ValueError(f"mask {m.shape} does not match map shape {shape}")
        out[m == 0] = np.nan
    return out


def healthy_reference(scores) -> dict:
    """``{"mean", "std"}`` of the pooled finite window log-likelihoods of healthy validation studies."""
    vals = [np.asarray(s.log_p if isinstance(s, PatchScores) else s, dtype=np.float64).ravel() for s in scores]
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise ValueError("need at least two finite healthy patch log-likelihoods for the reference: the validation "
                         "split needs healthy studies that scored ok")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1))}


# ------------------------------------------------------------------------------------------ the kind
class PatchMap(MapKind):
    name = "patch"
    title = "the paper's Log P map: window log-likelihoods blurred with σ, τ in healthy window sd"
    score_file = "patch_scores.npz"
    map_file = "log_p_map.nii.gz"
    space = {"sigma_vox": [1.0, 2.0, 4.0, 8.0], "tau_z": [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5],
             "v_min_cm3": [0.0, 0.5, 2.0]}
    map_params = ("sigma_vox",)
    tie_break = (("sigma_vox", "asc"), ("tau_z", "asc"), ("v_min_cm3", "desc"))  # lower τ flags less

    def settings(self, scoring: dict, patch_size: int) -> dict:
        stride = scoring.get("stride") or max(1, int(patch_size) - 10)  # the paper's 10-voxel overlap
        return {"patch_size": int(patch_size), "stride": int(stride),
                "precision": str(scoring.get("precision") or DEFAULT_PRECISION),
                "batch_size": int(scoring.get("batch_size") or 16)}

    def score(self, predictor, study, settings: dict, device="cpu") -> PatchScores:
        grid = window_grid(study.volume, study.permissive, settings["patch_size"], settings["stride"])
        return patch_log_likelihoods(predictor, grid, settings.get("batch_size", 16), device,
                                     use_bf16(settings.get("precision", DEFAULT_PRECISION), device))

    def load_score(self, path) -> PatchScores:
        return PatchScores.load(path)

    def summary(self, score: PatchScores) -> dict:
        fin = score.log_p[np.isfinite(score.log_p)]
        return {"n_patches": len(score), "log_p_min": float(fin.min()) if fin.size else float("nan"),
                "log_p_mean": float(fin.mean()) if fin.size else float("nan")}

    def score_settings(self, score: PatchScores) -> dict:
        return {"patch_size": int(score.size), "stride": int(score.stride)}

    def fit_reference(self, scores, masks, params) -> dict:
        return healthy_reference(scores)

    def atypicality(self, score: PatchScores, mask, params, reference) -> np.ndarray:
        return log_p_map(np.shape(mask), score.centres, score.log_p, float(params["sigma_vox"]), mask=mask)

    def level(self, params, reference) -> float:
        return float(reference["mean"] + float(params["tau_z"]) * reference["std"])

    def nifti_fill(self, atypicality: np.ndarray) -> float:
        # outside the mask the map is NaN, which SimpleITK's reader turns into 0 (a "likely" value): store the minimum
        return float(np.nanmin(atypicality)) if np.isfinite(atypicality).any() else 0.0
