"""The lung's bite (ct3dflow.detect.bite): 0 on a healthy lung's smooth wall, the opening's own cut at a sharp
corner, the closed form in a half-ball pit on a flat wall, blind to a pit wider than the closing ball, and the
opening ignores honeycombing's cysts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ct3dflow.detect.bite import BITE_CLOSING_MM, lung_bite

SHAPE = (40, 40, 40)
R_BALL = BITE_CLOSING_MM / 2.0  # the closing ball's radius in voxels on the 2 mm grid: 8


def _box_lung():
    lung = np.zeros(SHAPE, np.uint8)
    lung[4:36, 4:36, 8:36] = 1  # its face x = 8 is flat and 12 voxels from any edge at (z, y) = (20, 20)
    return lung


def _pit(lung, r):
    """A half-ball of radius ``r`` voxels of solid tissue pressing into the face x = 8 at (z, y) = (20, 20)."""
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    pit = ((z - 20) ** 2 + (y - 20) ** 2 + (x - 8) ** 2 <= r * r) & (lung != 0)
    out = lung.copy()
    out[pit] = 0
    return out, pit


def test_a_healthy_box_lung_has_no_bite_but_at_its_corners_where_the_opening_cuts():
    lung = _box_lung()
    bite = lung_bite(lung, lung != 0)
    assert np.isnan(bite[lung == 0]).all()  # NaN off the region
    inner = np.zeros(SHAPE, bool)
    inner[8:32, 8:32, 12:32] = True  # 4 voxels or more from every edge of the box
    assert (bite[inner] == 0).all()
    # the opening's octahedron of radius 3 reaches a corner's nearest voxel at (2, 2, 2) from it: √12
    assert float(np.nanmax(bite)) == pytest.approx(math.sqrt(12.0), abs=1e-5)
    assert bite[4, 4, 8] == pytest.approx(math.sqrt(12.0), abs=1e-5)


def test_a_half_ball_pit_on_a_flat_wall_has_its_closed_form_bite():
    """A ball of radius R rests on the rim of a pit of radius r and sinks R − √(R² − r²) into it; deeper on the
    axis the pit is filled, and a voxel t deep lies r − t from the lung."""
    r = 6
    lung, pit = _pit(_box_lung(), r)
    bite = lung_bite(lung, _box_lung() != 0)
    sink = R_BALL - math.sqrt(R_BALL**2 - r**2)  # 2.71 voxels
    axis = bite[20, 20, 8:8 + r]
    for t, b in enumerate(axis):
        if t < sink - 1:
            assert b == 0, (t, axis)
        elif t > sink + 1:
            assert b == pytest.approx(r - t, abs=0.5), (t, axis)
    assert r - sink - 0.5 <= float(np.nanmax(bite[pit])) <= r - sink + 1.0


def test_a_pit_wider_than_the_closing_ball_is_not_a_bite():
    """A ball of the closing's radius enters a half-ball pit of a larger radius entirely: the closing leaves
    it open, as it leaves the diaphragm's dome."""
    lung, pit = _pit(_box_lung(), int(R_BALL) + 2)
    bite = lung_bite(lung, _box_lung() != 0)
    # only the opening's cut along the rim, where the pit makes a sharp edge of the lung: a ring of voxels, ≤ √2
    assert float(np.nanmax(bite[pit])) <= math.sqrt(2.0) + 1e-5 and float(np.mean(bite[pit] > 0)) < 0.1
    assert float(np.nanmax(lung_bite(lung, _box_lung() != 0, closing_mm=30.0)[pit])) > 3.0  # a wider ball fills it


def test_the_opening_ignores_small_cysts_in_a_solid_bite():
    """Honeycombing: a solid pit holding 2×2×2-voxel cysts of air that the lung mask holds. Unopened, every cyst is
    lung and the pit's bite shrinks to the distance to its nearest cyst; the opening (3 voxels) takes them out."""
    lung, pit = _pit(_box_lung(), 6)
    solid = float(np.nanmax(lung_bite(lung, _box_lung() != 0)[pit]))
    cysts = lung.copy()
    for z, y, x in ((20, 20, 9), (18, 22, 10), (22, 18, 10), (20, 17, 9)):
        cysts[z:z + 2, y:y + 2, x:x + 2] = 1
    opened = float(np.nanmax(lung_bite(cysts, _box_lung() != 0)[pit]))
    unopened = float(np.nanmax(lung_bite(cysts, _box_lung() != 0, opening=0)[pit]))
    assert opened >= solid and unopened < solid - 0.5, (solid, opened, unopened)


def test_an_empty_region_and_a_lung_thinner_than_the_opening():
    lung = _box_lung()
    assert np.isnan(lung_bite(lung, np.zeros(SHAPE, bool))).all()
    thin = np.zeros(SHAPE, np.uint8)
    thin[10:30, 10:30, 20:24] = 1  # 4 voxels thick: the opening of 3 leaves nothing
    bite = lung_bite(thin, thin != 0)
    assert (bite[thin != 0] == 0).all() and np.isnan(bite[thin == 0]).all()


def test_the_bite_on_the_lungs_box_is_the_whole_scan_s():
    """lung_bite works on the box of the lung and its region, wide enough for the closing: the whole scan's bite.
    Lumpy lungs (unions of balls), whose grooves near the box's faces the closing fills only with room around."""
    from scipy import ndimage

    from ct3dflow.lungs import closing_ball

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:40, :50, :60]
    strict = np.zeros((40, 50, 60), np.uint8)
    for label, (x0, x1) in ((1, (6, 24)), (2, (32, 52))):
        for _ in range(6):
            c = rng.integers([8, 10, x0 + 3], [30, 38, x1 - 3])
            strict[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.integers(20, 50)] = label
    region = ndimage.binary_dilation(strict != 0, iterations=2)
    opened = ndimage.binary_opening(strict != 0, ndimage.generate_binary_structure(3, 1), iterations=3)
    filled = closing_ball(strict == 1, BITE_CLOSING_MM, (2.0,) * 3) | closing_ball(strict == 2, BITE_CLOSING_MM,
                                                                                    (2.0,) * 3)
    want = np.where(filled, ndimage.distance_transform_edt(~opened), 0.0)  # on the whole scan
    got = lung_bite(strict, region, (2.0, 2.0, 2.0))
    assert np.allclose(got[region], want[region]) and np.isnan(got[~region]).all()
    assert got[region].max() >= 2  # the grooves are there to be measured
