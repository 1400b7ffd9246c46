"""Resampling, intensities and preprocess_study on synthetic torsos."""

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import synthetic_torso, write_dicom_series

from ct3dflow.errors import CTInputError
from ct3dflow.preprocess import (
    PreprocessConfig,
    PreprocessedStudy,
    denormalise,
    grid_size,
    normalise,
    preprocess_study,
    resample_isotropic,
)

SP = (2.0, 2.0, 2.0)


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def to_image(arr, spacing=SP, origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture(scope="module")
def torso_file(tmp_path_factory):
    hu, truth = synthetic_torso((56, 64, 80), SP)
    p = tmp_path_factory.mktemp("torso") / "torso.nii.gz"
    sitk.WriteImage(to_image(hu), str(p))
    return p, hu, truth


def test_grid_size_rule():
    assert grid_size((512, 512, 300), (0.7, 0.7, 1.0), 2.0) == [179, 179, 150]
    assert grid_size((512, 512, 64), (0.841796875, 0.841796875, 5.0), 2.0) == [216, 216, 158]
    img = to_image(np.zeros((31, 40, 50)), spacing=(0.7, 0.9, 1.25))
    out = resample_isotropic(img, 2.0, -1024.0)
    assert list(out.GetSize()) == grid_size((50, 40, 31), (0.7, 0.9, 1.25), 2.0)
    assert out.GetSpacing() == (2.0, 2.0, 2.0) and out.GetOrigin() == img.GetOrigin()


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 1.0), (0.5, 0.6, 5.0), (2.0, 2.0, 2.0), (0.9, 0.9, 1.7)])
def test_resampling_keeps_constant_hu_and_never_pads(spacing):
    img = to_image(np.full((23, 37, 41), 40.0), spacing=spacing, origin=(-3.0, 5.0, 7.0))
    out = sitk.GetArrayFromImage(resample_isotropic(img, 2.0, -1024.0))
    assert out.dtype == np.float32
    assert np.allclose(out, 40.0, atol=1e-3)  # no −1024 padding at the far edges


def test_resampling_antialiases():
    x = np.where(np.arange(200) % 2 == 0, 100.0, -100.0)  # Nyquist stripes at 0.5 mm
    img = to_image(np.broadcast_to(x, (10, 12, 200)), spacing=(0.5, 1.0, 1.0))
    out = sitk.GetArrayFromImage(resample_isotropic(img, 2.0, -1024.0))
    assert np.abs(out).max() < 5.0  # plain linear interpolation would alias to ±100


def test_resampling_keeps_position_of_a_step():
    # an edge at x = 30 mm stays at 30 mm after downsampling
    x = np.arange(200) * 0.5
    img = to_image(np.broadcast_to(np.where(x < 30.0, -1000.0, 0.0), (8, 8, 200)), spacing=(0.5, 1.0, 1.0))
    out = sitk.GetArrayFromImage(resample_isotropic(img, 2.0, -1024.0))[2, 2]
    xs = np.arange(out.size) * 2.0
    crossing = np.interp(-500.0, out, xs)
    assert abs(crossing - 29.75) < 0.5  # the input step lies between 29.5 and 30 mm


def test_normalise_roundtrip():
    cfg = PreprocessConfig()
    hu = np.array([-3000, -1020, -1000, 0, 200, 3000], np.float32)
    x = normalise(hu, cfg)
    assert x.dtype == np.float32 and x.min() == -0.5 and x.max() == 0.5
    assert np.allclose(x[2] - x[1], 20 / 1220)
    assert np.allclose(denormalise(x, cfg), np.clip(hu, -1020, 200), atol=1e-3)


def test_config_fingerprint_and_dict():
    a = PreprocessConfig()
    assert a.fingerprint() == PreprocessConfig().fingerprint() and len(a.fingerprint()) == 16
    b = PreprocessConfig(spacing_mm=1.5)
    assert b.fingerprint() != a.fingerprint()
    assert PreprocessConfig.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict({"nope": 1})


def test_preprocess_study_torso(torso_file):
    p, hu, truth = torso_file
    s = preprocess_study(p)
    assert isinstance(s, PreprocessedStudy)
    assert s.volume.dtype == np.float32 and s.volume.shape == hu.shape
    assert s.volume.min() >= -0.5 and s.volume.max() <= 0.5
    assert s.strict.dtype == np.uint8 and s.permissive.dtype == np.uint8
    assert dice(s.strict == 1, truth == 1) >= 0.95 and dice(s.strict == 2, truth == 2) >= 0.95
    assert np.all(s.permissive[s.strict > 0] == 1)
    assert s.spacing == (2.0, 2.0, 2.0) and s.direction == tuple(np.eye(3).ravel())
    vox = 8.0 / 1000
    assert s.lung_volume_right_cm3 == pytest.approx((s.strict == 1).sum() * vox)
    assert any("outside the adult range" in n for n in s.notes)  # a small phantom: a note, no error
    ref = s.reference_image()
    assert ref.GetSize() == (80, 64, 56) and ref.GetSpacing() == (2.0, 2.0, 2.0)


def test_flipped_direction_gives_same_result(tmp_path, torso_file):
    p, hu, _ = torso_file
    nz, ny, nx = hu.shape
    flipped = to_image(
        hu[:, ::-1, ::-1],
        origin=(2.0 * (nx - 1), 2.0 * (ny - 1), 0.0),
        direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1),
    )  # RAS-like storage
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    a, b = preprocess_study(p), preprocess_study(tmp_path / "flipped.nii.gz")
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.strict, b.strict) and np.array_equal(a.permissive, b.permissive)
    assert np.allclose(a.origin, b.origin)


def test_dicom_series_preprocesses_like_nifti(tmp_path, torso_file):
    p, hu, _ = torso_file
    write_dicom_series(hu, tmp_path / "dcm", spacing=SP)
    a, b = preprocess_study(p), preprocess_study(tmp_path / "dcm")
    assert np.abs(a.volume - b.volume).max() <= 0.5 / 1220 + 1e-6  # DICOM stores whole HU
    assert dice(a.strict > 0, b.strict > 0) > 0.99


def test_body_smaller_than_one_patch(tmp_path):
    hu, _ = synthetic_torso((40, 60, 60), SP)
    sitk.WriteImage(to_image(hu), str(tmp_path / "small.mha"))
    with pytest.raises(CTInputError, match=r"48³ patch \(96 mm\) per axis"):
        preprocess_study(tmp_path / "small.mha")


def test_no_lungs_is_an_error(tmp_path):
    hu, truth = synthetic_torso((56, 64, 80), SP, airways=False)
    hu[truth > 0] = 40.0
    sitk.WriteImage(to_image(hu), str(tmp_path / "nolung.mha"))
    with pytest.raises(CTInputError, match="lungs too small or not found"):
        preprocess_study(tmp_path / "nolung.mha")


def test_voxels_too_coarse(tmp_path):
    hu, _ = synthetic_torso((8, 8, 8), (50.0, 50.0, 50.0), airways=False)
    sitk.WriteImage(to_image(hu, spacing=(50.0, 50.0, 50.0)), str(tmp_path / "coarse.nii.gz"))
    with pytest.raises(CTInputError, match=r"voxels are too coarse: 50 × 50 × 50 mm.*beyond 10 mm per axis"):
        preprocess_study(tmp_path / "coarse.nii.gz")


def test_abdominal_ct_with_lung_bases_only_is_rejected(tmp_path):
    """An abdominal CT: the lung bases in its top slices, abdomen below. Not a chest CT to call normal."""
    from ct3dflow.synthetic import make_phantom

    ph = make_phantom(3, size="demo")  # 2.5 mm slices; lungs from slice 12 up
    bases = ph.hu[:30].astype(np.float32)  # the diaphragm and the lowest lung
    abdomen = np.repeat(bases[:1], 50, axis=0)  # below the diaphragm: soft tissue only
    hu = np.concatenate([abdomen, bases])
    lung_cm3 = (ph.lung_mask[:30] > 0).sum() * np.prod(ph.spacing) / 1000
    assert 100 < lung_cm3 < 800  # a few hundred cm³ of lung, as such a scan shows
    sitk.WriteImage(to_image(hu, spacing=ph.spacing), str(tmp_path / "abdomen.nii.gz"))
    with pytest.raises(CTInputError, match=r"does not cover the lungs: they are cut at its upper edge.*only the "
                                           r"lower part of the lungs .*will not call such a scan normal"):
        preprocess_study(tmp_path / "abdomen.nii.gz")
    # the same phantom whole is a chest CT
    sitk.WriteImage(to_image(ph.hu.astype(np.float32), spacing=ph.spacing), str(tmp_path / "chest.nii.gz"))
    assert preprocess_study(tmp_path / "chest.nii.gz").lung_volume_left_cm3 > 500


def test_asymmetry_is_noted(tmp_path):
    hu, truth = synthetic_torso((56, 64, 80), SP, airways=False)
    z = np.arange(hu.shape[0])[:, None, None]
    hu[(truth == 2) & (z < 40)] = 30.0  # most of the left lung collapsed
    sitk.WriteImage(to_image(hu), str(tmp_path / "asym.mha"))
    s = preprocess_study(tmp_path / "asym.mha")
    assert any("strong left/right asymmetry" in n for n in s.notes)


def test_user_mask_wins(tmp_path, torso_file):
    p, hu, truth = torso_file
    box = np.zeros(hu.shape, np.uint8)
    box[10:40, 20:40, 10:30] = 1  # nothing like the lungs: it must be used as given
    box[10:40, 20:40, 50:70] = 1
    m = to_image(box)
    sitk.WriteImage(sitk.Cast(m, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    s = preprocess_study(p, mask_path=tmp_path / "mask.nii.gz")
    assert np.array_equal(s.strict > 0, box > 0)
    assert (s.strict[:, :, :40] != 2).all() and (s.strict[:, :, 40:] != 1).all()
    assert any("supplied by the user" in n for n in s.notes)
