import os

import pandas as pd
import pytest

from ct3dflow.errors import CTInputError
from ct3dflow.manifest import manifest_fingerprint, read_manifest, validate_manifest, write_manifest


@pytest.fixture()
def archive(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / "data" / name).write_bytes(b"x")
    (tmp_path / "data" / "dcm").mkdir()
    df = pd.DataFrame({
        "study_id": ["a", "b", "c", "d"],
        "path": ["data/a.nii.gz", "data/b.nii.gz", str(tmp_path / "data" / "c.nii.gz"), "data/dcm"],
        "split": ["train", "val", "test", None],
        "label": [0, 1, None, 0],
    })
    return tmp_path, df


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_read_both_formats_and_resolve_paths(archive, ext):
    root, df = archive
    path = write_manifest(df, root / f"manifest.{ext}")
    got = read_manifest(path)
    assert list(got.study_id) == ["a", "b", "c", "d"]
    assert got.abs_path[0] == os.path.normpath(str(root / "data" / "a.nii.gz"))
    assert got.abs_path[2] == os.path.normpath(str(root / "data" / "c.nii.gz"))  # absolute stays
    assert got.abs_path[3] == os.path.normpath(str(root / "data" / "dcm"))
    assert list(got.label.astype("float").fillna(-1)) == [0, 1, -1, 0]
    assert pd.isna(got.split[3])
    assert validate_manifest(got) == []


def test_relative_paths_resolve_against_manifest_folder_not_cwd(archive, monkeypatch, tmp_path_factory):
    root, df = archive
    path = write_manifest(df, root / "manifest.csv")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    got = read_manifest(path)
    assert validate_manifest(got) == []


def test_csv_keeps_string_ids(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("study_id,path\n0007,x.nii.gz\n")
    got = read_manifest(tmp_path / "m.csv")
    assert got.study_id[0] == "0007"


def test_duplicates_and_missing_paths_are_row_errors(archive):
    root, df = archive
    df = pd.concat([df, df.iloc[[0]], pd.DataFrame({"study_id": ["e"], "path": ["data/missing.nii.gz"]})],
                   ignore_index=True)
    path = write_manifest(df, root / "m.parquet")
    got = read_manifest(path)  # not a hard failure
    errors = validate_manifest(got)
    rows = {i: msg for i, msg in errors}
    assert sorted(rows) == [4, 5]
    assert "duplicate study_id 'a' (also on row 0)" in rows[4] and "unique id" in rows[4]
    assert "path not found" in rows[5] and "missing.nii.gz" in rows[5]
    assert "relative paths are resolved against the manifest's folder" in rows[5]


def test_invalid_split_and_label(archive):
    root, df = archive
    df["split"] = ["train", "training", "test", None]
    df["label"] = ["0", "1", "2", ""]
    path = write_manifest(df, root / "m.csv")
    errors = dict(validate_manifest(read_manifest(path)))
    assert sorted(errors) == [1, 2]
    assert "invalid split 'training'" in errors[1]
    assert "invalid label" in errors[2]


def test_one_bad_label_is_that_rows_error_and_the_others_still_train(archive):
    """A manifest with one unusable label (a CSV, where labels arrive as text): the other rows keep their 0/1
    labels, the bad row and a duplicate id's second row are error rows, and neither reaches the training set."""
    from ct3dflow.pipeline import manifest_rows, ok_study_ids

    root, df = archive
    df["split"] = ["train", "train", "train", "train"]
    df["label"] = ["0.0", "yes", "1", "0"]
    df = pd.concat([df, df.iloc[[0]].assign(label="1")], ignore_index=True)  # "a" again, labelled abnormal
    rows = manifest_rows(write_manifest(df, root / "m.csv"))
    assert [r["label"] for r in rows] == [0, "yes", 1, 0, 1]
    assert [bool(r["manifest_error"]) for r in rows] == [False, True, False, False, True]
    assert "invalid label 'yes'" in rows[1]["manifest_error"]
    summary = pd.DataFrame({"study_id": ["a", "b", "c", "d", "a"], "status": ["ok", "error", "ok", "ok", "error"]})
    assert ok_study_ids(summary, rows, "train") == ["a", "d"]  # c is abnormal; a once
    assert ok_study_ids(summary, rows, "train", healthy_only=False) == ["a", "c", "d"]


def test_every_problem_of_a_row_is_kept(archive):
    from ct3dflow.pipeline import manifest_rows

    root, df = archive
    df.loc[1, ["path", "split", "label"]] = ["data/missing.nii.gz", "training", 7]
    err = manifest_rows(write_manifest(df, root / "m.csv"))[1]["manifest_error"]
    assert "path not found" in err and "invalid split 'training'" in err and "invalid label" in err


def test_missing_required_column(tmp_path):
    pd.DataFrame({"id": ["a"], "path": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(CTInputError, match="no column 'study_id'.*expected columns: study_id, path"):
        read_manifest(tmp_path / "m.csv")


def test_empty_study_id_and_bad_files(tmp_path):
    (tmp_path / "m.csv").write_text("study_id,path\n,x\n")
    with pytest.raises(CTInputError, match="empty study_id on row"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(CTInputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.parquet")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(CTInputError, match="unknown format"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(CTInputError, match="cannot read manifest"):
        read_manifest(tmp_path / "bad.parquet")


def test_fingerprint(archive):
    root, df = archive
    f1 = manifest_fingerprint(df)
    assert len(f1) == 64
    assert manifest_fingerprint(df.iloc[::-1]) == f1  # order does not matter
    path = write_manifest(df, root / "m.csv")
    assert manifest_fingerprint(read_manifest(path)) == f1  # nor the file format or derived columns
    df2 = df.copy()
    df2.loc[1, "label"] = 0
    assert manifest_fingerprint(df2) != f1
