"""Find the studies of an archive: a folder tree, or a manifest (no Ray here).

``discover_studies(root) -> list[dict]``, one entry per study candidate, each
``{"study_id", "entry", "path", "kind", "error", "mask_path"}`` (``error`` is ``""`` when discovery found
nothing wrong; a non-empty one becomes an ``error`` result row without any reading of pixels):

- **Folder mode** (``root`` is a folder). The tree is walked with ``os.scandir``; symbolic links to
  folders are followed once (a folder already visited, by device and inode, is not entered again, so a
  symlink loop neither hangs nor repeats studies). A folder that directly holds files other than image
  files (DICOM slices — any name, with or without ``.dcm`` — or anything else) is one study candidate;
  each image file (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) is one study. A leaf
  folder without files is a candidate too (it becomes an "empty folder" error row, which an operator
  wants to see). Hidden files and well-known sidecar files (``.json``, ``.md``, ``.csv``, ``.parquet``,
  ``.yaml``, ``.log``, ``.raw`` beside an ``.mhd``) are ignored. Unreadable folders, broken or looping
  symbolic links become entries with an ``error``, never exceptions.
- **Manifest mode** (``root`` is a ``.parquet``/``.csv`` manifest, DESIGN §3): one entry per manifest row,
  ``study_id`` from the manifest; row problems (duplicate id, missing path) become the entry's ``error``.

Study ids hold no patient data: ``s-`` + 20 hex digits of a sha256 of the StudyInstanceUID and
SeriesInstanceUID of the first readable DICOM file of a folder (the same series copied elsewhere gets the
hash of UIDs + relative path, so ids stay unique), else of the path relative to ``root``
(``f-`` for image files, ``d-`` for folders without readable UIDs). Ids are stable from night to night
as long as the files do not move (DICOM: as long as the first file's UIDs stay the same).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
SIDECAR_SUFFIXES = (".json", ".md", ".csv", ".parquet", ".yaml", ".yml", ".log")
MANIFEST_SUFFIXES = (".parquet", ".csv")
_UID_RE = re.compile(r"\b\d+(?:\.\d+){4,}\b")


def _hash(*parts: str, n: int = 20) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:n]


def hash_uids(text: str) -> str:
    """Replace DICOM UIDs (dotted numbers with ≥ 5 parts) in ``text`` by ``uid:<hash>``: messages from the
    reader may name a series by its UID, and results and logs keep only hashed identifiers."""
    return _UID_RE.sub(lambda m: f"uid:{_hash(m.group(0), n=10)}", text or "")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_ignored(name: str, siblings: set[str]) -> bool:
    low = name.lower()
    if name.startswith("."):
        return True
    if low.endswith(SIDECAR_SUFFIXES):
        return True
    if low.endswith((".raw", ".zraw", ".raw.gz")):  # MetaImage data file beside its .mhd header
        stem = low.split(".")[0]
        return any(s.lower().startswith(stem + ".") and s.lower().endswith(".mhd") for s in siblings)
    return False


def _dicom_uids(folder: Path, files: list[str]) -> tuple[str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID) of the first file (sorted) whose DICOM header reads."""
    import SimpleITK as sitk

    for name in sorted(files)[:20]:
        r = sitk.ImageFileReader()
        r.SetImageIO("GDCMImageIO")
        r.SetFileName(str(folder / name))
        try:
            r.ReadImageInformation()
        except RuntimeError:
            continue
        study = r.GetMetaData("0020|000d").strip() if r.HasMetaDataKey("0020|000d") else ""
        series = r.GetMetaData("0020|000e").strip() if r.HasMetaDataKey("0020|000e") else ""
        if study or series:
            return study, series
    return None


def _entry(study_id: str, path, kind: str, error: str = "") -> dict:
    # ``entry`` is unique per entry (== study_id except for duplicate manifest ids): the results key
    return {"study_id": study_id, "entry": study_id, "path": str(path), "kind": kind, "error": error,
            "mask_path": ""}


def _os_error(exc: OSError, what: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied reading {what}; give the screening job's user read access"
    if exc.errno == errno.ELOOP:
        return f"symbolic link loop at {what}; remove or fix the link"
    return f"cannot read {what} ({exc.strerror or type(exc).__name__}); check the archive's file system"


def _discover_folder(root: Path) -> tuple[list[dict], list[str]]:
    """Walk ``root``; return (entries, notes about skipped links)."""
    entries: list[dict] = []
    notes: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    uid_ids: set[str] = set()

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(root)) or "."
        except ValueError:
            return str(p)

    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            entries.append(_entry("d-" + _hash(rel(folder)), folder, "folder", _os_error(exc, f"folder {folder}")))
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            notes.append(f"{rel(folder)}: already visited through another path (symbolic link); not entered again")
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            entries.append(_entry("d-" + _hash(rel(folder)), folder, "folder", _os_error(exc, f"folder {folder}")))
            continue
        files: list[str] = []
        images: list[str] = []
        subdirs: list[Path] = []
        names = {c.name for c in children}
        for c in children:
            p = Path(c.path)
            try:
                if c.is_dir(follow_symlinks=True):
                    if not c.name.startswith("."):
                        subdirs.append(p)
                    continue
                is_file = c.is_file(follow_symlinks=True)
            except OSError:
                is_file = False
            if not is_file:
                if c.is_symlink():  # dangling or looping link: an entry, so the operator sees it
                    try:
                        os.stat(p)
                        msg = f"{p} is not a regular file or folder; remove it from the archive"
                    except OSError as exc:
                        msg = (_os_error(exc, str(p)) if exc.errno == errno.ELOOP
                               else f"broken symbolic link {p} (its target does not exist); fix or remove it")
                    entries.append(_entry("f-" + _hash(rel(p)), p, "file", msg))
                continue
            if _is_ignored(c.name, names):
                continue
            (images if is_image_file(c.name) else files).append(c.name)
        for name in images:
            p = folder / name
            err = ""
            if not os.access(p, os.R_OK):
                err = f"permission denied reading {p}; give the screening job's user read access"
            entries.append(_entry("f-" + _hash(rel(p)), p, "file", err))
        if files:
            readable = [f for f in files if os.access(folder / f, os.R_OK)]
            err = ""
            if not readable:
                err = (f"permission denied reading the files of folder {folder}; give the screening job's user "
                       "read access")
            uids = _dicom_uids(folder, readable) if readable else None
            if uids is not None:
                sid = "s-" + _hash(*uids)
                if sid in uid_ids:  # the same series copied to another folder: keep ids unique
                    notes.append(f"{rel(folder)}: same Study/Series UIDs as another folder; id includes the path")
                    sid = "s-" + _hash(*uids, rel(folder))
                uid_ids.add(sid)
            else:
                sid = "d-" + _hash(rel(folder))
            entries.append(_entry(sid, folder, "folder", err))
        elif not images and not subdirs and folder != root:
            entries.append(_entry("d-" + _hash(rel(folder)), folder, "folder",
                                  f"folder {folder} is empty; remove it or copy the study's files into it"))
        stack.extend(reversed(subdirs))
    return entries, notes


def _discover_manifest(path: Path) -> list[dict]:
    from .pipeline import manifest_rows

    entries = []
    seen: dict[str, int] = {}
    for i, r in enumerate(manifest_rows(path)):
        sid = str(r["study_id"]).strip()
        p = r.get("abs_path") or r.get("path")
        e = _entry(sid, p, "manifest", r.get("manifest_error") or "")
        if sid in seen:  # a duplicate id keeps its own result row (an error), told apart by its row number
            e["entry"] = f"{sid}#row{i}"
        seen.setdefault(sid, i)
        if r.get("mask_path"):
            e["mask_path"] = str(r.get("abs_mask_path") or r["mask_path"])
        entries.append(e)
    return entries


def discover_studies(root, with_notes: bool = False):
    """Study candidates of a folder tree or a manifest; see the module docstring.

    Raises ``FileNotFoundError`` only when ``root`` itself does not exist (a job cannot screen nothing);
    everything below ``root`` that is wrong becomes an entry's ``error``.
    """
    root = Path(root)
    if not root.exists():
        what = "manifest" if root.suffix.lower() in MANIFEST_SUFFIXES else "archive folder"
        raise FileNotFoundError(f"{what} not found: {root}; pass an existing folder or manifest (--archive)")
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ValueError(f"{root} is a file but not a manifest (.parquet or .csv); pass the archive folder "
                             "or a manifest")
        entries, notes = _discover_manifest(root), []
    else:
        entries, notes = _discover_folder(root)
    return (entries, notes) if with_notes else entries
