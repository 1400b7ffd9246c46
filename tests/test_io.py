"""read_ct: DICOM series folders and image files, and every bad input of DESIGN §4.1."""

import math
import re

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import write_dicom_series, write_dicom_slice
from pydicom.uid import generate_uid

from ct3dflow.errors import CTInputError
from ct3dflow.io import ReadReport, read_ct


def small_volume(nz=12, ny=20, nx=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=(nz, ny, nx)).astype(np.float32)


def write_image(arr, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def test_dicom_roundtrip_hu_geometry(tmp_path):
    hu = small_volume()
    write_dicom_series(hu, tmp_path / "s", spacing=(0.7, 0.8, 2.5), origin=(-10.0, -20.0, 30.0))
    img, rep = read_ct(tmp_path / "s")
    assert isinstance(rep, ReadReport)
    assert rep.format == "dicom" and rep.n_series_found == 1 and rep.n_slices == 12
    assert img.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(img), hu)  # rescale applied, slices sorted by position
    assert np.allclose(img.GetSpacing(), (0.7, 0.8, 2.5))
    assert np.allclose(img.GetOrigin(), (-10.0, -20.0, 30.0))
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    assert rep.notes == []


def test_dicom_in_subfolder(tmp_path):
    write_dicom_series(small_volume(), tmp_path / "patient" / "series1")
    img, rep = read_ct(tmp_path / "patient")
    assert img.GetSize() == (24, 20, 12)


def test_path_does_not_exist(tmp_path):
    with pytest.raises(CTInputError, match="does not exist"):
        read_ct(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(CTInputError, match="is empty"):
        read_ct(tmp_path / "e")


def test_folder_without_dicom(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(3):
        (d / f"note{i}.txt").write_text("not an image\n")
    with pytest.raises(CTInputError, match="none is DICOM"):
        read_ct(d)


def test_non_ct_modality(tmp_path):
    write_dicom_series(small_volume(), tmp_path / "mr", modality="MR")
    with pytest.raises(CTInputError, match="Modality is MR, not CT"):
        read_ct(tmp_path / "mr")


def test_two_series_picks_most_slices(tmp_path):
    study = generate_uid()
    write_dicom_series(small_volume(nz=12), tmp_path, study_uid=study, prefix="a", series_number=2)
    write_dicom_series(small_volume(nz=5), tmp_path, study_uid=study, prefix="b", series_number=3)
    img, rep = read_ct(tmp_path)
    assert rep.n_series_found == 2 and rep.n_slices == 12 and img.GetSize()[2] == 12
    assert any("holds 2 series; chose the CT axial series with the most slices" in n for n in rep.notes)
    assert not any("ambiguous" in n for n in rep.notes)


def test_two_equal_series_ambiguous_but_picked(tmp_path):
    write_dicom_series(small_volume(nz=6), tmp_path, prefix="a")
    write_dicom_series(small_volume(nz=6, seed=1), tmp_path, prefix="b")
    img, rep = read_ct(tmp_path)
    assert img.GetSize()[2] == 6
    assert any("ambiguous choice" in n for n in rep.notes)


def test_ct_chosen_over_mr_in_same_folder(tmp_path):
    write_dicom_series(small_volume(nz=20), tmp_path, modality="MR", prefix="mr")
    write_dicom_series(small_volume(nz=8), tmp_path, prefix="ct")
    img, rep = read_ct(tmp_path)
    assert img.GetSize()[2] == 8


def test_localizer_is_dropped(tmp_path):
    uid, study = generate_uid(), generate_uid()
    hu = small_volume()
    write_dicom_series(hu, tmp_path, series_uid=uid, study_uid=study)
    write_dicom_slice(
        np.zeros((30, 40)),
        tmp_path / "scout.dcm",
        position=(0.0, 0.0, 40.0),
        row_dir=(1, 0, 0),
        col_dir=(0, 0, -1),
        series_uid=uid,
        study_uid=study,
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        instance=99,
    )
    img, rep = read_ct(tmp_path)
    assert rep.n_slices == 12
    assert np.array_equal(sitk.GetArrayFromImage(img), hu)
    assert any("localizer" in n for n in rep.notes)


def test_reformat_with_other_orientation_is_dropped(tmp_path):
    uid, study = generate_uid(), generate_uid()
    write_dicom_series(small_volume(), tmp_path, series_uid=uid, study_uid=study)
    write_dicom_slice(
        np.zeros((20, 24)),
        tmp_path / "cor.dcm",
        position=(0.0, 0.0, 40.0),
        row_dir=(1, 0, 0),
        col_dir=(0, 0, -1),
        series_uid=uid,
        study_uid=study,
        instance=50,
    )
    img, rep = read_ct(tmp_path)
    assert rep.n_slices == 12
    assert any("orientation differs" in n for n in rep.notes)


def test_missing_slice(tmp_path):
    write_dicom_series(small_volume(), tmp_path, spacing=(1, 1, 2.0), skip_slices=[5])
    with pytest.raises(
        CTInputError, match=r"slice gap of 4\.00 mm.*1 slice\(s\) appear to be missing.*re-export"
    ):
        read_ct(tmp_path)


def test_one_slice_of_half_the_size_is_named_not_missing(tmp_path):
    """A slice re-exported at another matrix size leaves a gap once dropped: the reason names that slice."""
    hu = small_volume(nz=10, ny=20, nx=24)
    uid, study = generate_uid(), generate_uid()
    for k in range(10):
        img = hu[k] if k != 4 else hu[k, ::2, ::2]  # 12 × 10 instead of 24 × 20
        write_dicom_slice(img, tmp_path / f"{k}.dcm", position=(0, 0, 2.0 * k), slice_thickness=2.0,
                          series_uid=uid, study_uid=study, instance=k + 1)
    with pytest.raises(CTInputError, match=r"slice at 8\.00 mm .* 12×10 matrix where the other slices have "
                                           r"24×20") as e:
        read_ct(tmp_path)
    assert "missing" not in str(e.value)


@pytest.mark.parametrize("slope", ["0", "-1"])
def test_rescale_slope_that_cannot_give_hu(tmp_path, slope):
    import pydicom

    files = write_dicom_series(small_volume(), tmp_path, spacing=(1, 1, 2.0))
    ds = pydicom.dcmread(files[3])
    ds.RescaleSlope = slope
    ds.save_as(files[3])
    with pytest.raises(CTInputError, match=rf"RescaleSlope \(0028,1053\) is '{slope}' in 1 of 12 slice.*not be "
                                           "converted to HU"):
        read_ct(tmp_path)


def test_int8_volume_is_not_hu(tmp_path):
    arr = np.random.default_rng(0).integers(-128, 127, size=(12, 20, 24)).astype(np.int8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "int8.nii.gz"))
    with pytest.raises(CTInputError, match="8-bit signed integers .* the values are not HU"):
        read_ct(tmp_path / "int8.nii.gz")


def test_values_without_air_are_not_hu(tmp_path):
    write_image(small_volume() + 1024.0, tmp_path / "raw.nii.gz")  # stored values, no intercept applied
    with pytest.raises(CTInputError, match=r"not HU: they range from 24 to .*air near −1000 HU"):
        read_ct(tmp_path / "raw.nii.gz")


def test_uneven_spacing(tmp_path):
    hu = small_volume(nz=4)
    uid, study = generate_uid(), generate_uid()
    for k, z in enumerate([0.0, 2.0, 4.0, 5.5]):
        write_dicom_slice(
            hu[k], tmp_path / f"{k}.dcm", position=(0, 0, z), series_uid=uid, study_uid=study, instance=k + 1
        )
    with pytest.raises(CTInputError, match="uneven slice spacing"):
        read_ct(tmp_path)


def test_gantry_tilt_is_corrected(tmp_path):
    # a bright ball at a known world point, sampled on the tilted (sheared) slice geometry
    tilt, dz, n = 20.0, 2.0, 30
    t = math.radians(tilt)
    row, col = np.array([1.0, 0, 0]), np.array([0.0, math.cos(t), math.sin(t)])
    j, i = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    centre = np.array([15.0, 12.0, 30.0])
    hu = np.full((n, 30, 30), -1000.0, np.float32)
    for k in range(n):
        p = np.array([0.0, 0.0, k * dz])[None, None, :] + i[..., None] * row + j[..., None] * col
        hu[k][np.linalg.norm(p - centre, axis=-1) <= 6.0] = 500.0
    write_dicom_series(hu, tmp_path, spacing=(1.0, 1.0, dz), tilt_deg=tilt)
    img, rep = read_ct(tmp_path)
    assert any(re.search(r"gantry tilt of 20\.0° corrected", n) for n in rep.notes)
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    arr = sitk.GetArrayFromImage(img)
    zz, yy, xx = np.nonzero(arr > 0)
    found = np.array(img.TransformContinuousIndexToPhysicalPoint([xx.mean(), yy.mean(), zz.mean()]))
    assert np.linalg.norm(found - centre) < 1.0


def test_single_slice_series_is_2d(tmp_path):
    write_dicom_series(small_volume(nz=1), tmp_path)
    with pytest.raises(CTInputError, match="single slice"):
        read_ct(tmp_path)


def test_2d_image_file(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((20, 30), np.float32))
    sitk.WriteImage(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(CTInputError, match="2-D image"):
        read_ct(tmp_path / "flat.nii.gz")


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "nan.mha"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_voxels(tmp_path, name, value):
    arr = small_volume()
    arr[3, 4, 5] = value
    write_image(arr, tmp_path / name)
    with pytest.raises(CTInputError, match="NaN or infinite"):
        read_ct(tmp_path / name)


@pytest.mark.parametrize("name", ["t.nii.gz", "t.mha", "t.nrrd"])
def test_truncated_file(tmp_path, name):
    p = write_image(small_volume(nz=20, ny=40, nx=40), tmp_path / name)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTInputError, match="truncated or corrupt"):
        read_ct(p)


def test_truncated_dicom_slice(tmp_path):
    files = write_dicom_series(small_volume(ny=64, nx=64), tmp_path)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 2000])
    with pytest.raises(CTInputError, match="truncated or corrupt|missing"):
        read_ct(tmp_path)


def test_absurd_header_size(tmp_path):
    p = write_image(small_volume(nz=4), tmp_path / "big.mha")
    text = p.read_bytes()
    p.write_bytes(text.replace(b"DimSize = 24 20 4", b"DimSize = 512 512 9000"))
    with pytest.raises(CTInputError, match="claims a size"):
        read_ct(p)


def test_image_file_formats_and_flipped_direction(tmp_path):
    arr = small_volume()
    write_image(arr, tmp_path / "a.nrrd", spacing=(0.5, 0.6, 2.0), origin=(1.0, 2.0, 3.0))
    img, rep = read_ct(tmp_path / "a.nrrd")
    assert rep.format == "nrrd" and img.GetPixelID() == sitk.sitkFloat32
    # the same image stored with a flipped x axis: re-oriented to LPS, identical voxels
    flipped = arr[:, :, ::-1].copy()
    origin = (1.0 + 0.5 * (arr.shape[2] - 1), 2.0, 3.0)
    write_image(
        flipped,
        tmp_path / "f.mha",
        spacing=(0.5, 0.6, 2.0),
        origin=origin,
        direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    img2, rep2 = read_ct(tmp_path / "f.mha")
    assert np.allclose(img2.GetDirection(), np.eye(3).ravel())
    assert np.allclose(img2.GetOrigin(), img.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(img2), sitk.GetArrayFromImage(img))


def test_patient_identity_never_in_notes(tmp_path):
    study = generate_uid()
    write_dicom_series(small_volume(nz=12), tmp_path, study_uid=study, prefix="a")
    write_dicom_series(small_volume(nz=5), tmp_path, study_uid=study, prefix="b")
    _, rep = read_ct(tmp_path)
    text = " ".join(rep.notes)
    assert rep.notes and "Phantom" not in text and "PHANTOM-0001" not in text
