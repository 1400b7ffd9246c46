"""Patch log-likelihoods on the inference grid, the Log P map, the patient decision, NIfTI/PNG outputs.

DESIGN §4.7–§4.9. Decisions made here:

* **Log P map** (§4.8): ``LogP(v) = Σp G_σ(v − c_p) ℓ_p / Σp G_σ(v − c_p)``, computed by trilinearly
  splatting ``ℓ_p`` and ``1`` at the patch centres into two volumes, Gaussian-filtering both (truncated at
  ``truncate·σ``) and dividing. Where the denominator is (numerically) zero — farther than the truncation
  radius from every centre — the value of the *nearest* patch centre is used, which is also the σ → 0
  limit. The map is therefore a convex combination of patch values everywhere.
* **Outside the mask** the map is ``NaN``: the decision only looks inside the permissive mask, and a NaN
  compares false with any τ (``NaN < τ`` is ``False``), so such voxels can never be flagged.
* **τ** (§4.9): ``OperatingPoint.tau_z`` is expressed in standard deviations of the *patch
  log-likelihoods* ``ℓ_p`` of healthy validation studies (all scored windows of all healthy validation
  studies pooled, :func:`healthy_reference`); ``tau_abs = healthy_mean + tau_z · healthy_std``. Patch
  values do not depend on σ, so the reference is computed once, and the map values (convex combinations
  of ``ℓ_p``) live on the same scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ct3dflow.errors import CTInputError
from ct3dflow.patches import extract_patches, inference_grid, integral_image, pad_to_patch, windows_touching

__all__ = [
    "OperatingPoint",
    "PatchScores",
    "StudyScore",
    "abnormal_volume",
    "decide_from_patch_scores",
    "healthy_reference",
    "log_p_map",
    "patch_log_likelihoods",
    "preview_size",
    "score_study",
    "write_log_p_map_nifti",
    "write_preview_png",
]

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------- patches
@dataclass
class PatchScores:
    """Log-likelihoods of the scored grid windows of one study.

    ``corners`` (m, 3) int64 and ``centres`` (m, 3) float64 are in the *original* (unpadded) voxel
    coordinates ``(z, y, x)`` — corners may be negative when the volume was padded; ``centres = corners +
    (size − 1) / 2``. ``log_p`` (m,) float64 is the natural-log density of each window. ``shape`` is the
    original volume shape (z, y, x).
    """

    corners: np.ndarray
    centres: np.ndarray
    log_p: np.ndarray
    size: int = 48
    stride: int = 38
    shape: tuple = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(len(self.log_p))

    def to_dict(self) -> dict:
        return {
            "corners": np.asarray(self.corners, dtype=np.int64),
            "centres": np.asarray(self.centres, dtype=np.float64),
            "log_p": np.asarray(self.log_p, dtype=np.float64),
            "size": int(self.size),
            "stride": int(self.stride),
            "shape": tuple(int(s) for s in self.shape),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PatchScores:
        return cls(
            corners=np.asarray(d["corners"], dtype=np.int64).reshape(-1, 3),
            centres=np.asarray(d["centres"], dtype=np.float64).reshape(-1, 3),
            log_p=np.asarray(d["log_p"], dtype=np.float64).reshape(-1),
            size=int(d.get("size", 48)),
            stride=int(d.get("stride", 38)),
            shape=tuple(int(s) for s in np.asarray(d.get("shape", ())).reshape(-1)),
        )

    def save(self, path) -> Path:
        """Write a compressed ``.npz`` (no pickles); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        d["shape"] = np.asarray(d["shape"], dtype=np.int64)
        with open(path, "wb") as f:
            np.savez_compressed(f, **d)
        return path

    @classmethod
    def load(cls, path) -> PatchScores:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls.from_dict({k: z[k] for k in z.files})


def scoring_windows(volume, permissive, size: int, stride: int):
    """The inference windows of a study: ``(volume, padded volume, pad_before, corners)``.

    The volume is padded to at least one window per axis (−0.5, :func:`ct3dflow.patches.pad_to_patch`);
    ``corners`` (in the padded frame) are the grid windows that touch the permissive mask. Raises
    :class:`CTInputError` when none does.
    """
    vol = np.asarray(volume, dtype=np.float32)
    msk = np.asarray(permissive)
    if vol.shape != msk.shape:
        raise ValueError(f"volume {vol.shape} and permissive mask {msk.shape} differ in shape")
    vol_p, before = pad_to_patch(vol, size, value=-0.5)
    msk_p, _ = pad_to_patch(msk, size, value=0)
    corners = inference_grid(vol_p.shape, size, stride)
    corners = corners[windows_touching(msk_p, corners, size, ii=integral_image(msk_p))]
    if len(corners) == 0:
        raise CTInputError(
            "the permissive lung mask is empty, so no inference window touches the lungs: "
            "check the lung segmentation or supply a mask (mask_path)"
        )
    return vol, vol_p, before, corners


def patch_log_likelihoods(
    model,
    volume: np.ndarray,
    permissive: np.ndarray,
    size: int = 48,
    stride: int = 38,
    batch_size: int = 16,
    device="cpu",
    progress: bool = False,
) -> PatchScores:
    """Score every grid window that touches the permissive mask with ``model.log_prob``.

    ``model`` is anything with ``log_prob(x)`` taking a ``(B, 1, S, S, S)`` float32 tensor and returning
    ``(B,)``. A volume smaller than one window along an axis is padded (−0.5 for the volume, 0 for the
    mask, :func:`ct3dflow.patches.pad_to_patch`). Runs under ``torch.no_grad`` with the model in eval mode
    (its previous mode is restored). Raises :class:`CTInputError` when no window touches the mask.
    """
    import torch

    vol, vol_p, before, corners = scoring_windows(volume, permissive, size, stride)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    out = np.empty(len(corners), dtype=np.float64)
    starts = range(0, len(corners), batch_size)
    if progress:
        try:
            from tqdm import tqdm

            starts = tqdm(starts, desc="patches", unit="batch")
        except ImportError:  # pragma: no cover
            pass
    try:
        with torch.no_grad():
            for s in starts:
                c = corners[s : s + batch_size]
                x = torch.from_numpy(extract_patches(vol_p, c, size)[:, None]).to(device)
                lp = model.log_prob(x)
                out[s : s + len(c)] = lp.detach().to("cpu", torch.float64).numpy().reshape(-1)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    corners_orig = corners - np.asarray(before, dtype=np.int64)
    centres = corners_orig.astype(np.float64) + (size - 1) / 2.0
    return PatchScores(
        corners=corners_orig, centres=centres, log_p=out, size=size, stride=stride, shape=tuple(vol.shape)
    )


# --------------------------------------------------------------------------------------------- the map
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


def log_p_map(
    shape,
    centres: np.ndarray,
    log_p: np.ndarray,
    sigma_vox: float,
    mask: np.ndarray | None = None,
    truncate: float = 4.0,
) -> np.ndarray:
    """The Log P map of DESIGN §4.8 on a ``shape`` (z, y, x) grid; float32.

    Normalised convolution of the patch values ``log_p`` at ``centres`` (m, 3; voxel coordinates, may be
    fractional) with an isotropic Gaussian of ``sigma_vox`` voxels. Voxels beyond the truncation radius
    of every centre get the nearest centre's value (the σ → 0 limit). Voxels outside ``mask`` (when
    given) are NaN. −inf patch values are treated as the lowest finite value, NaN ones are ignored.
    """
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
    # Underflow guard: a floor relative to the weight of one patch at the truncation radius.
    floor = 1e-12 * math.exp(-0.5 * float(truncate) ** 2)
    ok = den > floor
    out = np.empty(shape, dtype=np.float64)
    out[ok] = num[ok] / den[ok]
    if not ok.all():
        # nearest patch centre, via a distance transform of the (rounded) centre voxels
        seed_num = np.zeros(shape, dtype=np.float64)
        seed_cnt = np.zeros(shape, dtype=np.float64)
        r = np.clip(np.rint(cen).astype(np.int64), 0, np.asarray(shape) - 1)
        flat = np.ravel_multi_index(r.T, shape)
        np.add.at(seed_num.reshape(-1), flat, lp)
        np.add.at(seed_cnt.reshape(-1), flat, 1.0)
        seeds = seed_cnt > 0
        idx = ndimage.distance_transform_edt(~seeds, return_distances=False, return_indices=True)
        nearest = seed_num[tuple(idx)] / seed_cnt[tuple(idx)]
        out[~ok] = nearest[~ok]
    # numerical safety: keep the convex-combination bound exactly
    np.clip(out, lp.min(), lp.max(), out=out)
    out = out.astype(np.float32)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != shape:
            raise ValueError(f"mask {m.shape} does not match map shape {shape}")
        out[m == 0] = np.nan
    return out


# ------------------------------------------------------------------------------------ the decision
@dataclass
class OperatingPoint:
    """σ (voxels), τ (healthy z-score of patch log-likelihoods), v_min (cm³), T (cm³) and the reference.

    ``healthy_mean``/``healthy_std`` are the mean and standard deviation of the patch log-likelihoods of
    all scored windows of the healthy validation studies (:func:`healthy_reference`).
    """

    sigma_vox: float
    tau_z: float
    v_min_cm3: float
    threshold_cm3: float
    healthy_mean: float
    healthy_std: float

    @property
    def tau_abs(self) -> float:
        return float(self.healthy_mean + self.tau_z * self.healthy_std)

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        if d.get("map") == "voxel":
            raise ValueError("this operating point belongs to the voxel map (ct3dflow.voxel_map), not the paper's "
                             "patch Log P map: load it with ct3dflow.evaluation.load_operating_point; the Ray "
                             "tune/evaluate/screening jobs use the patch map only, score with `ct3dflow score-local`")
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ValueError(f"operating point lacks {missing}; write it with `ct3dflow tune-local` or the tune job")
        return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__})


def healthy_reference(patch_scores) -> tuple[float, float]:
    """``(mean, std)`` of the pooled finite patch log-likelihoods of healthy validation studies."""
    vals = [np.asarray(ps.log_p if isinstance(ps, PatchScores) else ps, dtype=np.float64).ravel()
            for ps in patch_scores]
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise ValueError("need at least two finite healthy patch log-likelihoods for the reference")
    return float(v.mean()), float(v.std(ddof=1))


def voxel_volume_cm3(spacing) -> float:
    """Voxel volume in cm³ from a spacing ``(x, y, z)`` in mm."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def abnormal_volume(log_p_map, mask, tau_abs: float, v_min_cm3: float, spacing):
    """Abnormal volume (cm³) and mask: voxels in ``mask`` with map < τ, 26-connected components < v_min
    removed. ``spacing`` is ``(x, y, z)`` mm. Returns ``(volume_cm3, abnormal_mask bool)``."""
    lp = np.asarray(log_p_map)
    m = np.asarray(mask) != 0
    if lp.shape != m.shape:
        raise ValueError(f"map {lp.shape} and mask {m.shape} differ in shape")
    with np.errstate(invalid="ignore"):
        low = m & (lp < tau_abs)
    vv = voxel_volume_cm3(spacing)
    if not low.any():
        return 0.0, low
    lab, n = ndimage.label(low, structure=STRUCTURE_26)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes * vv >= float(v_min_cm3)
    keep[0] = False
    out = keep[lab]
    return float(out.sum() * vv), out


def decide_from_patch_scores(patch_scores: PatchScores, shape, permissive, spacing, op: OperatingPoint):
    """The decision from stored patch scores: ``(volume_cm3, abnormal_mask, log_p_map)``."""
    lpm = log_p_map(shape, patch_scores.centres, patch_scores.log_p, op.sigma_vox, mask=permissive)
    vol, ab = abnormal_volume(lpm, permissive, op.tau_abs, op.v_min_cm3, spacing)
    return vol, ab, lpm


@dataclass
class StudyScore:
    patch_scores: PatchScores
    log_p_map: np.ndarray
    abnormal_mask: np.ndarray
    abnormal_volume_cm3: float
    predicted_abnormal: bool
    n_patches: int
    log_p_min: float
    log_p_mean: float


def score_study(
    model,
    volume,
    permissive,
    spacing,
    op: OperatingPoint,
    size: int = 48,
    stride: int = 38,
    batch_size: int = 16,
    device="cpu",
    progress: bool = False,
) -> StudyScore:
    """Patch scores → Log P map → abnormal volume → decision (abnormal when volume > T)."""
    ps = patch_log_likelihoods(model, volume, permissive, size, stride, batch_size, device, progress)
    vol, ab, lpm = decide_from_patch_scores(ps, np.shape(volume), permissive, spacing, op)
    fin = ps.log_p[np.isfinite(ps.log_p)]
    return StudyScore(
        patch_scores=ps,
        log_p_map=lpm,
        abnormal_mask=ab,
        abnormal_volume_cm3=vol,
        predicted_abnormal=bool(vol > op.threshold_cm3),
        n_patches=len(ps),
        log_p_min=float(fin.min()) if fin.size else float("nan"),
        log_p_mean=float(fin.mean()) if fin.size else float("nan"),
    )


# --------------------------------------------------------------------------------------------- outputs
def write_log_p_map_nifti(log_p_map, reference, path, fill_value: float | None = None) -> Path:
    """Write the map as float32 NIfTI (``.nii.gz``) with the geometry of ``reference``.

    ``reference`` is a ``SimpleITK.Image`` (e.g. ``PreprocessedStudy.reference_image()``) or a tuple
    ``(spacing, origin, direction)`` in SimpleITK's (x, y, z) convention. NaN voxels (outside the mask)
    are written as NaN by default — nibabel, 3D Slicer and ITK-SNAP read them as NaN, but SimpleITK's NIfTI
    *reader* turns NaN into 0 — or as ``fill_value`` when given.
    """
    import SimpleITK as sitk

    arr = np.array(log_p_map, dtype=np.float32)
    if fill_value is not None:
        arr[np.isnan(arr)] = np.float32(fill_value)
    img = sitk.GetImageFromArray(arr)
    if isinstance(reference, sitk.Image):
        if tuple(reference.GetSize()) != tuple(reversed(arr.shape)):
            raise ValueError(f"map shape {arr.shape} (z, y, x) does not match reference size "
                             f"{reference.GetSize()} (x, y, z)")
        spacing, origin, direction = reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()
    else:
        spacing, origin, direction = reference
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


PREVIEW_SCALE = 3
PREVIEW_GAP = 6
PREVIEW_HEADER = 30


def preview_size(shape) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`write_preview_png` for a volume of ``shape`` (z, y, x)."""
    z, y, x = (int(s) for s in shape)
    return 2 * PREVIEW_SCALE * x + PREVIEW_GAP, PREVIEW_HEADER + PREVIEW_SCALE * max(y, z)


def _grey(v: np.ndarray, level: float = -600.0, width: float = 1500.0) -> np.ndarray:
    hu = (np.asarray(v, dtype=np.float64) + 0.5) * 1220.0 - 1020.0
    g = (hu - (level - width / 2)) / width
    return (np.clip(g, 0, 1) * 255).astype(np.uint8)


def _panel(ct2d, map2d, ab2d, ref: float, scale_val: float):
    from PIL import Image

    g = _grey(ct2d)
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float64)
    with np.errstate(invalid="ignore"):
        a = np.clip((ref - map2d) / scale_val, 0.0, 1.0)
    a = np.where(np.isfinite(a), a, 0.0) * 0.7
    red = np.array([255.0, 30.0, 30.0])
    rgb = rgb * (1 - a[..., None]) + red * a[..., None]
    ab = ab2d.astype(bool)
    if ab.any():
        edge = ab & ~ndimage.binary_erosion(ab, border_value=0)
        rgb[edge] = (255, 230, 0)
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    return img.resize((img.width * PREVIEW_SCALE, img.height * PREVIEW_SCALE), Image.NEAREST)


def write_preview_png(
    volume, log_p_map, abnormal_mask, path, title=None, tau_abs: float | None = None
) -> Path:
    """One PNG: an axial and a coronal slice through the worst region, CT in a lung window (grey), the
    Log P map in red (opacity grows with how far the map is below ``tau_abs``, or below the median map
    value when τ is not given), the abnormal region outlined in yellow.

    The worst region is the lowest map value inside the largest abnormal component if there is one, else
    the lowest map value overall (NaN ignored). Axial: rows y (anterior at top), columns x (patient right on
    the left); coronal: rows z flipped (superior at top). Pixels are upscaled ×3; size: :func:`preview_size`.
    """
    from PIL import Image, ImageDraw

    vol = np.asarray(volume, dtype=np.float32)
    lpm = np.asarray(log_p_map, dtype=np.float64)
    ab = np.asarray(abnormal_mask).astype(bool) if abnormal_mask is not None else np.zeros(vol.shape, bool)
    if not (vol.shape == lpm.shape == ab.shape):
        raise ValueError("volume, map and abnormal mask must have the same shape")
    finite = np.isfinite(lpm)
    search = finite.copy()
    if ab.any():
        lab, n = ndimage.label(ab, structure=STRUCTURE_26)
        largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        search = finite & (lab == largest)
    if search.any():
        flat = np.where(search, lpm, np.inf)
        zc, yc, xc = np.unravel_index(int(np.argmin(flat)), vol.shape)
    else:
        zc, yc, xc = (s // 2 for s in vol.shape)
    vals = lpm[finite]
    if vals.size:
        ref = float(tau_abs) if tau_abs is not None else float(np.median(vals))
        spread = max(ref - float(vals.min()), float(vals.std()), 1e-6)
    else:
        ref, spread = 0.0, 1.0
    axial = _panel(vol[zc], lpm[zc], ab[zc], ref, spread)
    coronal = _panel(vol[::-1, yc, :], lpm[::-1, yc, :], ab[::-1, yc, :], ref, spread)
    w, h = preview_size(vol.shape)
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(axial, (0, PREVIEW_HEADER))
    canvas.paste(coronal, (axial.width + PREVIEW_GAP, PREVIEW_HEADER))
    d = ImageDraw.Draw(canvas)
    head = title or "CT-3DFlow"
    d.text((4, 2), f"{head}  axial z={zc}  coronal y={yc}", fill=(255, 255, 255))
    tau_txt = f"tau={tau_abs:.4g}" if tau_abs is not None else f"ref=median {ref:.4g}"
    d.text((4, 15), f"red: low Log P ({tau_txt})  yellow: abnormal", fill=(255, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
