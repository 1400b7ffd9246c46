"""The main job on an embedded default: ``make demo`` (= ``python -m ct3dflow.ray_demo``).

A synthetic phantom archive → Ray Data preprocessing → Ray Train (a tiny 3D GLOW and the AE baseline,
CPU, 2 workers, gloo) → Ray Tune chooses σ, τ, v_min, T on the validation split → the test split, once
per model → the paper's Table 1 rows. Local Ray (started in this process) and a local MLflow (SQLite under
the work directory), the same jobs `ray job submit` runs. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
AE_TRAIN = {"model": "ae", "levels": 3, "width": 16}


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
    from ..config import load_config, parse_overrides

    overrides = parse_overrides(a.set)
    overrides.setdefault("work_dir", str(work))
    overrides.setdefault("data", {}).update(manifest=str(work / "archive" / "manifest.parquet"),
                                            cache_dir=str(work / "cache"))
    cfg = load_config(a.config, overrides)
    # each demo run trains afresh under its own Ray Train name (same name = resume)
    cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0, total = time.time(), 7

    _stage(1, total, f"phantom archive: {a.normal} normal + {a.abnormal} abnormal chest CTs", t0)
    from ..synthetic import make_archive

    if not cfg.manifest_path.exists():
        make_archive(cfg.manifest_path.parent, a.normal, a.abnormal, fmt="nifti", seed=7, size="demo")
    else:
        print(f"reusing {cfg.manifest_path}")

    import dataclasses

    import ray

    from ..metrics import table1
    from . import ray_data
    from .ray_jobs import evaluate_job, preprocess_job, train_job, tune_job

    # the AE baseline (the paper's "AE" row) through the very same jobs
    ae = dataclasses.replace(cfg, name=cfg.name.replace("glow3d", "ae"),
                             train={**cfg.train, **AE_TRAIN},
                             mlflow={**cfg.mlflow, "registered_model": cfg.mlflow["registered_model"] + "-ae"})
    # the dashboard serves the State API Ray Train's controller polls (without it, its log fills with errors)
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=False)
    ray_data.quiet_progress()
    out = {}
    try:
        _stage(2, total, "Ray Data: preprocessing on CPU workers → study cache", t0)
        summary = preprocess_job(cfg)
        for i, (label, c) in enumerate((("CT-3DFlow", cfg), ("AE", ae))):
            _stage(3 + i, total, f"Ray Train: {label} ({c.train.get('model', 'glow3d')}), "
                                 f"{c.ray['num_workers']} workers (gloo), {c.train['iterations']} iterations", t0)
            trained = train_job(c, summary)
            uri = f"models:/{trained['registered_model']}/{trained['model_version']}"
            out[label] = {"uri": uri, "cfg": c}
        for i, label in enumerate(out):
            _stage(5 + i, total, f"Ray Tune: {label} operating point (σ, τ, v_min → T) on validation only", t0)
            out[label]["tune"] = tune_job(out[label]["cfg"], out[label]["uri"])
        _stage(7, total, "test split, touched once per model: patient-level metrics", t0)
        for label in out:
            out[label]["eval"] = evaluate_job(out[label]["cfg"], out[label]["uri"])
    finally:
        ray.shutdown()

    rows = []
    for label, o in out.items():
        m = o["eval"]["metrics"]
        metrics = {k: m.get(f"test_{k}", float("nan")) for k in ("auroc", "f1", "accuracy")}
        ci = {k: (m[f"test_{k}_ci_low"], m[f"test_{k}_ci_high"]) for k in ("auroc", "f1", "accuracy")
              if f"test_{k}_ci_low" in m}
        rows.append((label, metrics, ci or None))
    n = out["CT-3DFlow"]["eval"]["n_test_studies"]
    print(f"\nPhantom test split ({n} studies), operating points chosen on validation; 95 % bootstrap intervals:\n")
    print(table1(rows))
    for label, o in out.items():
        from ..detect import OperatingPoint

        m, op = o["eval"]["metrics"], OperatingPoint.from_dict(o["tune"]["operating_point"])
        print(f"\n{label}: sensitivity {m.get('test_sensitivity', float('nan')):.3f}, specificity "
              f"{m.get('test_specificity', float('nan')):.3f}; {op.describe()}")
        kinds = sorted(k[len("test_sensitivity_"):] for k in m
                       if k.startswith("test_sensitivity_") and "_ci_" not in k)
        if kinds:
            print("  sensitivity per kind: " + ", ".join(f"{k} {m['test_sensitivity_' + k]:.2f}" for k in kinds))
    print(f"\nLog P maps and previews: {cfg.work_path / 'scores'}/<model>/v<version>/test/")
    db = cfg.work_path / "mlflow.db"
    print(f"done in {time.time() - t0:.0f} s. Open the MLflow UI (experiment 'ct3dflow-comparison') with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
