"""`ray job submit` against a real local Ray head, with a real MLflow server (both started by conftest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chain import TINY_TRAIN

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


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
    # the trainers' shuffle buffer mixes the sampling tasks (each one study's patches) into every batch: 4 patches
    # from the 3 training studies hold 2.4 studies on average. This short run makes a block per task, so the buffer
    # alone mixes: the former 32 patches a task and 16-patch buffer drew a batch from one or two blocks
    # (studies_per_batch was not logged then)
    mix = [h.value for h in client.get_metric_history(result["run_id"], "studies_per_batch")]
    assert len(mix) >= 10 and max(mix) <= 3 and np.mean(mix) >= 1.9, mix
    _registered_model_scores_a_patch(mlflow_server, GLOW, TINY_TRAIN["patch_size"])


def test_training_against_the_clock_stops_on_every_worker_and_registers(jobs_done, mlflow_server):
    """``train.max_minutes``: the chain's AE job (2 workers) stops where its budget ends, long before its
    iterations, at one step on both ranks (else DDP would hang), and registers what it has."""
    from chain import AE, AE_CLOCK
    from mlflow.tracking import MlflowClient

    status, log = jobs_done["statuses"]["te-train-ae"]
    assert status == "SUCCEEDED", log
    m = re.search(r"trained (\d+) of (\d+) steps \(train.max_minutes = 0.1 reached\)", log)
    assert m and int(m.group(2)) == AE_CLOCK["iterations"] and 0 < int(m.group(1)) < AE_CLOCK["iterations"], log[-3000:]
    result = json.loads((jobs_done["work"] / "ray_results" / "te-ae" / "train_result.json").read_text())
    assert result["steps"] == int(m.group(1)) and result["iterations"] == AE_CLOCK["iterations"]
    client = MlflowClient(mlflow_server)
    stop = client.get_metric_history(result["run_id"], "stopped_by_time_budget")
    assert [(h.step, h.value) for h in stop] == [(result["steps"], 1.0)]
    assert max(h.step for h in client.get_metric_history(result["run_id"], "train_bits_per_dim")) == result["steps"]
    # train.lr_decay_at = 0.5 of the clock: the second half at lr/10, from one step on (the ranks agree on it)
    lr = np.array([h.value for h in sorted(client.get_metric_history(result["run_id"], "lr"), key=lambda h: h.step)])
    decayed = np.isclose(lr, TINY_TRAIN["lr"] / 10)
    first = int(np.argmax(decayed))
    assert decayed[-1] and decayed[first:].all() and np.isclose(lr[:first], TINY_TRAIN["lr"]).any(), lr
    _registered_model_scores_a_patch(mlflow_server, AE, TINY_TRAIN["patch_size"])


def test_a_train_job_starts_from_the_registered_champion(jobs_done, mlflow_server, tmp_path):
    """``train.init_model: models:/NAME@champion`` (site adaptation), the train job's own step against the session's
    MLflow server: its driver fetches the champion once into the run's folder, pinned to its version (a resumed
    job starts from the same weights even if the alias moves), and the model every Ray Train worker builds
    (``TrainConfig.build_model``) starts from the champion's weights, not from a fresh flow. The rest of that job
    is any train job's (the chain's stopped and resumed one); fine-tuning from the weights: test_train.py. Until
    2026-12-07 the chain ran it as a Ray job of its own, a train job's start that `make test` could not afford
    (docs/BENCHMARKS.md)."""
    import mlflow
    import torch
    from chain import GLOW
    from mlflow.tracking import MlflowClient

    from ct3dflow.adapters.ray_jobs import start_model_file
    from ct3dflow.adapters.tracking import load_patch_model
    from ct3dflow.train import TrainConfig

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias(GLOW, "champion")
    tcfg = TrainConfig(**{**TINY_TRAIN, "init_model": f"models:/{GLOW}@champion"})
    pinned, version = start_model_file(tcfg, tmp_path)
    assert version == f"{GLOW}/{champion.version}"
    assert Path(pinned.init_model) == (tmp_path / "init_model.pt").resolve()
    want = load_patch_model(f"models:/{GLOW}/{champion.version}").model.state_dict()
    got = pinned.build_model().state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    fresh = TrainConfig(**TINY_TRAIN).build_model().state_dict()
    assert not all(torch.equal(fresh[k], got[k]) for k in fresh)
    # pinned: a resumed job reads the run folder's file, whatever the alias says now (this one names no model)
    again, version_again = start_model_file(TrainConfig(**{**TINY_TRAIN, "init_model": "models:/moved-on@champion"}),
                                            tmp_path)
    assert version_again == version and again.init_model == pinned.init_model
    # a model of another architecture is refused before any worker starts, naming the settings
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="train.init_model"):
        start_model_file(TrainConfig(**{**TINY_TRAIN, "width": 16, "init_model": f"models:/{GLOW}@champion"}),
                         tmp_path / "other")


def test_stopped_training_job_resumes_from_checkpoint(jobs_done, mlflow_server):
    """The chain's CT-3DFlow train job was stopped (`ray job stop`) after its first checkpoint and submitted
    again with the same name (tests/chain.py): the second resumed from a checkpoint the first wrote, and the
    MLflow run's history continues in the same run."""
    from mlflow.tracking import MlflowClient

    info = jobs_done["resume"]
    assert info["status"] == "STOPPED" and 0 < info["first_seen"] < TINY_TRAIN["iterations"]
    m = re.search(r"resumed from checkpoint at step (\d+)", info["log"])
    assert m, info["log"][-3000:]
    resumed = int(m.group(1))
    # it continues from a checkpoint the stopped job wrote, not from zero
    assert resumed in info["on_disk"] and resumed >= info["first_seen"] > 0
    result = json.loads((jobs_done["work"] / "ray_results" / "te-glow" / "train_result.json").read_text())
    assert result["steps"] == TINY_TRAIN["iterations"] and result["run_id"] == info["first_run_id"]
    client = MlflowClient(mlflow_server)
    hist = client.get_metric_history(info["first_run_id"], "train_bits_per_dim")
    steps = np.array([h.step for h in hist])
    assert steps.min() <= resumed, "the first submission's history is gone"
    assert steps.max() == TINY_TRAIN["iterations"]
    resumed_hist = [h.value for h in client.get_metric_history(info["first_run_id"], "resumed_from_step")]
    assert resumed in resumed_hist


def test_training_that_leaves_ray_data_no_whole_cpu_is_refused_with_the_fix():
    """Ray Data gets only whole CPUs of what the trainers leave: 1.5 of 2 CPUs for one trainer used to hang
    the demo's training after its first patches (the sampler never ran again)."""
    from ct3dflow.adapters.ray_train import check_cpus_left_for_data, cpus_left_for_data

    assert cpus_left_for_data(2, 1, 1.5) == 0 and cpus_left_for_data(2, 1, 1.0) == 1
    assert cpus_left_for_data(2, 2, 0.5) == 1 and cpus_left_for_data(16, 2, 7.5) == 1
    with pytest.raises(ValueError, match=r"cpus_per_worker=1.5 leaves 0.5 .*Lower ray.cpus_per_worker"):
        check_cpus_left_for_data(2, 1, 1.5)
    check_cpus_left_for_data(2, 1, 1.0)


def test_the_batch_mix_settings_are_positive_whole_numbers():
    """ray.patches_per_task and ray.shuffle_buffer set how many studies a training batch mixes (8 and 512: ≈ 12 of
    48 in a batch of 16, docs/RESULTS.md); a wrong value fails when the configuration loads, naming the setting."""
    from ct3dflow.config import load_config, parse_overrides

    cfg = load_config(None)
    assert (cfg.ray["patches_per_task"], cfg.ray["shuffle_buffer"]) == (8, 512)
    assert load_config(None, parse_overrides(["ray.shuffle_buffer=2048"])).ray["shuffle_buffer"] == 2048
    with pytest.raises(ValueError, match=r"setting ray.patches_per_task expects a positive integer, got 0"):
        load_config(None, parse_overrides(["ray.patches_per_task=0"]))
    with pytest.raises(ValueError, match=r"setting ray.shuffle_buffer expects a positive integer, got 1000.0"):
        load_config(None, parse_overrides(["ray.shuffle_buffer=1e3"]))
