"""The nightly archive screening job: discover → skip what is done → preprocess (CPU) → score (actors).

``screen_job(cfg, archive, model=None)`` is what ``jobs/screen.py`` calls (docs/SCREENING.md is the
operator's page). The science is the core's: ``pipeline.preprocess_row`` and ``evaluation.score_row``;
this module only wires them to Ray Data and keeps the results dataset exact.

Results (``<results_dir>``, default ``<work_dir>/results``)::

    parts/<key>.parquet      one row per study and scoring (DESIGN §3 columns + model_version, input_key,
                             scoring_key), written atomically (tmp + rename) as soon as the study is done
    results.parquet          one row per study discovered by the latest run, for its model: rewritten
                             (atomically) at the end of every run from the parts
    maps/<model>/<study_id>/ log_p_map.nii.gz, preview.png, patch_scores.npz

``key = sha256(entry, model_version, scoring_key, input_key)``: ``input_key`` is the cache key of the
study (``cache.cache_key``: input bytes + preprocessing settings), ``scoring_key`` hashes the operating
point and grid settings. A study whose ``ok`` part exists under its key is *skipped* (not read, not
scored again); error rows are retried every run (the input, the code or a transient fault may have
changed). A killed or stopped job therefore resumes where it was: a re-run recomputes only the studies
without a part, and never writes a row twice (the same key names the same file).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .discovery import discover_studies, hash_uids
from .evaluation import RESULT_COLUMNS

SCREEN_COLUMNS = [*RESULT_COLUMNS, "model_version", "input_key", "scoring_key"]
PARTS = "parts"
RESULTS_FILE = "results.parquet"
_STREAM_KEYS = ("entry", "study_id", "path", "action", "part", "status", "error", "model_version",
                "input_key", "predicted_abnormal")


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to a temporary file beside ``path`` and rename it: readers never see half a file."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _log(msg: str) -> None:
    line = f"[ct3dflow] {msg}"
    try:
        print(line, flush=True)
    except UnicodeEncodeError:  # a driver whose locale is ASCII must still log, not crash
        print(line.encode("ascii", "backslashreplace").decode("ascii"), flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha(*parts: str, n: int = 32) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:n]


def part_name(entry: str, model_version: str, scoring_key: str, input_key: str) -> str:
    return f"{_sha(entry, model_version, scoring_key, input_key)}.parquet"


def write_part(parts_dir, name: str, row: dict) -> Path:
    """Write one result row as ``parts/<name>`` atomically: a reader sees the whole row or no file."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([{c: row.get(c) for c in SCREEN_COLUMNS}], columns=SCREEN_COLUMNS)
    df["predicted_abnormal"] = df["predicted_abnormal"].astype("boolean")
    for c in ("n_patches",):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in ("abnormal_volume_cm3", "threshold_cm3", "log_p_min", "log_p_mean"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return write_parquet_atomic(df, parts_dir / name)


def _part_status(path: Path) -> str | None:
    try:
        return str(pd.read_parquet(path, columns=["status"])["status"].iloc[0])
    except Exception:  # noqa: BLE001 - an unreadable part is as good as none: recompute
        return None


# ------------------------------------------------------------------------------------------- model
@dataclass
class ModelRef:
    """Which model scores, resolved once on the driver so that every actor loads the same version."""

    spec: str  # what the user gave
    uri: str  # pinned: models:/NAME/VERSION, or the absolute .pt path
    version: str  # NAME/VERSION, or file-<sha>
    settings: dict = field(default_factory=dict)
    operating_point: dict | None = None
    op_source: str = "model version tag"
    tracking_uri: str | None = None

    @property
    def is_file(self) -> bool:
        return not self.uri.startswith(("models:/", "runs:/"))

    def load(self):
        """The patch scorer (``.log_prob``); called once per actor."""
        if self.is_file:
            from .models import load_patch_scorer

            return load_patch_scorer(self.uri, map_location="cpu")
        import mlflow

        from .tracking import load_patch_model

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        return load_patch_model(self.uri).model


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model(cfg, spec: str | None, tracking_uri: str | None) -> tuple[ModelRef, object]:
    """``models:/NAME@champion`` (default), ``models:/NAME/3``, ``runs:/…`` or a Glow3D ``.pt`` file."""
    from .config import resolve_path

    spec = spec or f"models:/{cfg.mlflow.get('registered_model') or 'ct3dflow-glow3d'}@champion"
    if spec.startswith(("models:/", "runs:/")):
        from .tracking import load_patch_model

        loaded = load_patch_model(spec)
        version = f"{loaded.name}/{loaded.version}" if loaded.name else loaded.uri
        ref = ModelRef(spec, loaded.uri, version, dict(loaded.settings or {}), loaded.operating_point,
                       tracking_uri=tracking_uri)
        return ref, loaded.model
    from .models import load_patch_scorer

    path = resolve_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model {spec} not found: pass models:/NAME@champion, models:/NAME/VERSION or "
                                f"the path of a saved Glow3D (.pt)")
    model = load_patch_scorer(path, map_location="cpu")
    settings = {"patch_size": int(getattr(model, "patch_size", 48))}
    return ModelRef(spec, str(path), f"file-{_file_sha(path)}", settings, None, tracking_uri=tracking_uri), model


def choose_operating_point(ref: ModelRef, cfg) -> dict | None:
    """The model version's operating point, else the job config's fallback (said in the log)."""
    from .scoring import OperatingPoint

    if ref.operating_point:
        ref.op_source = "model version tag"
        return OperatingPoint.from_dict(ref.operating_point).to_dict()
    fallback = dict(cfg.operating_point or {})
    missing = [k for k in OperatingPoint.__dataclass_fields__ if fallback.get(k) is None]
    if missing:
        ref.op_source = "none"
        _log(f"WARNING: model {ref.version} has no operating point tag and the config's operating_point lacks "
             f"{', '.join(missing)}: studies get patch scores but no decision, map or preview. Run the tuning "
             f"job, or set operating_point.{', operating_point.'.join(missing)} in the config")
        return None
    ref.op_source = "job config (fallback)"
    _log(f"model {ref.version} has no operating point tag: using the job config's operating_point as a "
         f"fallback ({json.dumps(fallback)})")
    return OperatingPoint.from_dict(fallback).to_dict()


# ------------------------------------------------------------------------------------ map functions
def _stream_row(item: dict, **over) -> dict:
    out = {k: "" for k in _STREAM_KEYS}
    out.update({k: item.get(k, "") for k in ("entry", "study_id", "path", "model_version")})
    out.update(over)
    out["predicted_abnormal"] = str(out["predicted_abnormal"])
    return {k: str(v) if v is not None else "" for k, v in out.items()}


def _error_part(item: dict, reason: str, input_key: str = "") -> dict:
    reason = hash_uids(reason)
    row = {"study_id": item["study_id"], "path": item["path"], "status": "error", "error": reason,
           "model": item["model_uri"], "model_version": item["model_version"], "input_key": input_key,
           "scoring_key": item["scoring_key"], "scored_at": _now()}
    name = part_name(item["entry"], item["model_version"], item["scoring_key"], input_key)
    write_part(item["parts_dir"], name, row)
    return _stream_row(item, action="error", part=name, status="error", error=reason, input_key=input_key)


def prepare_study(item: dict) -> dict:
    """CPU stage: hash the input, skip it when already scored, else preprocess it into the cache.

    Discovery and preprocessing errors are written as error parts here, at once. Never raises."""
    from .cache import StudyCache, cache_key
    from .pipeline import error_reason, preprocess_row
    from .preprocess import PreprocessConfig

    try:
        if item.get("error"):
            return _error_part(item, item["error"])
        cfg = PreprocessConfig.from_dict(json.loads(item["preprocess"]))
        mask = item.get("mask_path") or None
        try:
            key = cache_key(item["path"], cfg, mask)
        except Exception as exc:  # noqa: BLE001 - unreadable input: an error row
            if isinstance(exc, PermissionError):
                return _error_part(item, f"permission denied reading {exc.filename or item['path']}; give the "
                                         "screening job's user read access")
            return _error_part(item, error_reason(exc))
        name = part_name(item["entry"], item["model_version"], item["scoring_key"], key)
        part = Path(item["parts_dir"]) / name
        if part.exists() and _part_status(part) == "ok":
            return _stream_row(item, action="skip", part=name, status="ok", input_key=key)
        res = preprocess_row({"study_id": item["study_id"], "path": item["path"], "mask_path": mask},
                             item["cache_dir"], cfg)
        if res["status"] != "ok":
            return _error_part(item, res["error"], key)
        meta = StudyCache(item["cache_dir"]).meta(item["study_id"]) or {}
        key = meta.get("key") or key  # the key of what was actually preprocessed
        name = part_name(item["entry"], item["model_version"], item["scoring_key"], key)
        return _stream_row(item, action="score", part=name, status="pending", input_key=key)
    except Exception as exc:  # noqa: BLE001 - e.g. the parts folder is not writable: still one row
        return _stream_row(item, action="error", status="error", error=hash_uids(f"unexpected {exc!r}"))


class ScoringActor:
    """Holds the model, loaded once per actor; scores the studies of a batch and writes their parts."""

    def __init__(self, ref: dict, cache_dir: str, maps_dir: str, parts_dir: str, scoring: dict,
                 operating_point: dict | None, use_gpu: bool):
        import torch

        from .scoring import OperatingPoint

        self.ref = ModelRef(**ref)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = self.ref.load().to(self.device).eval()
        self.cache_dir, self.maps_dir, self.parts_dir = cache_dir, maps_dir, parts_dir
        self.scoring = scoring
        self.op = OperatingPoint.from_dict(operating_point) if operating_point else None
        _log(f"scoring actor pid {os.getpid()} loaded {self.ref.version} on {self.device}")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from .evaluation import score_row

        out = []
        for item in batch.to_dict("records"):
            if item["action"] != "score":
                out.append(item)
                continue
            with torch.no_grad():
                row = score_row(self.model, {"study_id": item["study_id"], "path": item["path"]}, self.cache_dir,
                                self.maps_dir, self.scoring, self.op, model_uri=self.ref.uri, device=self.device)
            row.update(model_version=item["model_version"], input_key=item["input_key"],
                       scoring_key=self.scoring["scoring_key"], error=hash_uids(row.get("error") or ""))
            write_part(self.parts_dir, item["part"], row)
            pa = row.get("predicted_abnormal")
            out.append({**item, "status": row["status"], "error": row["error"],
                        "predicted_abnormal": "" if pa is None else str(bool(pa))})
        return pd.DataFrame(out, columns=list(_STREAM_KEYS))


# -------------------------------------------------------------------------------------- compaction
def compact_results(results_dir, entries: list[dict], outcomes: dict[str, dict]) -> pd.DataFrame:
    """``results.parquet``: exactly one row per discovered entry, from its part (written atomically).

    An entry without a readable part (which the pipeline should never leave) gets an error row, so no
    study is ever missing; rows are deduplicated by part key, keeping the newest ``scored_at``."""
    results_dir = Path(results_dir)
    parts_dir = results_dir / PARTS
    frames = []
    for e in entries:
        o = outcomes.get(e["entry"])
        part = parts_dir / o["part"] if o and o.get("part") else None
        df = None
        if part is not None and part.exists():
            try:
                df = pd.read_parquet(part)
            except Exception:  # noqa: BLE001
                df = None
        if df is None or df.empty:
            reason = (o or {}).get("error") or "the job lost this study (no result part); it is retried next run"
            df = pd.DataFrame([{"study_id": e["study_id"], "path": e["path"], "status": "error",
                                "error": reason, "scored_at": _now()}], columns=SCREEN_COLUMNS)
        frames.append(df.assign(_key=(o or {}).get("part") or f"missing:{e['entry']}"))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*SCREEN_COLUMNS, "_key"])
    df = (df.sort_values("scored_at", kind="stable").drop_duplicates("_key", keep="last")
          .drop(columns="_key").reset_index(drop=True))
    df = df.reindex(columns=SCREEN_COLUMNS)  # parts written by an older version may lack newer columns
    write_parquet_atomic(df, results_dir / RESULTS_FILE)
    return df


# --------------------------------------------------------------------------------------------- job
def gpu_plan(cfg) -> tuple[bool, float]:
    """(use GPUs, GPUs in the cluster): never ask for GPUs a cluster does not have (it would hang)."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0) or 0)
    want = cfg.ray.get("use_gpu", "auto")
    want = str(want).lower() if want is not None else "auto"
    if want in ("auto", "none", ""):
        return gpus >= 1, gpus
    if want in ("true", "1", "yes"):
        if gpus < 1:
            _log("WARNING: ray.use_gpu is true but the cluster has no GPU: scoring on CPU actors instead "
                 "(a task asking for a GPU would wait forever)")
            return False, gpus
        return True, gpus
    return False, gpus


def screen_job(cfg, archive, model: str | None = None, run_name: str | None = None) -> dict:
    """Screen ``archive`` (a folder tree or a manifest) with ``model``; return the run's summary."""
    import mlflow
    import ray

    from . import tracking
    from .config import resolve_path
    from .preprocess import PreprocessConfig
    from .ray_data import quiet_progress

    t0 = time.time()
    archive = resolve_path(archive)
    tracking_uri = tracking.configure(cfg)
    ref, _ = resolve_model(cfg, model, tracking_uri)
    op = choose_operating_point(ref, cfg)
    pre = dict(ref.settings.get("preprocess") or cfg.preprocess or {})
    if "patch_size" in ref.settings:
        pre["patch_size"] = int(ref.settings["patch_size"])
    pre_cfg = PreprocessConfig.from_dict(pre)
    scoring = {"stride": 38, "batch_size": 16, **(cfg.scoring or {})}
    scoring["patch_size"] = int(ref.settings.get("patch_size") or scoring.get("patch_size") or 48)
    scoring["scoring_key"] = _sha(json.dumps({"op": op, "stride": scoring["stride"],
                                              "patch_size": scoring["patch_size"]}, sort_keys=True), n=12)
    results_dir = resolve_path(cfg.data.get("results_dir")) or cfg.work_path / "results"
    parts_dir = results_dir / PARTS
    maps_dir = results_dir / "maps" / ref.version.replace("/", "-v")
    cache_dir = cfg.cache_path
    for d in (parts_dir, maps_dir, cache_dir):
        d.mkdir(parents=True, exist_ok=True)
    _log(f"model {ref.version} ({ref.uri}); operating point from {ref.op_source}; preprocessing "
         f"{pre_cfg.fingerprint()}; scoring key {scoring['scoring_key']}")

    entries, notes = discover_studies(archive, with_notes=True)
    for n in notes:
        _log(f"discovery: {n}")
    n_disc_err = sum(1 for e in entries if e["error"])
    _log(f"discovered {len(entries)} studies under {archive} ({n_disc_err} with discovery errors)")

    use_gpu, gpus = gpu_plan(cfg)
    n_actors = max(1, int(cfg.ray.get("scoring_actors", 1)))
    if use_gpu:
        n_actors = min(n_actors, int(gpus))
    n_pre = max(1, int(cfg.ray.get("preprocess_workers", 2)))
    pre_cpus = float(cfg.ray.get("preprocess_cpus", 1))
    score_cpus = float(cfg.ray.get("scoring_cpus", 1))
    cpus = float(ray.cluster_resources().get("CPU", 0) or 0)
    if cpus and n_actors * score_cpus + pre_cpus > cpus:
        # actors hold their CPUs for the whole run: leave room for at least one preprocessing task, or
        # the pipeline waits forever
        score_cpus = pre_cpus = round(cpus / (n_actors + 1), 3)
        _log(f"the cluster has {cpus:g} CPUs: {n_actors} scoring actor(s) and a preprocessing task get "
             f"{score_cpus:g} CPU each")
    _log(f"{n_pre} preprocessing worker(s) on CPU, {n_actors} scoring actor(s) on "
         f"{'GPU' if use_gpu else 'CPU'} (cluster CPUs: {cpus:g}, GPUs: {gpus:g})")

    common = {"model_uri": ref.uri, "model_version": ref.version, "scoring_key": scoring["scoring_key"],
              "parts_dir": str(parts_dir), "cache_dir": str(cache_dir), "preprocess": json.dumps(pre_cfg.to_dict())}
    items = [{**common, **{k: str(v) for k, v in e.items()}} for e in entries]
    run_name = run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tags = {"ct3dflow.model": ref.uri, "ct3dflow.model_version": ref.version,
            "ct3dflow.operating_point_source": ref.op_source, "ct3dflow.archive": str(archive)}
    outcomes: dict[str, dict] = {}
    with tracking.job_run(cfg, "screen", run_name=run_name, tags=tags,
                          system_metrics=bool(cfg.mlflow.get("system_metrics", True))) as run:
        if items:
            quiet_progress()
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map(prepare_study, num_cpus=pre_cpus,
                        compute=ray.data.TaskPoolStrategy(size=n_pre))
            ref_dict = {k: getattr(ref, k) for k in ("spec", "uri", "version", "settings", "operating_point",
                                                      "op_source", "tracking_uri")}
            ds = ds.map_batches(
                ScoringActor, batch_format="pandas",
                batch_size=int(cfg.ray.get("studies_per_batch", 1)),
                fn_constructor_kwargs={"ref": ref_dict, "cache_dir": str(cache_dir), "maps_dir": str(maps_dir),
                                       "parts_dir": str(parts_dir), "scoring": scoring, "operating_point": op,
                                       "use_gpu": use_gpu},
                num_gpus=1 if use_gpu else 0, num_cpus=score_cpus,
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                max_restarts=int(cfg.ray.get("actor_max_restarts", -1)),
                max_task_retries=int(cfg.ray.get("actor_max_task_retries", -1)),
            )
            for i, row in enumerate(ds.iter_rows(), 1):
                outcomes[row["entry"]] = row
                what = {"skip": "skipped (already scored)", "score": "scored", "error": "error"}[row["action"]]
                if row["status"] == "error":
                    what = f"error: {row['error']}"
                elif row["action"] == "score":
                    what += " (flagged)" if row["predicted_abnormal"] == "True" else ""
                _log(f"[{i}/{len(items)}] {row['study_id']}: {what}")
        results = compact_results(results_dir, entries, outcomes)
        elapsed = time.time() - t0
        acts = [o["action"] for o in outcomes.values()]
        scored = sum(1 for o in outcomes.values() if o["action"] == "score" and o["status"] == "ok")
        skipped = acts.count("skip")
        errors = int((results["status"] == "error").sum())
        processed = len(acts) - skipped
        summary = {
            "found": len(entries), "scored": scored, "skipped": skipped, "errors": errors,
            "errors_now": int(sum(1 for o in outcomes.values() if o["status"] == "error")),
            "flagged": int(results["predicted_abnormal"].fillna(False).astype(bool).sum()),
            "ok": int((results["status"] == "ok").sum()),
            "elapsed_s": round(elapsed, 2),
            "studies_per_min": round(60.0 * processed / elapsed, 3) if elapsed > 0 else 0.0,
            "model": ref.uri, "model_version": ref.version, "operating_point_source": ref.op_source,
            "results": str(results_dir / RESULTS_FILE), "mlflow_run_id": run.info.run_id,
        }
        mlflow.log_metrics({k: float(summary[k]) for k in ("found", "scored", "skipped", "errors", "errors_now",
                                                           "flagged", "ok", "elapsed_s", "studies_per_min")})
        mlflow.log_dict(summary, "screen_summary.json")
        mlflow.log_artifact(str(results_dir / RESULTS_FILE))
    (results_dir / "last_run.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _log("screen summary: " + " ".join(f"{k}={summary[k]}" for k in
                                        ("found", "scored", "skipped", "errors", "flagged", "studies_per_min")))
    _log(f"results: {results_dir / RESULTS_FILE} ({len(results)} rows); MLflow run {run.info.run_id}")
    return summary


def read_results(results_dir) -> pd.DataFrame:
    """The compacted results of the latest run (for notebooks and tests)."""
    return pd.read_parquet(Path(results_dir) / RESULTS_FILE)


__all__ = ["SCREEN_COLUMNS", "ModelRef", "ScoringActor", "compact_results", "discover_studies", "part_name",
           "prepare_study", "read_results", "resolve_model", "screen_job", "write_part"]
