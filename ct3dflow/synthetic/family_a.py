"""Phantom family A: the anatomy of the original phantoms (every model and result before issue 16).

An elliptic torso with fat and muscle wall, a spine, sternum and ribs, a mediastinum with heart and aorta,
two ellipsoidal lungs with a diaphragm dome and smooth plus fine texture, trachea and main bronchi,
branching bronchial and vessel trees. Each part is one function in the order the image is drawn; they
share the random stream of the anatomy (``rng``) and the texture stream (``rng_tex``), in the order the
original single function drew them, so the same seed gives the same phantom bit for bit.

:func:`anatomy` returns ``(hu float32, lung_mask uint8, info)``; :mod:`ct3dflow.synthetic` adds the lesion
(:mod:`.lesions`) and the CT noise.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from .geometry import Grid, rotate_away, smooth_noise, tree, tube


def torso(rng, g: Grid) -> tuple[np.ndarray, np.ndarray, SimpleNamespace]:
    """Air, the elliptic body (fat, muscle) and the thoracic cavity (mediastinal soft tissue for now)."""
    nz, ny, nx = g.shape
    sx, sy, sz = g.spacing
    fx, fy, fz = nx * sx, ny * sy, nz * sz
    X, Y = g.X, g.Y
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

    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    hu_fat = rng.uniform(-115, -85)
    hu_muscle = rng.uniform(35, 55)
    hu[:, body2] = hu_fat
    hu[:, (rho_fat <= 1.0)] = hu_muscle
    hu[:, cavity2] = rng.uniform(30, 40)  # mediastinal soft tissue (filled by the lungs later)
    bone = np.zeros(g.shape, dtype=bool)
    t = SimpleNamespace(fx=fx, fy=fy, fz=fz, a=a, b=b, k=k, cx0=cx0, cy0=cy0, fat=fat, wall=wall, ai=ai, bi=bi,
                        X2=X2, Y2=Y2, rho_cav=rho_cav, cavity2=cavity2)
    return hu, bone, t


def spine(rng, g: Grid, hu, bone, t) -> None:
    """Vertebral body (cortex, cancellous bone, discs), canal and posterior elements."""
    Y, Z, X2, k = g.Y, g.Z, t.X2, t.k
    t.r_vb = r_vb = rng.uniform(13, 18) * max(k, 0.6)
    t.ys = ys = t.cy0 + t.bi - 0.55 * r_vb  # vertebral body centre, protruding into the cavity posteriorly
    t.vb_d = vb_d = np.sqrt((X2) ** 2 + (Y[0] - ys) ** 2)
    r_canal = 0.55 * r_vb
    y_canal = ys + r_vb + r_canal * 0.9
    canal_d = np.sqrt(X2**2 + (Y[0] - y_canal) ** 2)
    # posterior elements: a ring around the canal and the spinous process towards the back
    post_ring = (canal_d <= r_canal + 3.5 * max(k, 0.6)) & ~(canal_d <= r_canal)
    spinous = (np.abs(X2) <= 3.0 * max(k, 0.6)) & (Y[0] > y_canal) & (Y[0] < t.cy0 + t.b - t.fat - 2)
    verte_h = rng.uniform(22, 28) * max(k, 0.7)
    disc = ((Z[:, 0, 0] - rng.uniform(0, verte_h)) % verte_h) < 0.22 * verte_h  # (nz,)
    t.cort = cort = rng.uniform(700, 1000)
    t.canc = canc = rng.uniform(180, 300)
    vb = vb_d <= r_vb
    vb_cortex = vb & (vb_d > r_vb - 2.0)
    hu[:, vb] = canc
    hu[:, vb_cortex] = cort
    hu[disc[:, None, None] & vb[None]] = rng.uniform(70, 100)
    hu[:, post_ring | spinous] = cort * 0.8
    hu[:, canal_d <= r_canal] = rng.uniform(5, 20)
    bone[:, vb | post_ring | spinous] = True
    bone[disc] &= ~vb[None]


def sternum(rng, g: Grid, hu, bone, t) -> None:
    st_d = np.sqrt((t.X2 / (12 * max(t.k, 0.6))) ** 2 + ((g.Y[0] - (t.cy0 - t.bi - t.wall * 0.45)) /
                                                          (0.3 * t.wall)) ** 2)
    st = st_d <= 1.0
    hu[:, st] = t.canc
    hu[:, st & (st_d > 0.6)] = t.cort * 0.75
    bone[:, st] = True


def ribs(rng, g: Grid, hu, bone, t) -> None:
    """Curved tubes in the chest wall, descending anteriorly, and costal cartilage in the anterior gap."""
    Y, Z, X2, Y2, k = g.Y, g.Z, t.X2, t.Y2, t.k
    r_loc = np.sqrt(X2**2 + Y2**2) / np.maximum(t.rho_cav, 1e-6)  # centre-to-cavity-wall distance
    d_rad = (t.rho_cav - 1.0) * r_loc  # mm outside the cavity wall (2D)
    rib_rr = rng.uniform(3.0, 4.5) * max(k, 0.7)  # radial half-thickness
    rib_rz = rng.uniform(4.5, 6.5) * max(k, 0.7)  # cranio-caudal half-height
    rib_c = rib_rr + 1.0
    rib_pitch = rng.uniform(19, 26)
    rib_slope = rng.uniform(12, 25)
    rib_phase = rng.uniform(0, rib_pitch)
    near = np.abs(d_rad - rib_c) <= rib_rr  # (ny, nx) band in the wall
    anterior_gap = (Y[0] < t.cy0) & (np.abs(X2) < 0.22 * t.a)
    band = near & ~anterior_gap & (Y[0] < t.ys + 0.3 * t.r_vb) | near & ~anterior_gap & (np.abs(X2) > t.r_vb + 6)
    yy, xx = np.nonzero(band)
    zc_rib = rib_phase + rib_slope * (Y[0][yy, 0] - t.cy0) / t.bi  # (m,)
    dz = Z[:, 0, 0][:, None] - zc_rib[None, :]  # (nz, m)
    dz = (dz + rib_pitch / 2) % rib_pitch - rib_pitch / 2
    q = np.sqrt(((d_rad[yy, xx] - rib_c) / rib_rr)[None, :] ** 2 + (dz / rib_rz) ** 2)
    rib_vals = np.where(q < 0.6, t.canc + 80, rng.uniform(550, 750))
    zi, mi = np.nonzero(q < 1.0)
    hu[zi, yy[mi], xx[mi]] = rib_vals[zi, mi]
    bone[zi, yy[mi], xx[mi]] = True
    cart = near & anterior_gap & (np.abs(X2) > 14 * max(k, 0.6))
    yy2, xx2 = np.nonzero(cart)
    if yy2.size:
        zc2 = rib_phase + rib_slope * (Y[0][yy2, 0] - t.cy0) / t.bi
        dz2 = (Z[:, 0, 0][:, None] - zc2[None, :] + rib_pitch / 2) % rib_pitch - rib_pitch / 2
        q2 = np.sqrt(((d_rad[yy2, xx2] - rib_c) / rib_rr)[None, :] ** 2 + (dz2 / rib_rz) ** 2)
        zi2, mi2 = np.nonzero(q2 < 1.0)
        hu[zi2, yy2[mi2], xx2[mi2]] = rng.uniform(100, 180)


def mediastinum(rng, g: Grid, hu, t) -> None:
    """Heart with pericardial fat, the aorta (ascending, arch, descending), the upper mediastinum's width."""
    ai, bi, cx0, cy0, k, fz = t.ai, t.bi, t.cx0, t.cy0, t.k, t.fz
    heart_c = np.array([cx0 + rng.uniform(0.08, 0.22) * ai, cy0 - rng.uniform(0.1, 0.3) * bi,
                        g.z1[0] + rng.uniform(0.15, 0.3) * fz])
    heart_r = np.array([rng.uniform(0.36, 0.46) * ai, rng.uniform(0.45, 0.6) * bi, rng.uniform(0.22, 0.3) * fz])
    hbox, hq = g.ellipsoid(heart_c, heart_r)
    heart = np.zeros(g.shape, dtype=bool)
    heart[hbox] = hq <= 1.0
    peri = np.zeros(g.shape, dtype=bool)
    peri[hbox] = (hq > 1.0) & (hq <= 1.0 + 3.0 / float(heart_r.min()))
    hu[heart & t.cavity2[None]] = rng.uniform(38, 50)
    hu[peri & t.cavity2[None]] = rng.uniform(-100, -70)
    vessels = np.zeros(g.shape, dtype=np.float32)
    r_ao = rng.uniform(9, 13) * max(k, 0.6)
    z_arch = g.z1[0] + rng.uniform(0.6, 0.75) * fz
    x_desc = cx0 + t.r_vb + r_ao + 2
    y_desc = t.ys - 0.2 * t.r_vb
    x_asc, y_asc = cx0 + 0.05 * ai, cy0 - 0.3 * bi
    for p0, p1 in (((x_desc, y_desc, g.z1[0] - 5), (x_desc, y_desc, z_arch)),  # descending
                   ((x_asc, y_asc, heart_c[2]), (x_asc, y_asc, z_arch)),  # ascending
                   ((x_asc, y_asc, z_arch), (x_desc, y_desc, z_arch))):  # arch
        tube(g, vessels, p0, p1, r_ao, r_ao, 1.0)
    hu_blood = rng.uniform(38, 50)
    hu += (vessels * (hu_blood - hu)) * t.cavity2[None]
    t.med_half = rng.uniform(14, 22) * max(k, 0.6)  # mediastinal half-width above the heart
    med_x0 = cx0 + rng.uniform(-3, 3)
    t.mediastinum2 = (np.abs(t.X2 - (med_x0 - cx0)) <= t.med_half) & (g.Y[0] < t.ys + 2)
    t.solid = np.maximum(vessels, heart.astype(np.float32))  # mediastinal organs, excluded from lungs


def lungs(rng, rng_tex, g: Grid, bone, t) -> tuple[np.ndarray, dict]:
    """Two ellipsoids bent by a smooth field, cut by the diaphragm dome, the mediastinum, spine and bone."""
    X, Y, Z, X2 = g.X, g.Y, g.Z, t.X2
    shape_noise = smooth_noise(rng_tex, g.shape, sigma_vox=10.0 / min(g.spacing) * 1.6)
    lung_mask = np.zeros(g.shape, dtype=np.uint8)
    info = {}
    for label, side in ((1, -1.0), (2, 1.0)):  # right lung at small x (side -1)
        shrink = rng.uniform(0.85, 0.95) if label == 2 else rng.uniform(0.95, 1.05)
        cxl = t.cx0 + side * t.ai * rng.uniform(0.48, 0.56)
        axl = t.ai * rng.uniform(0.47, 0.56) * shrink
        cyl = t.cy0 + t.bi * rng.uniform(-0.05, 0.12)
        ayl = t.bi * rng.uniform(0.95, 1.1)
        # the apex stays a few slices below the top, the lung base above the bottom (upper abdomen)
        azl = t.fz * rng.uniform(0.5, 0.56) * (0.97 if label == 2 else 1.0)
        czl = g.z1[-1] - t.fz * rng.uniform(0.04, 0.1) - azl
        lung = (((X - cxl) / axl) ** 2 + ((Y - cyl) / ayl) ** 2 + ((Z - czl) / azl) ** 2 + 0.1 * shape_noise) <= 1.0
        # the diaphragm dome: the lung base rises towards the centre of each hemithorax
        dome_h = rng.uniform(0.12, 0.22) * t.fz
        z_base = g.z1[0] + max(rng.uniform(0.04, 0.1) * t.fz, 2.5 * g.spacing[2]) + (0.0 if label == 1 else 0.03 * t.fz)
        rho_d = np.clip(((X - cxl) / axl) ** 2 + ((Y - cyl) / ayl) ** 2, 0, 1)
        lung &= Z >= z_base + dome_h * (1.0 - rho_d)
        lung &= (side * X2 > 0)[None]
        lung &= t.cavity2[None] & ~t.mediastinum2[None]
        lung &= ~((t.vb_d <= t.r_vb + 4) | (np.abs(X2) <= t.r_vb + 2) & (Y[0] > t.ys))[None]
        lung &= t.solid < 0.2
        lung &= ~bone
        lung_mask[lung] = label
        info[label] = dict(centre=(cxl, cyl, czl), axes=(axl, ayl, azl))
    return lung_mask, info


def parenchyma(rng, rng_tex, g: Grid, hu, lung, t) -> None:
    """Lung density: a base value, a gravity gradient (posterior denser), smooth and fine texture."""
    base = rng.uniform(-880, -850)
    grad = rng.uniform(10, 25)
    low = smooth_noise(rng_tex, g.shape, sigma_vox=14.0 / min(g.spacing) * 1.6)
    fine = ndimage.gaussian_filter(rng_tex.standard_normal(g.shape).astype(np.float32), 0.9)
    fine *= 1.0 / (fine.std() + 1e-6)
    values = (base + grad * np.clip((g.Y - t.cy0) / t.bi, -1, 1) + rng.uniform(12, 18) * low
              + rng.uniform(6, 12) * fine)
    hu[lung] = np.broadcast_to(values, g.shape)[lung]


def airways_and_vessels(rng, g: Grid, hu, lung_mask, lungs_info, bone, t) -> None:
    """Trachea and main bronchi (mediastinal), bronchial and vessel trees from each hilum into its lung."""
    k, cavity2 = t.k, t.cavity2
    lung = lung_mask > 0
    air = np.zeros(g.shape, dtype=np.float32)
    wallw = np.zeros(g.shape, dtype=np.float32)
    r_tr = max(rng.uniform(7, 10) * k, 3.5)
    x_tr = t.cx0 + rng.uniform(-3, 3)
    y_tr = t.ys - t.r_vb - r_tr - rng.uniform(4, 10)
    z_car = g.z1[0] + rng.uniform(0.55, 0.7) * t.fz
    top = g.z1[-1] + 5
    air_main = np.zeros(g.shape, dtype=np.float32)
    tube(g, air_main, (x_tr, y_tr, top), (x_tr, y_tr, z_car), r_tr, r_tr, 1.0)
    tube(g, wallw, (x_tr, y_tr, top), (x_tr, y_tr, z_car), r_tr + 2, r_tr + 2, 1.0)
    vessel = np.zeros(g.shape, dtype=np.float32)
    min_r = 0.35 * min(g.spacing)
    for label, side in ((1, -1.0), (2, 1.0)):
        cxl, cyl, czl = lungs_info[label]["centre"]
        inside = lung_mask == label
        if not inside.any():
            continue
        hilum = np.array([t.cx0 + side * (t.med_half + rng.uniform(4, 10)), y_tr + rng.uniform(0, 8),
                          z_car - rng.uniform(8, 16) * (0.8 if label == 1 else 1.2)])
        r_mb = max(r_tr * rng.uniform(0.65, 0.8), 2.5)
        tube(g, air_main, (x_tr, y_tr, z_car), hilum, r_tr * 0.9, r_mb, 1.0)
        tube(g, wallw, (x_tr, y_tr, z_car), hilum, r_tr * 0.9 + 2, r_mb + 2, 1.0)
        # bronchi and vessels start where the hilum meets the lung
        start = hilum + np.array([side * 6.0, 0.0, 0.0])
        lung_c = np.array([cxl, cyl, czl])
        seg_b: list = []
        for _ in range(int(rng.integers(3, 5))):
            d0 = rotate_away(rng, lung_c - start, rng.uniform(5, 45))
            tree(rng, g, inside, start, d0, 0.35 * lungs_info[label]["axes"][0] + 10, r_mb * 0.7,
                 0, max(min_r, 1.0), 3, seg_b)
        for p0, p1, r0, r1 in seg_b:
            tube(g, wallw, p0, p1, r0 + 0.8, r1 + 0.8, 0.8 * min(g.spacing))
            tube(g, air, p0, p1, r0, r1, 0.8 * min(g.spacing))
        seg_v: list = []
        for _tree_i in range(int(rng.integers(5, 8))):  # arteries and veins
            st = start + rng.uniform(-8, 8, size=3)
            d0 = rotate_away(rng, lung_c - st, rng.uniform(10, 70))
            tree(rng, g, inside, st, d0, 0.3 * lungs_info[label]["axes"][0] + 12,
                 max(rng.uniform(3.5, 5.5) * k, 2.0), 0, min_r, 6, seg_v)
        for p0, p1, r0, r1 in seg_v:
            tube(g, vessel, p0, p1, r0, r1, 0.8 * min(g.spacing))
    hu_vessel = rng.uniform(30, 50)
    vessel *= lung
    hu += vessel * (hu_vessel - hu)
    air = np.maximum(air, air_main)
    wallw = np.maximum(wallw - air, 0.0)
    hu += wallw * (rng.uniform(20, 50) - hu) * (lung | cavity2[None])
    air_in = air * ((lung | cavity2[None]) & ~bone)
    hu += air_in * (-1000.0 - hu)
    lung_mask[air_main > 0.5] = 0  # the trachea and main bronchi are airway, not lung


def anatomy(rng, rng_tex, g: Grid) -> tuple[np.ndarray, np.ndarray, dict]:
    """The healthy chest of family A: ``(hu float32, lung_mask uint8, info)``."""
    hu, bone, t = torso(rng, g)
    spine(rng, g, hu, bone, t)
    sternum(rng, g, hu, bone, t)
    ribs(rng, g, hu, bone, t)
    mediastinum(rng, g, hu, t)
    lung_mask, lungs_info = lungs(rng, rng_tex, g, bone, t)
    parenchyma(rng, rng_tex, g, hu, lung_mask > 0, t)
    airways_and_vessels(rng, g, hu, lung_mask, lungs_info, bone, t)
    return hu, lung_mask, {"lungs": lungs_info, "body_axes": (t.a, t.b), "family": "a"}
