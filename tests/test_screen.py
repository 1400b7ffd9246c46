"""The nightly screening job (jobs/screen.py) against a real Ray head and MLflow server (conftest).

The chain's nightly screening (tests/chain.py) of a hostile archive (≥ 20 kinds of bad input beside good DICOM
and NIfTI phantoms) and tonight's new studies (tests/tonight_archive.py): one row per study, the champion's map and
operating point, flags, privacy; and how the night went: its first job's scoring actor killed mid-run, the job
stopped mid-run, and the second job resuming it with a study that arrived late.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from chain import GLOW, parts_of
from tonight_archive import PATCH, SHAPE, SPACING

from ct3dflow.discovery import discover_studies, hash_uids
from ct3dflow.synthetic import make_phantom, write_dicom_series, write_nifti

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = GLOW  # the session chain's CT-3DFlow (tests/chain.py)


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
def summary_of(logs: str) -> dict:
    m = re.findall(r"screen summary: (.*)", logs)
    assert m, logs[-3000:]
    return {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in m[-1].split())}


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
    assert loaded.operating_point["map"] == "anatomy-density"
    return {"path": champion["model_file"], "version": loaded.version, "op": loaded.operating_point}



@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_hostile_archive_one_row_per_study(nightly, tiny_model):
    exp, a = nightly["exp"], nightly["archive"]
    assert len(exp) - 2 >= 24 and len([k for k, (s, _) in exp.items() if s == "error"]) >= 20
    df = one_row_per_study(nightly["work"], len(exp))
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
            assert r.map_kind == "anatomy-density" and Path(r.map_path).name == "atypicality_map.nii.gz"
        assert r.model == f"models:/{MODEL_NAME}/{tiny_model['version']}"
        assert r.model_version == f"{MODEL_NAME}/{tiny_model['version']}"
    s = summary_of(nightly["logs"])  # the night's second job: the first was stopped mid-run (below)
    n_ok = sum(1 for v in exp.values() if v[0] == "ok")
    assert (s["found"], s["scored"] + s["skipped"], s["errors"]) == (len(exp), n_ok, len(exp) - n_ok)
    assert "operating point from model version tag" in nightly["logs"]
    # ray.scoring_threads reached the actor (the driver's plan and the actor's own line)
    assert "1 scoring actor(s) on 0.5 CPU, 2 torch threads each" in nightly["logs"]
    assert re.search(r"scoring actor pid \d+ loaded \S+ on cpu \(anatomy-density map, 2 torch thread\(s\)\)",
                     nightly["logs"])


def test_scoring_threads_setting_is_a_whole_number_or_unset():
    from ct3dflow.adapters.ray_score import scoring_threads

    assert scoring_threads({}) is None and scoring_threads({"scoring_threads": None}) is None
    assert scoring_threads({"scoring_threads": 2}) == 2 and scoring_threads({"scoring_threads": 3.0}) == 3
    for bad in (1.5, -1, "two", True):
        with pytest.raises(ValueError, match="ray.scoring_threads must be a whole number"):
            scoring_threads({"scoring_threads": bad})


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_screening_follows_the_champions_map_kind_and_flags_the_lesions(nightly, tiny_model):
    """The nightly screening with the CT-3DFlow champion: tonight's studies are mapped with the voxel map of
    the model version's operating point and decided with that point, and the flow flags the abnormal phantoms
    (large lesions) above the normal ones. (The AE's patch map runs through the same Ray Data scorer in its
    evaluate job: test_tune_evaluate.py.)"""
    res = pd.read_parquet(nightly["work"] / "results" / "results.parquet").set_index("path")
    truth = nightly["tonight"]
    res = res.loc[list(truth)]
    assert (res.status == "ok").all(), res[["error"]]
    assert (res.map_kind == "anatomy-density").all() and res.predicted_abnormal.notna().all()
    op = tiny_model["op"]
    assert (res.threshold_cm3 == op["threshold_cm3"]).all()
    assert (nightly["work"] / "results" / "report.html").exists()
    sick = res[[truth[p] is not None for p in res.index]]
    normal = res[[truth[p] is None for p in res.index]]
    assert sick.predicted_abnormal.any(), res[["abnormal_volume_cm3", "threshold_cm3"]]
    assert sick.abnormal_volume_cm3.max() > normal.abnormal_volume_cm3.max()


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_privacy_no_patient_data_in_results_logs_or_mlflow(nightly, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    secrets = [*nightly["secrets"].values(), "PHANTOM^", "Phantom^Test", "PHANTOM-0001"]
    blobs = {"logs": nightly["logs"], "the stopped job's logs": nightly["interrupted"]["logs"]}
    res = nightly["work"] / "results"
    for p in [res / "results.parquet", *(res / "parts").glob("*.parquet")]:
        blobs[str(p)] = p.read_bytes().decode("latin-1")
    df = pd.read_parquet(res / "results.parquet")
    blobs["errors"] = "\n".join(df["error"])
    # raw DICOM UIDs never appear in what the job writes or says; only hashed ones
    ours = "\n".join(ln for ln in nightly["logs"].splitlines() if "[ct3dflow]" in ln)
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
    assert run.info.status == "FINISHED" and run.data.metrics["found"] == len(nightly["exp"])


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


# faults: the chain's night (tests/chain.py, nightly_screening)
@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_killed_actor_is_replaced_and_a_stopped_night_resumes(nightly):
    """The night's first screening job: its scoring actor was killed after the first study (Ray started another
    and the run went on), then the job was stopped mid-run. Tonight's last study arrived after that: the second
    submission skipped what was scored, left those parts untouched, scored the rest and the late study, and gave
    every broken input its error row again."""
    first, exp, work = nightly["interrupted"], nightly["exp"], nightly["work"]
    n_ok = sum(1 for status, _ in exp.values() if status == "ok")
    assert first["status"] == "STOPPED", first["logs"][-3000:]
    assert first["done_before_kill"] < n_ok - 1, "the job finished before the kill"
    assert first["killed"] in first["pids"] and len(first["pids"]) >= 2, \
        f"the killed actor {first['killed']} was not replaced: {first['pids']}"
    ok_before = first["ok"]
    assert 2 <= len(ok_before) < n_ok - 1, f"{len(ok_before)} of {n_ok - 1} studies before the stop: not mid-run"
    held, late = nightly["late"]
    assert f"discovered {len(exp) - 1} studies" in first["logs"] and not held.exists()  # it came after the stop
    s = summary_of(nightly["logs"])
    assert (s["found"], s["skipped"], s["scored"], s["errors"]) == \
        (len(exp), len(ok_before), n_ok - len(ok_before), len(exp) - n_ok), s
    after = parts_of(work)
    assert len(after) == len(exp) and all(after[k] == first["parts"][k] for k in ok_before)  # done ones untouched
    df = one_row_per_study(work, len(exp)).set_index("path")
    assert df.loc[str(late), "status"] == "ok" and df.loc[str(late), "predicted_abnormal"] in (True, False)
    assert len(re.findall(r"skipped \(already scored\)", nightly["logs"])) == len(ok_before)


def test_the_nightly_script_screens_the_archive_given_or_else_the_configs_pacs(tmp_path):
    """platform/nightly-screen.sh (cron, systemd): an archive, as argument or CT3DFLOW_ARCHIVE, is handed to the
    job, where it wins over the config's source.url; without one the config's PACS is screened, and a config
    without a PACS is a usage error."""
    sh = str(ROOT / "platform" / "nightly-screen.sh")
    pacs = tmp_path / "screen-pacs.yaml"
    pacs.write_text(yaml.safe_dump({"source": {"url": "https://pacs.example.org/dicom-web"}}), encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k not in ("CT3DFLOW_ARCHIVE", "CT3DFLOW_SCREEN_CONFIG")}
    base.update(CT3DFLOW_STATE=str(tmp_path / "state"), CT3DFLOW_DRY_RUN="1", CT3DFLOW_SUBMISSION_ID="screen-t")

    def run(*args, **env):
        return subprocess.run(["bash", sh, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)

    r = run("/data/archive", "--model", "models:/m/3")
    assert r.returncode == 0 and "--config configs/screen.yaml --archive /data/archive --run-name screen-t " \
        "--model models:/m/3" in r.stdout, r.stdout + r.stderr
    r = run("--model", "models:/m/3", CT3DFLOW_ARCHIVE="/data/tonight")
    assert r.returncode == 0 and "--archive /data/tonight --run-name screen-t --model models:/m/3" in r.stdout
    r = run(CT3DFLOW_SCREEN_CONFIG=str(pacs))
    assert r.returncode == 0 and f"--config {pacs} --run-name" in r.stdout and "--archive" not in r.stdout
    r = run()  # configs/screen.yaml names no PACS
    assert r.returncode == 2 and "usage" in r.stderr and "source.url" in r.stderr


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
