"""Voxel-level maps: window averaging of local log-likelihood terms, depth-banded healthy reference,
two-sided typicality volume (ct3dflow.voxel_map)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ct3dflow.flow import Glow3D
from ct3dflow.flow.local import local_log_prob
from ct3dflow.voxel_map import DepthReference, depth_bands, smooth_in_mask, typicality_volume, voxel_log_p_volume

torch.set_num_threads(2)


def _glow() -> Glow3D:
    torch.manual_seed(0)
    g = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    g.initialize(0.1 * torch.randn(4, 1, 8, 8, 8) - 0.3)
    return g.eval()


def _ball(shape, centre, r) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r


def test_windows_are_averaged_and_uncovered_voxels_are_nan():
    g = _glow()
    rng = np.random.default_rng(0)
    vol = (0.05 * rng.standard_normal((16, 24, 24)) - 0.3).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[2:6, 2:6, 2:6] = True  # touches only the windows at the corner
    m = voxel_log_p_volume(g, vol, mask, size=8, stride=8, part="all")
    assert m.shape == vol.shape
    assert np.isfinite(m[:8, :8, :8]).all() and np.isnan(m[8:, 8:, 8:]).all()
    # stride == size: no overlap, so the first window's voxels hold exactly its own terms
    ref = local_log_prob(g, torch.from_numpy(vol[None, None, :8, :8, :8]), part="all")[0].numpy()
    assert np.allclose(m[:8, :8, :8], ref, rtol=1e-5, atol=1e-5)
    # with overlap (stride 4) a voxel is the mean of the windows that cover it
    m4 = voxel_log_p_volume(g, vol, mask, size=8, stride=4, part="all")
    w = [local_log_prob(g, torch.from_numpy(vol[None, None, a : a + 8, 0:8, 0:8]), part="all")[0].numpy()
         for a in (0, 4)]
    assert m4[5, 1, 1] == pytest.approx((w[0][5, 1, 1] + w[1][1, 1, 1]) / 2, rel=1e-5)


def test_depth_reference_standardises_healthy_maps_per_band():
    rng = np.random.default_rng(1)
    shape = (40, 40, 40)
    mask = _ball(shape, (20, 20, 20), 16)
    band = depth_bands(mask)
    assert band[0, 0, 0] == -1 and band[20, 20, 20] == 5 and band[20, 20, 4] == 0

    def healthy():  # the healthy level falls towards the border, the spread grows
        return np.where(mask, 2.0 * band + (1.0 + 0.5 * (5 - band)) * rng.standard_normal(shape), np.nan)

    ref = DepthReference.fit([healthy() for _ in range(3)], [mask] * 3)
    z = ref.z(healthy(), mask)
    for b in range(6):
        zb = z[band == b]
        assert abs(np.median(zb)) < 0.15 and 0.85 < 1.4826 * np.median(np.abs(zb)) < 1.15, b
    assert np.isnan(z[~mask]).all()
    assert DepthReference.from_dict(ref.to_dict()) == ref


def test_typicality_volume_counts_both_tails_and_drops_small_components():
    shape = (30, 30, 30)
    mask = np.ones(shape, bool)
    z = np.zeros(shape, np.float32)
    z[_ball(shape, (8, 8, 8), 4)] = -6.0  # unlikely
    z[_ball(shape, (20, 20, 20), 4)] = +6.0  # too likely (e.g. ground glass in the coarse latent)
    z[2, 25, 2] = 9.0  # one stray voxel
    spacing = (2.0, 2.0, 2.0)
    n_ball = int(_ball(shape, (8, 8, 8), 4).sum())
    vol, ab = typicality_volume(z, mask, tau=4.0, v_min_cm3=0.0, spacing=spacing)
    assert ab.sum() == 2 * n_ball + 1 and vol == pytest.approx(ab.sum() * 0.008)
    vol, ab = typicality_volume(z, mask, tau=4.0, v_min_cm3=0.05, spacing=spacing)
    assert ab.sum() == 2 * n_ball
    vol, _ = typicality_volume(z, mask, tau=7.0, v_min_cm3=0.0, spacing=spacing)
    assert vol == pytest.approx(0.008)


def test_smoothing_stays_inside_the_mask():
    shape = (20, 20, 20)
    mask = np.zeros(shape, bool)
    mask[5:15, 5:15, 5:15] = True
    v = np.where(mask, 1.0, 100.0).astype(np.float32)  # huge values outside must not leak in
    s = smooth_in_mask(v, mask, 2.0)
    assert np.allclose(s[mask], 1.0, atol=1e-4) and np.isnan(s[~mask]).all()


def _sphere_study(rng, lesion: bool, n=36, r=15.0):
    """A ball-shaped 'lung' whose voxel map is smooth healthy noise, with a block of very low values if sick."""
    zz, yy, xx = np.mgrid[:n, :n, :n]
    mask = ((zz - n / 2) ** 2 + (yy - n / 2) ** 2 + (xx - n / 2) ** 2) < r**2
    vmap = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.0).astype(np.float32)
    if lesion:
        c = n // 2 + int(rng.integers(-3, 4))
        vmap[c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] -= 5.0
    return vmap, mask


def test_voxel_grid_search_separates_and_generalises():
    """On validation maps where sick studies hold a 6³ block of low values, the search finds AUROC 1, its
    reference comes from the healthy studies alone, and the chosen point classifies fresh studies."""
    from ct3dflow.voxel_map import VoxelOperatingPoint, voxel_grid_search

    rng = np.random.default_rng(0)
    labels = [0] * 6 + [1] * 6
    studies = [_sphere_study(rng, bool(y)) for y in labels]
    maps, masks = [s[0] for s in studies], [s[1] for s in studies]
    spacing = (2.0, 2.0, 2.0)
    op, trials = voxel_grid_search(maps, masks, [spacing] * 12, labels,
                                   {"sigma_vox": [1.0], "tau_z": [3.0, 4.0], "v_min_cm3": [0.0, 0.1]}, stride=8)
    assert len(trials) == 4 and trials.iloc[0]["auroc"] == 1.0
    assert op.stride == 8 and op.sigma_vox == 1.0 and op.threshold_cm3 >= 0
    healthy_only = DepthReference.fit([smooth_in_mask(m, k, 1.0) for m, k in zip(maps[:6], masks[:6])], masks[:6])
    assert op.reference.median == pytest.approx(healthy_only.median)
    assert op.reference.scale == pytest.approx(healthy_only.scale)
    again = VoxelOperatingPoint.from_dict(op.to_dict())
    fresh = [(_sphere_study(rng, bool(y)), y) for y in (0, 0, 0, 1, 1, 1)]
    calls = [again.abnormal(vm, mk, spacing)[0] > again.threshold_cm3 for (vm, mk), _ in fresh]
    assert calls == [bool(y) for _, y in fresh]
    from ct3dflow.evaluation import load_operating_point
    from ct3dflow.scoring import OperatingPoint

    assert isinstance(load_operating_point(op.to_dict()), VoxelOperatingPoint)
    with pytest.raises(ValueError, match="voxel map"):  # the patch-map jobs refuse it with a reason
        OperatingPoint.from_dict(op.to_dict())
    with pytest.raises(ValueError, match="voxel"):
        VoxelOperatingPoint.from_dict({"sigma_vox": 2.0, "tau_z": -2.0, "v_min_cm3": 0.0, "threshold_cm3": 1.0,
                                       "healthy_mean": 0.0, "healthy_std": 1.0})
