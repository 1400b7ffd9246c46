"""`ray job submit` against a real local Ray head, with a real MLflow server (both started by conftest)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import raycli
import yaml
from chain import TINY_TRAIN
from raycli import job_logs, job_status, ray_cli

from ct3dflow.synthetic import make_archive

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    make_archive(out, n_normal=4, n_abnormal=1, fmt="nifti", seed=3)
    return out / "manifest.parquet"


def write_config(path: Path, work: Path, manifest: Path, name: str, **train) -> Path:
    cfg = {"name": name, "work_dir": str(work),
           "data": {"manifest": str(manifest), "cache_dir": str(work.parent / "cache")},
           "train": {**TINY_TRAIN, **train},
           "ray": {"num_workers": 2, "use_gpu": False, "backend": "gloo", "cpus_per_worker": 0.5,
                   "log_every": 5},
           "mlflow": {"experiment": "ct3dflow-test", "registered_model": "ct3dflow-glow3d-test"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(env, sid: str, script: str, config: Path, wait=True):
    return raycli.submit(env, sid, ["python", script, "--config", str(config)], wait=wait)


def test_preprocess_job_with_broken_studies_succeeds(ray_head, archive, tmp_path):
    df = pd.read_parquet(archive)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("hello")
    bad = pd.DataFrame([
        {"study_id": "missing", "path": str(tmp_path / "nope.nii.gz")},
        {"study_id": "empty", "path": str(tmp_path / "empty")},
        {"study_id": "notdicom", "path": str(tmp_path / "notdicom")},
        {"study_id": df.study_id.iloc[0], "path": str(archive.parent / df.path.iloc[0])},  # duplicate id
    ])
    good = df.assign(path=[str(archive.parent / p) for p in df.path])[["study_id", "path", "split", "label"]]
    manifest = tmp_path / "manifest.parquet"
    pd.concat([good, bad], ignore_index=True).to_parquet(manifest)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "work", manifest, "pre")
    r = submit(ray_head, "test-preprocess", "jobs/preprocess.py", cfg)
    assert job_status(ray_head, "test-preprocess") == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-3000:]
    summary = pd.read_parquet(tmp_path / "cache" / "summary.parquet")
    assert len(summary) == len(good) + len(bad)
    status = dict(zip(summary.study_id + "#" + summary.index.astype(str), summary.status, strict=True))
    assert (summary.status == "ok").sum() == len(good), summary[["study_id", "status", "error"]]
    errors = summary[summary.status == "error"].set_index(summary[summary.status == "error"].study_id)
    assert set(errors.index) == {"missing", "empty", "notdicom", df.study_id.iloc[0]}, status
    assert "duplicate" in errors.loc[df.study_id.iloc[0], "error"]
    assert "not found" in errors.loc["missing", "error"]


def _registered_model_scores_a_patch(tracking_uri: str, name: str, patch_size: int) -> float:
    import mlflow
    import torch

    from ct3dflow.adapters.tracking import load_patch_model

    mlflow.set_tracking_uri(tracking_uri)
    loaded = load_patch_model(f"models:/{name}@champion")
    x = torch.rand(1, 1, patch_size, patch_size, patch_size) - 0.5
    lp = loaded.model.log_prob(x)
    assert lp.shape == (1,) and torch.isfinite(lp).all()
    assert loaded.settings["patch_size"] == patch_size and "preprocess" in loaded.settings
    return float(lp)


def test_train_job_submit_logs_and_registers(jobs_done, mlflow_server):
    """The session chain's train job (tests/chain.py): its MLflow run, metric history, system metrics and the
    registered model that scores a patch."""
    from chain import GLOW, TINY_TRAIN
    from mlflow.tracking import MlflowClient

    status, log = jobs_done["statuses"]["te-train-glow"]
    assert status == "SUCCEEDED", log
    result = json.loads((jobs_done["work"] / "ray_results" / "te-glow" / "train_result.json").read_text())
    assert result["steps"] == TINY_TRAIN["iterations"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.iterations"] == str(TINY_TRAIN["iterations"])
    assert "ct3dflow.code_version" in run.data.tags and "ct3dflow.manifest_fingerprint" in run.data.tags
    hist = client.get_metric_history(result["run_id"], "train_bits_per_dim")
    assert len(hist) >= 3 and max(m.step for m in hist) == TINY_TRAIN["iterations"]
    assert client.get_metric_history(result["run_id"], "val_bits_per_dim")
    assert any(k.startswith("system/") for k in run.data.metrics), "system metrics missing"
    _registered_model_scores_a_patch(mlflow_server, GLOW, TINY_TRAIN["patch_size"])


def test_killed_training_job_resumes_from_checkpoint(ray_head, mlflow_server, archive, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    cfg = write_config(tmp_path / "cfg.yaml", work, archive, "resume-test", iterations=400, checkpoint_every=20)
    run_dir = work / "ray_results" / "resume-test"
    r = submit(ray_head, "test-resume-1", "jobs/train.py", cfg, wait=False)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 400
    while time.time() < deadline:
        ckpts = sorted(run_dir.glob("checkpoint_*/metrics.json"))
        if ckpts:
            break
        status = job_status(ray_head, "test-resume-1")
        assert status in ("PENDING", "RUNNING"), job_logs(ray_head, "test-resume-1")[-3000:]
        time.sleep(2)
    else:
        pytest.fail("no checkpoint within 400 s")
    first_seen = json.loads(ckpts[0].read_text())["step"]
    time.sleep(3)  # let Ray Train register it before the kill
    ray_cli(ray_head, "job", "stop", "test-resume-1", timeout=120)
    assert job_status(ray_head, "test-resume-1") == "STOPPED"
    on_disk = {json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/metrics.json")}
    assert 0 < first_seen < 400
    first_run_id = (run_dir / "mlflow_run_id").read_text().strip()

    r = submit(ray_head, "test-resume-2", "jobs/train.py", cfg)
    assert job_status(ray_head, "test-resume-2") == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-3000:]
    logs = job_logs(ray_head, "test-resume-2")
    m = re.search(r"resumed from checkpoint at step (\d+)", logs)
    assert m, logs[-3000:]
    resumed = int(m.group(1))
    # it continues from a checkpoint the killed job wrote, not from zero
    assert resumed in on_disk and resumed >= first_seen > 0
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["steps"] == 400 and result["run_id"] == first_run_id
    client = MlflowClient(mlflow_server)
    hist = client.get_metric_history(first_run_id, "train_bits_per_dim")
    steps = np.array([h.step for h in hist])
    assert steps.min() <= resumed, "the first submission's history is gone"
    assert steps.max() == 400
    resumed_hist = [h.value for h in client.get_metric_history(first_run_id, "resumed_from_step")]
    assert resumed in resumed_hist
