"""Per-study steps shared by the single-process CLI and the Ray Data jobs.

Each function takes one manifest row and returns one plain-dict result row: a study that fails becomes an
``error`` row with a reason a person can act on, never an exception that stops the batch.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import StudyCache
from .errors import CTInputError
from .manifest import read_manifest, validate_manifest
from .preprocess import PreprocessConfig

SUMMARY_COLUMNS = [
    "study_id", "path", "status", "error", "shape", "lung_volume_right_cm3", "lung_volume_left_cm3",
    "cache_hit", "notes",
]


def error_reason(exc: BaseException) -> str:
    """A one-line reason for a result row; unexpected errors keep their type for the operator."""
    if isinstance(exc, CTInputError | FileNotFoundError):
        return str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"unexpected {type(exc).__name__}: {exc}{where}; please report this study to the maintainers"


def preprocess_row(row: dict, cache_dir: str, cfg: PreprocessConfig | dict | None = None) -> dict:
    """Preprocess one manifest row into the cache; return its summary row."""
    if isinstance(cfg, dict):
        cfg = PreprocessConfig.from_dict(cfg)
    cfg = cfg or PreprocessConfig()
    out = {c: None for c in SUMMARY_COLUMNS}
    out.update(study_id=str(row["study_id"]), path=str(row.get("path")), cache_hit=False, notes="")
    if row.get("manifest_error"):
        return {**out, "status": "error", "error": row["manifest_error"]}
    try:
        mask = row.get("mask_path")
        mask = mask if isinstance(mask, str) and mask else None
        entry = StudyCache(cache_dir).get_or_compute(out["study_id"], row.get("abs_path") or row["path"], cfg,
                                                     mask_path=mask)
        s = entry.study
        out.update(
            status="ok", error="", shape=list(s.volume.shape),
            lung_volume_right_cm3=float(s.lung_volume_right_cm3),
            lung_volume_left_cm3=float(s.lung_volume_left_cm3),
            cache_hit=entry.hit, notes="; ".join(s.notes),
        )
    except Exception as exc:  # noqa: BLE001 - one broken study must not stop the batch
        out.update(status="error", error=error_reason(exc))
    return out


def manifest_rows(manifest_path) -> list[dict]:
    """Manifest rows as dicts, with per-row problems (duplicate id, missing path) in ``manifest_error``."""
    df = read_manifest(manifest_path)
    df["manifest_error"] = ""
    for idx, msg in validate_manifest(df):  # every problem of a row, not only its last
        df.loc[idx, "manifest_error"] = "; ".join(m for m in (df.loc[idx, "manifest_error"], msg) if m)
    rows = df.to_dict("records")
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and pd.isna(v):
                r[k] = None
    return rows


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return df


def cached_patches(cache_dir, study_ids: list[str], n: int, size: int, min_lung_fraction: float,
                   seed: int) -> np.ndarray:
    """``n`` reproducible patches ``(n, 1, S, S, S)`` from cached studies (validation, ActNorm init)."""
    from .patches import extract_patches, sample_patch_corners

    if not study_ids:
        raise ValueError("no studies to draw patches from")
    cache = StudyCache(cache_dir)
    rng = np.random.default_rng(seed)
    per = np.bincount(np.arange(n) % len(study_ids), minlength=len(study_ids))
    out = []
    for sid, k in zip(study_ids, per, strict=True):
        if k == 0:
            continue
        s = cache.load(sid, mmap=True)
        corners = sample_patch_corners(s.strict, size, int(k), min_lung_fraction, rng)
        out.append(extract_patches(s.volume, corners, size))
    return np.concatenate(out)[:, None].astype(np.float32)


def ok_study_ids(summary: pd.DataFrame, manifest: list[dict], split: str, healthy_only: bool = True
                 ) -> list[str]:
    """Studies of ``split`` that preprocessed ok (and are not labelled abnormal), in manifest order. A row with a
    manifest error (a duplicate id, a bad label) is left out even where another row of its id preprocessed ok."""
    ok = set(summary.loc[summary["status"] == "ok", "study_id"])
    out = []
    for r in manifest:
        if r.get("manifest_error") or r.get("split") != split or r["study_id"] not in ok:
            continue
        if not (healthy_only and r.get("label") is not None and int(r["label"]) == 1):
            out.append(r["study_id"])
    return out
