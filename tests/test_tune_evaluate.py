"""Operating-point tuning (validation only) and the test evaluation, for the flow (voxel map) and the AE
baseline (the paper's patch map).

Fast tests check the split guard and the resume rule in-process and the Tune space; the slow ones read the
session's chain (tests/chain.py: train, tune and evaluate both models with `ray job submit` against the real
Ray head and MLflow server) and refuse a second evaluation. The screening with the chain's champion is
test_screen.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chain import AE, GLOW, TINY_TRAIN, TUNE

from ct3dflow.synthetic import make_archive


# ------------------------------------------------------------------------------------------ fast
def test_tune_param_space_is_the_kinds_own():
    pytest.importorskip("ray")
    from ct3dflow.adapters.ray_tune import param_space, threshold_range
    from ct3dflow.detect import get_kind

    voxel, patch = get_kind("voxel"), get_kind("patch")
    space = param_space(voxel, {})
    assert space["tau_z"] == {"grid_search": voxel.space["tau_z"]}  # every value of the kind's grid
    space = param_space(patch, {"patch": {"sigma_vox": [8.0, 2.0], "tau_z": {"grid": [-1, 0]}, "v_min_cm3": 0.5}})
    assert space["v_min_cm3"] == 0.5 and space["tau_z"] == {"grid_search": [-1.0, 0.0]}
    assert space["sigma_vox"].lower == 2.0 and space["sigma_vox"].upper == 8.0
    assert threshold_range({"threshold_cm3": [50, 0.5]}) == (0.5, 50.0)
    with pytest.raises(ValueError, match="tune.voxel.tau_z"):
        param_space(voxel, {"tau_z": [2, 3]})  # a flat range names no map kind
    with pytest.raises(ValueError, match="does not search"):
        param_space(voxel, {"voxel": {"healthy_mean": 1.0}})


def test_split_scoring_never_touches_other_splits_and_never_scores_twice(tmp_path, monkeypatch):
    """The scoring run over the rows of one split reads, preprocesses and writes nothing of another split;
    run again, it scores nothing (the one resume rule: an ok part under the same key is kept)."""
    import torch

    from ct3dflow import cache as cache_mod
    from ct3dflow.adapters.ray_jobs import split_rows
    from ct3dflow.baselines import ConvAE3D
    from ct3dflow.detect import get_kind
    from ct3dflow.detect.batch import ScoringPlan, entries_of_rows, score_locally
    from ct3dflow.pipeline import manifest_rows
    from ct3dflow.preprocess import PreprocessConfig

    real = tmp_path / "archive"
    df = make_archive(real, n_normal=4, n_abnormal=2, seed=5, splits=(0.5, 0.25, 0.25))
    test_ids = set(df.loc[df.split == "test", "study_id"])
    val_ids = list(df.loc[df.split == "val", "study_id"])
    assert test_ids and set(df.loc[df.split == "val", "label"]) == {0, 1}
    touched: list[str] = []
    orig_load, orig_goc = cache_mod.StudyCache.load, cache_mod.StudyCache.get_or_compute

    def load(self, study_id, mmap=False):
        touched.append(study_id)
        return orig_load(self, study_id, mmap=mmap)

    def get_or_compute(self, study_id, path, *a, **k):
        touched.extend([study_id, str(path)])
        return orig_goc(self, study_id, path, *a, **k)

    monkeypatch.setattr(cache_mod.StudyCache, "load", load)
    monkeypatch.setattr(cache_mod.StudyCache, "get_or_compute", get_or_compute)
    torch.manual_seed(0)
    model = ConvAE3D(depth=2, width=4, patch_size=16).eval()
    rows = split_rows(manifest_rows(real / "manifest.parquet"), "val")
    plan = ScoringPlan.make("patch", {"stride": 16, "batch_size": 32}, 16, None, "models:/m/1", "m/1",
                            PreprocessConfig(patch_size=16).to_dict(), tmp_path / "c", tmp_path / "work" / "val")
    res, outcomes = score_locally(entries_of_rows(rows), plan, model)
    assert list(res.study_id) == val_ids and (res.status == "ok").all() and (res.map_kind == "patch").all()
    test_paths = {str(real / p) for p in df.loc[df.split == "test", "path"]}
    assert touched and not (set(touched) & (test_ids | test_paths)), touched
    assert not any(p.name in test_ids for p in (tmp_path / "work").rglob("*"))
    assert not any((tmp_path / "c" / t).exists() for t in test_ids)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "val" / "parts").glob("*.parquet")}
    scored = []
    monkeypatch.setattr(get_kind("patch"), "score", lambda *a, **k: scored.append(1) or pytest.fail("scored again"))
    res2, outcomes2 = score_locally(entries_of_rows(rows), plan, model)
    assert not scored and {o["action"] for o in outcomes2.values()} == {"skip"}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "val" / "parts").glob("*.parquet")} == mtimes
    assert res2.drop(columns="scored_at").equals(res.drop(columns="scored_at"))
    with pytest.raises(ValueError, match="no row with split 'val'"):
        split_rows([{"study_id": "a", "split": "test"}], "val")


def test_evaluation_report_pictures(tmp_path):
    from PIL import Image

    from ct3dflow.eval_report import confusion_png, per_kind_markdown, roc_png
    from ct3dflow.metrics import patient_metrics, roc_curve_data

    y, s = np.array([0, 0, 0, 1, 1, 1]), np.array([0.0, 1.0, 5.0, 3.0, 8.0, 9.0])
    m = patient_metrics(y, s, 2.0)
    p = roc_png(roc_curve_data(y, s), tmp_path / "roc.png", auroc=m["auroc"],
                operating=(1 - m["specificity"], m["sensitivity"]))
    img = np.asarray(Image.open(p).convert("RGB"))
    assert img.shape[0] > 300 and (np.abs(img.astype(int) - [31, 119, 180]).sum(-1) < 30).sum() > 100  # the curve
    assert (np.abs(img.astype(int) - [214, 39, 40]).sum(-1) < 30).sum() > 20  # the operating point
    c = np.asarray(Image.open(confusion_png(m, tmp_path / "cm.png")).convert("RGB"))
    assert c.shape[1] > 300
    md = per_kind_markdown({"nodule": {"n": 2, "auroc": 1.0, "sensitivity": 0.5,
                                       "median_abnormal_volume_cm3": 3.25}})
    assert "| nodule | 2 | 1.000 | 0.500 | 3.250 |" in md


# ------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_tuned_operating_point_is_stored_and_used_by_scoring(jobs_done, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ct3dflow.adapters.tracking import load_patch_model

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    work = jobs_done["work"]
    for name, kind, map_kind in ((GLOW, "glow3d", "anatomy-density"), (AE, "ae", "patch")):
        loaded = load_patch_model(f"models:/{name}@champion")
        base = work / "scores" / name / f"v{loaded.version}"
        tuned = json.loads((base / "tune_result.json").read_text())
        op = tuned["operating_point"]
        assert loaded.operating_point == op and tuned["model_kind"] == kind and op["map"] == map_kind
        space = TUNE[map_kind]
        assert op["params"]["sigma_vox"] in space["sigma_vox"]["grid"]
        assert op["params"]["tau_z"] in space["tau_z"]["grid"]
        assert op["params"]["v_min_cm3"] == 0.0001  # every trial tied with v_min 0: the larger v_min wins
        assert op["scoring"]["patch_size"] == TINY_TRAIN["patch_size"] and op["scoring"]["stride"] == 8
        if map_kind == "anatomy-density":  # the platform default through the Ray jobs: flow, density, blobs, bite
            assert set(op["reference"]) == {"type", "flow", "density", "blob", "bite"}
            assert op["params"]["blob_weight"] == 0.5 and op["scoring"]["bite"] == 3
            assert op["scoring"]["blobs"] == [1.5, 2.5, 3.5] and op["scoring"]["density_below_hu"] == -300.0
        # the MLflow tune run: operating point artifact, trials, best trial = the stored point
        run = client.get_run(tuned["run_id"])
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.name == "ct3dflow-te-comparison" and run.info.status == "FINISHED"
        assert run.data.params["model_kind"] == kind and run.data.params["model_version"] == loaded.version
        assert run.data.params["op_map"] == map_kind
        art = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="operating_point.json"))
        assert json.loads(art.read_text()) == op
        trials = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="trials.csv"))
        n_grid = np.prod([len(v["grid"]) for v in space.values()])
        assert len(trials) == n_grid and trials.objective.iloc[0] == trials.objective.max()
        assert (trials.sigma_vox.iloc[0], trials.tau_z.iloc[0]) == (op["params"]["sigma_vox"], op["params"]["tau_z"])
        assert run.data.metrics["val_auroc"] == pytest.approx(trials.auroc.iloc[0])
        # a scoring run (the evaluate job) picked it up: its params and every decision used the stored point
        ev = json.loads((base / "test" / "evaluate_result.json").read_text())
        assert ev["operating_point"] == op and ev["map_kind"] == map_kind
        assert ev["comparison_view"].endswith("?viewStateShareKey=ct3dflow-comparison")
        erun = client.get_run(ev["run_id"])
        assert float(erun.data.params["op_threshold_cm3"]) == pytest.approx(op["threshold_cm3"])
        res = pd.read_parquet(base / "test" / "results.parquet")
        ok = res[res.status == "ok"]
        assert len(ok) == len(jobs_done["df"].query("split == 'test'")) and (ok.map_kind == map_kind).all()
        assert np.allclose(ok.threshold_cm3.astype(float), op["threshold_cm3"])
        assert (ok.predicted_abnormal == (ok.abnormal_volume_cm3 > op["threshold_cm3"])).all()
        assert all(Path(p).exists() for p in ok.preview_path) and all(Path(p).exists() for p in ok.map_path)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_tune_local_chooses_the_ray_tune_jobs_point(jobs_done, tmp_path):
    """``ct3dflow tune-local`` on the Ray tune job's stored validation scores, with the same grid, writes the
    identical operating point, for both map kinds — exact ties included."""
    from ct3dflow.cli import main

    work, tmp = jobs_done["work"], jobs_done["tmp"]
    for name, map_kind in ((GLOW, "anatomy-density"), (AE, "patch")):
        tuned = json.loads(next((work / "scores" / name).glob("v*/tune_result.json")).read_text())
        val = next((work / "scores" / name).glob("v*/val/results.parquet"))
        space = TUNE[map_kind]
        out = tmp_path / f"{map_kind}.json"
        argv = ["tune-local", "--manifest", str(tmp / "archive" / "manifest.parquet"), "--cache", str(tmp / "cache"),
                "--results", str(val), "--out", str(out), "--sigma", *map(str, space["sigma_vox"]["grid"]),
                "--tau", *map(str, space["tau_z"]["grid"]), "--v-min", *map(str, space["v_min_cm3"]["grid"])]
        for key in ("density_weight", "blob_weight"):
            if key in space:
                argv += [f"--{key.replace('_', '-')}", *map(str, space[key]["grid"])]
        assert main(argv) == 0
        local = json.loads(out.read_text())
        job = dict(tuned["operating_point"])
        assert local.pop("validation") == pytest.approx(job.pop("validation"))
        assert local == job, map_kind


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_tune_never_reads_the_test_split(jobs_done, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    df, work, sentinels = jobs_done["df"], jobs_done["work"], jobs_done["sentinels"]
    val_ids = set(df.loc[df.split == "val", "study_id"])
    real_test = set(df.loc[df.split == "test", "study_id"])
    forbidden = real_test | set(sentinels)
    before = jobs_done["after_tune_files"]
    assert not [p for p in before if any(t in p for t in forbidden)], "a test study was touched before evaluate"
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    for name in (GLOW, AE):
        version = client.get_model_version_by_alias(name, "champion").version
        val = pd.read_parquet(work / "scores" / name / f"v{version}" / "val" / "results.parquet")
        assert set(val.study_id) == val_ids and (val.status == "ok").all()
        tuned = json.loads((work / "scores" / name / f"v{version}" / "tune_result.json").read_text())
        assert set(tuned["validation_study_ids"]) == val_ids
        logged = mlflow.artifacts.load_dict(f"runs:/{tuned['run_id']}/validation_studies.json")
        assert set(logged["study_ids"]) == val_ids
    for sid in ("te-tune-glow", "te-tune-ae"):
        log = jobs_done["statuses"][sid][1]
        assert not any(t in log for t in forbidden), log


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_evaluations_side_by_side_and_once_per_version(jobs_done, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    exp = client.get_experiment_by_name("ct3dflow-te-comparison")
    runs = client.search_runs([exp.experiment_id], "tags.`ct3dflow.job` = 'evaluate'")
    by_kind = {r.data.params["model_kind"]: r for r in runs}
    assert set(by_kind) == {"glow3d", "ae"} and len(runs) == 2
    for r in runs:
        m = r.data.metrics
        for k in ("test_auroc", "test_f1", "test_accuracy", "test_sensitivity", "test_specificity"):
            assert k in m and 0.0 <= m[k] <= 1.0, (k, m)
        assert m["test_auroc_ci_low"] <= m["test_auroc"] <= m["test_auroc_ci_high"]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"roc.png", "confusion_matrix.png", "table1.md", "per_kind.md", "evaluation.json"} <= arts
        mv = client.get_model_version(r.data.params["model_name"], r.data.params["model_version"])
        assert r.info.run_id in mv.tags["ct3dflow.test_evaluation"]
    last = max(runs, key=lambda r: r.info.start_time)
    table = mlflow.artifacts.load_text(f"runs:/{last.info.run_id}/table1.md")
    assert table.startswith("| Method | AUROC | F1 | Accuracy |")
    assert "CT-3DFlow (ct3dflow-glow3d-te" in table and "AE (ct3dflow-ae-te" in table
    # a second evaluation of the same version is refused before anything is read or scored
    from ct3dflow.adapters.ray_jobs import evaluate_job, evaluate_models
    from ct3dflow.config import load_config

    real = jobs_done["tmp"] / "archive" / "manifest.parquet"
    cfg = load_config(jobs_done["config"], {"data": {"manifest": str(real)}, "mlflow": {"tracking_uri": mlflow_server}})
    before = sorted(p.stat().st_mtime_ns for p in (jobs_done["work"] / "scores").rglob("*") if p.is_file())
    with pytest.raises(RuntimeError, match="already evaluated on the test split.*--force"):
        evaluate_job(cfg, f"models:/{GLOW}@champion")
    # several models in one job (the chain evaluated both so): each refused on its own, neither stops the other
    with pytest.raises(RuntimeError, match=rf"2 of 2 model\(s\) not evaluated:\n  models:/{GLOW}@champion: .*already "
                       rf"evaluated.*\n  models:/{AE}@champion: .*already evaluated"):
        evaluate_models(cfg, [f"models:/{GLOW}@champion", f"models:/{AE}@champion"])
    assert sorted(p.stat().st_mtime_ns for p in (jobs_done["work"] / "scores").rglob("*") if p.is_file()) == before
