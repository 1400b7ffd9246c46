"""The main job on an embedded default: ``make demo`` (= ``python -m ct3dflow.demo``).

A synthetic phantom archive → Ray Data preprocessing → Ray Train (tiny model, CPU, 2 workers, gloo) →
scoring of the validation and test splits → σ, τ, v_min, T chosen on validation → patient-level metrics
on test in the form of the paper's Table 1. Local Ray (started in this process) and a local MLflow
(SQLite under the work directory). Runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _stage(n: int, total: int, what: str, t0: float) -> None:
    print(f"\n[{n}/{total}] {what}   (t = {time.time() - t0:.0f} s)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/demo", help="work directory (archive, cache, runs, MLflow)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--normal", type=int, default=20)
    p.add_argument("--abnormal", type=int, default=10)
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = p.parse_args(argv)

    work = Path(a.work).resolve()
    if a.fresh and work.exists():
        shutil.rmtree(work)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from .config import load_config, parse_overrides

    overrides = parse_overrides(a.set)
    overrides.setdefault("work_dir", str(work))
    overrides.setdefault("data", {}).update(manifest=str(work / "archive" / "manifest.parquet"),
                                            cache_dir=str(work / "cache"))
    cfg = load_config(a.config, overrides)
    # each demo run trains afresh under its own Ray Train name (same name = resume)
    cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0, total = time.time(), 6

    _stage(1, total, f"phantom archive: {a.normal} normal + {a.abnormal} abnormal chest CTs", t0)
    from .phantoms import make_archive

    if not cfg.manifest_path.exists():
        make_archive(cfg.manifest_path.parent, a.normal, a.abnormal, fmt="nifti", seed=7, size="demo")
    else:
        print(f"reusing {cfg.manifest_path}")

    import ray

    from . import ray_data
    from .ray_jobs import preprocess_job, train_job

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    ray_data.quiet_progress()
    try:
        _stage(2, total, "Ray Data: preprocessing on CPU workers → study cache", t0)
        summary = preprocess_job(cfg)

        _stage(3, total, f"Ray Train: {cfg.train['levels']}-level 3D GLOW, {cfg.ray['num_workers']} workers "
                         f"(gloo), {cfg.train['iterations']} iterations", t0)
        trained = train_job(cfg, summary)
    finally:
        ray.shutdown()

    _stage(4, total, "scoring the validation and test splits (patch log-likelihoods)", t0)
    from .evaluation import score_row
    from .pipeline import manifest_rows
    from .tracking import load_patch_model

    uri = f"models:/{trained['registered_model']}/{trained['model_version']}"
    loaded = load_patch_model(uri)
    scoring = {**cfg.scoring, "patch_size": loaded.settings["patch_size"]}
    rows = manifest_rows(cfg.manifest_path)
    ok = set(summary.loc[summary.status == "ok", "study_id"])
    scores_dir = work / "scores" / cfg.name
    import pandas as pd

    results = {}
    for split in ("val", "test"):
        split_rows = [r for r in rows if r.get("split") == split and r["study_id"] in ok]
        results[split] = pd.DataFrame([score_row(loaded.model, r, cfg.cache_path, scores_dir, scoring, None,
                                                 model_uri=uri) for r in split_rows])
        print(f"  {split}: {len(split_rows)} studies, "
              f"{int(results[split]['n_patches'].sum())} patches scored")

    _stage(5, total, "operating point (σ, τ, v_min, T) chosen on the validation split only", t0)
    from .evaluation import evaluate_test, grid_search, load_tuning_studies

    val = load_tuning_studies([r for r in rows if r.get("split") == "val"], results["val"], cfg.cache_path)
    space = {"sigma_vox": [1.0, 2.0, 4.0], "tau_z": [-3.0, -2.0, -1.5, -1.0, -0.5], "v_min_cm3": [0.0, 1.0]}
    op, trials = grid_search(val, space)
    best = trials.iloc[0]
    print(f"  {len(trials)} settings tried; validation AUROC {best['auroc']:.3f}, F1 {best['f1']:.3f}")
    print(f"  σ = {op.sigma_vox:g} voxels, τ = healthy mean {op.tau_z:+g} sd, v_min = {op.v_min_cm3:g} cm³, "
          f"T = {op.threshold_cm3:.2f} cm³")

    _stage(6, total, "test split, touched once: patient-level metrics", t0)
    from .metrics import table1

    test_rows = [r for r in rows if r.get("split") == "test" and r["study_id"] in ok]
    # with the operating point fixed, the test studies get their Log P maps, decisions and previews
    results["test"] = pd.DataFrame([score_row(loaded.model, r, cfg.cache_path, scores_dir, scoring, op,
                                              model_uri=uri) for r in test_rows])
    results["test"].to_parquet(scores_dir / "test_results.parquet", index=False)
    test = load_tuning_studies(test_rows, results["test"], cfg.cache_path)
    ev = evaluate_test(test, op, n_boot=500)
    import mlflow

    with mlflow.start_run(run_id=trained["run_id"]):
        mlflow.log_metrics({f"test_{k}": float(ev["metrics"][k])
                            for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity")})
        mlflow.log_dict(op.to_dict(), "operating_point.json")
        mlflow.log_text(table1([("CT-3DFlow (demo)", ev["metrics"], ev["ci"])]), "table1.md")
    print()
    print(table1([("CT-3DFlow (demo)", ev["metrics"], ev["ci"])]))
    m = ev["metrics"]
    print(f"\nsensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f} on {m['n']} test studies "
          f"({m['n_pos']} abnormal); 95 % bootstrap intervals in brackets")
    for kind, k in ev["per_kind"].items():
        print(f"  {kind:14s} n={k['n']}  sensitivity {k['sensitivity']:.2f}  "
              f"median abnormal volume {k['median_abnormal_volume_cm3']:.1f} cm³")
    print(f"\nLog P maps and previews: {scores_dir}/<study_id>/")
    db = cfg.work_path / "mlflow.db"
    print(f"done in {time.time() - t0:.0f} s. Open the MLflow UI with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
