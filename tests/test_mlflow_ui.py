"""The MLflow UI shows a CT-3DFlow evaluation and an AE baseline side by side (headless Chromium).

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped with that hint when it is missing.
The screenshot is kept as a test artifact under ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]


def _evaluation(seed: int, separation: float) -> dict:
    """What evaluation.evaluate_test returns, for synthetic abnormal volumes (20 normal, 20 abnormal)."""
    from ct3dflow.metrics import bootstrap_ci, patient_metrics, roc_curve_data

    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], 20)
    vols = np.abs(rng.normal(2.0 + separation * y, 2.0))
    m = patient_metrics(y, vols, 3.0)
    return {"metrics": m, "ci": {k: list(v) for k, v in bootstrap_ci(y, vols, 3.0, n_boot=100).items()},
            "roc": roc_curve_data(y, vols),
            "per_kind": {"nodule": {"n": 20, "auroc": m["auroc"], "sensitivity": m["sensitivity"],
                                    "median_abnormal_volume_cm3": float(np.median(vols[y == 1]))}}}


def _chromium(*args: str, user_data: Path, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}",
                           f"--virtual-time-budget={budget_ms}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed: apt-get install -y chromium")
def test_comparison_experiment_lists_both_models_with_test_auroc(mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ct3dflow.adapters.ray_jobs import comparison_view, log_evaluation

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment(f"ct3dflow-comparison-ui-{uuid.uuid4().hex[:8]}")
    op = {"sigma_vox": 2.0, "tau_z": -2.0, "v_min_cm3": 0.5, "threshold_cm3": 3.0, "healthy_mean": -1.0,
          "healthy_std": 1.0}
    runs = {}
    for kind, name, sep in (("glow3d", "ct3dflow-glow3d-ui", 4.0), ("ae", "ct3dflow-ae-ui", 1.0)):
        params = {"model_kind": kind, "model_name": name, "model_version": "1", "model_uri": f"models:/{name}/1"}
        with mlflow.start_run(experiment_id=exp_id, run_name=f"evaluate/{name}/v1") as run:
            mlflow.set_tag("ct3dflow.job", "evaluate")
            flat = log_evaluation(params, _evaluation(1, sep), op, tmp_path / kind)
        runs[kind] = (run.info.run_id, f"evaluate/{name}/v1", flat["test_auroc"])
    # the tune run of the same experiment is filtered out of the view
    with mlflow.start_run(experiment_id=exp_id, run_name="tune/ct3dflow-glow3d-ui/v1"):
        mlflow.set_tag("ct3dflow.job", "tune")
        mlflow.log_metric("val_auroc", 0.99)
    # same metric names for both models
    metrics = {k: client.get_run(rid).data.metrics for k, (rid, _, _) in runs.items()}
    for k in ("test_auroc", "test_f1", "test_accuracy", "test_sensitivity", "test_specificity"):
        assert k in metrics["glow3d"] and k in metrics["ae"]
    table = mlflow.artifacts.load_text(f"runs:/{runs['ae'][0]}/table1.md")
    assert "CT-3DFlow (ct3dflow-glow3d-ui v1)" in table and "AE (ct3dflow-ae-ui v1)" in table

    url = comparison_view(exp_id, mlflow_server)
    assert url.startswith(f"{mlflow_server}/#/experiments/{exp_id}/runs?viewStateShareKey=")
    dom = _chromium("--dump-dom", url, user_data=tmp_path / "chrome-dom").stdout
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mlflow_ui_comparison.html").write_text(dom)
    for kind, (_, run_name, auroc) in runs.items():
        assert run_name in dom, f"{run_name} not on the page (see test-artifacts/mlflow_ui_comparison.html)"
        shown = [f"{auroc:.4g}", f"{auroc:.3g}", str(round(auroc, 4))]
        assert any(s in dom for s in shown), f"test_auroc {auroc} of {kind} not on the page"
    assert "test_auroc" in dom and "tune/ct3dflow-glow3d-ui/v1" not in dom
    # the higher test_auroc is listed first (sorted by test_auroc, descending)
    assert dom.index(runs["glow3d"][1]) < dom.index(runs["ae"][1])
    shot = ARTIFACTS / "mlflow_ui_comparison.png"
    shot.unlink(missing_ok=True)
    r = _chromium(f"--screenshot={shot}", url, user_data=tmp_path / "chrome-shot")
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
