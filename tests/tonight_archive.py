"""Tonight's archive for the chain's nightly screening (tests/chain.py; test_screen.py checks what the job
made of it): ≥ 20 kinds of bad input beside good DICOM and NIfTI phantoms (a hostile archive), and tonight's new
chest studies, two of them with large lesions."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from dicom_helpers import write_dicom_series as helper_dicom_series
from dicom_helpers import write_dicom_slice
from pydicom.uid import generate_uid

from ct3dflow.synthetic import make_phantom, write_dicom_series, write_nifti

SHAPE, SPACING = (40, 64, 80), (2.5, 2.5, 3.0)  # (z, y, x) voxels, (x, y, z) mm: ≈ 60×80×100 on the 2 mm grid
PATCH = 16
SECRET_PID = "PID-SECRET-4711"
# tonight's new studies among the hostile archive's: two normal, two with large lesions, DICOM and NIfTI
TONIGHT = [("normal-a", None), ("consolidation", "consolidation"), ("normal-b", None), ("emphysema", "emphysema")]


def write_config(path: Path, work: Path, tracking_uri: str, registered_model: str, stride: int = PATCH,
                 **ray) -> Path:
    """A screening job's configuration (jobs/screen.py) for the session's Ray head and MLflow server."""
    cfg = {"name": "screen-test", "work_dir": str(work), "data": {"cache_dir": str(work / "cache")},
           "scoring": {"stride": stride, "batch_size": 64},
           "ray": {"preprocess_workers": 1, "preprocess_cpus": 0.5, "scoring_actors": 1, "scoring_cpus": 0.5,
                   "use_gpu": "auto", **ray},
           "mlflow": {"tracking_uri": tracking_uri, "experiment": "ct3dflow-screen",
                      "registered_model": registered_model, "system_metrics": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _nifti(arr: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.0), direction=None) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def tonight_studies(folder: Path) -> dict[str, str | None]:
    """Tonight's new chest studies (the small phantoms the session's models were trained on), two of them with
    large lesions; DICOM and NIfTI. Returns path → lesion kind (None: normal)."""
    truth = {}
    for i, (name, kind) in enumerate(TONIGHT):
        ph = make_phantom(600 + i, kind, size="small")
        if kind and ph.lesion_volume_cm3 < 15:  # the session's models are tiny: show them something plain
            ph = max((make_phantom(600 + i + 100 * j, kind, size="small") for j in range(1, 6)),
                     key=lambda p: p.lesion_volume_cm3)
        path = folder / (f"{name}.nii.gz" if i % 2 else name)
        write_nifti(ph, path) if i % 2 else write_dicom_series(ph, path)
        truth[str(path)] = kind
    return truth


def build_hostile_archive(a: Path) -> tuple[dict, dict]:
    """Return ({relative path: (expected status, reason regex or None)}, secrets to grep for)."""
    exp: dict[str, tuple[str, str | None]] = {}
    ph = make_phantom(11, shape=SHAPE, spacing=SPACING)
    ph2 = make_phantom(12, shape=SHAPE, spacing=SPACING)
    hu = ph.hu.astype(np.float32)
    # good studies
    write_nifti(ph, a / "good" / "chest.nii.gz")
    exp["good/chest.nii.gz"] = ("ok", None)
    files = write_dicom_series(ph2, a / "good_dicom" / "CT1", patient_id=SECRET_PID)
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    secrets = {"name": str(ds.PatientName), "pid": SECRET_PID, "birth": str(ds.PatientBirthDate)}
    exp["good_dicom/CT1"] = ("ok", None)
    # 1 empty folder
    (a / "empty").mkdir()
    exp["empty"] = ("error", "empty")
    # 2 non-DICOM files
    (a / "notdicom").mkdir()
    (a / "notdicom" / "data.bin").write_bytes(os.urandom(4096))
    (a / "notdicom" / "readme.txt").write_text("not an image")
    exp["notdicom"] = ("error", "none is DICOM")
    # 3 MR series
    small = hu[:, ::2, ::2]
    helper_dicom_series(small, a / "mr", spacing=(5.0, 5.0, 3.0), modality="MR")
    exp["mr"] = ("error", "not CT")
    # 4 two series in one folder (CT with 40 slices + CT with 12): picks the larger
    s_uid = generate_uid()
    write_dicom_series(make_phantom(13, shape=SHAPE, spacing=SPACING), a / "two_series", study_uid=s_uid)
    helper_dicom_series(hu[:12, ::2, ::2], a / "two_series", spacing=(5.0, 5.0, 3.0), study_uid=s_uid, prefix="b")
    exp["two_series"] = ("ok", None)
    # 5 a localizer among the slices
    write_dicom_series(make_phantom(14, shape=SHAPE, spacing=SPACING), a / "with_localizer")
    loc = pydicom.dcmread(next((a / "with_localizer").glob("*.dcm")), stop_before_pixels=True)
    write_dicom_slice(np.zeros((64, 64)), a / "with_localizer" / "LOC0001.dcm", position=(0, 0, 0),
                      row_dir=(1, 0, 0), col_dir=(0, 0, -1), series_uid=str(loc.SeriesInstanceUID),
                      study_uid=str(loc.StudyInstanceUID), image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    exp["with_localizer"] = ("ok", None)
    # 6 a missing slice
    helper_dicom_series(hu, a / "missing_slice", spacing=(2.5, 2.5, 3.0), skip_slices=[20])
    exp["missing_slice"] = ("error", "missing")
    # 7 gantry tilt (corrected)
    helper_dicom_series(hu, a / "tilt", spacing=(2.5, 2.5, 3.0), tilt_deg=12.0)
    exp["tilt"] = ("ok", None)
    # 8 a 2-D image
    _nifti(hu[20:21], a / "flat.nii.gz")
    exp["flat.nii.gz"] = ("error", "2-D")
    # 9 a body smaller than one patch (8 voxels of 2 mm < a 16-voxel patch)
    _nifti(hu[16:24, 28:36, 36:44], a / "tiny.nii.gz")
    exp["tiny.nii.gz"] = ("error", "patch")
    # 10 NaN voxels
    nan = hu.copy()
    nan[10, 10, 10] = np.nan
    _nifti(nan, a / "nan.nii.gz", spacing=SPACING)
    exp["nan.nii.gz"] = ("error", "NaN")
    # 11 flipped direction matrix (re-oriented: ok)
    _nifti(hu[:, :, ::-1].copy(), a / "flipped.nii.gz", spacing=SPACING, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    exp["flipped.nii.gz"] = ("ok", None)
    # 12 truncated file
    _nifti(hu, a / "trunc.nii", spacing=SPACING)
    raw = (a / "trunc.nii").read_bytes()
    (a / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    exp["trunc.nii"] = ("error", "truncated")
    # 13 an unreadable file (as root, reading still works: then it must be scored)
    write_nifti(make_phantom(15, shape=SHAPE, spacing=SPACING), a / "locked.nii.gz")
    os.chmod(a / "locked.nii.gz", 0)
    exp["locked.nii.gz"] = ("ok", None) if os.geteuid() == 0 else ("error", "permission denied")
    # 14 symlink loops: a folder loop (not entered twice) and a file that links to itself
    (a / "loops").mkdir()
    os.symlink("..", a / "loops" / "up")
    os.symlink("self.nii.gz", a / "loops" / "self.nii.gz")
    exp["loops/self.nii.gz"] = ("error", "symbolic link loop")
    # 15 zero-byte file
    (a / "zero.nii.gz").write_bytes(b"")
    exp["zero.nii.gz"] = ("error", "not a readable image|truncated")
    # 16 a folder of JPEGs
    (a / "photos").mkdir()
    for i in range(2):
        sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(sitk.GetImageFromArray(hu[10 + i])), sitk.sitkUInt8),
                        str(a / "photos" / f"img{i}.jpg"))
    exp["photos"] = ("error", "none is DICOM")
    # 17 only localizers
    helper_dicom_series(small[:5], a / "only_localizers", spacing=(5.0, 5.0, 3.0),
                        image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    exp["only_localizers"] = ("error", "localizer")
    # 18 a header claiming 20,000 slices over tiny data
    _nifti(hu[:4, :16, :16], a / "huge.nii", spacing=SPACING)
    b = bytearray((a / "huge.nii").read_bytes())
    b[46:48] = struct.pack("<h", 20000)  # dim[3]
    (a / "huge.nii").write_bytes(bytes(b))
    exp["huge.nii"] = ("error", "20000|truncated")
    # 19 a dangling symbolic link
    os.symlink("gone.nii.gz", a / "dangling.nii.gz")
    exp["dangling.nii.gz"] = ("error", "broken symbolic link")
    # 20 a single DICOM slice (its series UID must not leak: the message is hashed)
    helper_dicom_series(hu[:1], a / "one_slice", spacing=(2.5, 2.5, 3.0))
    exp["one_slice"] = ("error", "single slice")
    # 21 a colour volume
    rgb = sitk.Image([32, 32, 32], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(a / "colour.nrrd"))
    exp["colour.nrrd"] = ("error", "components")
    # 22 a MetaImage header whose data file is missing
    (a / "nodata.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 32 32 32\nElementType = MET_SHORT\n"
                                  "ElementDataFile = nodata.raw\n")
    exp["nodata.mhd"] = ("error", "cannot read")
    # 23 a DICOM slice truncated inside a series
    fs = write_dicom_series(make_phantom(16, shape=SHAPE, spacing=SPACING), a / "trunc_dicom")
    fs[5].write_bytes(fs[5].read_bytes()[:2000])
    exp["trunc_dicom"] = ("error", "missing|truncated|corrupt")
    # 24 a gzip file that is not a NIfTI
    with gzip.open(a / "garbage.nii.gz", "wb") as fh:
        fh.write(os.urandom(2048))
    exp["garbage.nii.gz"] = ("error", "cannot read")
    # 25 the same slices twice in one series
    dup_uid = generate_uid()
    for prefix in ("a", "b"):
        helper_dicom_series(small[:10], a / "dup_slices", spacing=(5.0, 5.0, 3.0), series_uid=dup_uid, prefix=prefix)
    exp["dup_slices"] = ("error", "share a position")
    # 26 one slice re-exported at half the matrix size: named, not "missing"
    half_uid, half_study = generate_uid(), generate_uid()
    (a / "half_size_slice").mkdir()
    for k in range(12):
        img = small[k] if k != 6 else small[k, ::2, ::2]
        write_dicom_slice(img, a / "half_size_slice" / f"{k}.dcm", position=(0, 0, 3.0 * k),
                          pixel_spacing=(5.0, 5.0), slice_thickness=3.0, series_uid=half_uid, study_uid=half_study,
                          instance=k + 1)
    exp["half_size_slice"] = ("error", "matrix where the other slices have")
    # 27 RescaleSlope 0 (GDCM would read it as 1)
    fs = write_dicom_series(make_phantom(17, shape=SHAPE, spacing=SPACING), a / "slope_zero")
    for f in fs[:3]:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = "0"
        ds.save_as(f)
    exp["slope_zero"] = ("error", "RescaleSlope .* cannot be converted to HU")
    # 28 an 8-bit volume: not HU
    _nifti(np.clip(hu / 8.0, -128, 127).astype(np.int8), a / "int8.nii.gz", spacing=SPACING)
    exp["int8.nii.gz"] = ("error", "8-bit signed integers.*not HU")
    # 29 50 mm voxels: too coarse
    _nifti(hu[::8, ::8, ::8].copy(), a / "coarse.nii.gz", spacing=(50.0, 50.0, 50.0))
    exp["coarse.nii.gz"] = ("error", "too coarse")
    # 30 an abdominal CT: lung bases in its top slices, abdomen below
    demo = make_phantom(18, size="demo")
    abdomen = np.concatenate([np.repeat(demo.hu[:1], 40, axis=0), demo.hu[:26]]).astype(np.int16)
    _nifti(abdomen, a / "abdomen.nii.gz", spacing=demo.spacing)
    exp["abdomen.nii.gz"] = ("error", "does not cover the lungs")
    return exp, secrets


def tonights_archive(a: Path) -> dict:
    """The hostile archive with tonight's new studies in ``tonight/``: ``exp`` (relative path → (expected
    status, reason regex or None)), ``secrets`` (to grep for) and ``tonight`` (path → lesion kind or None).
    Tonight's last study arrives late: it waits beside the archive, and ``late`` is (where it waits, where it
    belongs in the archive), for the chain to move it in while the night's screening is stopped."""
    exp, secrets = build_hostile_archive(a)
    tonight = tonight_studies(a / "tonight")
    exp.update({Path(p).relative_to(a).as_posix(): ("ok", None) for p in tonight})
    last = Path(list(tonight)[-1])  # a NIfTI file: moved in at once, as a PACS export would rename it
    held = a.parent / "late" / last.name
    held.parent.mkdir(parents=True, exist_ok=True)
    last.rename(held)
    return {"archive": a, "exp": exp, "secrets": secrets, "tonight": tonight, "late": (held, last)}
