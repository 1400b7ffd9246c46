"""Phantom family B: a second anatomy, different from family A where a hospital's patients and scanners
differ from a training archive (issue 16): body shape, heart size, airway tree, vessel density and
calibre, lung density, CT noise and reconstruction sharpness.

* **body**: a superellipse (boxier than A's ellipse, ``|x/a|^p + |y/b|^p ≤ 1``, p 2.2–3), rounder
  (b/a 0.78–0.95), with a thicker fat layer (12–28 mm) and a thinner muscle wall;
* **heart**: larger (half-axes 0.45–0.55 of the cavity across, 0.55–0.7 front to back) and further left; a
  wider upper mediastinum and a larger aorta;
* **lungs**: taller, with a flatter diaphragm, denser parenchyma (−840…−790 HU) with a steeper gravity
  gradient and coarser texture;
* **airways**: more bronchial trees per lung (4–6, one generation deeper) with thicker walls;
* **vessels**: denser and thicker trees (8–12 per lung, 4.5–7 mm at the hilum, one generation deeper),
  brighter (40–70 HU, as with a little contrast);
* **scanner**: noise of 15–30 HU with a sharper kernel (0.35-voxel blur instead of 0.6) and edge
  enhancement (an unsharp mask), as a sharp lung reconstruction kernel gives.

The skeleton (spine, sternum, ribs) is family A's (:mod:`.family_a`), placed in B's body. The pathologies
are the same five kinds (:mod:`.lesions`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from . import family_a
from .geometry import Grid, rotate_away, smooth_noise, tree, tube

NOISE_HU = (15.0, 30.0)


def torso(rng, g: Grid) -> tuple[np.ndarray, np.ndarray, SimpleNamespace]:
    """A superelliptic body with a thick fat layer; returns the fields the skeleton of family A reads."""
    nz, ny, nx = g.shape
    sx, sy, sz = g.spacing
    fx, fy, fz = nx * sx, ny * sy, nz * sz
    a = rng.uniform(0.88, 0.98) * min(170.0, 0.46 * fx)
    b = min(rng.uniform(0.78, 0.95) * a, 0.45 * fy)
    k = a / 165.0
    p = rng.uniform(2.2, 3.0)
    cx0, cy0 = rng.uniform(-0.02, 0.02) * fx, rng.uniform(-0.02, 0.02) * fy
    fat, wall = rng.uniform(12, 28) * k, rng.uniform(8, 14) * k
    ai, bi = a - fat - wall, b - fat - wall
    X2, Y2 = g.X[0] - cx0, g.Y[0] - cy0

    def rho(ax, by):
        return (np.abs(X2 / ax) ** p + np.abs(Y2 / by) ** p) ** (1.0 / p)

    rho_cav = rho(ai, bi)
    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    hu[:, rho(a, b) <= 1.0] = rng.uniform(-110, -80)  # fat
    hu[:, rho(a - fat, b - fat) <= 1.0] = rng.uniform(40, 60)  # muscle
    cavity2 = rho_cav <= 1.0
    hu[:, cavity2] = rng.uniform(30, 45)
    bone = np.zeros(g.shape, dtype=bool)
    t = SimpleNamespace(fx=fx, fy=fy, fz=fz, a=a, b=b, k=k, cx0=cx0, cy0=cy0, fat=fat, wall=wall, ai=ai, bi=bi,
                        X2=X2, Y2=Y2, rho_cav=rho_cav, cavity2=cavity2)
    return hu, bone, t


def mediastinum(rng, g: Grid, hu, t) -> None:
    """A large heart set to the left, a wide upper mediastinum, a large aorta."""
    heart_c = np.array([t.cx0 + rng.uniform(0.18, 0.3) * t.ai, t.cy0 - rng.uniform(0.05, 0.2) * t.bi,
                        g.z1[0] + rng.uniform(0.12, 0.25) * t.fz])
    heart_r = np.array([rng.uniform(0.45, 0.55) * t.ai, rng.uniform(0.55, 0.7) * t.bi, rng.uniform(0.25, 0.33) * t.fz])
    hbox, hq = g.ellipsoid(heart_c, heart_r)
    heart = np.zeros(g.shape, dtype=bool)
    heart[hbox] = hq <= 1.0
    hu[heart & t.cavity2[None]] = rng.uniform(35, 55)
    vessels = np.zeros(g.shape, dtype=np.float32)
    r_ao = rng.uniform(12, 16) * max(t.k, 0.6)
    z_arch = g.z1[0] + rng.uniform(0.62, 0.78) * t.fz
    x_desc, y_desc = t.cx0 + t.r_vb + r_ao + 1, t.ys - 0.25 * t.r_vb
    x_asc, y_asc = t.cx0 + 0.08 * t.ai, t.cy0 - 0.25 * t.bi
    for p0, p1 in (((x_desc, y_desc, g.z1[0] - 5), (x_desc, y_desc, z_arch)),
                   ((x_asc, y_asc, heart_c[2]), (x_asc, y_asc, z_arch)),
                   ((x_asc, y_asc, z_arch), (x_desc, y_desc, z_arch))):
        tube(g, vessels, p0, p1, r_ao, r_ao * 0.9, 1.0)
    hu += (vessels * (rng.uniform(40, 60) - hu)) * t.cavity2[None]
    t.med_half = rng.uniform(20, 30) * max(t.k, 0.6)
    t.mediastinum2 = (np.abs(t.X2 - rng.uniform(-3, 3)) <= t.med_half) & (g.Y[0] < t.ys + 2)
    t.solid = np.maximum(vessels, heart.astype(np.float32))


def lungs(rng, rng_tex, g: Grid, bone, t) -> tuple[np.ndarray, dict]:
    """Tall lungs with a flat diaphragm, bent by a coarse smooth field, kept off the heart and spine."""
    X, Y, Z = g.X, g.Y, g.Z
    bend = smooth_noise(rng_tex, g.shape, sigma_vox=16.0 / min(g.spacing))
    lung_mask = np.zeros(g.shape, dtype=np.uint8)
    info = {}
    for label, side in ((1, -1.0), (2, 1.0)):
        cxl = t.cx0 + side * t.ai * rng.uniform(0.5, 0.58)
        axl = t.ai * rng.uniform(0.5, 0.6) * (rng.uniform(0.8, 0.9) if label == 2 else 1.0)
        cyl, ayl = t.cy0 + t.bi * rng.uniform(0.0, 0.1), t.bi * rng.uniform(1.0, 1.15)
        azl = t.fz * rng.uniform(0.55, 0.62)
        czl = g.z1[-1] - t.fz * rng.uniform(0.03, 0.07) - azl
        q = ((X - cxl) / axl) ** 2 + ((Y - cyl) / ayl) ** 2 + (np.maximum(Z - czl, 0) / azl) ** 2 + 0.12 * bend
        z_base = g.z1[0] + max(rng.uniform(0.06, 0.12) * t.fz, 2.5 * g.spacing[2])
        lung = (q <= 1.0) & (Z >= z_base + rng.uniform(0.04, 0.1) * t.fz * (1.0 - np.clip(q, 0, 1)))
        lung &= (side * t.X2 > 0)[None] & t.cavity2[None] & ~t.mediastinum2[None]
        lung &= ~((t.vb_d <= t.r_vb + 5) | (np.abs(t.X2) <= t.r_vb + 3) & (Y[0] > t.ys))[None]
        lung &= t.solid < 0.1
        lung &= ~ndimage.binary_dilation(t.solid > 0.5, iterations=1) & ~bone
        lung_mask[lung] = label
        info[label] = dict(centre=(cxl, cyl, czl), axes=(axl, ayl, azl))
    return lung_mask, info


def parenchyma(rng, rng_tex, g: Grid, hu, lung, t) -> None:
    """Denser lung, a steeper gravity gradient, coarse and fine texture of other correlation lengths."""
    coarse = smooth_noise(rng_tex, g.shape, sigma_vox=9.0 / min(g.spacing))
    fine = ndimage.gaussian_filter(rng_tex.standard_normal(g.shape).astype(np.float32), 0.6)
    fine /= fine.std() + 1e-6
    values = (rng.uniform(-840, -790) + rng.uniform(20, 40) * np.clip((g.Y - t.cy0) / t.bi, -1, 1)
              + rng.uniform(15, 25) * coarse + rng.uniform(8, 14) * fine)
    hu[lung] = np.broadcast_to(values, g.shape)[lung]


def airways_and_vessels(rng, g: Grid, hu, lung_mask, lungs_info, bone, t) -> None:
    """A trachea and main bronchi; per lung 4–6 bronchial trees with thick walls and 8–12 thick vessel trees."""
    lung = lung_mask > 0
    cav = t.cavity2[None]
    air, wallw, vessel = (np.zeros(g.shape, dtype=np.float32) for _ in range(3))
    air_main = np.zeros(g.shape, dtype=np.float32)
    r_tr = max(rng.uniform(8, 11) * t.k, 4.0)
    x_tr, y_tr = t.cx0 + rng.uniform(-4, 4), t.ys - t.r_vb - r_tr - rng.uniform(3, 8)
    z_car = g.z1[0] + rng.uniform(0.58, 0.72) * t.fz
    tube(g, air_main, (x_tr, y_tr, g.z1[-1] + 5), (x_tr, y_tr, z_car), r_tr, r_tr, 1.0)
    tube(g, wallw, (x_tr, y_tr, g.z1[-1] + 5), (x_tr, y_tr, z_car), r_tr + 2.5, r_tr + 2.5, 1.0)
    min_r = 0.35 * min(g.spacing)
    soft = 0.8 * min(g.spacing)
    for label, side in ((1, -1.0), (2, 1.0)):
        inside = lung_mask == label
        if not inside.any():
            continue
        centre = np.array(lungs_info[label]["centre"])
        reach = lungs_info[label]["axes"][0]
        hilum = np.array([t.cx0 + side * (t.med_half + rng.uniform(3, 8)), y_tr + rng.uniform(2, 10),
                          z_car - rng.uniform(10, 20)])
        r_mb = max(r_tr * rng.uniform(0.7, 0.85), 3.0)
        tube(g, air_main, (x_tr, y_tr, z_car), hilum, r_tr * 0.9, r_mb, 1.0)
        tube(g, wallw, (x_tr, y_tr, z_car), hilum, r_tr * 0.9 + 2.5, r_mb + 2.5, 1.0)
        start = hilum + np.array([side * 5.0, 0.0, 0.0])
        bronchi: list = []
        for _ in range(int(rng.integers(4, 7))):
            tree(rng, g, inside, start, rotate_away(rng, centre - start, rng.uniform(5, 55)), 0.3 * reach + 12,
                 r_mb * 0.75, 0, max(min_r, 0.9), 4, bronchi)
        for p0, p1, r0, r1 in bronchi:
            tube(g, wallw, p0, p1, r0 + 1.4, r1 + 1.2, soft)
            tube(g, air, p0, p1, r0, r1, soft)
        vessels: list = []
        for _ in range(int(rng.integers(8, 13))):
            st = start + rng.uniform(-10, 10, size=3)
            tree(rng, g, inside, st, rotate_away(rng, centre - st, rng.uniform(10, 80)), 0.28 * reach + 14,
                 max(rng.uniform(4.5, 7.0) * t.k, 2.5), 0, min_r, 7, vessels)
        for p0, p1, r0, r1 in vessels:
            tube(g, vessel, p0, p1, r0, r1, soft)
    vessel *= lung
    hu += vessel * (rng.uniform(40, 70) - hu)
    air = np.maximum(air, air_main)
    wallw = np.maximum(wallw - air, 0.0)
    hu += wallw * (rng.uniform(30, 60) - hu) * (lung | cav)
    hu += air * ((lung | cav) & ~bone) * (-1000.0 - hu)
    lung_mask[air_main > 0.5] = 0


def anatomy(rng, rng_tex, g: Grid) -> tuple[np.ndarray, np.ndarray, dict]:
    """The healthy chest of family B: ``(hu float32, lung_mask uint8, info)``."""
    hu, bone, t = torso(rng, g)
    family_a.spine(rng, g, hu, bone, t)
    family_a.sternum(rng, g, hu, bone, t)
    family_a.ribs(rng, g, hu, bone, t)
    mediastinum(rng, g, hu, t)
    lung_mask, lungs_info = lungs(rng, rng_tex, g, bone, t)
    parenchyma(rng, rng_tex, g, hu, lung_mask > 0, t)
    airways_and_vessels(rng, g, hu, lung_mask, lungs_info, bone, t)
    return hu, lung_mask, {"lungs": lungs_info, "body_axes": (t.a, t.b), "family": "b"}


def noise(rng_noise, hu: np.ndarray, sigma: float) -> None:
    """A sharp reconstruction kernel: edges enhanced (unsharp mask), then less correlated noise."""
    hu += 0.6 * (hu - ndimage.gaussian_filter(hu, 1.0))
    n = ndimage.gaussian_filter(rng_noise.standard_normal(hu.shape).astype(np.float32), 0.35)
    hu += n * (sigma / (n.std() + 1e-6))
