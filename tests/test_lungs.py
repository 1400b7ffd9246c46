"""Classical lung masks on small synthetic torsos."""

import numpy as np
import pytest
from dicom_helpers import synthetic_torso

from ct3dflow import lungs

SP = (2.0, 2.0, 2.0)


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def torso():
    return synthetic_torso((56, 64, 80), SP, airways=True)


def test_strict_mask_dice_and_sides(torso):
    hu, truth = torso
    strict = lungs.strict_lung_mask(hu, SP)
    assert strict.dtype == np.uint8
    assert set(np.unique(strict)) == {0, 1, 2}
    assert dice(strict == 1, truth == 1) >= 0.95
    assert dice(strict == 2, truth == 2) >= 0.95
    # LPS: right lung (1) at small x
    assert np.nonzero(strict == 1)[2].mean() < np.nonzero(strict == 2)[2].mean()


def test_trachea_is_removed(torso):
    hu, truth = torso
    strict = lungs.strict_lung_mask(hu, SP)
    trachea = (hu < -950) & (truth == 0)
    trachea[:, :, :] &= np.arange(hu.shape[0])[:, None, None] > hu.shape[0] * 0.6  # above the carina
    assert trachea.sum() > 50
    assert not (strict > 0)[trachea].any()


def test_merged_lungs_are_split():
    hu, truth = synthetic_torso((56, 64, 80), SP, airways=False)
    # a bridge of lung density joining the two lungs (anterior junction at 2 mm)
    zc, yc = 28, 32
    hu[zc - 4 : zc + 4, yc - 3 : yc + 3, 20:60] = -850.0
    strict = lungs.strict_lung_mask(hu, SP)
    assert dice(strict == 1, truth == 1) >= 0.93
    assert dice(strict == 2, truth == 2) >= 0.93


def test_no_lungs_gives_empty_mask():
    hu, truth = synthetic_torso((40, 48, 48), SP, airways=False)
    hu[truth > 0] = 40.0  # no lungs: soft tissue inside the body
    assert lungs.strict_lung_mask(hu, SP).sum() == 0


def test_permissive_holds_pleural_blob_and_excludes_bone():
    hu, truth = synthetic_torso((56, 64, 80), SP, airways=False)
    nz, ny, nx = hu.shape
    # lateral pleura of the right lung, at mid height: the lung ends at x ≈ centre - 0.35 * extent
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    right_x = np.nonzero(truth[nz // 2, ny // 2] == 1)[0].min()  # most lateral lung voxel
    blob = (zz - nz // 2) ** 2 + (yy - ny // 2) ** 2 + (xx - right_x) ** 2 <= 4**2  # r = 8 mm
    hu[blob] = 30.0
    strict = lungs.strict_lung_mask(hu, SP)
    assert not (strict > 0)[blob].any()
    perm = lungs.permissive_lung_mask(hu, strict, SP)
    assert perm.dtype == np.uint8
    assert perm[blob].mean() >= 0.95
    assert np.all(perm[strict > 0] == 1)
    assert perm[hu > 300].sum() == 0  # spine excluded
    assert perm[lungs.outside_air(hu, -500.0)].sum() == 0  # outside air excluded


def test_lung_volumes():
    strict = np.zeros((10, 10, 10), np.uint8)
    strict[:5] = 1
    strict[5:7] = 2
    r, l = lungs.lung_volumes_cm3(strict, (2.0, 2.0, 2.0))
    assert r == pytest.approx(500 * 8 / 1000)
    assert l == pytest.approx(200 * 8 / 1000)


def test_split_left_right_of_binary_mask(torso):
    _, truth = torso
    lab = lungs.split_left_right(truth > 0, SP)
    assert np.array_equal(lab, truth)
