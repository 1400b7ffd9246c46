"""Read a chest CT (a DICOM series folder or one image file) as HU float32, oriented to LPS.

``read_ct(path) -> (sitk.Image, ReadReport)`` does every check of DESIGN §4.1 and raises
:class:`ct3dflow.errors.CTInputError` with a message saying what is wrong and what to do.

DICOM folders
    Every regular file of the folder (or, if it holds no DICOM file, of its immediate subfolders) is
    opened header-only with SimpleITK's GDCM reader (≈0.4 ms per file; no pixel data). Files are grouped
    by SeriesInstanceUID (what ``ImageSeriesReader.GetGDCMSeriesIDs`` does, but with the headers we need
    read once). Within a series, localizers (ImageType contains LOCALIZER) and slices whose orientation
    or matrix size differs from the majority are dropped with a note. Among the remaining series the
    reader picks a CT series, axial before others, with the most slices, and says so in the notes (also
    when the choice is ambiguous: two CT axial series with the same number of slices).

    Slices are sorted by their ImagePositionPatient projected on the slice normal. A gap larger than
    1.5× the typical spacing is a missing slice, other spacing variation above 10 % is uneven spacing:
    both are rejected (resampling across a hole would invent anatomy).

Gantry tilt — corrected, not rejected
    With gantry tilt the slice planes are tilted but the table moves along z, so consecutive positions
    are not along the slice normal. The stack is then a sheared grid. We *correct* it: the voxel
    ``(i, j, k)`` is at ``P0 + i·dx·row + j·dy·col + k·step`` (``step`` the mean position increment), and
    the volume is resampled (linear, −1024 HU outside) onto an axis-aligned LPS grid with the same
    in-plane spacing and the table step as slice spacing. A note records the angle. Tilted data are
    common in older head-and-neck and some chest protocols, and the correction is exact up to
    interpolation, so rejecting them would throw away usable studies. Oblique image files (a direction
    matrix that is not axis-aligned after LPS re-orientation) are resampled the same way.

Single files
    ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd`` (and any other format SimpleITK reads). The header
    is read first (size checks before pixels), then the pixels; NaN or inf voxels are rejected.

Orientation: ``sitk.DICOMOrient(img, "LPS")`` so axis-aligned input gets the identity direction; a flipped
axis is re-oriented, not an error. No patient name, ID or birth date ever enters notes or messages.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ct3dflow.errors import CTInputError

MAX_SLICES = 5000
MAX_VOXELS = 2 * 1024**3 // 4  # 2 GiB of float32
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
_TAGS = {
    "modality": "0008|0060",
    "image_type": "0008|0008",
    "series_uid": "0020|000e",
    "series_number": "0020|0011",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "rows": "0028|0010",
    "cols": "0028|0011",
    "slope": "0028|1053",
}


@dataclass
class ReadReport:
    """What the reader found and decided."""

    source: str
    format: str  # "dicom", "nifti", "mha", "nrrd", or the SimpleITK ImageIO name
    series_uid: str | None
    n_series_found: int
    n_slices: int
    notes: list[str] = field(default_factory=list)


@dataclass
class _Slice:
    path: str
    modality: str
    image_type: str
    series_uid: str
    series_number: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    rows: int
    cols: int
    slope: str = ""  # RescaleSlope as written ("" when absent)
    dropped_because: str = ""  # why _clean_series left this slice out


# --------------------------------------------------------------------------------------------- public


def read_ct(path: str | os.PathLike) -> tuple[sitk.Image, ReadReport]:
    """Read a DICOM series folder or an image file; return (HU float32 image in LPS, report)."""
    p = Path(path)
    if not p.exists():
        raise CTInputError(
            f"path does not exist: {p}; check the path (relative manifest paths are resolved against the "
            "manifest's folder)"
        )
    if p.is_dir():
        return _read_dicom_folder(p)
    return _read_image_file(p)


def is_axis_aligned(direction, tol: float = 1e-4) -> bool:
    """True when a 3×3 direction (9 floats) is the identity within ``tol``."""
    return bool(np.allclose(np.asarray(direction, dtype=float).reshape(3, 3), np.eye(3), atol=tol))


# ------------------------------------------------------------------------------------------ image files


def _format_of(p: Path, io_name: str) -> str:
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if "GDCM" in io_name:
        return "dicom"
    return io_name or "unknown"


def _read_image_file(p: Path) -> tuple[sitk.Image, ReadReport]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CTInputError(
            f"cannot read {p.name}: not a readable image, or the file is truncated or corrupt "
            f"({_first_line(exc)}); re-export or re-copy the file (supported: DICOM series folder, "
            f"{', '.join(IMAGE_SUFFIXES)})"
        ) from None
    io_name = reader.GetImageIO()
    fmt = _format_of(p, io_name)
    size = list(reader.GetSize())
    dim = reader.GetDimension()
    if reader.GetNumberOfComponents() != 1:
        raise CTInputError(
            f"{p.name} has {reader.GetNumberOfComponents()} components per voxel (colour or vector image); "
            "a CT must be a scalar HU volume"
        )
    if fmt == "dicom":
        # a single DICOM file is one slice (multi-frame files are read by the folder path)
        if dim < 3 or min(size[:3]) < 2:
            raise CTInputError(
                f"{p.name} is a single 2-D DICOM slice; pass the folder that holds the whole series"
            )
    if dim == 2 or (dim >= 3 and min(size[:3]) < 2):
        raise CTInputError(
            f"{p.name} is a 2-D image (size {tuple(size)}); CT-3DFlow needs a 3-D volume with several slices"
        )
    if dim > 4 or (dim == 4 and size[3] != 1):
        raise CTInputError(
            f"{p.name} is a {dim}-D image (size {tuple(size)}), e.g. a time series; export one 3-D volume"
        )
    _check_size(size[:3], p.name)
    stored_type = reader.GetPixelID()
    if fmt == "nifti":
        _check_nifti_raw(p)
    try:
        reader.SetOutputPixelType(sitk.sitkFloat32)
        img = reader.Execute()
    except RuntimeError as exc:
        raise CTInputError(
            f"cannot read the pixels of {p.name}: the file is truncated or corrupt ({_first_line(exc)}); "
            "re-export or re-copy it"
        ) from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    notes: list[str] = []
    _check_finite(img, p.name)
    img, more = _orient_lps(img)
    notes += more
    _check_hu(img, p.name, stored_type)
    report = ReadReport(
        source=str(p), format=fmt, series_uid=None, n_series_found=1, n_slices=img.GetSize()[2], notes=notes
    )
    return img, report


# ---------------------------------------------------------------------------------------- DICOM folders


def _list_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _read_header(path: Path) -> _Slice | None:
    r = sitk.ImageFileReader()
    r.SetImageIO("GDCMImageIO")
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return None

    def tag(key: str) -> str:
        k = _TAGS[key]
        return r.GetMetaData(k).strip() if r.HasMetaDataKey(k) else ""

    def floats(key: str, n: int) -> np.ndarray | None:
        try:
            v = np.array([float(x) for x in tag(key).split("\\")], dtype=float)
        except ValueError:
            return None
        return v if v.size == n and np.all(np.isfinite(v)) else None

    def integer(key: str) -> int:
        try:
            return int(tag(key))
        except ValueError:
            return 0

    return _Slice(
        path=str(path),
        modality=tag("modality").upper(),
        image_type=tag("image_type").upper(),
        series_uid=tag("series_uid") or "(no SeriesInstanceUID)",
        series_number=tag("series_number"),
        position=floats("position", 3),
        orientation=floats("orientation", 6),
        rows=integer("rows") or r.GetSize()[1],
        cols=integer("cols") or r.GetSize()[0],
        slope=tag("slope"),
    )


def _scan_folder(folder: Path) -> tuple[list[_Slice], int, list[Path]]:
    files = _list_files(folder)
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not files and not subdirs:
        raise CTInputError(
            f"folder {folder} is empty; pass a folder holding one DICOM series, or an image file"
        )
    slices = [s for s in (_read_header(f) for f in files) if s is not None]
    if not slices and subdirs:  # look one level down (e.g. PATIENT/SERIES/…)
        files = [f for d in subdirs for f in _list_files(d)]
        slices = [s for s in (_read_header(f) for f in files) if s is not None]
    if not files:
        raise CTInputError(
            f"folder {folder} holds no files (only empty subfolders); pass a folder holding one DICOM series"
        )
    return slices, len(files), files


def _orientation_key(o: np.ndarray) -> tuple:
    return tuple(np.round(o, 3))


def _normal(o: np.ndarray) -> np.ndarray:
    n = np.cross(o[:3], o[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _clean_series(uid: str, slices: list[_Slice]) -> tuple[list[_Slice], list[str], list[_Slice]]:
    """Drop localizers and orientation/size outliers of one series; return kept slices, notes and the
    dropped outliers (each with ``dropped_because``), so that a gap they leave in the stack is reported as
    what it is."""
    notes: list[str] = []
    loc = [s for s in slices if "LOCALIZER" in s.image_type or "SCOUT" in s.image_type]
    if loc:
        notes.append(f"series {uid_tag(uid)}: dropped {len(loc)} localizer image(s) (ImageType LOCALIZER)")
    kept = [s for s in slices if s not in loc]
    bad = [s for s in kept if s.position is None or s.orientation is None]
    if bad:
        notes.append(f"series {uid_tag(uid)}: dropped {len(bad)} image(s) without ImagePosition/OrientationPatient")
        kept = [s for s in kept if s not in bad]
    if not kept:
        return [], notes, []
    major_o = Counter(_orientation_key(s.orientation) for s in kept).most_common(1)[0][0]
    off = [s for s in kept if _orientation_key(s.orientation) != major_o]
    for s in off:
        s.dropped_because = "an orientation that differs from the other slices"
    outliers = list(off)
    if off:
        notes.append(
            f"series {uid_tag(uid)}: dropped {len(off)} image(s) whose orientation differs from the other "
            f"{len(kept) - len(off)} (localizer or reformat)"
        )
        kept = [s for s in kept if s not in off]
    major_size = Counter((s.rows, s.cols) for s in kept).most_common(1)[0][0]
    off = [s for s in kept if (s.rows, s.cols) != major_size]
    for s in off:
        s.dropped_because = (f"a {s.cols}×{s.rows} matrix where the other slices have "
                             f"{major_size[1]}×{major_size[0]}")
    outliers += off
    if off:
        notes.append(f"series {uid_tag(uid)}: dropped {len(off)} image(s) whose matrix size differs from the others")
        kept = [s for s in kept if s not in off]
    return kept, notes, outliers


def uid_tag(uid: str | None) -> str:
    """A DICOM UID as it may appear in notes and errors: a short hash (UIDs can identify a patient's study)."""
    import hashlib

    return "uid:" + hashlib.sha256(str(uid).encode()).hexdigest()[:12] if uid else "uid:?"


def _describe(uid: str, sl: list[_Slice]) -> str:
    mod = sl[0].modality or "?"
    axial = "axial" if abs(_normal(sl[0].orientation)[2]) > 0.8 else "non-axial"
    num = f"series number {sl[0].series_number}, " if sl[0].series_number else ""
    return f"{uid_tag(uid)} ({num}{mod}, {axial}, {len(sl)} slices)"


def _choose_series(groups: dict[str, list[_Slice]], folder: Path
                   ) -> tuple[str, list[_Slice], list[str], list[_Slice]]:
    notes: list[str] = []
    usable: dict[str, list[_Slice]] = {}
    dropped: dict[str, list[_Slice]] = {}
    for uid, sl in groups.items():
        kept, n, dropped[uid] = _clean_series(uid, sl)
        notes += n
        if len(kept) >= 1:
            usable[uid] = kept
    if not usable:
        raise CTInputError(
            f"folder {folder} holds DICOM files but no usable image series (only localizers or images "
            "without position/orientation); export the axial CT series"
        )
    ct = {u: s for u, s in usable.items() if s[0].modality == "CT"}
    if not ct:
        mods = sorted({s[0].modality or "(none)" for s in usable.values()})
        raise CTInputError(
            f"Modality is {', '.join(mods)}, not CT (tag 0008,0060) in {folder}; CT-3DFlow reads chest CT "
            "only — pass the CT series"
        )

    def rank(item):
        uid, sl = item
        return (abs(_normal(sl[0].orientation)[2]) > 0.8, len(sl))

    ordered = sorted(ct.items(), key=rank, reverse=True)
    uid, chosen = ordered[0]
    if len(groups) > 1:
        others = [_describe(u, s) for u, s in usable.items() if u != uid]
        others += [f"{u} (no usable images)" for u in groups if u not in usable]
        notes.append(
            f"folder holds {len(groups)} series; chose the CT axial series with the most slices: "
            f"{_describe(uid, chosen)}; ignored: {'; '.join(others)}"
        )
        if len(ordered) > 1 and rank(ordered[1]) == rank(ordered[0]):
            notes.append(
                f"ambiguous choice: series {ordered[1][0]} is also CT with {len(ordered[1][1])} slices; "
                "kept the first — pass a folder holding only the series you want to be sure"
            )
    return uid, chosen, notes, dropped[uid]


def _geometry(sl: list[_Slice], dropped: list[_Slice] = ()
              ) -> tuple[list[_Slice], np.ndarray, np.ndarray, np.ndarray, float]:
    """Sort slices; check spacing; return (sorted slices, row, col, step vector, tilt angle in degrees).

    ``dropped`` are the slices :func:`_clean_series` left out: one that sat in a gap is named as the cause
    (a slice of another matrix size is not a missing slice)."""
    o = sl[0].orientation
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    n = _normal(o)
    pos = np.array([s.position for s in sl])
    d = pos @ n
    order = np.argsort(d, kind="stable")
    sl = [sl[i] for i in order]
    pos, d = pos[order], d[order]
    gaps = np.diff(d)
    if np.any(gaps < 1e-3):
        k = int(np.sum(gaps < 1e-3))
        raise CTInputError(
            f"{k} slice(s) share a position with another slice (several acquisitions or duplicated files in "
            "one series); re-export a single series"
        )
    typical = float(np.median(gaps))
    big = np.nonzero(gaps > 1.5 * typical)[0]
    if big.size:
        i = int(big[0])
        for s in dropped:  # the gap holds a slice we dropped: say why it was dropped, not "missing"
            if s.position is not None and d[i] < float(s.position @ n) < d[i + 1]:
                raise CTInputError(
                    f"the slice at {float(s.position @ n):.2f} mm along the slice normal has {s.dropped_because}, "
                    f"so the series cannot be stacked (a slice re-exported or replaced at another resolution); "
                    "re-export the series with one matrix size and orientation"
                )
        n_missing = int(sum(max(round(g / typical) - 1, 1) for g in gaps[big]))
        raise CTInputError(
            f"slice gap of {gaps[i]:.2f} mm between positions {d[i]:.2f} and {d[i + 1]:.2f} mm along the "
            f"slice normal (typical spacing {typical:.2f} mm); {n_missing} slice(s) appear to be missing; "
            "re-export the complete series"
        )
    if np.any(np.abs(gaps - typical) > 0.1 * typical + 1e-3):
        raise CTInputError(
            f"uneven slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm along "
            f"the slice normal; "
            "re-export the series with a constant slice increment"
        )
    step = (pos[-1] - pos[0]) / (len(sl) - 1)
    # positions must lie on a line
    resid = pos - pos[0] - np.outer(np.arange(len(sl)), step)
    if np.max(np.linalg.norm(resid, axis=1)) > max(0.5, 0.25 * typical):
        raise CTInputError(
            "slice positions do not lie on a straight line (a mixed or reformatted series); "
            "re-export the original axial series"
        )
    cosang = abs(float(step @ n)) / float(np.linalg.norm(step))
    tilt = math.degrees(math.acos(min(1.0, cosang)))
    return sl, row, col, step, tilt


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, ReadReport]:
    slices, n_files, files = _scan_folder(folder)
    if not slices:
        example = ", ".join(f.name for f in files[:3])
        raise CTInputError(
            f"folder {folder} holds {n_files} file(s) but none is DICOM (e.g. {example}); pass "
            f"a DICOM series "
            f"folder or an image file ({', '.join(IMAGE_SUFFIXES)})"
        )
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    uid, chosen, notes, dropped = _choose_series(groups, folder)
    if n_files > len(slices):
        notes.append(f"ignored {n_files - len(slices)} non-DICOM file(s) in the folder")
    if len(chosen) < 2:
        raise CTInputError(
            f"the CT series {uid_tag(uid)} has a single slice (a 2-D image); CT-3DFlow needs a 3-D volume — export "
            "the whole axial series"
        )
    if len(chosen) > MAX_SLICES:
        raise CTInputError(
            f"the series claims {len(chosen)} slices (> {MAX_SLICES}); this is not a single chest CT — check "
            "the export"
        )
    _check_size([chosen[0].cols, chosen[0].rows, len(chosen)], f"series {uid_tag(uid)}")
    _check_rescale_slope(chosen, uid)
    chosen, row, col, step, tilt = _geometry(chosen, dropped)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([s.path for s in chosen])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise CTInputError(
            f"cannot read the pixels of series {uid_tag(uid)}: a file is truncated or corrupt ({_first_line(exc)}); "
            "re-export or re-copy the series"
        ) from None
    if img.GetSize()[2] != len(chosen):
        raise CTInputError(
            f"series {uid_tag(uid)}: read {img.GetSize()[2]} slices from {len(chosen)} files (multi-frame or corrupt "
            "files); re-export the series as one file per slice"
        )
    dx, dy = img.GetSpacing()[:2]
    origin = chosen[0].position
    if tilt > 0.1:
        notes.append(
            f"gantry tilt of {tilt:.1f}° corrected by resampling onto an axial grid (linear interpolation)"
        )
        m = np.column_stack([dx * row, dy * col, step])
        img = _resample_affine_to_axial(img, m, origin, (dx, dy, float(np.linalg.norm(step))))
    else:
        n = _normal(chosen[0].orientation)
        img.SetOrigin([float(v) for v in origin])
        img.SetSpacing([float(dx), float(dy), float(step @ n)])
        img.SetDirection([float(v) for v in np.column_stack([row, col, n]).ravel()])
        img, more = _orient_lps(img)
        notes += more
    _check_hu(img, f"series {uid_tag(uid)}")
    report = ReadReport(
        source=str(folder),
        format="dicom",
        series_uid=uid,
        n_series_found=len(groups),
        n_slices=len(chosen),
        notes=notes,
    )
    return img, report


# --------------------------------------------------------------------------------------------- helpers


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    return msg[:200]


def _check_size(size, what: str) -> None:
    n = int(np.prod([int(s) for s in size], dtype=np.int64))
    if size[2] > MAX_SLICES or n > MAX_VOXELS:
        raise CTInputError(
            f"{what} claims a size of {tuple(int(s) for s in size)} voxels "
            f"({n * 4 / 1024**3:.1f} GiB as float32), "
            f"beyond the limits ({MAX_SLICES} slices, 2 GiB); the header is corrupt or this is "
            f"not one chest CT"
        )


def _check_finite(img: sitk.Image, what: str) -> None:
    arr = sitk.GetArrayViewFromImage(img)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise CTInputError(
            f"{what} holds {int(bad.sum())} NaN or infinite voxel(s); fix the conversion that produced it "
            "(HU images have finite values everywhere)"
        )


def _nifti_header(p: Path):
    """(endian, datatype, bitpix, n_voxels, vox_offset) of a NIfTI-1 file, or None."""
    import gzip
    import struct

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as fh:
            hdr = fh.read(348)
    except (OSError, EOFError):
        return None
    if len(hdr) < 348:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", hdr[:4])[0] == 348:
            break
    else:
        return None  # NIfTI-2 or unknown: rely on ITK
    dims = struct.unpack(endian + "8h", hdr[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", hdr[70:74])
    n = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(min(int(dims[0]), 7), 1)]]))
    offset = int(struct.unpack(endian + "f", hdr[108:112])[0])
    return endian, int(datatype), int(bitpix), n, max(offset, 348)


def _check_nifti_raw(p: Path) -> None:
    """ITK's NIfTI reader fills a truncated file with zeros and turns NaN into 0: check both ourselves.

    Truncation: the file size (``.nii``) or the gzip trailer's uncompressed size (``.nii.gz``, verified by
    decompressing only when it disagrees) must cover the voxel data. NaN/inf: only float32/float64 data can
    hold them, and only then is the data decompressed and scanned.
    """
    import gzip

    info = _nifti_header(p)
    if info is None:
        return
    endian, datatype, bitpix, n, offset = info
    expected = offset + n * max(bitpix, 8) // 8
    gz = p.name.lower().endswith(".gz")

    def truncated() -> CTInputError:
        return CTInputError(
            f"cannot read the pixels of {p.name}: the file is truncated or corrupt (the header announces "
            f"{n} voxels, the data are shorter); re-export or re-copy it"
        )

    if gz:
        with open(p, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        if isize != expected % 2**32:  # a multi-member gzip can disagree: decompress to be sure
            total = 0
            try:
                with gzip.open(p, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        total += len(chunk)
            except (OSError, EOFError):
                raise truncated() from None
            if total < expected:
                raise truncated()
    elif p.stat().st_size < expected:
        raise truncated()
    if datatype not in (16, 64):  # only float32 / float64 can hold NaN
        return
    opener = gzip.open if gz else open
    with opener(p, "rb") as fh:
        fh.read(offset)
        dtype = np.dtype(endian + ("f4" if datatype == 16 else "f8"))
        data = np.frombuffer(fh.read(n * dtype.itemsize), dtype=dtype)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise CTInputError(
            f"{p.name} holds {bad} NaN or infinite voxel(s); fix the conversion that produced it "
            "(HU images have finite values everywhere)"
        )


def _orient_lps(img: sitk.Image) -> tuple[sitk.Image, list[str]]:
    notes: list[str] = []
    if is_axis_aligned(img.GetDirection()):
        img.SetDirection(np.eye(3).ravel().tolist())
        return img, notes
    img = sitk.DICOMOrient(img, "LPS")
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    if is_axis_aligned(d):
        img.SetDirection(np.eye(3).ravel().tolist())
        return img, notes
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(d) - 1) / 2))))
    notes.append(f"oblique orientation ({angle:.1f}° from axial) resampled onto an axial LPS grid")
    m = d @ np.diag(img.GetSpacing())
    img = _resample_affine_to_axial(img, m, np.asarray(img.GetOrigin()), img.GetSpacing())
    return img, notes


def _resample_affine_to_axial(img: sitk.Image, m: np.ndarray, origin, spacing, pad: float = -1024.0):
    """Resample voxels at world = origin + m @ index onto an identity-direction grid covering them."""
    src = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))  # index space: spacing 1, origin 0
    size = np.array(img.GetSize())
    corners = np.array(
        [[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    )
    world = corners @ m.T + np.asarray(origin, dtype=float)
    lo, hi = world.min(axis=0), world.max(axis=0)
    spacing = np.abs(np.asarray(spacing, dtype=float))
    out_size = [int(math.floor((h - l) / s + 1e-6)) + 1 for l, h, s in zip(lo, hi, spacing)]
    minv = np.linalg.inv(m)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(minv.ravel().tolist())
    tx.SetTranslation((-minv @ np.asarray(origin, dtype=float)).tolist())
    out = sitk.Resample(
        src,
        out_size,
        tx,
        sitk.sitkLinear,
        lo.tolist(),
        spacing.tolist(),
        np.eye(3).ravel().tolist(),
        pad,
        sitk.sitkFloat32,
    )
    return out


_BITS = {sitk.sitkInt8: (8, "signed"), sitk.sitkUInt8: (8, "unsigned")}


def _check_rescale_slope(chosen: list[_Slice], uid: str) -> None:
    """HU = RescaleSlope · stored value + RescaleIntercept. GDCM reads a slope of 0 as 1 and would hand us
    stored values as if they were HU; a CT's slope is positive (normally 1)."""
    bad = []
    for s in chosen:
        if not s.slope:
            continue
        try:
            v = float(s.slope.split("\\")[0])
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            bad.append(s.slope)
    if bad:
        raise CTInputError(
            f"RescaleSlope (0028,1053) is {bad[0]!r} in {len(bad)} of {len(chosen)} slice(s) of series "
            f"{uid_tag(uid)}: the stored values cannot be converted to HU (HU = slope × value + intercept, and a "
            "CT's slope is positive, normally 1); fix the rescale tags of the export"
        )


def _check_hu(img: sitk.Image, what: str, stored_type: int | None = None) -> None:
    """A chest CT in HU holds air (≈ −1000 HU, outside the body and in the lungs) and soft tissue (≈ 40 HU):
    an image without both is not HU, and every later step (lungs, map) would fail with a wrong reason."""
    f = sitk.MinimumMaximumImageFilter()
    f.Execute(img)
    lo, hi = f.GetMinimum(), f.GetMaximum()
    if lo <= -500 and hi >= -200:
        return
    if stored_type in _BITS:
        bits, sign = _BITS[stored_type]
        raise CTInputError(
            f"{what} is stored as {bits}-bit {sign} integers (values {lo:.0f} to {hi:.0f}), which cannot hold CT "
            "values in HU (air ≈ −1000, bone > 1000): the values are not HU; export the CT in HU (e.g. as 16-bit "
            "integers or float with the rescale applied)"
        )
    if lo > -500:
        raise CTInputError(
            f"the values of {what} are not HU: they range from {lo:.0f} to {hi:.0f}, and a chest CT holds air "
            "near −1000 HU (outside the body and in the lungs); check the rescale slope/intercept of the export, "
            "or that this is a CT"
        )
    raise CTInputError(
        f"{what} holds no body tissue: its values range from {lo:.0f} to {hi:.0f} HU (only air); pass the chest "
        "CT itself"
    )
