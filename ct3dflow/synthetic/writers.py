"""Phantoms as files: NIfTI (HU, int16), lung and lesion masks, and real DICOM series (one file per slice)."""

from __future__ import annotations

import contextlib
import locale
from pathlib import Path

import numpy as np

from .phantom import CT_IMAGE_STORAGE, HU_MAX, HU_MIN, Phantom


def write_nifti(phantom: Phantom, path) -> Path:
    """Write the phantom's HU as an int16 NIfTI (or any SimpleITK format, by extension)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(phantom.to_image(phantom.hu.astype(np.int16)), str(path), True)
    return path


def write_mask(phantom: Phantom, path, which: str = "lung") -> Path:
    """Write the lung mask (uint8 0/1/2) or the lesion mask (uint8 0/1) on the phantom's grid."""
    import SimpleITK as sitk

    if which not in ("lung", "lesion"):
        raise ValueError(f"which must be 'lung' or 'lesion', got {which!r}")
    arr = phantom.lung_mask if which == "lung" else phantom.lesion_mask.astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(phantom.to_image(arr.astype(np.uint8)), str(path), True)
    return path


@contextlib.contextmanager
def keeps_locale():
    """Restore the process's locale after the block. GDCM's DICOM writer (behind SimpleITK's ``ImageFileWriter``)
    switches the whole process to the C locale, so that it writes decimal points, and leaves it there; under a
    UTF-8 locale such as ``LANG=C.UTF-8`` every later ``open()`` and ``read_text()`` in the process that names
    no encoding then reads ASCII and fails on the first non-ASCII byte."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def phantom_uid(seed: int, *parts) -> str:
    """A DICOM UID derived deterministically from the seed and `parts`."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["ct3dflow-phantom", str(int(seed)), *[str(p) for p in parts]]))


def write_dicom_series(
    phantom: Phantom,
    folder,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str | None = None,
    series_number: int = 1,
    series_description: str = "CT3DFlow phantom chest",
    extra_tags: dict[str, str] | None = None,
) -> list[Path]:
    """Write the phantom as a CT DICOM series, one file per axial slice, into `folder`.

    Stored pixels are HU + 1024 (RescaleIntercept -1024, RescaleSlope 1). UIDs are derived from the
    seed unless given. The fake patient name, id and birth date are there so that privacy tests can
    check that they never leak into outputs. `extra_tags` ("gggg|eeee" -> value) are set on every slice.
    Returns the file paths, in slice order (inferior to superior).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seed = phantom.seed
    study_uid = study_uid or phantom_uid(seed, "study")
    series_uid = series_uid or phantom_uid(seed, "series", series_number)
    frame_uid = phantom_uid(seed, "frame")
    patient_id = patient_id or f"PH{seed:08d}"
    rng = np.random.default_rng([seed, 7])
    birth = f"{int(rng.integers(1940, 2000))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    sx, sy, sz = phantom.spacing
    # int16 HU with intercept -1024: GDCM stores HU + 1024 (0..4095); see _mark_unsigned
    img = phantom.to_image(np.clip(phantom.hu, HU_MIN, HU_MAX).astype(np.int16))
    common = {
        "0008|0060": "CT",
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0016": CT_IMAGE_STORAGE,
        "0008|0020": "20260101",
        "0008|0021": "20260101",
        "0008|0030": "090000",
        "0008|0031": "090000",
        "0008|0050": f"ACC{seed:08d}",
        "0008|0070": "CT3DFlow",
        "0008|0080": "Phantom General Hospital",
        "0008|0090": "DOCTOR^FAKE",
        "0008|1030": "CT CHEST",
        "0008|103e": series_description,
        "0010|0010": f"PHANTOM^{seed}",
        "0010|0020": patient_id,
        "0010|0030": birth,
        "0010|0040": "O",
        "0018|0015": "CHEST",
        "0018|0050": f"{sz:g}",
        "0018|0060": "120",
        "0018|0088": f"{sz:g}",
        "0018|5100": "FFS",
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0010": f"{seed % 100000}",
        "0020|0011": str(int(series_number)),
        "0020|0052": frame_uid,
        "0020|0037": "1\\0\\0\\0\\1\\0",
        "0028|0030": f"{sy:g}\\{sx:g}",  # row spacing (y), column spacing (x)
        "0028|1050": "-600",
        "0028|1051": "1500",
        "0028|1052": "-1024",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    if extra_tags:
        common.update(extra_tags)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    with keeps_locale():
        for i in range(img.GetDepth()):
            sl = img[:, :, i]
            for tag, value in common.items():
                sl.SetMetaData(tag, value)
            pos = img.TransformIndexToPhysicalPoint((0, 0, i))
            sl.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in pos))
            sl.SetMetaData("0020|1041", f"{pos[2]:.4f}")
            sl.SetMetaData("0020|0013", str(i + 1))
            sl.SetMetaData("0008|0018", phantom_uid(seed, "sop", series_uid, i))
            p = folder / f"IM{i + 1:04d}.dcm"
            writer.SetFileName(str(p))
            writer.Execute(sl)
            paths.append(p)
    _mark_unsigned(paths)
    return paths


def _mark_unsigned(paths) -> None:
    """GDCM writes HU + 1024 (0..4095) as *signed* 16-bit; mark it unsigned 12-of-16 bits, as CT
    scanners store it (the pixel bytes are the same for values below 32768)."""
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelRepresentation = 0
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.save_as(p)
