"""The nightly screening job (jobs/screen.py) against a real Ray head and MLflow server (conftest).

A hostile archive (≥ 20 kinds of bad input beside good DICOM and NIfTI phantoms), privacy, re-runs that
score only what is new, an actor killed mid-run and a job stopped mid-run and submitted again.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import raycli
import SimpleITK as sitk
import yaml
from chain import GLOW
from dicom_helpers import write_dicom_series as helper_dicom_series
from dicom_helpers import write_dicom_slice
from pydicom.uid import generate_uid
from raycli import job_logs, job_status, stop_job

from ct3dflow.discovery import discover_studies, hash_uids
from ct3dflow.synthetic import make_phantom, write_dicom_series, write_nifti

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (40, 64, 80), (2.5, 2.5, 3.0)  # (z, y, x) voxels, (x, y, z) mm: ≈ 60×80×100 on the 2 mm grid
PATCH = 16
MODEL_NAME = GLOW  # the session chain's CT-3DFlow (tests/chain.py)
SECRET_PID = "PID-SECRET-4711"


# ---------------------------------------------------------------------------------------------------
# fast unit tests of discovery (no Ray)
def test_compaction_keeps_parts_of_an_older_version(tmp_path):
    """A nightly archive screened before a column was added: its parts lack the column, the study is skipped
    (already scored), and compaction still writes one row per study with every current column."""
    from ct3dflow.detect.batch import PARTS, RESULTS_FILE, SCREEN_COLUMNS, compact_results

    old_columns = [c for c in SCREEN_COLUMNS if c not in ("map_kind", "score_path")]
    parts = tmp_path / PARTS
    parts.mkdir()
    entries, outcomes = [], {}
    for i in range(2):
        row = dict.fromkeys(old_columns)
        row.update(study_id=f"s{i}", path=f"/a/s{i}", status="ok", error="", abnormal_volume_cm3=float(i),
                   scored_at=f"2026-11-0{i + 1}T00:00:00+00:00")
        pd.DataFrame([row], columns=old_columns).to_parquet(parts / f"p{i}.parquet", index=False)
        entries.append({"entry": f"e{i}", "study_id": f"s{i}", "path": f"/a/s{i}"})
        outcomes[f"e{i}"] = {"part": f"p{i}.parquet"}
    df = compact_results(tmp_path, entries, outcomes)
    assert list(df.columns) == SCREEN_COLUMNS and sorted(df["study_id"]) == ["s0", "s1"]
    assert df["map_kind"].isna().all() and df["score_path"].isna().all() and (df["status"] == "ok").all()
    assert pd.read_parquet(tmp_path / RESULTS_FILE)["abnormal_volume_cm3"].tolist() == [0.0, 1.0]


def test_discovery_ids_links_and_errors(tmp_path):
    a = tmp_path / "arch"
    ph = make_phantom(1, shape=SHAPE, spacing=SPACING)
    write_nifti(ph, a / "x" / "one.nii.gz")
    write_dicom_series(ph, a / "p" / "series")
    (a / "empty").mkdir()
    (a / "p" / "series" / ".hidden").write_text("ignored")
    (a / "loop").mkdir()
    os.symlink("..", a / "loop" / "up")  # a directory loop: not entered twice, no hang
    os.symlink("self.nii.gz", a / "loop" / "self.nii.gz")  # ELOOP
    os.symlink("nowhere.nii", a / "loop" / "dangling.nii")
    entries = discover_studies(a)
    by_path = {Path(e["path"]).relative_to(a).as_posix(): e for e in entries}
    assert set(by_path) == {"x/one.nii.gz", "p/series", "empty", "loop/self.nii.gz", "loop/dangling.nii"}
    assert by_path["p/series"]["study_id"].startswith("s-") and not by_path["p/series"]["error"]
    assert by_path["x/one.nii.gz"]["study_id"].startswith("f-")
    assert "empty" in by_path["empty"]["error"]
    assert "loop" in by_path["loop/self.nii.gz"]["error"]
    assert "broken symbolic link" in by_path["loop/dangling.nii"]["error"]
    assert len({e["study_id"] for e in entries}) == len(entries)
    assert discover_studies(a) == entries  # stable ids
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        discover_studies(tmp_path / "nope.parquet")
    assert "1.2.840.113619.2.55.3" not in hash_uids("series 1.2.840.113619.2.55.3 broke")


# ---------------------------------------------------------------------------------------------------
# helpers for the job tests
def submit(env, sid: str, config: Path, archive: Path, model: str | None = None, wait=True):
    entry = ["python", "jobs/screen.py", "--config", str(config), "--archive", str(archive), "--run-name", sid]
    return raycli.submit(env, sid, entry + (["--model", model] if model else []), wait=wait)


def summary_of(logs: str) -> dict:
    m = re.findall(r"screen summary: (.*)", logs)
    assert m, logs[-3000:]
    return {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in m[-1].split())}


def write_config(path: Path, work: Path, tracking_uri: str, stride: int = PATCH, **ray) -> Path:
    cfg = {"name": "screen-test", "work_dir": str(work), "data": {"cache_dir": str(work / "cache")},
           "scoring": {"stride": stride, "batch_size": 64},
           "ray": {"preprocess_workers": 2, "preprocess_cpus": 0.5, "scoring_actors": 1, "scoring_cpus": 0.5,
                   "use_gpu": "auto", **ray},
           "mlflow": {"tracking_uri": tracking_uri, "experiment": "ct3dflow-screen",
                      "registered_model": MODEL_NAME, "system_metrics": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_ok(env, sid, config, archive, model=None) -> str:
    r = submit(env, sid, config, archive, model)
    status = job_status(env, sid)
    logs = job_logs(env, sid) if status != "PENDING" else ""
    assert status == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-3000:] + logs[-3000:]
    return logs


def parts_of(work: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (work / "results" / "parts").glob("*.parquet")}


def one_row_per_study(work: Path, n: int) -> pd.DataFrame:
    df = pd.read_parquet(work / "results" / "results.parquet")
    assert len(df) == n, df[["study_id", "path", "status", "error"]]
    assert df["path"].is_unique and df["study_id"].is_unique
    return df


# ---------------------------------------------------------------------------------------------------
# the model: a tiny Glow3D trained here, registered with an operating point
@pytest.fixture(scope="module")
def tiny_model(champion, mlflow_server):
    """The session chain's CT-3DFlow champion (tests/chain.py), with its voxel-map operating point, and its
    model file (without one: studies get scores, no decision)."""
    import mlflow

    from ct3dflow.adapters.tracking import load_patch_model

    mlflow.set_tracking_uri(mlflow_server)
    loaded = load_patch_model(f"models:/{MODEL_NAME}@champion")
    assert loaded.operating_point["map"] == "voxel"
    return {"path": champion["model_file"], "version": loaded.version, "op": loaded.operating_point}


# ---------------------------------------------------------------------------------------------------
# the hostile archive
def _nifti(arr: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.0), direction=None) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


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


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ray_head, mlflow_server, tiny_model):
    base = tmp_path_factory.mktemp("hostile")
    archive = base / "archive"
    exp, secrets = build_hostile_archive(archive)
    work = base / "work"
    cfg = write_config(base / "screen.yaml", work, mlflow_server)
    logs = run_ok(ray_head, "test-screen-hostile", cfg, archive)
    return {"archive": archive, "work": work, "cfg": cfg, "exp": exp, "secrets": secrets, "logs": logs}


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_hostile_archive_one_row_per_study(hostile, tiny_model):
    exp, a = hostile["exp"], hostile["archive"]
    assert len(exp) - 2 >= 24 and len([k for k, (s, _) in exp.items() if s == "error"]) >= 20
    df = one_row_per_study(hostile["work"], len(exp))
    df["rel"] = [Path(p).relative_to(a).as_posix() for p in df["path"]]
    assert set(df["rel"]) == set(exp)
    for r in df.itertuples():
        status, reason = exp[r.rel]
        assert r.status == status, (r.rel, r.status, r.error)
        if reason:
            assert re.search(reason, r.error, re.I), (r.rel, r.error)
        else:
            assert r.error == "" and r.n_patches > 0 and Path(r.map_path).is_file() and Path(r.preview_path).is_file()
            assert r.threshold_cm3 == tiny_model["op"]["threshold_cm3"] and r.predicted_abnormal in (True, False)
            assert r.map_kind == "voxel" and Path(r.map_path).name == "atypicality_map.nii.gz"
        assert r.model == f"models:/{MODEL_NAME}/{tiny_model['version']}"
        assert r.model_version == f"{MODEL_NAME}/{tiny_model['version']}"
    s = summary_of(hostile["logs"])
    n_ok = sum(1 for v in exp.values() if v[0] == "ok")
    assert (s["found"], s["scored"], s["skipped"], s["errors"]) == (len(exp), n_ok, 0, len(exp) - n_ok)
    assert "operating point from model version tag" in hostile["logs"]


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_privacy_no_patient_data_in_results_logs_or_mlflow(hostile, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    secrets = [*hostile["secrets"].values(), "PHANTOM^", "Phantom^Test", "PHANTOM-0001"]
    blobs = {"logs": hostile["logs"]}
    res = hostile["work"] / "results"
    for p in [res / "results.parquet", *(res / "parts").glob("*.parquet")]:
        blobs[str(p)] = p.read_bytes().decode("latin-1")
    df = pd.read_parquet(res / "results.parquet")
    blobs["errors"] = "\n".join(df["error"])
    # raw DICOM UIDs never appear in what the job writes or says; only hashed ones
    ours = "\n".join(ln for ln in hostile["logs"].splitlines() if "[ct3dflow]" in ln)
    assert "uid:" in blobs["errors"]
    assert not re.search(r"\b\d+(?:\.\d+){4,}\b", blobs["errors"] + ours)
    run_id = json.loads((res / "last_run.json").read_text(encoding="utf-8"))["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    blobs["params"] = json.dumps(run.data.params)
    blobs["tags"] = json.dumps(run.data.tags)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    art = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path)))
    for f in art.rglob("*"):
        if f.is_file():
            blobs[f"artifact {f.name}"] = f.read_bytes().decode("latin-1")
    assert any(k.startswith("artifact results") for k in blobs)
    for where, text in blobs.items():
        for s in secrets:
            assert s not in text, f"{s!r} leaked into {where}"
    assert run.info.status == "FINISHED" and run.data.metrics["found"] == len(hostile["exp"])


def test_manifest_mode_duplicates_and_missing_paths(tmp_path):
    """A manifest as the archive: one row per manifest row, a duplicate id and a missing path are error rows.
    The scoring run of the job in one process (the Ray job distributes the same two stages)."""
    import torch

    from ct3dflow.detect.batch import ScoringPlan, score_locally
    from ct3dflow.preprocess import PreprocessConfig
    from ct3dflow.train import TrainConfig

    write_nifti(make_phantom(31, shape=SHAPE, spacing=SPACING), tmp_path / "a.nii.gz")
    write_dicom_series(make_phantom(32, shape=SHAPE, spacing=SPACING), tmp_path / "b")
    m = pd.DataFrame([{"study_id": "A", "path": "a.nii.gz"}, {"study_id": "B", "path": "b"},
                      {"study_id": "A", "path": "b"}, {"study_id": "C", "path": "not/there.nii.gz"}])
    m.to_csv(tmp_path / "manifest.csv", index=False)
    torch.manual_seed(0)
    model = TrainConfig(levels=2, steps=1, width=4, patch_size=PATCH).build_model().eval()
    plan = ScoringPlan.make("voxel", {"stride": PATCH}, PATCH, None, "file", "file-x",
                            PreprocessConfig(patch_size=PATCH).to_dict(), tmp_path / "cache", tmp_path / "results")
    df, _ = score_locally(discover_studies(tmp_path / "manifest.csv"), plan, model)
    assert len(df) == 4 and sorted(df.study_id) == ["A", "A", "B", "C"]
    assert list(df[df.study_id == "B"].status) == ["ok"]
    assert sorted(df[df.study_id == "A"].status) == ["error", "ok"]
    assert df[(df.study_id == "A") & (df.status == "error")].error.str.contains("duplicate").all()
    assert df[df.study_id == "C"].error.str.contains("not found").all()


# ---------------------------------------------------------------------------------------------------
# faults
def _fault_archive(d: Path, n: int, seed0: int) -> Path:
    for i in range(n):
        write_nifti(make_phantom(seed0 + i, shape=SHAPE, spacing=SPACING), d / f"study{i:02d}.nii.gz")
    return d


def ok_parts(work: Path) -> dict[str, float]:
    """The parts of studies scored (an error row has a part too)."""
    parts = work / "results" / "parts"
    return {k: v for k, v in parts_of(work).items() if pd.read_parquet(parts / k).status.iloc[0] == "ok"}


def _wait_parts(env, sid, work, k, timeout=240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = len(ok_parts(work)) if (work / "results" / "parts").exists() else 0
        if n >= k:
            return n
        st = job_status(env, sid)
        assert st in ("PENDING", "RUNNING"), (st, job_logs(env, sid)[-3000:])
        time.sleep(0.3)
    pytest.fail(f"fewer than {k} parts within {timeout} s")


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_killed_actor_is_replaced_and_a_stopped_job_resumes(ray_head, mlflow_server, tiny_model, tmp_path):
    """One job: its scoring actor is killed after the first study (Ray starts another and the run goes on),
    then the job is stopped mid-run. The next night one more study has arrived: submitted again, the job skips
    what was scored, scores the rest and the new study, and gives the broken input its error row again."""
    n = 8
    archive = _fault_archive(tmp_path / "archive", n, 400)
    (archive / "broken.nii.gz").write_bytes(b"not an image")
    work = tmp_path / "work"
    cfg = write_config(tmp_path / "screen.yaml", work, mlflow_server, stride=4, preprocess_workers=1)
    sid = "test-screen-faults-1"
    r = submit(ray_head, sid, cfg, archive, model=str(tiny_model["path"]), wait=False)
    assert r.returncode == 0, r.stderr
    deadline, pid = time.time() + 240, None
    while pid is None and time.time() < deadline:
        m = re.search(r"scoring actor pid (\d+) loaded", job_logs(ray_head, sid))
        pid = int(m.group(1)) if m else None
        time.sleep(0.3)
    assert pid, job_logs(ray_head, sid)[-3000:]
    done = _wait_parts(ray_head, sid, work, 1)
    assert done < n, "the job finished before the kill: raise n or lower the stride"
    os.kill(pid, signal.SIGKILL)
    done = len(ok_parts(work))  # what the killed actor finished; any further part is a new actor's
    # a new actor takes over and finishes a study; stopped at once (the job's logs reach the REST API seconds
    # late, and by then the tiny studies may all be done), its pid is checked in the logs afterwards
    _wait_parts(ray_head, sid, work, done + 1)
    assert stop_job(ray_head, sid) == "STOPPED"
    pids = {int(p) for p in re.findall(r"scoring actor pid (\d+) loaded", job_logs(ray_head, sid))}
    assert pid in pids and len(pids) >= 2, f"the killed actor {pid} was not replaced: {pids}"
    time.sleep(1)
    before = parts_of(work)
    ok_before = set(ok_parts(work))
    assert 2 <= len(ok_before) < n, f"{len(ok_before)} of {n} studies before the stop: not stopped mid-run"
    write_nifti(make_phantom(21, shape=SHAPE, spacing=SPACING), archive / "new" / "late.nii.gz")
    logs = run_ok(ray_head, "test-screen-faults-2", cfg, archive, model=str(tiny_model["path"]))
    s = summary_of(logs)
    assert (s["found"], s["skipped"], s["scored"], s["errors"]) == (n + 2, len(ok_before), n + 1 - len(ok_before), 1), s
    after = parts_of(work)
    assert len(after) == n + 2 and all(after[k] == before[k] for k in ok_before)  # done studies untouched
    df = one_row_per_study(work, n + 2)
    assert (df.status == "ok").sum() == n + 1 and (df.loc[df.path.str.endswith("late.nii.gz"), "status"] == "ok").all()
    assert "cannot read broken.nii.gz" in df.loc[df.path.str.endswith("broken.nii.gz"), "error"].iloc[0]
    assert len(re.findall(r"skipped \(already scored\)", logs)) == len(ok_before)


def test_nightly_scripts_are_valid(tmp_path):
    sh = ROOT / "platform" / "nightly-screen.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert "--submission-id" in sh.read_text(encoding="utf-8")
    for f in ("kuberay/raycronjob.yaml", "kuberay/cronjob-rayjob.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / "platform" / f).read_text(encoding="utf-8")) if d]
        assert docs and all("kind" in d for d in docs)
    unit = (ROOT / "platform" / "systemd" / "ct3dflow-screen.service").read_text(encoding="utf-8")
    assert "nightly-screen.sh" in unit and "OnCalendar" in (ROOT / "platform" / "systemd" /
                                                             "ct3dflow-screen.timer").read_text(encoding="utf-8")
