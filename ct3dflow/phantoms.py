"""Synthetic chest CT phantoms in HU, their NIfTI / DICOM writers and a phantom archive maker.

The phantoms stand in for real chest CT in tests and in the demo (DESIGN §5). Each one is a random
torso per seed: fat and muscle wall, spine, ribs, sternum, mediastinum with heart and aorta, two lungs
of random size and shape with smooth and fine texture, trachea and main bronchi, branching vessel and
bronchial trees, and correlated CT noise. An abnormal phantom adds one pathology inside a lung
(:data:`PATHOLOGIES`), with its voxel mask and volume recorded.

Conventions (docs/ARCHITECTURE.md): arrays are ``(z, y, x)``; spacing and origin are SimpleITK's
``(x, y, z)`` in mm; LPS orientation with identity direction (``+x`` patient left, ``+y`` posterior,
``+z`` superior), so the patient's right lung (label 1 of ``lung_mask``) lies at small ``x``.

The anatomy, the pathology and the noise use separate random streams of the seed: ``make_phantom(s)``
and ``make_phantom(s, "nodule")`` share the same anatomy and noise, and differ only where the lesion is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

PATHOLOGIES: tuple[str, ...] = ("nodule", "ground_glass", "consolidation", "emphysema", "honeycombing")

#: named phantom sizes: shape (z, y, x) and spacing (x, y, z) in mm
SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    # tests: 128 x 112 voxels of 1.6 mm (205 x 179 mm), 64 slices of 2.5 mm (160 mm)
    "small": ((64, 112, 128), (1.6, 1.6, 2.5)),
    # demo: an adult-sized field of view (374 x 317 x 280 mm)
    "demo": ((112, 176, 208), (1.8, 1.8, 2.5)),
}

DEFAULT_SHAPE = SIZES["small"][0]
DEFAULT_SPACING = SIZES["small"][1]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HU_MIN, HU_MAX = -1024, 3071

# lesion volumes are drawn log-uniformly in this range (cm^3); the recorded volume is the mask's
LESION_VOLUME_RANGE_CM3 = (2.0, 100.0)


@dataclass
class Phantom:
    """One synthetic chest CT study."""

    hu: np.ndarray  # (z, y, x) int16 HU
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # (x, y, z) mm, LPS
    pathology: str | None
    lesion_mask: np.ndarray  # (z, y, x) bool
    lesion_volume_cm3: float
    lung_mask: np.ndarray  # (z, y, x) uint8: 0 background, 1 right lung, 2 left lung
    seed: int = 0
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    info: dict = field(default_factory=dict)  # lesion centre, side, target volume, anatomy numbers

    @property
    def label(self) -> int:
        return 0 if self.pathology is None else 1

    @property
    def voxel_volume_cm3(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def to_image(self, array: np.ndarray | None = None):
        """A SimpleITK image of ``hu`` (or of ``array``, e.g. a mask) with this phantom's geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.hu if array is None else array)
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(self.direction)
        return img


# ---------------------------------------------------------------------------------------------------
# geometry helpers (all in mm, LPS)


class _Grid:
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


def _smooth_noise(rng, shape, sigma_vox: float, factor: int = 4) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: filtered noise on a coarse grid, upsampled linearly."""
    coarse = tuple(max(2, int(math.ceil(n / factor)) + 2) for n in shape)
    field_ = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma_vox / factor)
    zoom = [(n + 2 * factor) / c for n, c in zip(shape, coarse)]
    up = ndimage.zoom(field_, zoom, order=1, prefilter=False)
    up = up[factor : factor + shape[0], factor : factor + shape[1], factor : factor + shape[2]]
    up = up - up.mean()
    return (up / (up.std() + 1e-6)).astype(np.float32)


def _tube(grid: _Grid, fieldw: np.ndarray, p0, p1, r0: float, r1: float, soft: float) -> None:
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


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v) + 1e-12)


def _rotate_away(rng, d, angle_deg):
    """A unit vector at angle_deg from d, in a random plane."""
    d = _unit(d)
    r = _unit(rng.standard_normal(3))
    perp = _unit(r - (r @ d) * d)
    a = math.radians(angle_deg)
    return _unit(math.cos(a) * d + math.sin(a) * perp)


def _tree(rng, grid, inside, start, direction, length, radius, depth, min_radius, max_depth, out):
    """Random branching tree of tube segments staying inside `inside` (a bool (z, y, x) array)."""
    if depth > max_depth or radius < min_radius:
        return
    for _ in range(3):
        end = np.asarray(start) + length * _unit(direction)
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
        child_dir = _rotate_away(rng, direction, rng.uniform(20, 50))
        _tree(rng, grid, inside, end, child_dir, length * rng.uniform(0.65, 0.85),
              r_end * rng.uniform(0.68, 0.8), depth + 1, min_radius, max_depth, out)


# ---------------------------------------------------------------------------------------------------
# the phantom


def _resolve_size(size, shape, spacing):
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(SIZES)} or pass shape=")
        s_shape, s_spacing = SIZES[size]
        shape = shape or s_shape
        spacing = spacing or s_spacing
    shape = tuple(int(n) for n in (shape or DEFAULT_SHAPE))
    spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING))
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 16 or min(spacing) <= 0:
        raise ValueError(f"phantom shape must be 3 ints >= 16 (z, y, x) and spacing 3 positive mm "
                         f"(x, y, z); got shape={shape}, spacing={spacing}")
    return shape, spacing


def make_phantom(
    seed: int,
    pathology: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    size: str | None = None,
    noise_hu: float | None = None,
) -> Phantom:
    """Make one synthetic chest CT phantom.

    seed: anatomy, lesion and noise are functions of it (same seed, same phantom).
    pathology: None (healthy) or one of :data:`PATHOLOGIES`.
    shape: (z, y, x) voxels, default (64, 112, 128); spacing: (x, y, z) mm, default (1.6, 1.6, 2.5).
    size: "small" (the default shape) or "demo" (adult-sized field of view); explicit shape/spacing win.
    noise_hu: CT noise standard deviation; default drawn per seed in 10–20 HU.
    """
    if pathology is not None and pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; choose one of {PATHOLOGIES} or None")
    shape, spacing = _resolve_size(size, shape, spacing)
    seed = int(seed)
    rng = np.random.default_rng([seed, 0])  # anatomy
    rng_tex = np.random.default_rng([seed, 1])  # texture fields
    rng_noise = np.random.default_rng([seed, 2])  # CT noise
    rng_path = np.random.default_rng([seed, 3, PATHOLOGIES.index(pathology) if pathology else 99])

    nz, ny, nx = shape
    sx, sy, sz = spacing
    fx, fy, fz = nx * sx, ny * sy, nz * sz
    # x/y centred on the isocentre; the top slice at z = -50 mm - a per-seed table offset
    origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0,
              round(-50.0 - (nz - 1) * sz - float(rng.uniform(0, 100)), 2))
    g = _Grid(shape, spacing, origin)
    X, Y, Z = g.X, g.Y, g.Z
    # ---- torso ------------------------------------------------------------------------------
    a = rng.uniform(0.9, 1.0) * min(165.0, 0.46 * fx)  # body semi-axis x (mm)
    b = rng.uniform(0.9, 1.0) * min(115.0, 0.43 * fy, 0.78 * a)  # body semi-axis y
    k = a / 165.0  # body scale relative to an adult
    cx0 = rng.uniform(-0.02, 0.02) * fx
    cy0 = rng.uniform(-0.03, 0.03) * fy
    fat = rng.uniform(5, 16) * k
    wall = rng.uniform(11, 17) * k
    ai, bi = a - fat - wall, b - fat - wall  # thoracic cavity
    X2, Y2 = X[0] - cx0, Y[0] - cy0  # (1, nx), (ny, 1)
    rho_body = np.sqrt((X2 / a) ** 2 + (Y2 / b) ** 2)  # (ny, nx)
    rho_fat = np.sqrt((X2 / (a - fat)) ** 2 + (Y2 / (b - fat)) ** 2)
    rho_cav = np.sqrt((X2 / ai) ** 2 + (Y2 / bi) ** 2)
    body2 = rho_body <= 1.0
    cavity2 = rho_cav <= 1.0

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu_fat = rng.uniform(-115, -85)
    hu_muscle = rng.uniform(35, 55)
    hu[:, body2] = hu_fat
    hu[:, (rho_fat <= 1.0)] = hu_muscle
    hu[:, cavity2] = rng.uniform(30, 40)  # mediastinal soft tissue (filled by the lungs later)
    bone = np.zeros(shape, dtype=bool)

    # ---- spine -----------------------------------------------------------------------------
    r_vb = rng.uniform(13, 18) * max(k, 0.6)
    ys = cy0 + bi - 0.55 * r_vb  # vertebral body centre, protruding into the cavity posteriorly
    vb_d = np.sqrt((X2) ** 2 + (Y[0] - ys) ** 2)
    r_canal = 0.55 * r_vb
    y_canal = ys + r_vb + r_canal * 0.9
    canal_d = np.sqrt(X2**2 + (Y[0] - y_canal) ** 2)
    # posterior elements: a ring around the canal and the spinous process towards the back
    post_ring = (canal_d <= r_canal + 3.5 * max(k, 0.6)) & ~(canal_d <= r_canal)
    spinous = (np.abs(X2) <= 3.0 * max(k, 0.6)) & (Y[0] > y_canal) & (Y[0] < cy0 + b - fat - 2)
    verte_h = rng.uniform(22, 28) * max(k, 0.7)
    disc = ((Z[:, 0, 0] - rng.uniform(0, verte_h)) % verte_h) < 0.22 * verte_h  # (nz,)
    cort = rng.uniform(700, 1000)
    canc = rng.uniform(180, 300)
    vb = vb_d <= r_vb
    vb_cortex = vb & (vb_d > r_vb - 2.0)
    hu[:, vb] = canc
    hu[:, vb_cortex] = cort
    hu[disc[:, None, None] & vb[None]] = rng.uniform(70, 100)
    hu[:, post_ring | spinous] = cort * 0.8
    hu[:, canal_d <= r_canal] = rng.uniform(5, 20)
    bone[:, vb | post_ring | spinous] = True
    bone[disc] &= ~vb[None]

    # ---- sternum -----------------------------------------------------------------------------
    st_d = np.sqrt((X2 / (12 * max(k, 0.6))) ** 2 + ((Y[0] - (cy0 - bi - wall * 0.45)) / (0.3 * wall)) ** 2)
    sternum = st_d <= 1.0
    hu[:, sternum] = canc
    hu[:, sternum & (st_d > 0.6)] = cort * 0.75
    bone[:, sternum] = True

    # ---- ribs (3D): curved tubes in the chest wall, descending anteriorly ------------------
    r_loc = np.sqrt(X2**2 + Y2**2) / np.maximum(rho_cav, 1e-6)  # centre-to-cavity-wall distance
    d_rad = (rho_cav - 1.0) * r_loc  # mm outside the cavity wall (2D)
    rib_rr = rng.uniform(3.0, 4.5) * max(k, 0.7)  # radial half-thickness
    rib_rz = rng.uniform(4.5, 6.5) * max(k, 0.7)  # cranio-caudal half-height
    rib_c = rib_rr + 1.0
    rib_pitch = rng.uniform(19, 26)
    rib_slope = rng.uniform(12, 25)
    rib_phase = rng.uniform(0, rib_pitch)
    near = np.abs(d_rad - rib_c) <= rib_rr  # (ny, nx) band in the wall
    anterior_gap = (Y[0] < cy0) & (np.abs(X2) < 0.22 * a)
    band = near & ~anterior_gap & (Y[0] < ys + 0.3 * r_vb) | near & ~anterior_gap & (np.abs(X2) > r_vb + 6)
    yy, xx = np.nonzero(band)
    zc_rib = rib_phase + rib_slope * (Y[0][yy, 0] - cy0) / bi  # (m,)
    dz = Z[:, 0, 0][:, None] - zc_rib[None, :]  # (nz, m)
    dz = (dz + rib_pitch / 2) % rib_pitch - rib_pitch / 2
    q = np.sqrt(((d_rad[yy, xx] - rib_c) / rib_rr)[None, :] ** 2 + (dz / rib_rz) ** 2)
    rib_vals = np.where(q < 0.6, canc + 80, rng.uniform(550, 750))
    rib_in = q < 1.0
    zi, mi = np.nonzero(rib_in)
    hu[zi, yy[mi], xx[mi]] = rib_vals[zi, mi]
    bone[zi, yy[mi], xx[mi]] = True
    # costal cartilage in the anterior gap
    cart = near & anterior_gap & (np.abs(X2) > 14 * max(k, 0.6))
    yy2, xx2 = np.nonzero(cart)
    if yy2.size:
        zc2 = rib_phase + rib_slope * (Y[0][yy2, 0] - cy0) / bi
        dz2 = (Z[:, 0, 0][:, None] - zc2[None, :] + rib_pitch / 2) % rib_pitch - rib_pitch / 2
        q2 = np.sqrt(((d_rad[yy2, xx2] - rib_c) / rib_rr)[None, :] ** 2 + (dz2 / rib_rz) ** 2)
        zi2, mi2 = np.nonzero(q2 < 1.0)
        hu[zi2, yy2[mi2], xx2[mi2]] = rng.uniform(100, 180)

    # ---- mediastinum: heart, aorta ----------------------------------------------------------
    heart_c = np.array([cx0 + rng.uniform(0.08, 0.22) * ai, cy0 - rng.uniform(0.1, 0.3) * bi,
                        g.z1[0] + rng.uniform(0.15, 0.3) * fz])
    heart_r = np.array([rng.uniform(0.36, 0.46) * ai, rng.uniform(0.45, 0.6) * bi,
                        rng.uniform(0.22, 0.3) * fz])
    hbox = g.box(heart_c - heart_r - 4, heart_c + heart_r + 4)
    hZ, hY, hX = g.coords(hbox)
    hq = np.sqrt(((hX - heart_c[0]) / heart_r[0]) ** 2 + ((hY - heart_c[1]) / heart_r[1]) ** 2
                 + ((hZ - heart_c[2]) / heart_r[2]) ** 2)
    heart = np.zeros(shape, dtype=bool)
    heart[hbox] = hq <= 1.0
    peri = np.zeros(shape, dtype=bool)
    peri[hbox] = (hq > 1.0) & (hq <= 1.0 + 3.0 / float(heart_r.min()))
    hu[heart & cavity2[None]] = rng.uniform(38, 50)
    hu[peri & cavity2[None]] = rng.uniform(-100, -70)
    mediast = np.zeros(shape, dtype=np.float32)
    r_ao = rng.uniform(9, 13) * max(k, 0.6)
    z_arch = g.z1[0] + rng.uniform(0.6, 0.75) * fz
    x_desc = cx0 + r_vb + r_ao + 2
    y_desc = ys - 0.2 * r_vb
    x_asc, y_asc = cx0 + 0.05 * ai, cy0 - 0.3 * bi
    ao_segments = [
        ((x_desc, y_desc, g.z1[0] - 5), (x_desc, y_desc, z_arch)),  # descending
        ((x_asc, y_asc, heart_c[2]), (x_asc, y_asc, z_arch)),  # ascending
        ((x_asc, y_asc, z_arch), (x_desc, y_desc, z_arch)),  # arch
    ]
    for p0, p1 in ao_segments:
        _tube(g, mediast, p0, p1, r_ao, r_ao, 1.0)
    hu_blood = rng.uniform(38, 50)
    hu += (mediast * (hu_blood - hu)) * cavity2[None]
    med_half = rng.uniform(14, 22) * max(k, 0.6)  # mediastinal half-width above the heart
    med_x0 = cx0 + rng.uniform(-3, 3)
    mediastinum2 = (np.abs(X2 - (med_x0 - cx0)) <= med_half) & (Y[0] < ys + 2)
    solid = np.maximum(mediast, heart.astype(np.float32))  # mediastinal organs, excluded from lungs

    # ---- lungs ----------------------------------------------------------------------------
    shape_noise = _smooth_noise(rng_tex, shape, sigma_vox=10.0 / min(spacing) * 1.6)
    lung_mask = np.zeros(shape, dtype=np.uint8)
    lungs_info = {}
    for label, side in ((1, -1.0), (2, 1.0)):  # right lung at small x (side -1)
        shrink = rng.uniform(0.85, 0.95) if label == 2 else rng.uniform(0.95, 1.05)
        cxl = cx0 + side * ai * rng.uniform(0.48, 0.56)
        axl = ai * rng.uniform(0.47, 0.56) * shrink
        cyl = cy0 + bi * rng.uniform(-0.05, 0.12)
        ayl = bi * rng.uniform(0.95, 1.1)
        # the apex stays a few slices below the top, the lung base above the bottom (upper abdomen)
        azl = fz * rng.uniform(0.5, 0.56) * (0.97 if label == 2 else 1.0)
        czl = g.z1[-1] - fz * rng.uniform(0.04, 0.1) - azl
        ell = (((X - cxl) / axl) ** 2 + ((Y - cyl) / ayl) ** 2 + ((Z - czl) / azl) ** 2
               + 0.1 * shape_noise)
        lung = ell <= 1.0
        # the diaphragm dome: the lung base rises towards the centre of each hemithorax
        dome_h = rng.uniform(0.12, 0.22) * fz
        z_base = g.z1[0] + max(rng.uniform(0.04, 0.1) * fz, 2.5 * sz) + (0.0 if label == 1 else 0.03 * fz)
        rho_d = np.clip(((X - cxl) / axl) ** 2 + ((Y - cyl) / ayl) ** 2, 0, 1)
        lung &= Z >= z_base + dome_h * (1.0 - rho_d)
        lung &= (side * X2 > 0)[None]
        lung &= cavity2[None] & ~mediastinum2[None]
        lung &= ~((vb_d <= r_vb + 4) | (np.abs(X2) <= r_vb + 2) & (Y[0] > ys))[None]
        lung &= solid < 0.2
        lung &= ~bone
        lung_mask[lung] = label
        lungs_info[label] = dict(centre=(cxl, cyl, czl), axes=(axl, ayl, azl))
    lung = lung_mask > 0

    # parenchyma: base, gravity gradient (posterior denser), smooth and fine texture
    base = rng.uniform(-880, -850)
    grad = rng.uniform(10, 25)
    low = _smooth_noise(rng_tex, shape, sigma_vox=14.0 / min(spacing) * 1.6)
    fine = ndimage.gaussian_filter(rng_tex.standard_normal(shape).astype(np.float32), 0.9)
    fine *= 1.0 / (fine.std() + 1e-6)
    parenchyma = (base + grad * np.clip((Y - cy0) / bi, -1, 1) + rng.uniform(12, 18) * low
                  + rng.uniform(6, 12) * fine)
    hu[lung] = np.broadcast_to(parenchyma, shape)[lung]

    # ---- airways: trachea, main bronchi (mediastinal), bronchial trees (in the lungs) --------
    air = np.zeros(shape, dtype=np.float32)
    wallw = np.zeros(shape, dtype=np.float32)
    r_tr = max(rng.uniform(7, 10) * k, 3.5)
    x_tr = cx0 + rng.uniform(-3, 3)
    y_tr = ys - r_vb - r_tr - rng.uniform(4, 10)
    z_car = g.z1[0] + rng.uniform(0.55, 0.7) * fz
    top = g.z1[-1] + 5
    air_main = np.zeros(shape, dtype=np.float32)
    _tube(g, air_main, (x_tr, y_tr, top), (x_tr, y_tr, z_car), r_tr, r_tr, 1.0)
    _tube(g, wallw, (x_tr, y_tr, top), (x_tr, y_tr, z_car), r_tr + 2, r_tr + 2, 1.0)
    vessel = np.zeros(shape, dtype=np.float32)
    min_r = 0.35 * min(spacing)
    for label, side in ((1, -1.0), (2, 1.0)):
        cxl, cyl, czl = lungs_info[label]["centre"]
        inside = lung_mask == label
        if not inside.any():
            continue
        hilum = np.array([cx0 + side * (med_half + rng.uniform(4, 10)), y_tr + rng.uniform(0, 8),
                          z_car - rng.uniform(8, 16) * (0.8 if label == 1 else 1.2)])
        r_mb = max(r_tr * rng.uniform(0.65, 0.8), 2.5)
        _tube(g, air_main, (x_tr, y_tr, z_car), hilum, r_tr * 0.9, r_mb, 1.0)
        _tube(g, wallw, (x_tr, y_tr, z_car), hilum, r_tr * 0.9 + 2, r_mb + 2, 1.0)
        # bronchi and vessels start where the hilum meets the lung
        start = hilum + np.array([side * 6.0, 0.0, 0.0])
        lung_c = np.array([cxl, cyl, czl])
        seg_b: list = []
        for _ in range(int(rng.integers(3, 5))):
            d0 = _rotate_away(rng, lung_c - start, rng.uniform(5, 45))
            _tree(rng, g, inside, start, d0, 0.35 * lungs_info[label]["axes"][0] + 10, r_mb * 0.7,
                  0, max(min_r, 1.0), 3, seg_b)
        for p0, p1, r0, r1 in seg_b:
            _tube(g, wallw, p0, p1, r0 + 0.8, r1 + 0.8, 0.8 * min(spacing))
            _tube(g, air, p0, p1, r0, r1, 0.8 * min(spacing))
        seg_v: list = []
        for _tree_i in range(int(rng.integers(5, 8))):  # arteries and veins
            st = start + rng.uniform(-8, 8, size=3)
            d0 = _rotate_away(rng, lung_c - st, rng.uniform(10, 70))
            _tree(rng, g, inside, st, d0, 0.3 * lungs_info[label]["axes"][0] + 12,
                  max(rng.uniform(3.5, 5.5) * k, 2.0), 0, min_r, 6, seg_v)
        for p0, p1, r0, r1 in seg_v:
            _tube(g, vessel, p0, p1, r0, r1, 0.8 * min(spacing))
    hu_vessel = rng.uniform(30, 50)
    vessel *= lung
    hu += vessel * (hu_vessel - hu)
    air = np.maximum(air, air_main)
    wallw = np.maximum(wallw - air, 0.0)
    hu += wallw * (rng.uniform(20, 50) - hu) * (lung | cavity2[None])
    air_in = air * ((lung | cavity2[None]) & ~bone)
    hu += air_in * (-1000.0 - hu)
    # the trachea and main bronchi are airway, not lung
    lung_mask[air_main > 0.5] = 0

    # ---- pathology --------------------------------------------------------------------------
    lesion_mask = np.zeros(shape, dtype=bool)
    info: dict = dict(noise_hu=None, lungs=lungs_info, body_axes=(a, b))
    if pathology is not None:
        lesion_mask, linfo = _add_pathology(pathology, rng_path, g, hu, lung_mask, spacing)
        info.update(linfo)

    # ---- CT noise ---------------------------------------------------------------------------
    sigma = float(noise_hu) if noise_hu is not None else float(rng_noise.uniform(10, 20))
    noise = ndimage.gaussian_filter(rng_noise.standard_normal(shape).astype(np.float32), 0.6)
    noise *= sigma / (noise.std() + 1e-6)
    hu += noise
    info["noise_hu"] = sigma
    hu_i = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    vox_cm3 = sx * sy * sz / 1000.0
    return Phantom(hu=hu_i, spacing=spacing, origin=origin, pathology=pathology, lesion_mask=lesion_mask,
                   lesion_volume_cm3=float(lesion_mask.sum() * vox_cm3), lung_mask=lung_mask, seed=seed,
                   info=info)


# ---------------------------------------------------------------------------------------------------
# pathologies


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _radius_mm(volume_cm3):
    return (3.0 * volume_cm3 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blob_q(g, box, c, r, rng, lobulation=0.12, elong=0.25):
    """Normalised radius of a lobulated ellipsoidal blob (<= 1 inside) on the box's voxels."""
    Z, Y, X = g.coords(box)
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    s = np.exp(rng.uniform(-elong, elong, 3))
    s /= s.prod() ** (1.0 / 3.0)
    raw = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    dist = np.sqrt((dx / s[0]) ** 2 + (dy / s[1]) ** 2 + (dz / s[2]) ** 2)
    pert = np.zeros_like(raw)
    for _ in range(4):
        v = _unit(rng.standard_normal(3))
        cos = (dx * v[0] + dy * v[1] + dz * v[2]) / raw
        pert += rng.uniform(-lobulation, lobulation) * (1.5 * cos * cos - 0.5)
        pert += rng.uniform(-lobulation, lobulation) * 0.5 * (2.5 * cos**3 - 1.5 * cos)
    return (dist / (r * (1.0 + pert))).astype(np.float32)


class _LungSide:
    """One lung's bounding box and depth (mm from its border) for placing lesions."""

    def __init__(self, g, lung_mask, label):
        self.label = label
        objs = ndimage.find_objects(lung_mask, max_label=2)
        sl = objs[label - 1]
        self.box = sl
        inside = lung_mask[sl] == label
        padded = np.pad(inside, 1)
        sx, sy, sz = g.spacing
        self.depth = ndimage.distance_transform_edt(padded, sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
        self.inside = inside
        self.offset = np.array([s.start for s in sl])

    def pick(self, rng, g, mode, r):
        d = self.depth
        if mode == "pleural":
            cand = np.argwhere(self.inside & (d <= 1.6 * max(g.spacing)))
        else:
            need = min(0.8 * r, 0.6 * float(d.max()))
            cand = np.argwhere(d >= need)
        if cand.size == 0:
            cand = np.argwhere(self.inside)
        idx = tuple(int(v) for v in cand[int(rng.integers(len(cand)))] + self.offset)
        return g.index_to_point(idx)


def _add_pathology(kind, rng, g, hu, lung_mask, spacing):
    """Draw one lesion of `kind` into `hu` (float32, in place); return (lesion_mask, info)."""
    vols = [int((lung_mask == lab).sum()) for lab in (1, 2)]
    if sum(vols) == 0:
        raise ValueError("phantom has no lung to place a pathology in; use a larger shape")
    label = 1 if rng.random() < vols[0] / sum(vols) else 2
    if vols[label - 1] == 0:
        label = 3 - label
    side = _LungSide(g, lung_mask, label)
    lung_any = lung_mask > 0
    inside = lung_mask == label
    target = _loguniform(rng, *LESION_VOLUME_RANGE_CM3)
    vox_cm3 = float(np.prod(spacing)) / 1000.0
    r = _radius_mm(target)
    info = dict(kind=kind, side="right" if label == 1 else "left", target_volume_cm3=target)
    hu0 = hu.copy()
    for attempt in range(4):
        if attempt:
            hu[...] = hu0  # a too-small lesion (clipped by the lung border) is drawn again elsewhere
        w = np.zeros(hu.shape, dtype=np.float32)
        if kind == "nodule":
            c = side.pick(rng, g, "deep", r)
            box = g.box(c - 2.2 * r - 4, c + 2.2 * r + 4)
            q = _blob_q(g, box, c, r, rng, lobulation=0.15, elong=0.2)
            w[box] = np.clip((1.0 - q) * r / (0.8 * min(spacing)) + 0.5, 0, 1)
            if rng.random() < 0.5:  # spiculation
                for _ in range(int(rng.integers(4, 12))):
                    d = _unit(rng.standard_normal(3))
                    _tube(g, w, c + 0.7 * r * d, c + r * rng.uniform(1.3, 2.0) * d,
                          rng.uniform(0.8, 1.4), 0.4, 0.8 * min(spacing))
            mask = (w >= 0.5) & inside
            value = rng.uniform(0, 60)
            wl = w * inside
            hu += wl * (value - hu)
        elif kind == "ground_glass":
            c = side.pick(rng, g, "deep", r)
            box = g.box(c - 1.4 * r - 4, c + 1.4 * r + 4)
            rr = r / 0.9
            q = _blob_q(g, box, c, rr, rng, lobulation=0.15, elong=0.3)
            w[box] = _smoothstep((1.15 - q) / 0.5)
            mask = (w >= 0.5) & inside
            value = rng.uniform(-700, -400)
            patch = np.zeros_like(w)
            patch[box] = rng.uniform(20, 50) * _smooth_noise(rng, w[box].shape, 6.0, factor=2)
            wl = w * inside
            hu += wl * np.maximum(value + patch - hu, 0.0)
        elif kind == "consolidation":
            mode = "pleural" if rng.random() < 0.8 else "deep"
            rr = r * (2.0 ** (1.0 / 3.0) if mode == "pleural" else 1.0)
            c = side.pick(rng, g, mode, rr)
            box = g.box(c - 1.5 * rr - 4, c + 1.5 * rr + 4)
            q = _blob_q(g, box, c, rr, rng, lobulation=0.12, elong=0.35)
            w[box] = _smoothstep((1.1 - q) / 0.3)
            mask = (w >= 0.5) & inside
            value = rng.uniform(0, 50)
            wl = w * inside
            hu += wl * np.maximum(value - hu, 0.0)
            if rng.random() < 0.7 and mask.any():  # air bronchograms
                ab = np.zeros_like(w)
                segs: list = []
                for _ in range(int(rng.integers(1, 4))):
                    st = c + _unit(rng.standard_normal(3)) * rr * 0.3
                    _tree(rng, g, mask, st, _unit(rng.standard_normal(3)), 0.6 * rr,
                          rng.uniform(1.0, 2.0), 0, 0.5, 2, segs)
                for p0, p1, r0, r1 in segs:
                    _tube(g, ab, p0, p1, r0, r1, 0.8 * min(spacing))
                ab *= mask
                hu += ab * (rng.uniform(-1000, -960) - hu)
        elif kind == "emphysema":
            n = int(rng.integers(3, 11))
            parts = rng.dirichlet(np.full(n, 2.0)) * target
            c = None
            for v in parts:
                rj = _radius_mm(max(v, 0.05))
                lab_j = label if rng.random() < 0.6 or vols[2 - label] == 0 else 3 - label
                sd = side if lab_j == label else _LungSide(g, lung_mask, lab_j)
                cj = sd.pick(rng, g, "deep", rj * 0.6)
                c = cj if c is None else c
                box = g.box(cj - 1.4 * rj - 3, cj + 1.4 * rj + 3)
                q = _blob_q(g, box, cj, rj, rng, lobulation=0.2, elong=0.3)
                np.maximum(w[box], np.clip((1.0 - q) * rj / (0.8 * min(spacing)) + 0.5, 0, 1), out=w[box])
            mask = (w >= 0.5) & lung_any
            value = rng.uniform(-1000, -975)
            wl = w * lung_any
            hu += wl * (value - hu)
        elif kind == "honeycombing":
            rr = _radius_mm(target) * 1.7
            c = side.pick(rng, g, "pleural", rr)
            depth_lim = rng.uniform(8, 18)
            box = side.box
            q = _blob_q(g, box, c, rr, rng, lobulation=0.15, elong=0.3)
            region = (q <= 1.0) & side.inside & (side.depth <= depth_lim)
            pts_idx = np.argwhere(region)
            mask = np.zeros(hu.shape, dtype=bool)
            if len(pts_idx) >= 8:
                from scipy.spatial import cKDTree

                sx, sy, sz = spacing
                pts = np.stack([pts_idx[:, 2] * sx, pts_idx[:, 1] * sy, pts_idx[:, 0] * sz], axis=1)
                rc = rng.uniform(3.0, 5.5) * max(1.0, min(spacing) / 1.6)
                n_c = max(4, int(len(pts) * vox_cm3 * 1000.0 / (4.0 / 3.0 * math.pi * rc**3)))
                centres = pts[rng.integers(len(pts), size=n_c)] + rng.uniform(-1, 1, size=(n_c, 3))
                d, _ = cKDTree(centres).query(pts, k=2)
                wall_t = rng.uniform(0.9, 1.2) * min(spacing)
                is_wall = (d[:, 1] - d[:, 0]) < wall_t
                vals = np.where(is_wall, rng.uniform(-20, 40), rng.uniform(-975, -930)).astype(np.float32)
                gi = tuple((pts_idx + side.offset).T)
                hu[gi] = vals
                mask[gi] = True
        else:  # pragma: no cover - checked by make_phantom
            raise ValueError(kind)
        vol = float(mask.sum()) * vox_cm3
        if vol >= 0.3 * target:
            break
    info["centre_mm"] = tuple(float(v) for v in c)
    return mask, info


# ---------------------------------------------------------------------------------------------------
# writers


def write_nifti(phantom: Phantom, path) -> Path:
    """Write the phantom's HU as an int16 NIfTI (or any SimpleITK format, by extension)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(phantom.to_image(phantom.hu.astype(np.int16)), str(path), True)
    return path


def write_mask(phantom: Phantom, path, which: str = "lung") -> Path:
    """Write the lung mask (uint8 0/1/2) or the lesion mask (uint8 0/1) on the phantom's grid."""
    import SimpleITK as sitk

    if which not in ("lung", "lesion"):
        raise ValueError(f"which must be 'lung' or 'lesion', got {which!r}")
    arr = phantom.lung_mask if which == "lung" else phantom.lesion_mask.astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(phantom.to_image(arr.astype(np.uint8)), str(path), True)
    return path


def phantom_uid(seed: int, *parts) -> str:
    """A DICOM UID derived deterministically from the seed and `parts`."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["ct3dflow-phantom", str(int(seed)), *[str(p) for p in parts]]))


def write_dicom_series(
    phantom: Phantom,
    folder,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str | None = None,
    series_number: int = 1,
    series_description: str = "CT3DFlow phantom chest",
    extra_tags: dict[str, str] | None = None,
) -> list[Path]:
    """Write the phantom as a CT DICOM series, one file per axial slice, into `folder`.

    Stored pixels are HU + 1024 (RescaleIntercept -1024, RescaleSlope 1). UIDs are derived from the
    seed unless given. The fake patient name, id and birth date are there so that privacy tests can
    check that they never leak into outputs. `extra_tags` ("gggg|eeee" -> value) are set on every slice.
    Returns the file paths, in slice order (inferior to superior).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seed = phantom.seed
    study_uid = study_uid or phantom_uid(seed, "study")
    series_uid = series_uid or phantom_uid(seed, "series", series_number)
    frame_uid = phantom_uid(seed, "frame")
    patient_id = patient_id or f"PH{seed:08d}"
    rng = np.random.default_rng([seed, 7])
    birth = f"{int(rng.integers(1940, 2000))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    sx, sy, sz = phantom.spacing
    # int16 HU with intercept -1024: GDCM stores HU + 1024 (0..4095); see _mark_unsigned
    img = phantom.to_image(np.clip(phantom.hu, HU_MIN, HU_MAX).astype(np.int16))
    common = {
        "0008|0060": "CT",
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0016": CT_IMAGE_STORAGE,
        "0008|0020": "20260101",
        "0008|0021": "20260101",
        "0008|0030": "090000",
        "0008|0031": "090000",
        "0008|0050": f"ACC{seed:08d}",
        "0008|0070": "CT3DFlow",
        "0008|0080": "Phantom General Hospital",
        "0008|0090": "DOCTOR^FAKE",
        "0008|1030": "CT CHEST",
        "0008|103e": series_description,
        "0010|0010": f"PHANTOM^{seed}",
        "0010|0020": patient_id,
        "0010|0030": birth,
        "0010|0040": "O",
        "0018|0015": "CHEST",
        "0018|0050": f"{sz:g}",
        "0018|0060": "120",
        "0018|0088": f"{sz:g}",
        "0018|5100": "FFS",
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0010": f"{seed % 100000}",
        "0020|0011": str(int(series_number)),
        "0020|0052": frame_uid,
        "0020|0037": "1\\0\\0\\0\\1\\0",
        "0028|0030": f"{sy:g}\\{sx:g}",  # row spacing (y), column spacing (x)
        "0028|1050": "-600",
        "0028|1051": "1500",
        "0028|1052": "-1024",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    if extra_tags:
        common.update(extra_tags)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in pos))
        sl.SetMetaData("0020|1041", f"{pos[2]:.4f}")
        sl.SetMetaData("0020|0013", str(i + 1))
        sl.SetMetaData("0008|0018", phantom_uid(seed, "sop", series_uid, i))
        p = folder / f"IM{i + 1:04d}.dcm"
        writer.SetFileName(str(p))
        writer.Execute(sl)
        paths.append(p)
    _mark_unsigned(paths)
    return paths


def _mark_unsigned(paths) -> None:
    """GDCM writes HU + 1024 (0..4095) as *signed* 16-bit; mark it unsigned 12-of-16 bits, as CT
    scanners store it (the pixel bytes are the same for values below 32768)."""
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelRepresentation = 0
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.save_as(p)


# ---------------------------------------------------------------------------------------------------
# archives


def _split_counts(n: int, fracs: Sequence[float]) -> list[int]:
    """Largest-remainder split of n into len(fracs) parts; every part with a positive fraction gets
    at least one item when n allows."""
    f = np.asarray(fracs, dtype=float)
    f = f / f.sum() if f.sum() > 0 else np.full(len(f), 1.0 / len(f))
    raw = f * n
    cnt = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    for i in np.nonzero((f > 0) & (cnt == 0))[0]:
        j = int(np.argmax(cnt))
        if cnt[j] > 1:
            cnt[j] -= 1
            cnt[i] += 1
    return [int(c) for c in cnt]


def make_archive(
    out_dir,
    n_normal: int,
    n_abnormal: int,
    fmt: str = "nifti",
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
    size: str | None = None,
    pathologies: Sequence[str] = PATHOLOGIES,
    write_lung_masks: bool = False,
    progress: bool | None = None,
):
    """Write a phantom archive and its manifest; return the manifest as a DataFrame.

    Each study is ``out_dir/<study_id>.nii.gz`` (fmt="nifti") or the DICOM folder ``out_dir/<study_id>/``
    (fmt="dicom"); ``out_dir/manifest.parquet`` has the columns study_id, path (relative to the manifest),
    split, label, pathology, lesion_volume_cm3, seed (and mask_path with ``write_lung_masks``).
    splits: (train, val, test) fractions of the normal studies. Abnormal studies go to val and test only
    (in the ratio of their fractions), never to train: the flow is trained on healthy studies only.
    Pathology kinds are cycled within val and within test, so each holds every kind when there are enough.
    """
    import pandas as pd

    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    if n_normal < 0 or n_abnormal < 0:
        raise ValueError("n_normal and n_abnormal must be >= 0")
    for k in pathologies:
        if k not in PATHOLOGIES:
            raise ValueError(f"unknown pathology {k!r}; choose from {PATHOLOGIES}")
    splits = tuple(float(s) for s in splits)
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative (train, val, test) fractions, got {splits}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([int(seed), 11])
    n_tr, n_va, n_te = _split_counts(n_normal, splits)
    normal_splits = ["train"] * n_tr + ["val"] * n_va + ["test"] * n_te
    rng.shuffle(normal_splits)
    if splits[1] + splits[2] > 0:
        ab_va, ab_te = _split_counts(n_abnormal, splits[1:])
    else:
        ab_va, ab_te = n_abnormal - n_abnormal // 2, n_abnormal // 2
    kinds = list(pathologies)
    ab_val = [("val", kinds[i % len(kinds)]) for i in range(ab_va)]
    ab_test = [("test", kinds[i % len(kinds)]) for i in range(ab_te)]
    abnormal = []  # interleave val and test so a partial archive stays balanced
    for i in range(max(ab_va, ab_te)):
        abnormal += ab_val[i : i + 1] + ab_test[i : i + 1]

    plan = [(s, None) for s in normal_splits] + abnormal
    width = max(4, len(str(len(plan))))
    rows = []
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        from tqdm import tqdm

        it = tqdm(list(enumerate(plan)), desc=f"phantoms ({fmt})", unit="study", disable=not progress)
    except ImportError:  # pragma: no cover
        it = list(enumerate(plan))
    for i, (split, kind) in it:
        study_seed = int(seed) * 100_000 + i
        study_id = f"phantom-{int(seed)}-{i:0{width}d}"
        ph = make_phantom(study_seed, kind, shape=shape, spacing=spacing, size=size)
        if fmt == "nifti":
            rel = f"{study_id}.nii.gz"
            write_nifti(ph, out / rel)
        else:
            rel = study_id
            write_dicom_series(ph, out / rel)
        row = dict(study_id=study_id, path=rel, split=split, label=int(kind is not None), pathology=kind,
                   lesion_volume_cm3=float(ph.lesion_volume_cm3), seed=study_seed)
        if write_lung_masks:
            mrel = f"{study_id}_lungs.nii.gz"
            write_mask(ph, out / mrel, "lung")
            row["mask_path"] = mrel
        rows.append(row)
    cols = ["study_id", "path", "split", "label", "pathology", "lesion_volume_cm3", "seed"]
    if write_lung_masks:
        cols.append("mask_path")
    df = pd.DataFrame(rows, columns=cols)
    df["label"] = df["label"].astype("int64")
    df["seed"] = df["seed"].astype("int64")
    df["pathology"] = df["pathology"].astype(object).where(df["pathology"].notna(), None)
    df.to_parquet(out / "manifest.parquet", index=False)
    return df


__all__ = [
    "PATHOLOGIES",
    "SIZES",
    "Phantom",
    "make_phantom",
    "write_nifti",
    "write_mask",
    "write_dicom_series",
    "phantom_uid",
    "make_archive",
]
