"""The nightly archive screening job: discover → skip what is done → preprocess (CPU) → score (actors).

``screen_job(cfg, archive, model=None)`` is what ``jobs/screen.py`` calls (docs/SCREENING.md is the operator's
page). The science is the core's (:mod:`ct3dflow.detect`: the map kind the model version's operating point
names, ``score_row``, the one resume rule of :mod:`ct3dflow.detect.batch`); this module discovers the studies,
runs them through :func:`ct3dflow.adapters.ray_score.run_scoring`, and writes the summary, the MLflow run
and ``report.html`` beside ``results.parquet``.

Results (``<results_dir>``, default ``<work_dir>/results``): ``parts/``, ``results.parquet`` (one row per
study discovered by the latest run), ``maps/<model version>-<scoring key>/<study_id>/`` (the stored score,
the map as NIfTI, ``preview.png``), ``last_run.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..detect import OperatingPoint, get_kind
from ..detect.batch import RESULTS_FILE, SCREEN_COLUMNS, ScoringPlan
from ..discovery import discover_studies
from . import dicomweb
from .model_ref import ModelRef
from .ray_score import describe_outcome, log, run_scoring
from .tracking import resolve_model


def choose_operating_point(ref: ModelRef, cfg) -> OperatingPoint | None:
    """The model version's operating point, else a complete one in the job config (said in the log)."""
    if ref.operating_point:
        ref.op_source = "model version tag"
        return OperatingPoint.from_dict(ref.operating_point)
    fallback = {k: v for k, v in (cfg.operating_point or {}).items() if v is not None}
    try:
        op = OperatingPoint.from_dict(fallback)
    except (ValueError, KeyError, TypeError) as exc:
        ref.op_source = "none"
        log(f"WARNING: model {ref.version} has no operating point tag and the config's operating_point is not "
            f"complete ({exc}): studies get scores but no decision, map or preview. Run the tune job "
            "(jobs/tune.py), or put a whole operating point (tune-local's operating_point.json) in the config")
        return None
    ref.op_source = "job config (fallback)"
    log(f"model {ref.version} has no operating point tag: using the job config's operating point ({op.describe()})")
    return op


def screen_job(cfg, archive, model: str | None = None, run_name: str | None = None) -> dict:
    """Screen ``archive`` (a folder tree, a manifest, or ``dicomweb+http(s)://…`` / ``cfg.source``: a PACS)
    with ``model``; return the run's summary."""
    import mlflow

    from ..config import resolve_path
    from ..preprocess import PreprocessConfig
    from ..report import write_screening_report
    from . import tracking

    t0 = time.time()
    started = datetime.now(timezone.utc)
    source = dicomweb.preflight(cfg, archive)  # an unreachable or unauthorised PACS fails now, nothing written
    if source is not None:
        where = f"PACS {source.url}"
    else:
        archive = resolve_path(archive)
        where = str(archive)
        if (cfg.source or {}).get("url"):  # the command line wins; say so, since a PACS night would be missed
            log(f"WARNING: the config names a PACS (source.url {cfg.source['url']}), and --archive {archive} was "
                "given: screening the archive given, not the PACS")
    tracking_uri = tracking.configure(cfg)
    spec = model or f"models:/{cfg.mlflow.get('registered_model') or 'ct3dflow-glow3d'}@champion"
    ref, loaded = resolve_model(spec, tracking_uri)
    op = choose_operating_point(ref, cfg)
    kind = get_kind(op.map if op else cfg.scoring.get("map"))
    if kind.needs_flow and type(loaded).__name__ != "Glow3D":
        raise ValueError(f"{ref.version} is a {type(loaded).__name__}: the {kind.name} map needs a flow; screen it "
                         "with a patch-map operating point (scoring.map: patch)")
    pre = dict(ref.settings.get("preprocess") or cfg.preprocess or {})
    pre["patch_size"] = ref.patch_size
    pre_cfg = PreprocessConfig.from_dict(pre)
    results_dir = resolve_path(cfg.data.get("results_dir")) or cfg.work_path / "results"
    plan = ScoringPlan.make(kind.name, cfg.scoring, ref.patch_size, op, ref.uri, ref.version, pre_cfg.to_dict(),
                            cfg.cache_path, results_dir, write_outputs=True)
    log(f"model {ref.version} ({ref.uri}); {kind.name} map; operating point from {ref.op_source}"
        f"{': ' + op.describe() if op else ''}; preprocessing {pre_cfg.fingerprint()}; scoring key {plan.scoring_key}")
    before = after = None
    if source is not None:
        entries = dicomweb.plan_entries(source, results_dir, log)
        before = (dicomweb.retrieve_item, {"source": source.to_dict(), "plan": plan.to_dict()})
        after = (dicomweb.writeback_item, {"source": source.to_dict(), "plan": plan.to_dict()})
    else:
        entries, notes = discover_studies(archive, with_notes=True)
        for n in notes:
            log(f"discovery: {n}")
        log(f"discovered {len(entries)} studies under {archive} ({sum(1 for e in entries if e['error'])} with "
            "discovery errors)")
    for d in (plan.parts_dir, plan.maps_dir, cfg.cache_path):
        d.mkdir(parents=True, exist_ok=True)
    run_name = run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tags = {"ct3dflow.model": ref.uri, "ct3dflow.model_version": ref.version, "ct3dflow.map_kind": kind.name,
            "ct3dflow.operating_point_source": ref.op_source,
            "ct3dflow.archive": source.name if source else str(archive)}
    with tracking.job_run(cfg, "screen", run_name=run_name, tags=tags,
                          system_metrics=bool(cfg.mlflow.get("system_metrics", True))) as run:
        results, outcomes = run_scoring(entries, plan, ref, cfg.ray, before=before, after=after, model=loaded,
                                        on_row=lambda i, n, r: log(f"[{i}/{n}] {r['study_id']}: {describe_outcome(r)}"))
        if source is not None:
            old = dicomweb.read_watermark(results_dir, source)["studies"]
            dicomweb.write_watermark(results_dir, source, {**old, **dicomweb.watermark_of(outcomes)}, started)
        elapsed = time.time() - t0
        acts = [o["action"] for o in outcomes.values()]
        skipped = acts.count("skip")
        processed = len(acts) - skipped
        summary = {
            "found": len(entries),
            "scored": sum(1 for o in outcomes.values() if o["action"] == "score" and o["status"] == "ok"),
            "skipped": skipped,
            "errors": int((results["status"] == "error").sum()),
            "errors_now": int(sum(1 for o in outcomes.values() if o["status"] == "error")),
            "flagged": int(results["predicted_abnormal"].fillna(False).astype(bool).sum()),
            "ok": int((results["status"] == "ok").sum()),
            "elapsed_s": round(elapsed, 2),
            "studies_per_min": round(60.0 * processed / elapsed, 3) if elapsed > 0 else 0.0,
            "model": ref.uri, "model_version": ref.version, "map_kind": kind.name,
            "operating_point_source": ref.op_source, "operating_point": op.to_dict() if op else None,
            "source": where, "results": str(results_dir / RESULTS_FILE), "mlflow_run_id": run.info.run_id,
            "stored_to_pacs": int(results["sr_uid"].notna().sum()) if source is not None else 0,
            "run_name": run_name, "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        report = write_screening_report(results_dir, results, summary)
        summary["report"] = str(report)
        mlflow.log_metrics({k: float(summary[k]) for k in ("found", "scored", "skipped", "errors", "errors_now",
                                                           "flagged", "ok", "elapsed_s", "studies_per_min")})
        if op:
            mlflow.log_params({f"op_{k}": v for k, v in op.flat().items()})
        mlflow.log_dict(summary, "screen_summary.json")
        mlflow.log_artifact(str(results_dir / RESULTS_FILE))
        mlflow.log_artifact(str(report))
    (results_dir / "last_run.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log("screen summary: " + " ".join(f"{k}={summary[k]}" for k in
                                       ("found", "scored", "skipped", "errors", "flagged", "studies_per_min")))
    for r in results[results["status"] == "error"].itertuples():
        log(f"  error {r.study_id}: {r.error}")
    log(f"results: {results_dir / RESULTS_FILE} ({len(results)} rows); report: {report}; MLflow run {run.info.run_id}")
    return summary


def read_results(results_dir) -> pd.DataFrame:
    """The compacted results of the latest run (for notebooks and tests)."""
    return pd.read_parquet(Path(results_dir) / RESULTS_FILE)


__all__ = ["SCREEN_COLUMNS", "choose_operating_point", "discover_studies", "read_results", "screen_job"]
