"""The five pathology kinds, drawn into a phantom's lungs (the same for every phantom family).

Each kind is one function that draws one lesion into ``hu`` (in place) inside the chosen lung and returns
its voxel mask and centre. Volumes are drawn log-uniformly in :data:`LESION_VOLUME_RANGE_CM3`; a lesion
clipped by the lung border to under 30 % of its target is drawn again elsewhere (up to four times).

* **nodule** — a solid lobulated blob (0–60 HU), half of them spiculated, deep in the lung;
* **ground_glass** — a hazy region raised to −700…−400 HU with its own texture, deep in the lung;
* **consolidation** — dense (0–50 HU), 80 % touching the pleura, often with air bronchograms;
* **emphysema** — 3–10 low-density pockets (< −975 HU), scattered over one or both lungs;
* **honeycombing** — clustered subpleural cysts with walls (−20…40 HU) to a random depth.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from .geometry import tree, tube, unit

PATHOLOGIES: tuple[str, ...] = ("nodule", "ground_glass", "consolidation", "emphysema", "honeycombing")
LESION_VOLUME_RANGE_CM3 = (2.0, 100.0)


def loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def radius_mm(volume_cm3):
    return (3.0 * volume_cm3 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def blob_q(g, box, c, r, rng, lobulation=0.12, elong=0.25):
    """Normalised radius of a lobulated ellipsoidal blob (<= 1 inside) on the box's voxels."""
    Z, Y, X = g.coords(box)
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    s = np.exp(rng.uniform(-elong, elong, 3))
    s /= s.prod() ** (1.0 / 3.0)
    raw = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    dist = np.sqrt((dx / s[0]) ** 2 + (dy / s[1]) ** 2 + (dz / s[2]) ** 2)
    pert = np.zeros_like(raw)
    for _ in range(4):
        v = unit(rng.standard_normal(3))
        cos = (dx * v[0] + dy * v[1] + dz * v[2]) / raw
        pert += rng.uniform(-lobulation, lobulation) * (1.5 * cos * cos - 0.5)
        pert += rng.uniform(-lobulation, lobulation) * 0.5 * (2.5 * cos**3 - 1.5 * cos)
    return (dist / (r * (1.0 + pert))).astype(np.float32)


class LungSide:
    """One lung's bounding box and depth (mm from its border) for placing lesions."""

    def __init__(self, g, lung_mask, label):
        self.label = label
        sl = ndimage.find_objects(lung_mask, max_label=2)[label - 1]
        self.box = sl
        inside = lung_mask[sl] == label
        sx, sy, sz = g.spacing
        self.depth = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
        self.inside = inside
        self.offset = np.array([s.start for s in sl])

    def pick(self, rng, g, mode, r):
        d = self.depth
        if mode == "pleural":
            cand = np.argwhere(self.inside & (d <= 1.6 * max(g.spacing)))
        else:
            cand = np.argwhere(d >= min(0.8 * r, 0.6 * float(d.max())))
        if cand.size == 0:
            cand = np.argwhere(self.inside)
        idx = tuple(int(v) for v in cand[int(rng.integers(len(cand)))] + self.offset)
        return g.index_to_point(idx)


def nodule(rng, x, hu, w):
    c = x.side.pick(rng, x.g, "deep", x.r)
    box = x.g.box(c - 2.2 * x.r - 4, c + 2.2 * x.r + 4)
    q = blob_q(x.g, box, c, x.r, rng, lobulation=0.15, elong=0.2)
    w[box] = np.clip((1.0 - q) * x.r / (0.8 * min(x.spacing)) + 0.5, 0, 1)
    if rng.random() < 0.5:  # spiculation
        for _ in range(int(rng.integers(4, 12))):
            d = unit(rng.standard_normal(3))
            tube(x.g, w, c + 0.7 * x.r * d, c + x.r * rng.uniform(1.3, 2.0) * d, rng.uniform(0.8, 1.4), 0.4,
                 0.8 * min(x.spacing))
    mask = (w >= 0.5) & x.inside
    value = rng.uniform(0, 60)
    hu += (w * x.inside) * (value - hu)
    return mask, c


def ground_glass(rng, x, hu, w):
    c = x.side.pick(rng, x.g, "deep", x.r)
    box = x.g.box(c - 1.4 * x.r - 4, c + 1.4 * x.r + 4)
    q = blob_q(x.g, box, c, x.r / 0.9, rng, lobulation=0.15, elong=0.3)
    w[box] = smoothstep((1.15 - q) / 0.5)
    mask = (w >= 0.5) & x.inside
    value = rng.uniform(-700, -400)
    patch = np.zeros_like(w)
    patch[box] = rng.uniform(20, 50) * _smooth_field(rng, w[box].shape)
    hu += (w * x.inside) * np.maximum(value + patch - hu, 0.0)
    return mask, c


def _smooth_field(rng, shape):
    from .geometry import smooth_noise

    return smooth_noise(rng, shape, 6.0, factor=2)


def consolidation(rng, x, hu, w):
    mode = "pleural" if rng.random() < 0.8 else "deep"
    rr = x.r * (2.0 ** (1.0 / 3.0) if mode == "pleural" else 1.0)
    c = x.side.pick(rng, x.g, mode, rr)
    box = x.g.box(c - 1.5 * rr - 4, c + 1.5 * rr + 4)
    q = blob_q(x.g, box, c, rr, rng, lobulation=0.12, elong=0.35)
    w[box] = smoothstep((1.1 - q) / 0.3)
    mask = (w >= 0.5) & x.inside
    value = rng.uniform(0, 50)
    hu += (w * x.inside) * np.maximum(value - hu, 0.0)
    if rng.random() < 0.7 and mask.any():  # air bronchograms
        ab = np.zeros_like(w)
        segs: list = []
        for _ in range(int(rng.integers(1, 4))):
            st = c + unit(rng.standard_normal(3)) * rr * 0.3
            tree(rng, x.g, mask, st, unit(rng.standard_normal(3)), 0.6 * rr, rng.uniform(1.0, 2.0), 0, 0.5, 2, segs)
        for p0, p1, r0, r1 in segs:
            tube(x.g, ab, p0, p1, r0, r1, 0.8 * min(x.spacing))
        ab *= mask
        hu += ab * (rng.uniform(-1000, -960) - hu)
    return mask, c


def emphysema(rng, x, hu, w):
    n = int(rng.integers(3, 11))
    parts = rng.dirichlet(np.full(n, 2.0)) * x.target
    c = None
    for v in parts:
        rj = radius_mm(max(v, 0.05))
        lab_j = x.label if rng.random() < 0.6 or x.vols[2 - x.label] == 0 else 3 - x.label
        sd = x.side if lab_j == x.label else LungSide(x.g, x.lung_mask, lab_j)
        cj = sd.pick(rng, x.g, "deep", rj * 0.6)
        c = cj if c is None else c
        box = x.g.box(cj - 1.4 * rj - 3, cj + 1.4 * rj + 3)
        q = blob_q(x.g, box, cj, rj, rng, lobulation=0.2, elong=0.3)
        np.maximum(w[box], np.clip((1.0 - q) * rj / (0.8 * min(x.spacing)) + 0.5, 0, 1), out=w[box])
    lung_any = x.lung_mask > 0
    mask = (w >= 0.5) & lung_any
    value = rng.uniform(-1000, -975)
    hu += (w * lung_any) * (value - hu)
    return mask, c


def honeycombing(rng, x, hu, w):
    from scipy.spatial import cKDTree

    rr = radius_mm(x.target) * 1.7
    c = x.side.pick(rng, x.g, "pleural", rr)
    depth_lim = rng.uniform(8, 18)
    q = blob_q(x.g, x.side.box, c, rr, rng, lobulation=0.15, elong=0.3)
    region = (q <= 1.0) & x.side.inside & (x.side.depth <= depth_lim)
    pts_idx = np.argwhere(region)
    mask = np.zeros(hu.shape, dtype=bool)
    if len(pts_idx) >= 8:
        sx, sy, sz = x.spacing
        pts = np.stack([pts_idx[:, 2] * sx, pts_idx[:, 1] * sy, pts_idx[:, 0] * sz], axis=1)
        rc = rng.uniform(3.0, 5.5) * max(1.0, min(x.spacing) / 1.6)
        n_c = max(4, int(len(pts) * x.vox_cm3 * 1000.0 / (4.0 / 3.0 * math.pi * rc**3)))
        centres = pts[rng.integers(len(pts), size=n_c)] + rng.uniform(-1, 1, size=(n_c, 3))
        d, _ = cKDTree(centres).query(pts, k=2)
        is_wall = (d[:, 1] - d[:, 0]) < rng.uniform(0.9, 1.2) * min(x.spacing)
        vals = np.where(is_wall, rng.uniform(-20, 40), rng.uniform(-975, -930)).astype(np.float32)
        gi = tuple((pts_idx + x.side.offset).T)
        hu[gi] = vals
        mask[gi] = True
    return mask, c


DRAW = {"nodule": nodule, "ground_glass": ground_glass, "consolidation": consolidation, "emphysema": emphysema,
        "honeycombing": honeycombing}


def add_lesion(kind, rng, g, hu, lung_mask, spacing):
    """Draw one lesion of ``kind`` into ``hu`` (float32, in place); return ``(lesion_mask, info)``."""
    vols = [int((lung_mask == lab).sum()) for lab in (1, 2)]
    if sum(vols) == 0:
        raise ValueError("phantom has no lung to place a pathology in; use a larger shape")
    label = 1 if rng.random() < vols[0] / sum(vols) else 2
    if vols[label - 1] == 0:
        label = 3 - label
    target = loguniform(rng, *LESION_VOLUME_RANGE_CM3)
    x = SimpleNamespace(g=g, lung_mask=lung_mask, label=label, vols=vols, side=LungSide(g, lung_mask, label),
                        inside=lung_mask == label, target=target, r=radius_mm(target), spacing=spacing,
                        vox_cm3=float(np.prod(spacing)) / 1000.0)
    info = dict(kind=kind, side="right" if label == 1 else "left", target_volume_cm3=target)
    hu0 = hu.copy()
    for attempt in range(4):
        if attempt:
            hu[...] = hu0  # a too-small lesion (clipped by the lung border) is drawn again elsewhere
        w = np.zeros(hu.shape, dtype=np.float32)
        mask, c = DRAW[kind](rng, x, hu, w)
        if float(mask.sum()) * x.vox_cm3 >= 0.3 * target:
            break
    info["centre_mm"] = tuple(float(v) for v in c)
    return mask, info
