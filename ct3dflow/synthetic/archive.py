"""A phantom archive: healthy studies for training, held-out healthy and abnormal ones (every kind) for
validation and test, written as NIfTI or DICOM with a manifest (DESIGN §3)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .lesions import PATHOLOGIES
from .phantom import make_phantom
from .writers import write_dicom_series, write_mask, write_nifti


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
    family: str = "a",
    workers: int = 1,
):
    """Write a phantom archive and its manifest; return the manifest as a DataFrame.

    Each study is ``out_dir/<study_id>.nii.gz`` (fmt="nifti") or the DICOM folder ``out_dir/<study_id>/``
    (fmt="dicom"); ``out_dir/manifest.parquet`` has the columns study_id, path (relative to the manifest),
    split, label, pathology, lesion_volume_cm3, seed (and mask_path with ``write_lung_masks``).
    splits: (train, val, test) fractions of the normal studies. Abnormal studies go to val and test only
    (in the ratio of their fractions), never to train: the flow is trained on healthy studies only.
    Pathology kinds are cycled within val and within test, so each holds every kind when there are enough.
    ``family`` chooses the anatomy (:data:`ct3dflow.synthetic.FAMILIES`); the manifest records it.
    ``workers`` > 1 writes the studies in that many processes (each study has its own seed: the same archive).
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
    prefix = "phantom" if family == "a" else f"phantom-{family}"  # ids of two families never collide
    width = max(4, len(str(len(plan))))
    if progress is None:
        progress = sys.stderr.isatty()
    jobs = [dict(out=str(out), study_id=f"{prefix}-{int(seed)}-{i:0{width}d}", study_seed=int(seed) * 100_000 + i,
                 split=split, kind=kind, fmt=fmt, shape=shape, spacing=spacing, size=size, family=family,
                 write_lung_masks=write_lung_masks) for i, (split, kind) in enumerate(plan)]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    bar = dict(total=len(jobs), desc=f"phantoms ({fmt})", unit="study", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(int(workers), len(jobs))) as pool:
            rows = list(tqdm(pool.map(_write_study, jobs), **bar))
    else:
        rows = [_write_study(j) for j in tqdm(jobs, **bar)]
    cols = ["study_id", "path", "split", "label", "pathology", "lesion_volume_cm3", "seed", "family"]
    if write_lung_masks:
        cols.append("mask_path")
    df = pd.DataFrame(rows, columns=cols)
    df["label"] = df["label"].astype("int64")
    df["seed"] = df["seed"].astype("int64")
    df["pathology"] = df["pathology"].astype(object).where(df["pathology"].notna(), None)
    df.to_parquet(out / "manifest.parquet", index=False)
    return df


def _write_study(job: dict) -> dict:
    """One phantom of an archive, written; its manifest row (a module function, so a process pool can run it)."""
    out, study_id, kind = Path(job["out"]), job["study_id"], job["kind"]
    ph = make_phantom(job["study_seed"], kind, shape=job["shape"], spacing=job["spacing"], size=job["size"],
                      family=job["family"])
    if job["fmt"] == "nifti":
        rel = f"{study_id}.nii.gz"
        write_nifti(ph, out / rel)
    else:
        rel = study_id
        write_dicom_series(ph, out / rel)
    row = dict(study_id=study_id, path=rel, split=job["split"], label=int(kind is not None), pathology=kind,
               lesion_volume_cm3=float(ph.lesion_volume_cm3), seed=job["study_seed"], family=job["family"])
    if job["write_lung_masks"]:
        mrel = f"{study_id}_lungs.nii.gz"
        write_mask(ph, out / mrel, "lung")
        row["mask_path"] = mrel
    return row
