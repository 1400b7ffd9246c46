"""The preprocessed-study cache: served only when the input's content and the settings are unchanged."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ct3dflow.cache import StudyCache
from ct3dflow.errors import CTInputError
from ct3dflow.preprocess import PreprocessConfig
from ct3dflow.synthetic import make_phantom, write_dicom_series, write_nifti
from ct3dflow.synthetic.writers import keeps_locale


def test_hit_then_recompute_on_changed_content_or_setting(tmp_path):
    ph = make_phantom(5)
    src = write_nifti(ph, tmp_path / "a.nii.gz")
    cache = StudyCache(tmp_path / "cache")
    first = cache.get_or_compute("s1", src)
    assert not first.hit
    again = cache.get_or_compute("s1", src)
    assert again.hit and again.key == first.key
    np.testing.assert_array_equal(again.study.volume, first.study.volume)
    np.testing.assert_array_equal(again.study.strict, first.study.strict)
    np.testing.assert_array_equal(again.study.permissive, first.study.permissive)
    assert again.study.spacing == first.study.spacing

    # same path, different content (one brighter region): recomputed, never stale
    hu = ph.hu.copy()
    hu[20:30, 40:60, 40:60] = 300
    img = ph.to_image(hu)
    sitk.WriteImage(img, str(src))
    changed = cache.get_or_compute("s1", src)
    assert not changed.hit and changed.key != first.key
    assert not np.array_equal(changed.study.volume, first.study.volume)

    # a different preprocessing setting: recomputed
    other = cache.get_or_compute("s1", src, PreprocessConfig(hu_max=100.0))
    assert not other.hit and other.key != changed.key
    meta = json.loads((tmp_path / "cache" / "s1" / "meta.json").read_text())
    assert meta["key"] == other.key and meta["preprocess"]["hu_max"] == 100.0
    # the study says which window its volume was normalised with, served fresh or from the cache
    assert other.study.hu_window == (-1020.0, 100.0) and first.study.hu_window == (-1020.0, 200.0)
    assert cache.get_or_compute("s1", src, PreprocessConfig(hu_max=100.0)).study.hu_window == (-1020.0, 100.0)


def test_masks_are_nifti_on_the_volume_grid_and_dicom_folders_are_keyed(tmp_path):
    ph = make_phantom(6)
    folder = tmp_path / "dicom"
    write_dicom_series(ph, folder)
    cache = StudyCache(tmp_path / "cache")
    entry = cache.get_or_compute("d1", folder)
    d = tmp_path / "cache" / "d1"
    for name, labels in (("lungs_strict.nii.gz", {0, 1, 2}), ("lungs_permissive.nii.gz", {0, 1})):
        img = sitk.ReadImage(str(d / name))
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == entry.study.volume.shape
        assert set(np.unique(arr)) == labels
        assert np.allclose(img.GetSpacing(), entry.study.spacing)
        assert np.allclose(img.GetOrigin(), entry.study.origin)
    assert cache.get_or_compute("d1", folder).hit
    # one slice file rewritten with other pixels: the folder's key changes
    first = sorted(folder.iterdir())[len(list(folder.iterdir())) // 2]
    sl = sitk.ReadImage(str(first))
    arr = sitk.GetArrayFromImage(sl)
    arr[...] = arr + 5
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(sl)
    for k in sl.GetMetaDataKeys():
        new.SetMetaData(k, sl.GetMetaData(k))
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(first))
    with keeps_locale():
        w.Execute(new)
    assert not cache.get_or_compute("d1", folder).hit
    assert cache.study_ids() == ["d1"]


def test_one_entry_serves_every_patch_size_and_a_hit_still_checks_the_size(tmp_path):
    """Training preprocesses with the config's patch size and scoring with the model's: the patch size only
    decides whether a study is too small, so both share one entry instead of overwriting each other's."""
    ph = make_phantom(7, size="small")
    src = write_nifti(ph, tmp_path / "a.nii.gz")
    cache = StudyCache(tmp_path / "cache")
    first = cache.get_or_compute("s1", src, PreprocessConfig(patch_size=16))
    assert not first.hit
    for patch in (24, 16):
        again = cache.get_or_compute("s1", src, PreprocessConfig(patch_size=patch))
        assert again.hit and again.key == first.key
    # a patch larger than the study: the same error as a fresh preprocessing gives, from the cache too
    too_big = PreprocessConfig(patch_size=max(first.study.volume.shape) + 1)
    with pytest.raises(CTInputError, match="patch") as from_cache:
        cache.get_or_compute("s1", src, too_big)
    with pytest.raises(CTInputError, match="patch") as fresh:
        StudyCache(tmp_path / "fresh").get_or_compute("s1", src, too_big)
    assert str(from_cache.value) == str(fresh.value)
