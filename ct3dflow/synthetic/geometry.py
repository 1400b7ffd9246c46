"""Geometry shared by the phantom families: voxel-centre coordinates in mm (LPS), smooth random fields,
tapered tubes with partial volume, random branching trees. Arrays are ``(z, y, x)``, points ``(x, y, z)`` mm.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


class Grid:
    """Physical coordinates of the voxel centres, as broadcastable (z, y, x) arrays."""

    def __init__(self, shape, spacing, origin):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.origin = tuple(float(o) for o in origin)
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        self.x1 = (self.origin[0] + sx * np.arange(nx)).astype(np.float32)
        self.y1 = (self.origin[1] + sy * np.arange(ny)).astype(np.float32)
        self.z1 = (self.origin[2] + sz * np.arange(nz)).astype(np.float32)
        self.X = self.x1[None, None, :]
        self.Y = self.y1[None, :, None]
        self.Z = self.z1[:, None, None]

    def box(self, lo, hi):
        """Index slices (z, y, x) covering the mm box [lo, hi] ((x, y, z) each), clipped to the grid."""
        sl = []
        for ax, (a, b) in zip((2, 1, 0), zip(lo, hi)):
            n = self.shape[ax]
            s = self.spacing[2 - ax]
            o = self.origin[2 - ax]
            i0 = max(0, int(math.floor((a - o) / s)))
            i1 = min(n, int(math.ceil((b - o) / s)) + 1)
            sl.append(slice(i0, max(i0, i1)))
        return (sl[2], sl[1], sl[0])

    def coords(self, box):
        zs, ys, xs = box
        return self.Z[zs], self.Y[:, ys], self.X[:, :, xs]

    def ellipsoid(self, c, r, pad: float = 4.0):
        """The box around the ellipsoid of centre ``c`` and radii ``r`` (mm, (x, y, z)) plus ``pad`` mm, and the
        normalised radius q of every voxel in it (q ≤ 1: inside)."""
        box = self.box(c - r - pad, c + r + pad)
        Z, Y, X = self.coords(box)
        return box, np.sqrt(((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2)

    def point_index(self, p):
        """(z, y, x) index of the voxel nearest to mm point p = (x, y, z), or None when outside."""
        idx = []
        for ax, c in zip((2, 1, 0), p):
            i = int(round((c - self.origin[2 - ax]) / self.spacing[2 - ax]))
            if not 0 <= i < self.shape[ax]:
                return None
            idx.append(i)
        return (idx[2], idx[1], idx[0])

    def index_to_point(self, idx):
        z, y, x = idx
        return np.array([self.x1[x], self.y1[y], self.z1[z]], dtype=np.float64)


def smooth_noise(rng, shape, sigma_vox: float, factor: int = 4) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: filtered noise on a coarse grid, upsampled linearly."""
    coarse = tuple(max(2, int(math.ceil(n / factor)) + 2) for n in shape)
    field_ = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma_vox / factor)
    zoom = [(n + 2 * factor) / c for n, c in zip(shape, coarse)]
    up = ndimage.zoom(field_, zoom, order=1, prefilter=False)
    up = up[factor : factor + shape[0], factor : factor + shape[1], factor : factor + shape[2]]
    up = up - up.mean()
    return (up / (up.std() + 1e-6)).astype(np.float32)


def tube(grid: Grid, fieldw: np.ndarray, p0, p1, r0: float, r1: float, soft: float) -> None:
    """Draw a tapered tube p0 -> p1 (mm, radii r0 -> r1) into the weight field with partial volume."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    rmax = max(r0, r1) + soft
    box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if any(s.stop <= s.start for s in box):
        return
    Z, Y, X = grid.coords(box)
    d = p1 - p0
    l2 = float(d @ d) or 1e-9
    t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / l2
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2)
    r = r0 + (r1 - r0) * t
    w = np.clip((r - dist) / soft + 0.5, 0.0, 1.0).astype(np.float32)
    np.maximum(fieldw[box], w, out=fieldw[box])


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v) + 1e-12)


def rotate_away(rng, d, angle_deg):
    """A unit vector at angle_deg from d, in a random plane."""
    d = unit(d)
    r = unit(rng.standard_normal(3))
    perp = unit(r - (r @ d) * d)
    a = math.radians(angle_deg)
    return unit(math.cos(a) * d + math.sin(a) * perp)


def tree(rng, grid, inside, start, direction, length, radius, depth, min_radius, max_depth, out):
    """Random branching tree of tube segments staying inside `inside` (a bool (z, y, x) array)."""
    if depth > max_depth or radius < min_radius:
        return
    for _ in range(3):
        end = np.asarray(start) + length * unit(direction)
        idx = grid.point_index(end)
        if idx is not None and inside[idx]:
            break
        length *= 0.6
    else:
        return
    r_end = radius * 0.85
    out.append((np.asarray(start, float), end, radius, r_end))
    n_children = 2 if rng.random() < 0.8 else 3
    for _ in range(n_children):
        child_dir = rotate_away(rng, direction, rng.uniform(20, 50))
        tree(rng, grid, inside, end, child_dir, length * rng.uniform(0.65, 0.85),
              r_end * rng.uniform(0.68, 0.8), depth + 1, min_radius, max_depth, out)
