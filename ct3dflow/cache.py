"""The preprocessed-study cache that training and scoring read.

Layout, one folder per study::

    ROOT/<study_id>/volume.npy              normalised volume (z, y, x) float32, memory-mappable
    ROOT/<study_id>/lungs_strict.nii.gz     0 background, 1 right lung, 2 left lung (overlay in a viewer)
    ROOT/<study_id>/lungs_permissive.nii.gz 0/1, the mask the Log P map is read in
    ROOT/<study_id>/meta.json               key, settings, geometry, lung volumes, notes

An entry is served only when its key matches: the key hashes the cache layout version, the
preprocessing settings (``PreprocessConfig.fingerprint``: all but the patch size, which is checked on every
hit instead) and the *content* of the input files (and of a
user-supplied mask), so a changed input or setting is recomputed, never served stale. Entries are written
to a temporary folder and renamed into place, so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .preprocess import PreprocessConfig, PreprocessedStudy, check_covers_a_patch, preprocess_study

CACHE_VERSION = 1
_CHUNK = 1 << 20


def input_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of an input's bytes: a file, or every file under a folder (sorted by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def cache_key(path, cfg: PreprocessConfig, mask_path=None) -> str:
    parts = [f"cache-v{CACHE_VERSION}", cfg.fingerprint(), input_fingerprint(path)]
    if mask_path:
        parts.append(input_fingerprint(mask_path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass
class CacheEntry:
    study: PreprocessedStudy
    key: str
    hit: bool  # True when served from the cache, False when computed now
    path: Path


class StudyCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def study_dir(self, study_id: str) -> Path:
        if not study_id or "/" in study_id or study_id in (".", ".."):
            raise ValueError(f"study_id {study_id!r} cannot name a cache folder: use a plain identifier")
        return self.root / study_id

    def meta(self, study_id: str) -> dict | None:
        f = self.study_dir(study_id) / "meta.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None

    def get_or_compute(self, study_id: str, path, cfg: PreprocessConfig | None = None,
                       mask_path=None) -> CacheEntry:
        cfg = cfg or PreprocessConfig()
        key = cache_key(path, cfg, mask_path)
        meta = self.meta(study_id)
        if meta is not None and meta.get("key") == key:
            check_covers_a_patch(meta["shape_zyx"][::-1], cfg)  # the key leaves the patch size out
            return CacheEntry(self.load(study_id), key, True, self.study_dir(study_id))
        study = preprocess_study(path, cfg, mask_path=mask_path)
        self._write(study_id, study, key, cfg)
        return CacheEntry(study, key, False, self.study_dir(study_id))

    def _write(self, study_id: str, study: PreprocessedStudy, key: str, cfg: PreprocessConfig) -> None:
        final = self.study_dir(study_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{study_id}.", dir=self.root))
        try:
            np.save(tmp / "volume.npy", np.ascontiguousarray(study.volume, dtype=np.float32))
            for name, arr in (("lungs_strict", study.strict), ("lungs_permissive", study.permissive)):
                img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
                img.CopyInformation(study.reference_image())
                sitk.WriteImage(img, str(tmp / f"{name}.nii.gz"), useCompression=True)
            meta = {
                "key": key,
                "cache_version": CACHE_VERSION,
                "study_id": study_id,
                "preprocess": cfg.to_dict(),
                "shape_zyx": list(study.volume.shape),
                "spacing": list(study.spacing),
                "origin": list(study.origin),
                "direction": list(study.direction),
                "lung_volume_right_cm3": float(study.lung_volume_right_cm3),
                "lung_volume_left_cm3": float(study.lung_volume_left_cm3),
                "notes": list(study.notes),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def load(self, study_id: str, mmap: bool = False) -> PreprocessedStudy:
        d = self.study_dir(study_id)
        meta = self.meta(study_id)
        if meta is None:
            raise FileNotFoundError(f"study {study_id!r} is not in the cache at {self.root}: run preprocess first")
        volume = np.load(d / "volume.npy", mmap_mode="r" if mmap else None)
        strict = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lungs_strict.nii.gz")))
        permissive = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lungs_permissive.nii.gz")))
        return PreprocessedStudy(
            volume=volume,
            strict=strict.astype(np.uint8),
            permissive=permissive.astype(np.uint8),
            spacing=tuple(meta["spacing"]),
            origin=tuple(meta["origin"]),
            direction=tuple(meta["direction"]),
            lung_volume_right_cm3=meta["lung_volume_right_cm3"],
            lung_volume_left_cm3=meta["lung_volume_left_cm3"],
            notes=list(meta["notes"]),
            hu_window=(float(meta["preprocess"]["hu_min"]), float(meta["preprocess"]["hu_max"])),
        )

    def study_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "meta.json").exists())
