"""The main job on an embedded default: ``make demo`` (= ``python -m ct3dflow.adapters.ray_demo``).

The platform's story on 2 CPU cores in about 12–15 minutes (docs/BENCHMARKS.md), with the same job functions
``ray job submit`` runs, on a local Ray (started in this process) and a local MLflow (SQLite under the work
folder), printed as nine stages (training and tuning once per model):

1. a phantom archive: healthy training studies; validation and test studies with all five pathology kinds;
2. Ray Data preprocessing into the study cache;
3. Ray Train of CT-3DFlow (the detection recipe of docs/RESULTS.md, scaled to the time) and, cheaply, of the
   AE baseline of the paper's Table 1;
4. Ray Tune chooses each model's operating point on validation only (CT-3DFlow: the platform's default
   ``anatomy-density`` map; AE: the paper's patch map), scoring on Ray Data actors;
5. the test split, touched once per model: Table 1 with 95 % intervals and the per-kind sensitivity;
6. the nightly screening job over "tonight's" archive (new DICOM series and NIfTI files, a few of them
   broken) with the champion: found / scored / flagged / errors, each error's reason, and what it got wrong;
7. the commands that open the MLflow UI and tonight's report.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = 9


def _stage(n: int, what: str, t0: float, times: dict) -> None:
    times[what] = time.time()
    print(f"\n[{n}/{STAGES}] {what}   (t = {time.time() - t0:.0f} s)", flush=True)


def make_tonight(folder: Path, seed: int = 77) -> list[dict]:
    """Tonight's archive: new studies as DICOM series and NIfTI files (normal and abnormal), and broken ones.
    Returns what each is, for the summary of what the screening got right and wrong."""
    import numpy as np

    from ..synthetic import PATHOLOGIES, make_phantom, write_dicom_series, write_nifti

    truth = []
    kinds = [None, "consolidation", None, "nodule", "emphysema", None, "honeycombing", "ground_glass", None,
             "consolidation"]
    for i, kind in enumerate(kinds):
        ph = make_phantom(seed * 1000 + i, kind, size="small")
        if i % 2 == 0:
            path = folder / f"ward-{i:02d}" / "CT"
            write_dicom_series(ph, path)
        else:
            path = folder / f"scan-{i:02d}.nii.gz"
            write_nifti(ph, path)
        truth.append({"path": str(path), "truth": kind or "normal", "lesion_cm3": ph.lesion_volume_cm3})
    assert set(kinds) - {None} <= set(PATHOLOGIES)
    # broken inputs, each of which must become one error row with its reason
    (folder / "ward-empty").mkdir(parents=True)
    truth.append({"path": str(folder / "ward-empty"), "truth": "broken: empty folder"})
    good = folder / "scan-01.nii.gz"
    raw = gzip.decompress(good.read_bytes())
    (folder / "scan-truncated.nii").write_bytes(raw[: len(raw) // 3])
    truth.append({"path": str(folder / "scan-truncated.nii"), "truth": "broken: truncated file"})
    ph = make_phantom(seed * 1000 + 99, None, size="small")
    files = write_dicom_series(ph, folder / "ward-gap" / "CT")
    files[len(files) // 2].unlink()
    truth.append({"path": str(folder / "ward-gap" / "CT"), "truth": "broken: a slice missing"})
    mr = dataclasses.replace(ph, hu=np.clip(ph.hu + 1024, 0, 4000).astype(np.int16))
    write_dicom_series(mr, folder / "ward-mr" / "MR", extra_tags={"0008|0060": "MR"})
    truth.append({"path": str(folder / "ward-mr" / "MR"), "truth": "broken: an MR series"})
    return truth


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/demo", help="work folder (archives, cache, runs, MLflow, results)")
    p.add_argument("--config", default=str(CONFIGS / "demo.yaml"))
    p.add_argument("--ae-config", default=str(CONFIGS / "demo-ae.yaml"))
    p.add_argument("--train-normal", type=int, default=16)
    # 12 validation normals: the anatomy reference is cross-fitted over 4 folds of them (6 left 4–5 per fit, and
    # the screening's T varied from run to run; docs/BENCHMARKS.md)
    p.add_argument("--val", type=int, nargs=2, default=(12, 10), metavar=("NORMAL", "ABNORMAL"))
    p.add_argument("--test", type=int, nargs=2, default=(12, 20), metavar=("NORMAL", "ABNORMAL"))
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a CT-3DFlow setting, e.g. --set train.iterations=2700 (make demo-full)")
    a = p.parse_args(argv)

    work = Path(a.work).resolve()
    if a.fresh and work.exists():
        shutil.rmtree(work)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from ..config import load_config, parse_overrides

    def job_config(path, extra=None):
        over = parse_overrides(extra or [])
        over.setdefault("work_dir", str(work))
        over.setdefault("data", {}).update(manifest=str(work / "archive" / "manifest.parquet"),
                                            cache_dir=str(work / "cache"))
        cfg = load_config(path, over)
        cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # each demo trains afresh (same name = resume)
        return cfg

    flow_cfg, ae_cfg = job_config(a.config, a.set), job_config(a.ae_config)
    t0, times = time.time(), {}
    n_tr, (v_n, v_a), (t_n, t_a) = a.train_normal, a.val, a.test
    _stage(1, f"phantom archive: {n_tr} healthy training studies; validation {v_n} normal + {v_a} abnormal, test "
              f"{t_n} normal + {t_a} abnormal, the five pathology kinds in each", t0, times)
    import pandas as pd

    from ..synthetic import make_archive

    manifest = flow_cfg.manifest_path
    if not manifest.exists():
        arch = manifest.parent
        healthy = make_archive(arch, n_tr + v_n + t_n, 0, seed=7, splits=(n_tr, v_n, t_n), workers=2)
        sick = make_archive(arch, 0, v_a + t_a, seed=8, splits=(0, v_a, t_a), workers=2)
        pd.concat([healthy, sick], ignore_index=True).to_parquet(manifest, index=False)
    else:
        print(f"reusing {manifest}")

    import ray

    from ..metrics import table1
    from . import ray_data
    from .ray_jobs import evaluate_job, preprocess_job, train_job, tune_job
    from .ray_screen import screen_job
    from .small_node import use_small_node_settings

    use_small_node_settings()  # before ray.init: its processes inherit the environment
    # the dashboard serves the State API Ray Train's controller polls (without it, its log fills with errors)
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=False)
    ray_data.configure_data_context()
    models = {"CT-3DFlow": {"cfg": flow_cfg}, "AE": {"cfg": ae_cfg}}
    try:
        _stage(2, "Ray Data: preprocessing on CPU workers → study cache", t0, times)
        summary = preprocess_job(flow_cfg)
        for i, (label, m) in enumerate(models.items()):
            c = m["cfg"]
            clock = f" or {c.train['max_minutes']:g} min, whichever first" if c.train.get("max_minutes") else ""
            _stage(3 + i, f"Ray Train: {label} ({c.train.get('model', 'glow3d')}, L={c.train['levels']}, "
                          f"width {c.train['width']}, {c.train['patch_size']}³), {c.train['iterations']} iterations"
                          f"{clock}", t0, times)
            m["trained"] = train_job(c, summary)
            m["uri"] = f"models:/{m['trained']['registered_model']}/{m['trained']['model_version']}"
        for i, (label, m) in enumerate(models.items()):
            _stage(5 + i, f"Ray Tune: {label} operating point ({m['cfg'].scoring['map']} map) on validation only",
                   t0, times)
            m["tune"] = tune_job(m["cfg"], m["uri"])
        _stage(7, "the test split, touched once per model: patient-level metrics", t0, times)
        for m in models.values():
            m["eval"] = evaluate_job(m["cfg"], m["uri"])
        tonight = work / "tonight"
        _stage(8, f"the nightly screening job over tonight's archive ({tonight}) with the champion", t0, times)
        if tonight.exists():
            shutil.rmtree(tonight)
        truth = make_tonight(tonight)
        screen_cfg = load_config(CONFIGS / "screen.yaml", {
            "work_dir": str(work / "screen"), "data": {"cache_dir": str(work / "screen" / "cache")},
            "ray": {"preprocess_workers": 2, "preprocess_cpus": 0.5, "scoring_actors": 2, "scoring_cpus": 0.5},
            "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "system_metrics": False,
                       "registered_model": flow_cfg.mlflow["registered_model"]}})
        screened = screen_job(screen_cfg, tonight, run_name=f"nightly-{time.strftime('%Y%m%d-%H%M%S')}")
    finally:
        ray.shutdown()
    _stage(9, "results", t0, times)
    rows = []
    for label, m in models.items():
        mm = m["eval"]["metrics"]
        metrics = {k: mm.get(f"test_{k}", float("nan")) for k in ("auroc", "f1", "accuracy")}
        ci = {k: (mm[f"test_{k}_ci_low"], mm[f"test_{k}_ci_high"]) for k in metrics if f"test_{k}_ci_low" in mm}
        rows.append((f"{label} ({m['cfg'].scoring['map']} map)", metrics, ci or None))
    n = models["CT-3DFlow"]["eval"]["n_test_studies"]
    print(f"Phantom test split ({n} studies), operating points chosen on validation; 95 % bootstrap intervals:\n")
    print(table1(rows))
    from ..detect import OperatingPoint

    for label, m in models.items():
        mm, op = m["eval"]["metrics"], OperatingPoint.from_dict(m["tune"]["operating_point"])
        per_kind = ", ".join(f"{k} {v['sensitivity']:.2f}" for k, v in m["eval"]["per_kind"].items())
        print(f"{label} ({m['trained']['steps']} training steps): sensitivity "
              f"{mm.get('test_sensitivity', float('nan')):.3f}, specificity "
              f"{mm.get('test_specificity', float('nan')):.3f}; {op.describe()}\n  sensitivity per kind: {per_kind}")
    results = pd.read_parquet(screened["results"])
    by_path = {t["path"]: t for t in truth}
    print(f"\nTonight's screening with {screened['model_version']} ({screened['map_kind']} map): found "
          f"{screened['found']}, scored {screened['scored']}, flagged {screened['flagged']}, "
          f"errors {screened['errors']}")
    wrong = []
    for r in results.itertuples():
        t = by_path.get(r.path, {"truth": "?"})
        if r.status == "error":
            print(f"  error   {Path(r.path).relative_to(tonight)} ({t['truth']}): {r.error}")
            continue
        call = "ABNORMAL" if r.predicted_abnormal else "normal"
        ok = (call == "normal") == (t["truth"] == "normal")
        lesion = f", lesion {t['lesion_cm3']:.1f} cm³" if t.get("lesion_cm3") else ""
        print(f"  {call:8s} {Path(r.path).relative_to(tonight)}: {r.abnormal_volume_cm3:.1f} cm³ "
              f"(truth: {t['truth']}{lesion}){'' if ok else '   <- wrong'}")
        if not ok:
            kind = t["truth"].replace("_", " ")
            wrong.append(f"{Path(r.path).relative_to(tonight)}: {call} for {'an' if kind[0] in 'aeiou' else 'a'} "
                         f"{kind} study")
    print("  got wrong: " + ("; ".join(wrong) if wrong else "nothing"))
    stage_times = list(times.items())
    print("\nwall time per stage: " + ", ".join(
        f"[{i + 1}] {(stage_times[i + 1][1] if i + 1 < len(stage_times) else time.time()) - t:.0f} s"
        for i, (_, t) in enumerate(stage_times[:-1])) + f"; total {time.time() - t0:.0f} s")
    (work / "demo_summary.json").write_text(json.dumps({
        "table1": rows, "screening": screened, "wrong": wrong, "seconds": time.time() - t0,
        "stages": {k: v - t0 for k, v in times.items()}}, indent=1, default=str), encoding="utf-8")
    db = work / "mlflow.db"
    print(f"\nLook at it:\n  tonight's report:  {screened['report']}\n"
          f"    (open it in a browser, e.g. chromium {screened['report']})\n"
          f"  the MLflow UI (experiments 'ct3dflow-comparison' and 'ct3dflow-screen'):\n"
          f"    .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000\n"
          f"    then http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
