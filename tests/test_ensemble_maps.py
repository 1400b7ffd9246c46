"""experiments/ensemble_maps.py: the mean of several models' stored voxel maps is the map of their mean window
terms (the merger is linear), and maps made differently are refused."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ensemble_maps as em  # noqa: E402

from ct3dflow.detect.grid import window_grid  # noqa: E402
from ct3dflow.detect.voxel_map import VoxelScore, merge_windows  # noqa: E402


def grid_and_terms(seed: int):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(32, 30, 34)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[3:12, 4:13, 2:11] = True  # in a corner: windows reach part of the scan only
    grid = window_grid(vol, mask, 8, 4)
    import torch

    # two cells per axis per window, as the coarsest latent of a small flow gives
    terms = torch.as_tensor(np.random.default_rng(seed).normal(size=(len(grid), 2, 2, 2)))
    return grid, terms


@pytest.mark.parametrize("merge", ["mean", "gaussian"])
def test_the_mean_of_two_maps_is_the_map_of_the_mean_terms(merge):
    grid, t1 = grid_and_terms(1)
    _, t2 = grid_and_terms(2)
    maps = [VoxelScore(merge_windows([(grid.corners, t)], grid, merge), stride=4, size=8, n_windows=len(grid),
                       merge=merge) for t in (t1, t2)]
    direct = merge_windows([(grid.corners, (t1 + t2) / 2)], grid, merge)
    mean = em.mean_score(maps).voxel_map
    assert np.isnan(mean).sum() == np.isnan(direct).sum() > 0
    np.testing.assert_allclose(mean, direct, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not np.allclose(mean, maps[0].voxel_map, equal_nan=True)


def test_maps_made_differently_are_refused():
    a = VoxelScore(np.zeros((4, 4, 4), np.float32), stride=12, size=24)
    with pytest.raises(ValueError, match="stride"):
        em.mean_score([a, VoxelScore(np.zeros((4, 4, 4), np.float32), stride=8, size=24)])
    holed = np.zeros((4, 4, 4), np.float32)
    holed[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="different voxels"):
        em.mean_score([a, VoxelScore(holed, stride=12, size=24)])


def test_a_split_keeps_the_studies_every_model_scored(tmp_path):
    folders = []
    for k, (value, broken) in enumerate([(1.0, "s2"), (3.0, None)]):
        f = tmp_path / f"t{k}"
        rows = []
        for sid in ("s1", "s2"):
            path = VoxelScore(np.full((3, 3, 3), value, np.float32), stride=12, size=24).save(f / sid / "v.npz")
            ok = sid != broken
            rows.append({"study_id": sid, "status": "ok" if ok else "error", "score_path": str(path) if ok else None,
                         "model": f"m{k}", "model_version": f"v{k}"})
        pd.DataFrame(rows).to_parquet(f / "results.parquet")
        folders.append(f)
    assert em.ensemble_split(folders, tmp_path / "ens") == 1
    res = pd.read_parquet(tmp_path / "ens" / "results.parquet")
    assert res["study_id"].tolist() == ["s1"] and res["model"].tolist() == ["m0+m1"]
    np.testing.assert_array_equal(VoxelScore.load(res["score_path"][0]).voxel_map, np.full((3, 3, 3), 2.0))
