"""The voxel map against a healthy reference that knows the anatomy (issue 16; not in the paper):
``scoring.map: anatomy``, and the flow's part of the platform's default, ``anatomy-density`` (:mod:`.density_map`).

The depth-banded reference of :mod:`.voxel_map` asks only how deep into the lung a voxel lies. Around the
hilum the lung holds the airways and the large vessels, whose coarse-latent values differ from peripheral
lung at the same depth, and a hospital's patients and scanners draw them differently from a training
archive: with one median and MAD per depth band those normal structures become "abnormal" (hundreds of cm³
per normal study on a foreign phantom family). This kind keeps the predictor and the merger of the voxel map
and changes the reference:

* **Anatomical bands** — each permissive-lung voxel gets three coordinates read off the lung mask alone (no
  intensities, so a lesion cannot move them): the depth into the mask (as before), the medial–lateral position
  within its lung (0 at the mediastinal edge of its axial slice, 1 at the chest wall) and the cranio-caudal
  position within its lung (0 at the base, 1 at the apex). Bands: the depth bands × ``lateral`` × ``vertical``
  equal parts; the medial, mid-height band is the hilum.
* **Calibration** — per band, the healthy median and 1.4826·MAD (``calibration="mad"``, the default), as the
  depth reference does. ``"quantile"`` maps the band's healthy values to a standard normal instead
  (``z = Φ⁻¹(F(v))``, linear beyond the extreme healthy quantiles with the band's robust scale), so that τ
  would mean the same tail probability in every band; with 53 quantiles per band it fits the validation
  normals it was fitted on too closely (cross-fitted it loses to MAD, docs/RESULTS.md).
  ``"tail"`` is for a channel that is 0 in most healthy lung and one-sided (the bright-blob response of
  :mod:`.blobs`): ``z = 3.09 · v / (the band's healthy 99.9th percentile)``.
* ``anterior_posterior`` (default 1: none) splits every band into equal parts of the mask's anterior–posterior
  extent: in the medial bands the hilum lies mid-way and the paravertebral gutter at the back, and a channel whose
  healthy tail is the hilum's (the lung's bite, :mod:`.bite`) needs them apart.
* A band with too few healthy voxels (``MIN_BAND_VOXELS``) falls back to its depth band, so a small validation
  set degrades to the depth reference instead of failing.

Why the default: on the detection experiment's phantoms, searched with the cross-fitted search and tested once,
this reference beat the depth reference of :mod:`.voxel_map` in 6 of 9 model-and-direction runs (A→A over three
training seeds, A→B, B→A, B→B, at full training length, 2026-12-02 and 2026-12-06), on cross-fitted validation
and on test alike, by a mean of +0.051 test AUROC (docs/RESULTS.md). Operating points store their reference
with its calibration, so points fitted with the quantile calibration keep mapping as they were chosen.

Everything else — σ-smoothing in the mask, ``|z| > τ``, components ≥ v_min, T — is the voxel map's. The
reference is fitted on the healthy *validation* studies (the hospital's own), never on test studies.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from ..lungs import bounding_box
from .voxel_map import DEFAULT_DEPTH_BINS, VoxelMap, smooth_in_mask

MIN_BAND_VOXELS = 200
# the "tail" calibration, for a channel that is 0 in most healthy lung (the bright-blob response, whose MAD is 0):
# z is its value in units of the band's healthy TAIL_PERCENTILE, which sits at TAIL_Z
TAIL_PERCENTILE, TAIL_Z = 99.9, 3.09
FRACTION_RADIUS = 12  # voxels: half of the detection model's 24³ window on the 2 mm grid
_Z_GRID = np.linspace(-3.9, 3.9, 53)  # quantiles stored at these standard-normal positions (p = 5e-5 … 1 − 5e-5)


def anatomy_coordinates(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth in voxels, medial→lateral 0…1, base→apex 0…1) of every voxel of ``mask`` (z, y, x; LPS: the
    patient's right at small x). The two sides are split at the mask's midline; in each axial slice the
    medial edge of a side is its voxel nearest the midline, the lateral edge the farthest."""
    m = np.asarray(mask) != 0
    depth = ndimage.distance_transform_edt(m)
    lateral = np.zeros(m.shape, np.float32)
    vertical = np.zeros(m.shape, np.float32)
    if not m.any():
        return depth, lateral, vertical
    xs = np.nonzero(m.any(axis=(0, 1)))[0]
    x_mid = 0.5 * (xs[0] + xs[-1])
    x = np.arange(m.shape[2], dtype=np.float32)
    for right in (True, False):
        side = m & ((x < x_mid) if right else (x >= x_mid))[None, None, :]
        if not side.any():
            continue
        big = float(m.shape[2])
        lo = np.where(side, x[None, None, :], big).min(axis=(1, 2), keepdims=True)  # per axial slice
        hi = np.where(side, x[None, None, :], -1.0).max(axis=(1, 2), keepdims=True)
        span = np.maximum(hi - lo, 1.0)
        u = (hi - x[None, None, :]) / span if right else (x[None, None, :] - lo) / span
        lateral = np.where(side, np.clip(u, 0, 1), lateral)
        zs = np.nonzero(side.any(axis=(1, 2)))[0]
        w = (np.arange(m.shape[0], dtype=np.float32) - zs[0]) / max(zs[-1] - zs[0], 1)
        vertical = np.where(side, np.clip(w, 0, 1)[:, None, None], vertical)
    return depth, lateral, vertical


def lung_fraction(mask: np.ndarray, radius: int = FRACTION_RADIUS) -> np.ndarray:
    """The share of ``mask`` in the ``(2·radius+1)³`` box around each voxel (0…1): how much of a window
    centred there is lung. Low at the thin anterior tips and along the heart, where a window holds mostly
    mediastinum, and about one half at a flat pleura, which depth alone does not tell apart."""
    m = (np.asarray(mask) != 0).astype(np.float32)
    return ndimage.uniform_filter(m, size=2 * int(radius) + 1, mode="constant")


_BAND_CACHE: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_BAND_LOCK = threading.Lock()
_band_bytes = 0  # what _BAND_CACHE holds
# the bands of about a hundred realistic masks (kept as the mask's voxels only): a search's validation set. Per
# process, so a nightly scoring actor holds at most this much beside its model; CT3DFLOW_BAND_CACHE_MB=0 keeps none
BAND_CACHE_BYTES = int(os.environ.get("CT3DFLOW_BAND_CACHE_MB", "512")) << 20


def clear_band_cache() -> None:
    global _band_bytes
    with _BAND_LOCK:
        _BAND_CACHE.clear()
        _band_bytes = 0


def band_index(mask: np.ndarray, bins, lateral: int, vertical: int, fraction: int = 1,
               anterior_posterior: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(anatomy band, depth band) per voxel (−1 outside the mask). A search asks for the same masks' bands at
    every σ, weight and fold, and the distance transforms cost most of it: the bands are kept per mask content
    (a digest of the mask and the settings), least recently used dropped beyond ``BAND_CACHE_BYTES``
    (``CT3DFLOW_BAND_CACHE_MB``, default 512)."""
    m = np.asarray(mask) != 0
    if anterior_posterior > 1:  # the bands without the split (kept), each cut in parts from front to back
        full, depth = band_index(m, bins, lateral, vertical, fraction)
        if m.any():
            ys = np.nonzero(m.any(axis=(0, 2)))[0]  # y grows to the back (LPS): 0 at the mask's front, 1 at its back
            y = (np.arange(m.shape[1]) - ys[0]) / max(ys[-1] - ys[0], 1)
            ai = np.minimum((y * anterior_posterior).astype(np.int64), anterior_posterior - 1)
            full = np.where(m, full * anterior_posterior + ai[None, :, None], -1)
        return full, depth
    key = (m.shape, hashlib.blake2b(np.packbits(m).tobytes(), digest_size=16).digest(),
           tuple(float(b) for b in bins), int(lateral), int(vertical), int(fraction))
    with _BAND_LOCK:
        hit = _BAND_CACHE.get(key)
        if hit is not None:
            _BAND_CACHE.move_to_end(key)
    if hit is None:
        full, depth = _band_index(m, bins, lateral, vertical, fraction)
        hit = (full[m].astype(np.int32), depth[m].astype(np.int16))
        global _band_bytes
        with _BAND_LOCK:
            if key not in _BAND_CACHE:
                _BAND_CACHE[key] = hit
                _band_bytes += hit[0].nbytes + hit[1].nbytes
            while _BAND_CACHE and _band_bytes > BAND_CACHE_BYTES:
                _, (a, d) = _BAND_CACHE.popitem(last=False)
                _band_bytes -= a.nbytes + d.nbytes
    full, depth = np.full(m.shape, -1, np.int64), np.full(m.shape, -1, np.int64)
    full[m], depth[m] = hit
    return full, depth


def _band_index(m: np.ndarray, bins, lateral: int, vertical: int, fraction: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`band_index` computed (``m`` boolean), on the mask's bounding box and one voxel around it: the
    coordinates are the same there (the nearest voxel off the mask lies within that box; the medial and lateral
    edges and the base and apex are read relative to the mask), and a chest's lungs fill a fifth to a half of its
    scan, so the distance transform costs that much less."""
    out_full, out_depth = np.full(m.shape, -1, np.int64), np.full(m.shape, -1, np.int64)
    if not m.any():
        return out_full, out_depth
    box = bounding_box(m, 1)
    m = m[box]
    depth, lat, ver = anatomy_coordinates(m)
    d = np.digitize(depth, np.asarray(bins, dtype=np.float64)[1:])
    li = np.minimum((lat * lateral).astype(np.int64), lateral - 1)
    vi = np.minimum((ver * vertical).astype(np.int64), vertical - 1)
    full = (d * lateral + li) * vertical + vi
    if fraction > 1:  # off the box the mask is empty, as the box filter's constant border assumes
        fi = np.minimum((lung_fraction(m) * fraction).astype(np.int64), fraction - 1)
        full = full * fraction + fi
    out_full[box], out_depth[box] = np.where(m, full, -1), np.where(m, d, -1)
    return out_full, out_depth


def _stats(vals: np.ndarray, calibration: str) -> dict:
    if calibration == "tail":  # one-sided, mostly 0: z = TAIL_Z at the healthy TAIL_PERCENTILE, 0 at 0
        top = float(np.percentile(vals, TAIL_PERCENTILE))
        return {"median": 0.0, "scale": max(top, 1e-6) / TAIL_Z, "n": int(vals.size)}
    mu = float(np.median(vals))
    sd = float(1.4826 * np.median(np.abs(vals - mu)))
    sd = sd if sd > 0 else float(vals.std() or 1.0)
    out = {"median": mu, "scale": sd, "n": int(vals.size)}
    if calibration == "quantile":
        out["quantiles"] = np.quantile(vals, ndtr(_Z_GRID)).tolist()
    return out


def fit_anatomy_reference(maps, masks, bins=DEFAULT_DEPTH_BINS, lateral: int = 3, vertical: int = 3,
                          calibration: str = "mad", fraction: int = 1, anterior_posterior: int = 1) -> dict:
    """From the smoothed maps and permissive masks of healthy validation studies."""
    per_depth = lateral * vertical * fraction * anterior_posterior
    n_full = len(bins) * per_depth
    full_vals: list[list[np.ndarray]] = [[] for _ in range(n_full)]
    depth_vals: list[list[np.ndarray]] = [[] for _ in bins]
    for v, m in zip(maps, masks, strict=True):
        full, depth = band_index(m, bins, lateral, vertical, fraction, anterior_posterior)
        ok = np.isfinite(v) & (full >= 0)
        fv, dv, vv = full[ok], depth[ok], np.asarray(v[ok], dtype=np.float64)
        order = np.argsort(fv, kind="stable")
        bounds = np.searchsorted(fv[order], np.arange(n_full + 1))
        for b in range(n_full):
            full_vals[b].append(vv[order[bounds[b]:bounds[b + 1]]])
        for b in range(len(bins)):
            depth_vals[b].append(vv[dv == b])
    depth_stats = []
    for b, parts in enumerate(depth_vals):
        vals = np.concatenate(parts)
        if vals.size < 10:
            raise ValueError(f"depth band {b} has {vals.size} healthy voxels; need more healthy validation studies")
        depth_stats.append(_stats(vals, calibration))
    bands = []
    for b, parts in enumerate(full_vals):
        vals = np.concatenate(parts)
        bands.append(_stats(vals, calibration) if vals.size >= MIN_BAND_VOXELS else
                     {**depth_stats[b // per_depth], "fallback": True})
    return {"type": "anatomy", "bins": [float(v) for v in bins], "lateral": int(lateral), "vertical": int(vertical),
            "fraction": int(fraction), "anterior_posterior": int(anterior_posterior), "calibration": calibration,
            "bands": bands, "depth_bands": depth_stats}


def anatomy_z(reference: dict, smoothed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z of every voxel against its anatomical band (NaN outside ``mask``)."""
    full, _ = band_index(mask, reference["bins"], reference["lateral"], reference["vertical"],
                         int(reference.get("fraction", 1)), int(reference.get("anterior_posterior", 1)))
    z = np.full(np.shape(smoothed), np.nan, dtype=np.float32)
    inside = full >= 0
    fv, vv = full[inside], np.asarray(smoothed, dtype=np.float64)[inside]
    out = np.full(fv.shape, np.nan)
    for b, st in enumerate(reference["bands"]):
        sel = fv == b
        if not sel.any():
            continue
        v = vv[sel]
        if reference["calibration"] == "quantile":
            q = np.asarray(st["quantiles"])
            zb = np.interp(v, q, _Z_GRID)
            # beyond the healthy extremes: continue linearly with the band's robust scale
            zb = np.where(v < q[0], _Z_GRID[0] - (q[0] - v) / st["scale"], zb)
            zb = np.where(v > q[-1], _Z_GRID[-1] + (v - q[-1]) / st["scale"], zb)
            out[sel] = zb
        else:
            out[sel] = (v - st["median"]) / st["scale"]
    z[inside] = out
    return z


class AnatomyMap(VoxelMap):
    """The voxel map (predictor, merger, decision) with the anatomy-aware reference (median and MAD per band)."""

    name = "anatomy"
    title = ("coarse-latent voxel map against a healthy median and MAD per depth × medial-lateral × cranio-caudal "
             "band, |z| > τ (not in the paper)")

    def __init__(self, lateral: int = 3, vertical: int = 3, calibration: str = "mad", bins=DEFAULT_DEPTH_BINS,
                 fraction: int = 1):
        if calibration not in ("quantile", "mad"):
            raise ValueError(f"calibration must be 'quantile' or 'mad', got {calibration!r}")
        self.lateral, self.vertical, self.calibration, self.bins = int(lateral), int(vertical), calibration, bins
        self.fraction = int(fraction)

    def fit_reference(self, scores, masks, params) -> dict:
        sigma = float(params["sigma_vox"])
        smoothed = [smooth_in_mask(s.voxel_map, m, sigma) for s, m in zip(scores, masks, strict=True)]
        return fit_anatomy_reference(smoothed, masks, self.bins, self.lateral, self.vertical, self.calibration,
                                     self.fraction)

    def atypicality(self, score, mask, params, reference) -> np.ndarray:
        return -np.abs(anatomy_z(reference, smooth_in_mask(score.voxel_map, mask, float(params["sigma_vox"])), mask))

    def __repr__(self) -> str:
        return (f"<map kind {self.name!r}: {self.lateral}×{self.vertical}×{self.fraction} anatomical bands per depth "
                f"band, {self.calibration} calibration>")

