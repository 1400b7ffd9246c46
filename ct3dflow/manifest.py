"""The study manifest: one row per study (DESIGN §3).

Columns: ``study_id`` (string, unique), ``path`` (a DICOM folder or an image file), optional ``split``
(``train`` | ``val`` | ``test``), optional ``label`` (0 normal, 1 abnormal, empty = unknown), optional
``mask_path`` (a lung mask on the same grid). Relative paths are resolved against the manifest's folder.

:func:`read_manifest` fails only for problems that make the whole file unusable (unreadable file, missing
required columns, empty study ids). Problems of single rows (a duplicate id, a missing file, a bad split or
label) are returned by :func:`validate_manifest` so that batch jobs can report them as ``error`` rows and go
on with the other studies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ct3dflow.errors import CTInputError

REQUIRED_COLUMNS = ("study_id", "path")
OPTIONAL_COLUMNS = ("split", "label", "mask_path")
EXPECTED_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
SPLITS = ("train", "val", "test")
_DERIVED = ("abs_path", "abs_mask_path")
_STR_COLUMNS = ("study_id", "path", "split", "mask_path", "pathology")


def _is_missing(v) -> bool:
    if v is None:
        return True
    try:
        if pd.isna(v):
            return True
    except (TypeError, ValueError):
        return False
    return isinstance(v, str) and v.strip() == ""


def _resolve(p, base: Path):
    if _is_missing(p):
        return None
    p = os.path.expanduser(str(p).strip())
    if not os.path.isabs(p):
        p = os.path.join(str(base), p)
    return os.path.normpath(p)


def _fmt(path) -> str:
    suffix = "".join(Path(path).suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        return "parquet"
    if suffix.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    raise CTInputError(f"manifest {path}: unknown format {suffix or '(no extension)'!r}; "
                       "use a .parquet or .csv file")


def _normalise_label(s: pd.Series) -> pd.Series:
    """Labels as nullable Int64 when every value is 0, 1 or empty. Otherwise each good value still becomes 0 or 1
    (an object column) and a bad one stays as written, for :func:`validate_manifest` to name: one bad label is
    that row's error, never the other rows'."""
    num = pd.to_numeric(s.where(~s.map(_is_missing)), errors="coerce")
    bad = (~s.map(_is_missing)) & (num.isna() | ~num.isin([0, 1]))
    if bad.any():
        return pd.Series([v if b else (None if pd.isna(n) else int(n)) for v, n, b in zip(s, num, bad, strict=True)],
                         index=s.index, dtype=object)
    return num.astype("Int64")


def _optional_str(s: pd.Series) -> pd.Series:
    """Stripped strings, with None (not NaN) for missing values, as an object column."""
    return pd.Series([None if _is_missing(v) else str(v).strip() for v in s], index=s.index, dtype=object)


def read_manifest(path, base_dir=None) -> pd.DataFrame:
    """Read a Parquet or CSV manifest; add ``abs_path`` (and ``abs_mask_path``) resolved against its folder.

    Raises :class:`CTInputError` when the file cannot be read, a required column is missing, or a
    study_id is empty. Row-level problems are for :func:`validate_manifest`.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"manifest not found: {path}; give the path of a .parquet or .csv manifest")
    fmt = _fmt(path)
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            sep = "\t" if path.name.lower().endswith(".tsv") else ","
            df = pd.read_csv(path, sep=sep, dtype={c: str for c in _STR_COLUMNS}, keep_default_na=True)
    except CTInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user problem
        raise CTInputError(f"cannot read manifest {path} as {fmt}: {e}; check that the file is a valid "
                           f"{fmt} table with the columns {', '.join(EXPECTED_COLUMNS)}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CTInputError(
            f"manifest {path} has no column {', '.join(repr(c) for c in missing)}; expected columns: "
            f"{', '.join(REQUIRED_COLUMNS)} (required), {', '.join(OPTIONAL_COLUMNS)} (optional); "
            f"found: {', '.join(map(str, df.columns)) or '(none)'}")
    df = df.reset_index(drop=True)
    empty = [int(i) for i, v in df["study_id"].items() if _is_missing(v)]
    if empty:
        rows = ", ".join(map(str, empty[:10])) + (" …" if len(empty) > 10 else "")
        raise CTInputError(f"manifest {path}: empty study_id on row(s) {rows} (rows counted from 0); "
                           "give every study a non-empty, unique id")
    df["study_id"] = df["study_id"].map(lambda v: str(v).strip())
    for c in ("path", "split", "mask_path"):
        if c in df.columns:
            df[c] = _optional_str(df[c])
    if "label" in df.columns:
        df["label"] = _normalise_label(df["label"])
    base = Path(base_dir) if base_dir is not None else path.resolve().parent
    df["abs_path"] = _optional_str(df["path"].map(lambda p: _resolve(p, base)))
    if "mask_path" in df.columns:
        df["abs_mask_path"] = _optional_str(df["mask_path"].map(lambda p: _resolve(p, base)))
    df.attrs["manifest_path"] = str(path)
    df.attrs["base_dir"] = str(base)
    return df


def validate_manifest(df: pd.DataFrame, base_dir=None) -> list[tuple[int, str]]:
    """Row-level problems as (row index, message): duplicate study_id (second and later occurrences),
    path not found, mask_path not found, invalid split or label. An empty list means all rows are usable.

    Paths are taken from ``abs_path`` when present (as :func:`read_manifest` adds it), else resolved
    against `base_dir` (default: the manifest's folder recorded by read_manifest, else the working folder).
    """
    for c in REQUIRED_COLUMNS:
        if c not in df.columns:
            raise CTInputError(f"manifest has no column {c!r}; expected columns: "
                               f"{', '.join(REQUIRED_COLUMNS)} (required), {', '.join(OPTIONAL_COLUMNS)}")
    base = Path(base_dir or df.attrs.get("base_dir") or os.getcwd())
    errors: list[tuple[int, str]] = []
    first: dict[str, object] = {}
    for pos, (idx, row) in enumerate(df.iterrows()):
        i = int(idx) if isinstance(idx, (int, np.integer)) else pos
        sid = row["study_id"]
        if _is_missing(sid):
            errors.append((i, "empty study_id: give every study a non-empty, unique id"))
        else:
            sid = str(sid).strip()
            if sid in first:
                errors.append((i, f"duplicate study_id {sid!r} (also on row {first[sid]}): "
                                  "give every study a unique id"))
            else:
                first[sid] = i
        p = row.get("abs_path") if "abs_path" in df.columns else None
        if _is_missing(p):
            p = _resolve(row["path"], base)
        if p is None:
            errors.append((i, "empty path: give the DICOM folder or image file of the study"))
        elif not os.path.exists(p):
            errors.append((i, f"path not found: {row['path']} (resolved to {p}); check the manifest's path "
                              "column (relative paths are resolved against the manifest's folder)"))
        if "mask_path" in df.columns and not _is_missing(row["mask_path"]):
            mp = row.get("abs_mask_path") if "abs_mask_path" in df.columns else None
            if _is_missing(mp):
                mp = _resolve(row["mask_path"], base)
            if not os.path.exists(mp):
                errors.append((i, f"mask_path not found: {row['mask_path']} (resolved to {mp}); check the "
                                  "manifest's mask_path column or leave it empty to compute lung masks"))
        if "split" in df.columns and not _is_missing(row["split"]):
            if str(row["split"]).strip() not in SPLITS:
                errors.append((i, f"invalid split {row['split']!r}: use one of {', '.join(SPLITS)} "
                                  "or leave it empty"))
        if "label" in df.columns and not _is_missing(row["label"]):
            v = row["label"]
            try:
                ok = float(v) in (0.0, 1.0)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                errors.append((i, f"invalid label {v!r}: use 0 (normal), 1 (abnormal) or leave it empty"))
    return errors


def write_manifest(df: pd.DataFrame, path) -> Path:
    """Write a manifest as Parquet or CSV (by extension), without the derived abs_* columns."""
    path = Path(path)
    fmt = _fmt(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=[c for c in _DERIVED if c in df.columns])
    if fmt == "parquet":
        out.to_parquet(path, index=False)
    else:
        out.to_csv(path, index=False, sep="\t" if path.name.lower().endswith(".tsv") else ",")
    return path


def manifest_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the sorted (study_id, path, label, split) rows: identifies a data set for MLflow."""

    def cell(row, c):
        if c not in df.columns or _is_missing(row[c]):
            return ""
        v = row[c]
        if c == "label":
            try:
                return str(int(float(v)))
            except (TypeError, ValueError):
                return str(v)
        return str(v).strip()

    lines = sorted("\t".join(cell(row, c) for c in ("study_id", "path", "label", "split"))
                   for _, row in df.iterrows())
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


__all__ = [
    "EXPECTED_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "read_manifest",
    "validate_manifest",
    "write_manifest",
    "manifest_fingerprint",
]
