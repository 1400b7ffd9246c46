"""The platform's jobs, as functions the thin ``jobs/*.py`` entrypoints (and the demo) call.

Each takes the job's ``JobConfig``; Ray is initialised by the caller (``ray.init()`` joins the cluster a
``ray job submit`` runs on, or starts a local one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..detect import OperatingPoint
from ..pipeline import cached_patches, manifest_rows, ok_study_ids
from .model_ref import ModelRef


def _log(msg: str) -> None:
    print(f"[ct3dflow] {msg}", flush=True)


def _log_errors(df: pd.DataFrame) -> None:
    for r in df[df["status"] == "error"].itertuples():
        _log(f"  error {r.study_id}: {r.error}")


# ---------------------------------------------------------------------------------------------------
def preprocess_job(cfg, rows_filter=None) -> pd.DataFrame:
    """Manifest → Ray Data preprocessing on CPU workers → the cache and ``cache/summary.parquet``."""
    from ..detect.batch import write_parquet_atomic
    from .ray_data import preprocess_manifest

    cache = cfg.cache_path
    cache.mkdir(parents=True, exist_ok=True)
    summary = preprocess_manifest(cfg.manifest_path, cache, cfg.preprocess_config().to_dict(),
                                  concurrency=cfg.ray.get("preprocess_concurrency"))
    write_parquet_atomic(summary, cache / "summary.parquet")  # jobs that share a cache never leave half a file
    n_err = int((summary["status"] == "error").sum())
    _log(f"preprocessed {len(summary)} studies into {cache}: {len(summary) - n_err} ok, {n_err} errors "
         f"({int(summary['cache_hit'].fillna(False).sum())} served from the cache)")
    _log_errors(summary)
    return summary


# ---------------------------------------------------------------------------------------------------
def start_model_file(tcfg, run_dir: Path):
    """``(tcfg, version)``: ``train.init_model`` as a file every Ray Train worker reads, and the version it is.

    A registered model (``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/…``) is fetched once on the driver
    into the run's folder, beside the init patches, and pinned there: a resumed job starts from the same
    weights even if the alias has moved. The architecture is checked here, before any worker starts."""
    import dataclasses

    from . import tracking

    spec = tcfg.init_model
    if not spec:
        return tcfg, None
    dest = run_dir / "init_model.pt"
    if dest.exists():
        version = (run_dir / "init_model.version").read_text(encoding="utf-8").strip()
    else:
        ref, model = tracking.resolve_model(spec)
        version = ref.version
        (run_dir / "init_model.version").write_text(version, encoding="utf-8")
        model.save(dest)  # atomic, and last: where it exists, so does its version
    tcfg = dataclasses.replace(tcfg, init_model=str(dest.resolve()))
    tcfg.build_model()  # a model of another architecture fails here, naming the settings
    _log(f"fine-tuning from {spec} ({version})")
    return tcfg, version


def train_job(cfg, summary: pd.DataFrame | None = None) -> dict:
    """Ray Train over the cached healthy training studies; MLflow run, checkpoint, registered model."""
    import mlflow
    import torch

    from ..manifest import manifest_fingerprint, read_manifest
    from ..train import CHECKPOINT_NAME, FlowTrainer
    from . import tracking
    from .ray_data import training_patch_dataset
    from .ray_train import MLFLOW_RUN_FILE, fit

    tcfg = cfg.train_config()
    if summary is None:
        summary = preprocess_job(cfg)
    rows = manifest_rows(cfg.manifest_path)
    train_ids = ok_study_ids(summary, rows, "train")
    val_ids = ok_study_ids(summary, rows, "val") or train_ids[-1:]
    if not train_ids:
        raise ValueError("no usable training study: the manifest needs healthy rows with split 'train'")
    storage = cfg.storage_path
    run_dir = storage / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    world = int(cfg.ray.get("num_workers", 1))

    init_file, val_file = run_dir / "init_patches.npy", run_dir / "val_patches.npy"
    if not init_file.exists():  # fixed once per run name: a resumed job sees the same patches
        np.save(init_file, cached_patches(cfg.cache_path, train_ids, max(2 * tcfg.batch_size, 16),
                                          tcfg.patch_size, tcfg.min_lung_fraction, tcfg.seed))
        np.save(val_file, cached_patches(cfg.cache_path, val_ids, tcfg.n_val_patches, tcfg.patch_size,
                                         tcfg.min_lung_fraction, tcfg.seed + 1))

    uri = tracking.configure(cfg)
    tcfg, init_version = start_model_file(tcfg, run_dir)
    run_file = run_dir / MLFLOW_RUN_FILE
    run_id = run_file.read_text(encoding="utf-8").strip() if run_file.exists() else None
    tags = {"ct3dflow.manifest_fingerprint": manifest_fingerprint(read_manifest(cfg.manifest_path)),
            "ct3dflow.ray_run_name": cfg.name, **({"ct3dflow.init_model": init_version} if init_version else {})}
    with tracking.job_run(cfg, "train", run_name=cfg.name, run_id=run_id, tags=tags) as run:
        run_file.write_text(run.info.run_id, encoding="utf-8")
        _log(f"MLflow run {run.info.run_id} ({'resumed' if run_id else 'new'}) at {uri}")
        n_patches = int(tcfg.iterations * tcfg.batch_size * world * 1.1) + 4 * tcfg.batch_size * world
        ds = training_patch_dataset(cfg.cache_path, train_ids, n_patches, tcfg.patch_size,
                                    tcfg.min_lung_fraction, seed=tcfg.seed,
                                    patches_per_task=int(cfg.ray["patches_per_task"]),
                                    concurrency=cfg.ray.get("sampling_concurrency"))
        result = fit(cfg, ds, str(init_file), str(val_file), run.info.run_id, uri, str(storage), cfg.name,
                     train=tcfg.to_dict())
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        model = tcfg.build_model()
        trainer = FlowTrainer(model, tcfg, "cpu")
        trainer.load_state_dict(state)
        model.eval()
        model_file = run_dir / "model.pt"
        model.save(model_file)
        val = torch.from_numpy(np.load(val_file))
        val_bpd = trainer.validate(val)
        mlflow.log_metric("final_val_bits_per_dim", val_bpd, step=trainer.step)
        mlflow.log_artifact(str(model_file), "checkpoint")
        settings = {"kind": tcfg.model, "preprocess": cfg.preprocess_config().to_dict(),
                    "patch_size": tcfg.patch_size, "train": tcfg.to_dict(),
                    "scoring": cfg.scoring}
        name = cfg.mlflow.get("registered_model")
        version = tracking.log_patch_model(model_file, settings, name, val_bits_per_dim=val_bpd)
        champion = bool(name and version and tracking.promote_if_best(name, version, val_bpd))
        out = {"run_id": run.info.run_id, "model_version": version, "registered_model": name,
               "val_bits_per_dim": val_bpd, "steps": trainer.step, "iterations": tcfg.iterations, "champion": champion,
               "skipped_steps": trainer.skipped_steps}
        mlflow.log_dict(out, "train_result.json")
    budget = f" (train.max_minutes = {tcfg.max_minutes:g} reached)" if trainer.step < tcfg.iterations else ""
    _log(f"trained {trainer.step} of {tcfg.iterations} steps{budget}; validation {val_bpd:.3f} bits/dim; "
         f"registered {name} v{version}{' (champion)' if champion else ''}")
    (run_dir / "train_result.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------
# Operating point (Ray Tune, validation only) and the test evaluation (once per model version)
# ---------------------------------------------------------------------------------------------------
TUNE_RUN_TAG = "ct3dflow.tune_run_id"
TEST_EVALUATION_TAG = "ct3dflow.test_evaluation"
DEFAULT_COMPARISON_EXPERIMENT = "ct3dflow-comparison"
TEST_METRICS = ("auroc", "f1", "accuracy", "sensitivity", "specificity")


def split_rows(rows: list[dict], split: str) -> list[dict]:
    """The manifest rows of one split — the guard every tune/evaluate step goes through first: nothing
    outside ``split`` is preprocessed, loaded or scored."""
    out = [r for r in rows if r.get("split") == split]
    if not out:
        raise ValueError(f"the manifest has no row with split {split!r}")
    return out


def comparison_config(cfg):
    """``cfg`` with the MLflow experiment set to the comparison experiment (tune and evaluate runs of every
    model kind land in one experiment, side by side): ``mlflow.comparison_experiment`` or
    ``ct3dflow-comparison``."""
    import dataclasses

    exp = cfg.mlflow.get("comparison_experiment") or DEFAULT_COMPARISON_EXPERIMENT
    return dataclasses.replace(cfg, mlflow={**cfg.mlflow, "experiment": exp})


def default_model_uri(cfg, model_uri: str | None = None) -> str:
    if model_uri:
        return model_uri
    name = cfg.mlflow.get("registered_model")
    if not name:
        raise ValueError("no model: pass --model models:/NAME@champion or set mlflow.registered_model")
    return f"models:/{name}@champion"


def loaded_model_kind(loaded) -> str:
    """``glow3d`` or ``ae``: the model object says it best (a train job's settings record the trainer's
    ``train.model``; older ones only ``kind``)."""
    kind = getattr(loaded.model, "KIND", None)
    if kind:
        return str(kind)
    if type(loaded.model).__name__ == "Glow3D":
        return "glow3d"
    return str((loaded.settings.get("train") or {}).get("model") or loaded.settings.get("kind") or "unknown")


def scores_dir(cfg, loaded) -> Path:
    """``work_dir/scores/<registered model>/v<version>``: patch scores belong to one model version."""
    if not (loaded.name and loaded.version):
        raise ValueError(f"{loaded.uri} is not a registered model version: tune and evaluate need one "
                         "(models:/NAME@champion or models:/NAME/VERSION) to store what they choose")
    return cfg.work_path / "scores" / loaded.name / f"v{loaded.version}"


def model_ref(cfg, loaded, tracking_uri: str | None) -> ModelRef:
    version = f"{loaded.name}/{loaded.version}" if loaded.name else loaded.uri
    return ModelRef(loaded.uri, loaded.uri, version, dict(loaded.settings or {}), loaded.operating_point,
                    tracking_uri=tracking_uri)


def map_kind_for(cfg, loaded, op: OperatingPoint | None = None):
    """The operating point's kind, else ``scoring.map``; a kind that needs a flow refuses a baseline at once."""
    from ..detect import get_kind

    kind = get_kind(op.map if op is not None else cfg.scoring.get("map"))
    if kind.needs_flow and type(loaded.model).__name__ != "Glow3D":
        raise ValueError(f"{loaded.name} v{loaded.version} is a {loaded_model_kind(loaded)} model, and the "
                         f"{kind.name} map decomposes a flow's log-likelihood: set scoring.map: patch for it "
                         "(configs/demo-ae.yaml)")
    return kind


def score_split(cfg, loaded, rows: list[dict], split: str, kind, op: OperatingPoint | None = None,
                write_outputs: bool = False) -> pd.DataFrame:
    """Preprocess (cache hits when the train job did it) and score the rows of ``split`` only, on Ray Data
    actors: the scorer and the resume rule of the nightly screening (:mod:`ct3dflow.detect.batch`).

    Results go to ``scores_dir/<split>/`` (``parts/``, ``results.parquet``, ``maps/``); a study this model
    version already scored with the same settings (and operating point) is not scored again."""
    import mlflow

    from ..detect.batch import ScoringPlan, entries_of_rows
    from .ray_score import describe_outcome, run_scoring

    rows = split_rows(rows, split)  # defensive: callers filter already
    ref = model_ref(cfg, loaded, mlflow.get_tracking_uri())
    # the preprocessing the model was trained with (its settings), so that scores match its training data
    pre = dict(loaded.settings.get("preprocess") or cfg.preprocess_config().to_dict())
    pre["patch_size"] = ref.patch_size
    plan = ScoringPlan.make(kind.name, cfg.scoring, ref.patch_size, op, loaded.uri, ref.version, pre,
                            cfg.cache_path, scores_dir(cfg, loaded) / split, write_outputs=write_outputs)
    ray_cfg = {"preprocess_workers": 2, "scoring_actors": 1, **cfg.ray}
    df, outcomes = run_scoring(entries_of_rows(rows), plan, ref, ray_cfg, model=loaded.model,
                               on_row=lambda i, n, r: _log(f"  [{i}/{n}] {r['study_id']}: {describe_outcome(r)}"))
    n_err = int((df["status"] == "error").sum())
    n_reused = sum(1 for o in outcomes.values() if o["action"] == "skip")
    _log(f"{split}: {len(df)} studies ({n_reused} scored before by {loaded.name} v{loaded.version}), {n_err} errors "
         f"→ {Path(plan.results_dir) / 'results.parquet'}")
    return df


def validation_studies(cfg, loaded, kind):
    """The validation split, scored once per model version, as ``ScoredStudy`` objects. Returns
    ``(studies, results, rows)``. Rows of any other split are dropped before anything touches them."""
    from ..detect.row import load_scored_studies

    rows = split_rows(manifest_rows(cfg.manifest_path), "val")
    results = score_split(cfg, loaded, rows, "val", kind, op=None)
    return load_scored_studies(kind, rows, results, cfg.cache_path), results, rows


def _model_params(loaded) -> dict:
    return {"model_kind": loaded_model_kind(loaded), "model_name": loaded.name or "",
            "model_version": str(loaded.version or ""), "model_uri": loaded.uri}


def tune_job(cfg, model_uri: str | None = None) -> dict:
    """Score the validation split once with a registered model, search the map kind's parameters with Ray
    Tune (T from the validation ROC inside each trial), store the best operating point on the model version
    (every later scoring of that version uses it by default) and in an MLflow run of the comparison experiment."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from ..detect.outputs import write_json
    from . import tracking
    from .ray_tune import run_search

    tracking.configure(cfg)
    uri = default_model_uri(cfg, model_uri)
    loaded = tracking.load_patch_model(uri)
    kind = map_kind_for(cfg, loaded)
    base = scores_dir(cfg, loaded)
    _log(f"tuning the {kind.name}-map operating point of {loaded.name} v{loaded.version} "
         f"({loaded_model_kind(loaded)}) on the validation split only")
    studies, results, rows = validation_studies(cfg, loaded, kind)
    storage = cfg.storage_path
    name = f"tune-{loaded.name}-v{loaded.version}-{time.strftime('%Y%m%d-%H%M%S')}"
    op, trials, tune_dir = run_search(kind, studies, cfg.tune, storage, name)
    best = trials.iloc[0]
    params = _model_params(loaded)
    tags = {"ct3dflow.model_name": loaded.name, "ct3dflow.model_version": str(loaded.version),
            "ct3dflow.model_kind": params["model_kind"], "ct3dflow.map_kind": kind.name}
    with tracking.job_run(comparison_config(cfg), "tune", run_name=f"tune/{loaded.name}/v{loaded.version}",
                          tags=tags) as run:
        mlflow.log_params({**params, **{f"op_{k}": v for k, v in op.flat().items()}})
        mlflow.log_metrics({"val_auroc": float(best["auroc"]), "val_f1": float(best["f1"]),
                            "val_accuracy": float(best["accuracy"]), "val_sensitivity": float(best["sensitivity"]),
                            "val_specificity": float(best["specificity"]), "val_objective": float(best["objective"]),
                            "n_trials": len(trials), "n_val_studies": len(studies),
                            "n_val_abnormal": sum(s.label for s in studies)})
        mlflow.log_dict(op.to_dict(), "operating_point.json")
        mlflow.log_text(trials.to_csv(index=False), "trials.csv")
        mlflow.log_dict({"study_ids": [s.study_id for s in studies], "scores_dir": str(base / "val"),
                         "tune_dir": tune_dir}, "validation_studies.json")
        tracking.set_operating_point(loaded.name, loaded.version, op.to_dict())
        MlflowClient().set_model_version_tag(loaded.name, str(loaded.version), TUNE_RUN_TAG, run.info.run_id)
        out = {"run_id": run.info.run_id, "model_uri": loaded.uri, "model_name": loaded.name,
               "model_version": str(loaded.version), "model_kind": params["model_kind"], "map_kind": kind.name,
               "operating_point": op.to_dict(), "val_auroc": float(best["auroc"]), "val_f1": float(best["f1"]),
               "n_trials": len(trials), "validation_study_ids": [s.study_id for s in studies],
               "tune_dir": tune_dir}
        mlflow.log_dict(out, "tune_result.json")
    write_json(out, base / "tune_result.json")
    _log(f"{len(trials)} trials on {len(studies)} validation studies: best AUROC {best['auroc']:.3f}, F1 "
         f"{best['f1']:.3f}; operating point ({op.describe()}) stored on {loaded.name} v{loaded.version}")
    return out


def _comparison_table(experiment_id: str) -> str:
    """Table 1 over the latest evaluation run of every model in the comparison experiment."""
    import mlflow

    from ..eval_report import display_name
    from ..metrics import table1

    runs = mlflow.search_runs([experiment_id], filter_string="tags.`ct3dflow.job` = 'evaluate'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    rows, seen = [], set()
    for r in runs:
        p, m = r.data.params, r.data.metrics
        key = (p.get("model_name"), p.get("model_version"))
        if key in seen or "test_auroc" not in m:
            continue
        seen.add(key)
        metrics = {k: m.get(f"test_{k}") for k in ("auroc", "f1", "accuracy")}
        ci = {k: (m[f"test_{k}_ci_low"], m[f"test_{k}_ci_high"]) for k in ("auroc", "f1", "accuracy")
              if f"test_{k}_ci_low" in m and f"test_{k}_ci_high" in m}
        rows.append((display_name(p.get("model_kind", "?"), *key), metrics, ci or None))
    return table1(list(reversed(rows)))


def log_evaluation(loaded_params: dict, ev: dict, op, out_dir: Path) -> dict:
    """Log one test evaluation into the active MLflow run: the same metric names for every model
    (``test_auroc``, ``test_f1``, ``test_accuracy``, ``test_sensitivity``, ``test_specificity`` and
    ``test_<metric>_ci_low/_high``), params ``model_kind``/``model_version``, the ROC and confusion-matrix
    PNGs, the per-kind breakdown and Table 1. Returns the flat metrics."""
    import mlflow

    from ..detect.outputs import write_json
    from ..eval_report import confusion_png, display_name, per_kind_markdown, roc_png
    from ..metrics import table1

    m = ev["metrics"]
    flat = {f"test_{k}": float(m[k]) for k in TEST_METRICS if m.get(k) is not None and np.isfinite(m[k])}
    for k, (lo, hi) in ev.get("ci", {}).items():
        if np.isfinite(lo) and np.isfinite(hi):
            flat[f"test_{k}_ci_low"], flat[f"test_{k}_ci_high"] = float(lo), float(hi)
    flat.update({f"test_{k}": int(m[k]) for k in ("tp", "fp", "tn", "fn", "n", "n_pos")})
    for kind, k in ev.get("per_kind", {}).items():
        for name in ("auroc", "sensitivity"):
            if k.get(name) is not None and np.isfinite(k[name]):
                flat[f"test_{name}_{kind}"] = float(k[name])
    op_flat = op.flat() if hasattr(op, "flat") else dict(op)
    mlflow.log_params({**loaded_params, **{f"op_{k}": v for k, v in op_flat.items()}})
    mlflow.log_metrics(flat)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = display_name(loaded_params["model_kind"], loaded_params.get("model_name"),
                         loaded_params.get("model_version"))
    fpr_op = 1.0 - m["specificity"] if np.isfinite(m.get("specificity", np.nan)) else np.nan
    roc_png(ev["roc"], out_dir / "roc.png", auroc=m.get("auroc"), operating=(fpr_op, m.get("sensitivity", np.nan)),
            title=f"ROC, test: {title}")
    confusion_png(m, out_dir / "confusion_matrix.png", title=f"Test: {title}")
    (out_dir / "per_kind.md").write_text(per_kind_markdown(ev.get("per_kind", {})), encoding="utf-8")
    (out_dir / "table1_row.md").write_text(table1([(title, m, ev.get("ci") or None)]), encoding="utf-8")
    write_json(ev, out_dir / "evaluation.json")
    write_json({k: m[k] for k in ("tp", "fp", "tn", "fn")}, out_dir / "confusion_matrix.json")
    for f in ("roc.png", "confusion_matrix.png", "per_kind.md", "table1_row.md", "evaluation.json",
              "confusion_matrix.json"):
        mlflow.log_artifact(str(out_dir / f))
    run = mlflow.active_run()
    table = _comparison_table(run.info.experiment_id)
    (out_dir / "table1.md").write_text(table, encoding="utf-8")
    mlflow.log_artifact(str(out_dir / "table1.md"))
    return flat


def evaluate_job(cfg, model_uri: str | None = None, force: bool = False) -> dict:
    """The test split, once per model version: score it with the stored operating point (its map kind) and
    log Table 1 metrics with bootstrap CIs, ROC and confusion-matrix pictures and the per-kind breakdown."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from ..detect import OperatingPoint
    from ..detect.evaluate import evaluate
    from ..detect.outputs import write_json
    from ..detect.row import load_scored_studies
    from . import tracking

    tracking.configure(cfg)
    uri = default_model_uri(cfg, model_uri)
    loaded = tracking.load_patch_model(uri)
    base = scores_dir(cfg, loaded)
    client = MlflowClient()
    done = client.get_model_version(loaded.name, str(loaded.version)).tags.get(TEST_EVALUATION_TAG)
    if done and not force:
        raise RuntimeError(f"{loaded.name} v{loaded.version} was already evaluated on the test split ({done}); "
                           "the test set is touched once per model version — pass --force to evaluate again")
    if not loaded.operating_point:
        raise RuntimeError(f"{loaded.name} v{loaded.version} has no operating point: run jobs/tune.py first "
                           "(the operating point is chosen on the validation split only)")
    op = OperatingPoint.from_dict(loaded.operating_point)
    kind = map_kind_for(cfg, loaded, op)
    rows = split_rows(manifest_rows(cfg.manifest_path), "test")
    results = score_split(cfg, loaded, rows, "test", kind, op=op, write_outputs=True)
    studies = load_scored_studies(kind, rows, results, cfg.cache_path)
    ev = evaluate(kind, op, studies, n_boot=int(cfg.tune.get("n_boot", 1000)))
    ev["n_errors"] = int((results["status"] == "error").sum())
    params = _model_params(loaded)
    tags = {"ct3dflow.model_name": loaded.name, "ct3dflow.model_version": str(loaded.version),
            "ct3dflow.model_kind": params["model_kind"], "ct3dflow.map_kind": kind.name,
            "ct3dflow.forced": str(bool(force and done))}
    with tracking.job_run(comparison_config(cfg), "evaluate",
                          run_name=f"evaluate/{loaded.name}/v{loaded.version}", tags=tags) as run:
        flat = log_evaluation(params, ev, op, base / "test" / "report")
        mlflow.log_metric("test_n_errors", ev["n_errors"])
        mlflow.log_artifact(str(base / "test" / "results.parquet"))
        stamp = json.dumps({"run_id": run.info.run_id, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        client.set_model_version_tag(loaded.name, str(loaded.version), TEST_EVALUATION_TAG, stamp)
        client.set_model_version_tag(loaded.name, str(loaded.version), "ct3dflow.test_auroc",
                                     f"{flat.get('test_auroc', float('nan')):.4f}")
        out = {"run_id": run.info.run_id, **params, "map_kind": kind.name, "metrics": flat,
               "operating_point": op.to_dict(), "per_kind": ev["per_kind"], "n_test_studies": len(studies),
               "n_errors": ev["n_errors"], "test_study_ids": [s.study_id for s in studies],
               "normal_volume_cm3": ev["normal_volume_cm3"]}
    try:
        uri = mlflow.get_tracking_uri()
        view = comparison_view(run.info.experiment_id, uri if uri.startswith("http") else None)
        out["comparison_view"] = view
    except Exception as exc:  # noqa: BLE001 - the view is a convenience; the evaluation is logged
        view = f"(no shared view: {exc})"
    write_json(out, base / "test" / "evaluate_result.json")
    m = ev["metrics"]
    _log(f"test: AUROC {m['auroc']:.3f}, F1 {m['f1']:.3f}, accuracy {m['accuracy']:.3f}, sensitivity "
         f"{m['sensitivity']:.3f}, specificity {m['specificity']:.3f} on {len(studies)} studies; MLflow run "
         f"{run.info.run_id}; compare the models in the MLflow UI: {view}")
    return out


def evaluate_models(cfg, model_uris: list[str | None], force: bool = False) -> list[dict]:
    """:func:`evaluate_job` for each model in turn, in one job (one Ray connection and driver: a researcher
    compares the champions of several models on the same test split). A model that cannot be evaluated (its
    version already was, it has no operating point) is reported and the others still are; the job then fails
    naming each one that was not."""
    done, failed = [], []
    for uri in model_uris:
        try:
            done.append(evaluate_job(cfg, uri, force))
        except Exception as exc:  # noqa: BLE001 - one model's refusal must not cost the others' evaluation
            name = default_model_uri(cfg, uri)
            _log(f"error {name}: {exc}")
            failed.append(f"{name}: {exc}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(model_uris)} model(s) not evaluated:\n  " + "\n  ".join(failed))
    return done


COMPARISON_VIEW_KEY = "ct3dflow-comparison"


def comparison_view(experiment_id: str, tracking_uri: str | None = None) -> str:
    """Store a shared view of the comparison experiment's runs table — the evaluation runs only, the
    ``test_*`` metric columns and ``model_kind``/``model_version`` visible, sorted by ``test_auroc``
    (best first) — as the experiment tag the MLflow UI reads for ``?viewStateShareKey=``; return the UI
    address that opens it (relative when no tracking URI is given)."""
    from mlflow.tracking import MlflowClient

    metrics = [f"test_{k}" for k in TEST_METRICS]
    state = {
        "selectedColumns": ["params.`model_kind`", "params.`model_version`",
                            *[f"metrics.`{m}`" for m in metrics]],
        "orderByKey": "metrics.`test_auroc`", "orderByAsc": False,
        "searchFilter": "tags.`ct3dflow.job` = 'evaluate'",
    }
    MlflowClient(tracking_uri).set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{COMPARISON_VIEW_KEY}",
                                                  json.dumps(state))
    base = (tracking_uri or "").rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={COMPARISON_VIEW_KEY}"
