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

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


def write_config(path: Path, work: Path, manifest: Path, name: str, cache: Path | None = None, **train) -> Path:
    cfg = {"name": name, "work_dir": str(work),
           "data": {"manifest": str(manifest), "cache_dir": str(cache or work.parent / "cache")},
           "train": {**TINY_TRAIN, **train},
           "ray": {"num_workers": 2, "use_gpu": False, "backend": "gloo", "cpus_per_worker": 0.5,
                   "log_every": 5},
           "mlflow": {"experiment": "ct3dflow-test", "registered_model": "ct3dflow-glow3d-test"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(env, sid: str, script: str, config: Path, wait=True):
    return raycli.submit(env, sid, ["python", script, "--config", str(config)], wait=wait)


def test_preprocess_with_broken_studies_gives_one_row_each(jobs_done):
    """The chain's train job preprocessed its manifest on Ray Data first: one summary row per manifest row,
    the good studies ok, each broken one an error row with its reason (tests/chain.py adds them)."""
    summary = pd.read_parquet(jobs_done["tmp"] / "cache" / "summary.parquet")
    manifest = pd.read_parquet(jobs_done["tmp"] / "tune_manifest.parquet")
    assert len(summary) == len(manifest)
    good = set(jobs_done["df"].study_id) - set(jobs_done["df"].query("split == 'test'").study_id)
    ok = summary[summary.status == "ok"]
    assert sorted(ok.study_id) == sorted(good)
    errors = summary[summary.status == "error"]
    for sid, reason in jobs_done["broken"].items():
        rows = errors[errors.study_id == sid]
        assert len(rows) == 1 and reason in rows.error.iloc[0], (sid, rows.error.tolist())
    assert set(jobs_done["sentinels"]) <= set(errors.study_id)  # the test rows the tune job was given: not found


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


def test_killed_training_job_resumes_from_checkpoint(ray_head, mlflow_server, jobs_done, tmp_path):
    """A train job stopped after its first checkpoint, submitted again with the same name: it resumes from a
    checkpoint the first one wrote, and the MLflow run's history continues (the chain's cache: no preprocessing)."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    cfg = write_config(tmp_path / "cfg.yaml", work, jobs_done["tmp"] / "tune_manifest.parquet", "resume-test",
                       cache=jobs_done["tmp"] / "cache", iterations=240, checkpoint_every=20)
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
    time.sleep(1.5)  # let Ray Train register it before the kill
    ray_cli(ray_head, "job", "stop", "test-resume-1", timeout=120)
    assert job_status(ray_head, "test-resume-1") == "STOPPED"
    on_disk = {json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/metrics.json")}
    assert 0 < first_seen < 240
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
    assert result["steps"] == 240 and result["run_id"] == first_run_id
    client = MlflowClient(mlflow_server)
    hist = client.get_metric_history(first_run_id, "train_bits_per_dim")
    steps = np.array([h.step for h in hist])
    assert steps.min() <= resumed, "the first submission's history is gone"
    assert steps.max() == 240
    resumed_hist = [h.value for h in client.get_metric_history(first_run_id, "resumed_from_step")]
    assert resumed in resumed_hist
