"""Seed ensembles of stored voxel maps (issue 16): the mean of several models' maps, as a new transfer folder.

    .venv/bin/python experiments/transfer.py --a work/experiments/det-a --b work/experiments/det-b \
        --a-model work/experiments/det-a-s13/model/model.pt --directions 'A->B' --score-only \
        --out work/experiments/transfer-s13
    .venv/bin/python experiments/ensemble_maps.py --transfers work/experiments/transfer-2711 \
        work/experiments/transfer-s13 --directions 'A->B' --out work/experiments/transfer-ens2
    .venv/bin/python experiments/reference_checks.py --transfer work/experiments/transfer-ens2 --directions 'A->B' ...

Why: the test AUROC moves with the training seed (sd 0.066 over three seeds of family A, docs/RESULTS.md of
2026-12-06), so part of a model's false volume is its own; the mean of two seeds' maps keeps what both models
find unlikely and halves what only one does. The merger (:func:`ct3dflow.detect.voxel_map.merge_windows`) is
linear in the window terms, so over the same window grid the mean of the models' merged maps is exactly the map
of the models' mean window terms, and nothing is rescored here. The mean is of the energies (log-likelihoods),
i.e. the geometric mean of the models' densities; the experiment that reads this folder refits the healthy
references on the ensemble's maps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.detect.voxel_map import VoxelScore  # noqa: E402

SPLITS = ("val", "test", "train")
SAME = ("stride", "part", "size", "n_windows", "phases", "merge")


def mean_score(scores: list[VoxelScore]) -> VoxelScore:
    """The mean of several models' maps of one study; refuses maps made on different grids or settings."""
    first = scores[0]
    for s in scores[1:]:
        diff = [k for k in SAME if getattr(s, k) != getattr(first, k)]
        if diff or s.voxel_map.shape != first.voxel_map.shape:
            raise ValueError(f"these maps were not made the same way ({diff or 'shape'} differ): score every model "
                             "with the same transfer.py settings")
        if not np.array_equal(np.isnan(s.voxel_map), np.isnan(first.voxel_map)):
            raise ValueError("these maps cover different voxels: were they scored on the same preprocessed studies?")
    stacked = np.stack([s.voxel_map for s in scores]).astype(np.float64)
    return VoxelScore(**{**vars(first), "voxel_map": stacked.mean(axis=0).astype(np.float32)})


def ensemble_split(folders: list[Path], out: Path) -> int:
    """Write ``out/results.parquet`` and the mean maps of the studies every folder scored ``ok``."""
    results = [pd.read_parquet(f / "results.parquet").set_index("study_id") for f in folders]
    ok = [set(r.index[(r["status"] == "ok") & r["score_path"].notna()]) for r in results]
    common = sorted(set.intersection(*ok))
    rows = []
    for sid in common:
        score = mean_score([VoxelScore.load(r.loc[sid, "score_path"]) for r in results])
        path = score.save(out / "maps" / "ensemble" / sid / "voxel_map.npz")
        row = results[0].loc[sid].to_dict()
        row.update(study_id=sid, score_path=str(path), model="+".join(str(r.loc[sid, "model"]) for r in results),
                   model_version="+".join(str(r.loc[sid, "model_version"]) for r in results))
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "results.parquet", index=False)
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfers", nargs="+", required=True, help="transfer.py --score-only folders, one per model")
    p.add_argument("--directions", nargs="+", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if len(a.transfers) < 2:
        p.error("an ensemble needs the maps of two models or more")
    for d in a.directions:
        for split in SPLITS:
            folders = [Path(t) / d / split for t in a.transfers]
            if not all((f / "results.parquet").exists() for f in folders):
                continue
            n = ensemble_split(folders, Path(a.out) / d / split)
            print(f"{d} {split}: {n} studies, the mean of {len(folders)} maps each", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
