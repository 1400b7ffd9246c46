"""The voxel-level map (not in the paper): the flow's coarsest latent mapped per voxel, against a healthy
reference that knows how deep into the lung a voxel lies. The ``anatomy`` kind
(:mod:`.anatomy_map`) is this map with a reference that also knows where in the lung a voxel lies, and the
platform's default, ``anatomy-density`` (:mod:`.density_map`), adds the lung's own density, blobs and bite.

The paper gives each window one number and blurs those numbers (:mod:`.patch_map`). On our phantoms that
map does not separate sick from healthy studies (docs/RESULTS.md): a window's log-likelihood sums every
voxel of it, so a lesion of a few cm³ moves it less than the anatomy in the window (outside air, chest
wall) does, and the full likelihood of a flow rewards smooth tissue. This kind keeps the flow and the
grid and changes what is mapped:

* **Predictor**: for every window, ``−½‖ε_L‖²`` of the coarsest latent, per cell of ``(2^L)³`` voxels
  (:func:`ct3dflow.flow.local.top_latent_energy`; the fast encoder on CUDA), or every local term
  (``part="all"``, :func:`ct3dflow.flow.local.local_log_prob`).
* **Merger**: a voxel's value is the mean over the windows that cover it (``scoring.merge: mean``), or
  their mean weighted by a Gaussian around each window's centre (``gaussian``), accumulated in torch on
  the scoring device (:func:`merge_windows`).
* **Reference**: healthy lungs are not alike from the pleura inwards (the pleura and chest wall share
  coarse cells with lung), so the healthy median and 1.4826·MAD of the σ-smoothed map are kept per band
  of depth into the permissive mask (:class:`DepthReference`), from healthy *validation* studies only.
* **Atypicality**: ``−|z|``, two-sided, because the coarse latent of ground glass can be *more* likely
  than healthy lung (a typicality test, Nalisnick et al. 2019); abnormal where ``|z| > τ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..lungs import bounding_box
from .grid import WindowGrid, window_grid
from .kind import DEFAULT_PRECISION, PRECISIONS, MapKind, use_bf16  # noqa: F401 - re-exported

DEFAULT_DEPTH_BINS = (0.0, 2.0, 4.0, 6.0, 9.0, 13.0)  # voxels from the permissive-mask border
DEFAULT_STRIDE = 12
DEFAULT_PHASES = 1
DEFAULT_MERGE = "mean"
MERGES = ("mean", "gaussian")
PARTS = ("top_latent", "all")


@dataclass
class VoxelScore:
    """The raw voxel map of one study (float32, NaN where no window reaches) and how it was made."""

    voxel_map: np.ndarray
    stride: int
    part: str = "top_latent"
    size: int = 0  # the window (patch) size; 0 in files written before it was recorded
    n_windows: int = 0
    phases: int = 1  # interleaved grids (detect.grid.window_grid)
    merge: str = DEFAULT_MERGE  # how overlapping windows are merged (window_weight)

    def arrays(self) -> dict:
        """What :meth:`save` writes (a subclass adds its own)."""
        return {"voxel_map": self.voxel_map, "stride": np.int64(self.stride), "part": np.str_(self.part),
                "size": np.int64(self.size), "n_windows": np.int64(self.n_windows), "phases": np.int64(self.phases),
                "merge": np.str_(self.merge)}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **self.arrays())
        return path

    @staticmethod
    def fields_of(f) -> dict:
        """The fields of a stored score (an open ``np.load``)."""
        get = lambda k, d: f[k] if k in f.files else d  # noqa: E731 - files of session 3 lack size/n_windows
        return {"voxel_map": f["voxel_map"], "stride": int(f["stride"]), "part": str(f["part"]),
                "size": int(get("size", 0)), "n_windows": int(get("n_windows", 0)), "phases": int(get("phases", 1)),
                "merge": str(get("merge", DEFAULT_MERGE))}

    @classmethod
    def load(cls, path) -> VoxelScore:
        with np.load(Path(path), allow_pickle=False) as f:
            return cls(**cls.fields_of(f))


def window_terms(glow, grid: WindowGrid, part: str = "top_latent", batch_size: int = 32, device="cpu",
                 bf16: bool = False):
    """The predictor: ``(corners, terms)`` per batch of ``grid``'s windows, on ``device``. ``top_latent``: the
    coarsest latent's ``−½‖ε_L‖²`` per cell, ``(b, s, s, s)``; ``all``: every local term per voxel, ``(b, S, S,
    S)``. ``bf16``: the coupling networks under bf16 autocast (the flow keeps its main stream, log-dets and
    latent in float32)."""
    import torch

    from ..flow.local import local_log_prob, top_latent_energy

    if part not in PARTS:
        raise ValueError(f"voxel map part must be one of {PARTS}, got {part!r}")
    glow.eval()
    dev_type = torch.device(device).type
    with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bool(bf16)):
        for corners, x in grid.batches(batch_size):
            xt = torch.from_numpy(x).to(device)
            terms = top_latent_energy(glow, xt) if part == "top_latent" else local_log_prob(glow, xt, part="all")
            yield corners, terms.to(torch.float64)


def window_weight(size: int, merge: str = DEFAULT_MERGE, device="cpu"):
    """The merger's weight of each voxel of a window, ``(S, S, S)`` float32: 1 everywhere (``mean``), or a
    Gaussian around the window's centre with σ = size/8 (``gaussian``, MONAI's ``sigma_scale`` 0.125): a
    coarse cell at the window's border sees the zero padding of the coupling networks' convolutions, the
    centre cell does not."""
    import torch

    if merge not in MERGES:
        raise ValueError(f"scoring.merge must be one of {MERGES}, got {merge!r}")
    if merge == "mean":
        return torch.ones((size, size, size), dtype=torch.float32, device=device)
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (r / (size / 8.0)) ** 2)
    return g[:, None, None] * g[None, :, None] * g[None, None, :]


def merge_windows(batches, grid: WindowGrid, merge: str = DEFAULT_MERGE, device="cpu") -> np.ndarray:
    """The merger: a voxel's value is the weighted mean of the terms of the windows that cover it (a
    ``top_latent`` cell's term shared evenly by its voxels); float32 on the study's grid, NaN where no window
    reaches."""
    import torch

    size = grid.size
    weight = window_weight(size, merge, device).to(torch.float64)
    total = torch.zeros(grid.padded.shape, dtype=torch.float64, device=device)
    count = torch.zeros(grid.padded.shape, dtype=torch.float64, device=device)
    for corners, terms in batches:
        f = size // terms.shape[-1]
        if f > 1:
            terms = terms / float(f**3)
            terms = terms.repeat_interleave(f, 1).repeat_interleave(f, 2).repeat_interleave(f, 3)
        for (z, y, w), m in zip(np.asarray(corners).tolist(), terms, strict=True):
            if merge == "mean":  # the default path stays as cheap as before
                total[z : z + size, y : y + size, w : w + size] += m
                count[z : z + size, y : y + size, w : w + size] += 1.0
            else:
                total[z : z + size, y : y + size, w : w + size] += m * weight
                count[z : z + size, y : y + size, w : w + size] += weight
    out = torch.where(count > 0, total / count.clamp(min=1e-300), torch.full_like(total, float("nan")))
    return grid.crop(out.to("cpu", torch.float32).numpy())


def voxel_log_p_volume(glow, grid: WindowGrid, part: str = "top_latent", batch_size: int = 32,
                       device="cpu", bf16: bool = False, merge: str = DEFAULT_MERGE) -> np.ndarray:
    """Per-voxel local log-likelihood terms on the study's grid (float32, NaN where no window reaches):
    the predictor over ``grid``'s windows, merged on ``device``."""
    window_weight(grid.size, merge)  # a bad merge name fails before the model runs
    return merge_windows(window_terms(glow, grid, part, batch_size, device, bf16), grid, merge, device)


def smooth_in_mask(voxel_map: np.ndarray, mask: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Normalised Gaussian convolution of ``voxel_map`` inside ``mask`` (NaN outside the mask)."""
    m = (np.asarray(mask) != 0) & np.isfinite(voxel_map)
    if sigma_vox <= 0:
        return np.where(m, voxel_map, np.nan).astype(np.float32)
    out = np.full(m.shape, np.nan, np.float32)
    if not m.any():
        return out
    # on the mask's box and the kernel's reach around it (scipy truncates at 4σ): the filter reads only zeros
    # beyond the box, so the result is the whole scan's, at the lungs' share of its cost
    box = bounding_box(m, int(4.0 * float(sigma_vox) + 0.5) + 1)
    m, v = m[box], np.asarray(voxel_map)[box]
    num = ndimage.gaussian_filter(np.where(m, v, 0.0).astype(np.float32), sigma_vox)
    den = ndimage.gaussian_filter(m.astype(np.float32), sigma_vox)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[box] = np.where(m, num / np.maximum(den, 1e-6), np.nan)
    return out


def depth_bands(mask: np.ndarray, bins=DEFAULT_DEPTH_BINS) -> np.ndarray:
    """Band index (0 … len(bins)−1) of each voxel's depth into ``mask`` (−1 outside)."""
    m = np.asarray(mask) != 0
    out = np.full(m.shape, -1, np.int64)
    if not m.any():
        return out
    box = bounding_box(m, 1)  # the nearest voxel off the mask lies within one voxel of its box
    band = np.digitize(ndimage.distance_transform_edt(m[box]), np.asarray(bins, dtype=np.float64)[1:])
    out[box] = np.where(m[box], band, -1)
    return out


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
                raise ValueError(f"depth band {b} has {vals.size} healthy voxels; need more healthy validation studies")
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


class VoxelMap(MapKind):
    name = "voxel"
    title = "coarse-latent voxel map against a depth-banded healthy reference, |z| > τ (not in the paper)"
    score_file = "voxel_map.npz"
    map_file = "atypicality_map.nii.gz"
    space = {"sigma_vox": [1.0, 2.0], "tau_z": [2.0, 3.0, 4.0, 5.0, 6.0], "v_min_cm3": [0.0, 1.0, 5.0]}
    map_params = ("sigma_vox",)
    tie_break = (("sigma_vox", "asc"), ("tau_z", "desc"), ("v_min_cm3", "desc"))  # higher τ flags less
    needs_flow = True
    point_defaults = {"phases": 1, "merge": "mean"}  # what points written before these were recorded used

    def settings(self, scoring: dict, patch_size: int) -> dict:
        part = scoring.get("part") or "top_latent"
        if part not in PARTS:
            raise ValueError(f"scoring.part must be one of {PARTS}, got {part!r}")
        merge = str(scoring.get("merge") or DEFAULT_MERGE)
        if merge not in MERGES:
            raise ValueError(f"scoring.merge must be one of {MERGES}, got {merge!r}")
        return {"patch_size": int(patch_size), "stride": int(scoring.get("stride") or DEFAULT_STRIDE),
                "phases": int(scoring.get("phases") or DEFAULT_PHASES), "part": part,
                "merge": merge,
                "precision": str(scoring.get("precision") or DEFAULT_PRECISION),
                "batch_size": int(scoring.get("batch_size") or 32)}

    def prepare(self, model, device):
        from ..flow import Glow3D
        from ..models import prepare_flow_encoder

        if not isinstance(model, Glow3D):
            raise ValueError(f"the voxel map decomposes a flow's log-likelihood, and this model is a "
                             f"{type(model).__name__}: score it with the patch map (scoring.map: patch)")
        return prepare_flow_encoder(model, device)

    def score(self, predictor, study, settings: dict, device="cpu") -> VoxelScore:
        phases = int(settings.get("phases", 1))
        grid = window_grid(study.volume, study.permissive, settings["patch_size"], settings["stride"], phases)
        vmap = voxel_log_p_volume(predictor, grid, settings.get("part", "top_latent"),
                                  settings.get("batch_size", 32), device,
                                  use_bf16(settings.get("precision", DEFAULT_PRECISION), device),
                                  settings.get("merge", DEFAULT_MERGE))
        return VoxelScore(vmap, grid.stride, settings.get("part", "top_latent"), grid.size, len(grid), phases,
                          settings.get("merge", DEFAULT_MERGE))

    def load_score(self, path) -> VoxelScore:
        return VoxelScore.load(path)

    def summary(self, score: VoxelScore) -> dict:
        fin = score.voxel_map[np.isfinite(score.voxel_map)]
        return {"n_patches": int(score.n_windows), "log_p_min": float(fin.min()) if fin.size else float("nan"),
                "log_p_mean": float(fin.mean()) if fin.size else float("nan")}

    def score_settings(self, score: VoxelScore) -> dict:
        out = {"stride": int(score.stride), "part": str(score.part)}
        # recorded only where they differ from what a point without them means (point_defaults)
        if int(score.phases) != self.point_defaults["phases"]:
            out["phases"] = int(score.phases)
        if str(score.merge) != self.point_defaults["merge"]:
            out["merge"] = str(score.merge)
        if score.size:
            out["patch_size"] = int(score.size)
        return out

    def fit_reference(self, scores, masks, params) -> dict:
        sigma = float(params["sigma_vox"])
        smoothed = [smooth_in_mask(s.voxel_map, m, sigma) for s, m in zip(scores, masks, strict=True)]
        return DepthReference.fit(smoothed, masks).to_dict()

    def atypicality(self, score: VoxelScore, mask, params, reference) -> np.ndarray:
        z = DepthReference.from_dict(reference).z(smooth_in_mask(score.voxel_map, mask, float(params["sigma_vox"])),
                                                  mask)
        return -np.abs(z)  # NaN outside the mask stays NaN

    def level(self, params, reference) -> float:
        return -float(params["tau_z"])
