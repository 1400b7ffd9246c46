import numpy as np
import pytest

from ct3dflow.errors import CTInputError
from ct3dflow.patches import (
    extract_patches,
    inference_grid,
    pad_to_patch,
    sample_patch_corners,
    valid_patch_corners,
    windows_touching,
)


def test_inference_grid_covers_and_ends_at_edge():
    shape = (100, 130, 48)
    g = inference_grid(shape, 48, 38)
    assert g.dtype == np.int64 and g.shape[1] == 3
    assert len(np.unique(g, axis=0)) == len(g)
    cover = np.zeros(shape, dtype=np.int32)
    for z, y, x in g:
        cover[z : z + 48, y : y + 48, x : x + 48] += 1
    assert cover.min() >= 1
    for ax, n in enumerate(shape):
        starts = np.unique(g[:, ax])
        assert starts[0] == 0 and starts[-1] == n - 48
        assert np.all(np.diff(starts)[:-1] == 38) if len(starts) > 2 else True
    assert list(np.unique(g[:, 0])) == [0, 38, 52]
    assert list(np.unique(g[:, 1])) == [0, 38, 76, 82]
    assert list(np.unique(g[:, 2])) == [0]
    assert len(g) == 3 * 4 * 1


def test_inference_grid_exact_fit_has_no_duplicate():
    assert list(np.unique(inference_grid((86, 48, 48))[:, 0])) == [0, 38]
    with pytest.raises(ValueError):
        inference_grid((40, 60, 60))


def test_pad_to_patch_small_volume():
    v = np.zeros((30, 60, 47), dtype=np.float32)
    p, before = pad_to_patch(v, 48)
    assert p.shape == (48, 60, 48)
    assert before == (9, 0, 0)
    assert p[0, 0, 0] == -0.5 and p[9, 0, 0] == 0.0 and p[-1, 0, -1] == -0.5
    m, _ = pad_to_patch(np.ones((30, 60, 47), np.uint8), 48, value=0)
    assert m.sum() == 30 * 60 * 47
    same, b = pad_to_patch(np.zeros((50, 50, 50)), 48)
    assert same.shape == (50, 50, 50) and b == (0, 0, 0)


def test_windows_touching_matches_brute_force():
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 45, 50), np.uint8)
    mask[rng.integers(0, 40, 5), rng.integers(0, 45, 5), rng.integers(0, 50, 5)] = 1
    size = 12
    g = inference_grid(mask.shape, size, 9)
    got = windows_touching(mask, g, size)
    want = np.array([mask[z : z + size, y : y + size, x : x + size].any() for z, y, x in g])
    np.testing.assert_array_equal(got, want)
    assert got.any() and not got.all()


def _lung_phantom():
    strict = np.zeros((40, 40, 40), np.uint8)
    strict[5:25, 8:30, 10:32] = 1
    strict[25:35, 8:30, 10:20] = 2
    return strict


def test_sample_patch_corners_respects_lung_fraction():
    strict = _lung_phantom()
    size, frac = 12, 0.6
    c = sample_patch_corners(strict, size, 200, frac, np.random.default_rng(0))
    assert c.shape == (200, 3) and c.dtype == np.int64
    for z, y, x in c:
        win = strict[z : z + size, y : y + size, x : x + size]
        assert win.shape == (size,) * 3
        assert (win > 0).mean() >= frac
    # valid corners agree with brute force on a coarse lattice
    v = valid_patch_corners(strict, size, frac, step=4)
    brute = [
        (z, y, x)
        for z in range(0, 40 - size + 1, 4)
        for y in range(0, 40 - size + 1, 4)
        for x in range(0, 40 - size + 1, 4)
        if (strict[z : z + size, y : y + size, x : x + size] > 0).mean() >= frac
    ]
    assert sorted(map(tuple, v.tolist())) == sorted(brute)
    # reproducible, and precomputed corners give the same draw
    a = sample_patch_corners(strict, size, 5, frac, 3)
    b = sample_patch_corners(strict, size, 5, frac, 3, valid_corners=valid_patch_corners(strict, size, frac))
    np.testing.assert_array_equal(a, b)


def test_exact_fraction_accepted():
    strict = np.zeros((4, 4, 4), np.uint8)
    strict[:2] = 1
    assert len(valid_patch_corners(strict, 4, 0.5)) == 1


def test_sample_patch_corners_raises_on_empty_mask():
    with pytest.raises(CTInputError, match="lower min_lung_fraction"):
        sample_patch_corners(np.zeros((30, 30, 30), np.uint8), 12, 4, 0.5, np.random.default_rng(0))
    with pytest.raises(CTInputError):
        sample_patch_corners(np.ones((10, 30, 30), np.uint8), 12, 4, 0.5, np.random.default_rng(0))


def test_extract_patches():
    v = np.arange(20 * 21 * 22, dtype=np.float64).reshape(20, 21, 22)
    c = np.array([[0, 0, 0], [8, 9, 10]])
    p = extract_patches(v, c, 10)
    assert p.shape == (2, 10, 10, 10) and p.dtype == np.float32
    np.testing.assert_array_equal(p[1], v[8:18, 9:19, 10:20])
    with pytest.raises(ValueError):
        extract_patches(v, np.array([[15, 0, 0]]), 10)
