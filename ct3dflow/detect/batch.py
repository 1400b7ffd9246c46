"""One scoring run over many studies, with one resume rule; the core of every batch path (no Ray here).

A run is a :class:`ScoringPlan` (the map kind and its settings, the operating point or none, the model
version, the preprocessing, where results go) applied to *entries* (``{"entry", "study_id", "path",
"mask_path", "error"}``, from :mod:`ct3dflow.discovery` or a manifest split). Two stages, which the Ray
adapter runs as a CPU task pool and a pool of scoring actors, and :func:`score_locally` as a loop:

1. :func:`prepare_item` (CPU): hash the input (``cache.cache_key``: input bytes + preprocessing); when a
   usable ``ok`` part exists under this run's key, the study is **skipped**; else it is preprocessed into
   the cache. Errors become error parts at once.
2. :class:`Scorer` (holds the model): :func:`ct3dflow.detect.row.score_row`, then the row is written as a
   part.

Results (``results_dir``)::

    parts/<key>.parquet   one row per study and scoring, written atomically as soon as the study is done
    results.parquet       one row per entry of the latest run, rewritten atomically from the parts
    maps/<version>-<scoring key>/<study_id>/   the stored score, and with an operating point the NIfTI map and
                                               preview.png

``key = sha256(entry, model_version, scoring_key, input_key)``, ``scoring_key`` = the kind, its settings and
the operating point. **The one resume rule**: a study whose ``ok`` part exists under its key (with its
stored score still on disk) is not read or scored again; error rows are retried every run (the input, the
code or a transient fault may have changed). A killed job therefore resumes where it was, and never writes
a row twice. Errors and notes are passed through :func:`ct3dflow.discovery.hash_uids`: results hold hashed
identifiers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..discovery import hash_uids
from .operating_point import OperatingPoint
from .row import RESULT_COLUMNS, now, resolve_settings, score_row

SCREEN_COLUMNS = [*RESULT_COLUMNS, "model_version", "input_key", "scoring_key", "sr_uid", "seg_uid"]
PARTS = "parts"
MAPS = "maps"
RESULTS_FILE = "results.parquet"
STREAM_KEYS = ("entry", "study_id", "path", "action", "part", "status", "error", "model_version", "input_key",
               "predicted_abnormal", "abnormal_volume_cm3", "dicomweb")


def sha(*parts: str, n: int = 32) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:n]


@dataclass
class ScoringPlan:
    """What is constant over one scoring run (plain data: it travels to Ray workers as a dict)."""

    kind: str
    settings: dict
    operating_point: dict | None
    model_uri: str
    model_version: str
    preprocess: dict
    cache_dir: str
    results_dir: str
    write_outputs: bool = True

    @classmethod
    def make(cls, kind: str, scoring: dict | None, patch_size: int, op: OperatingPoint | dict | None,
             model_uri: str, model_version: str, preprocess: dict, cache_dir, results_dir,
             write_outputs: bool = True) -> ScoringPlan:
        from . import get_kind

        k = get_kind(kind)
        opp = OperatingPoint.load(op) if op is not None else None
        if opp is not None and opp.map != k.name:
            raise ValueError(f"the operating point is for the {opp.map} map, but this run scores the {k.name} map")
        settings = resolve_settings(k, scoring, patch_size, opp)
        return cls(k.name, settings, opp.to_dict() if opp else None, str(model_uri), str(model_version),
                   dict(preprocess), str(cache_dir), str(results_dir), bool(write_outputs))

    @property
    def scoring_key(self) -> str:
        # batching changes no number; precision only rounding (docs/RESULTS.md: bf16 chose the same point)
        made = {k: v for k, v in self.settings.items() if k not in ("batch_size", "precision")}
        return sha(json.dumps({"kind": self.kind, "settings": made, "op": self.operating_point}, sort_keys=True), n=12)

    @property
    def parts_dir(self) -> Path:
        return Path(self.results_dir) / PARTS

    @property
    def maps_dir(self) -> Path:
        """``maps/<model version>-<scoring key>/``: another version or operating point never overwrites these."""
        return Path(self.results_dir) / MAPS / f"{self.model_version.replace('/', '-v')}-{self.scoring_key}"

    def op(self) -> OperatingPoint | None:
        return OperatingPoint.from_dict(self.operating_point) if self.operating_point else None

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- parts
def write_parquet_atomic(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to a temporary file beside ``path`` and rename it: readers never see half a file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def part_name(entry: str, model_version: str, scoring_key: str, input_key: str) -> str:
    return f"{sha(entry, model_version, scoring_key, input_key)}.parquet"


def write_part(parts_dir, name: str, row: dict) -> Path:
    """One result row as ``parts/<name>``, atomically, with the results' column types."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([{c: row.get(c) for c in SCREEN_COLUMNS}], columns=SCREEN_COLUMNS)
    return write_parquet_atomic(typed(df), parts_dir / name)


def typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["predicted_abnormal"] = df["predicted_abnormal"].astype("boolean")
    df["n_patches"] = pd.to_numeric(df["n_patches"], errors="coerce").astype("Int64")
    for c in ("abnormal_volume_cm3", "threshold_cm3", "log_p_min", "log_p_mean"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def _usable_part(path: Path) -> bool:
    """An ``ok`` part whose stored score is still there (an unreadable part is as good as none)."""
    try:
        r = pd.read_parquet(path, columns=["status", "score_path"]).iloc[0]
    except Exception:  # noqa: BLE001
        return False
    return r["status"] == "ok" and (not isinstance(r["score_path"], str) or Path(r["score_path"]).exists())


# ------------------------------------------------------------------------------------------- stages
def stream_row(item: dict, **over) -> dict:
    """The small row each stage passes on (strings only: Ray Data blocks stay simple)."""
    out = {k: "" for k in STREAM_KEYS}
    out.update({k: item.get(k, "") for k in ("entry", "study_id", "path", "model_version", "input_key", "dicomweb")})
    out.update(over)
    return {k: "" if v is None else str(v) for k, v in out.items()}


def _error_part(item: dict, plan: ScoringPlan, reason: str, input_key: str = "") -> dict:
    reason = hash_uids(reason)
    row = {"study_id": item["study_id"], "path": item["path"], "status": "error", "error": reason,
           "model": plan.model_uri, "map_kind": plan.kind, "model_version": plan.model_version,
           "input_key": input_key, "scoring_key": plan.scoring_key, "scored_at": now()}
    name = part_name(item["entry"], plan.model_version, plan.scoring_key, input_key)
    write_part(plan.parts_dir, name, row)
    return stream_row(item, action="error", part=name, status="error", error=reason, input_key=input_key,
                      model_version=plan.model_version)


def usable_part_name(item: dict, plan: ScoringPlan, input_key: str) -> str | None:
    """The part of this item under this plan and input, if a usable one exists (the one resume rule)."""
    name = part_name(item["entry"], plan.model_version, plan.scoring_key, input_key)
    return name if (plan.parts_dir / name).exists() and _usable_part(plan.parts_dir / name) else None


def prepare_item(item: dict, plan: dict | ScoringPlan) -> dict:
    """Stage 1 (CPU): skip what this plan already scored, else preprocess into the cache. Never raises.

    An item may come with its ``input_key`` already known (a PACS study's fingerprint, so that a study scored
    before is skipped without being retrieved) or already decided (``action`` ``skip``)."""
    from ..cache import StudyCache, cache_key
    from ..pipeline import error_reason, preprocess_row
    from ..preprocess import PreprocessConfig

    plan = plan if isinstance(plan, ScoringPlan) else ScoringPlan(**plan)
    try:
        if item.get("action") == "skip":
            return stream_row(item, action="skip", part=item["part"], status="ok", model_version=plan.model_version)
        if item.get("error"):
            return _error_part(item, plan, item["error"], item.get("input_key") or "")
        cfg = PreprocessConfig.from_dict(plan.preprocess)
        mask = item.get("mask_path") or None
        given = item.get("input_key") or ""
        try:
            key = given or cache_key(item["path"], cfg, mask)
        except Exception as exc:  # noqa: BLE001 - unreadable input: an error row
            if isinstance(exc, PermissionError):
                return _error_part(item, plan, f"permission denied reading {exc.filename or item['path']}; give "
                                               "the scoring job's user read access")
            return _error_part(item, plan, error_reason(exc))
        done = usable_part_name(item, plan, key)
        if done:
            return stream_row(item, action="skip", part=done, status="ok", input_key=key,
                              model_version=plan.model_version)
        res = preprocess_row({"study_id": item["study_id"], "path": item["path"], "mask_path": mask},
                             plan.cache_dir, cfg)
        if res["status"] != "ok":
            return _error_part(item, plan, res["error"], key)
        if not given:  # the key of what was actually preprocessed
            key = (StudyCache(plan.cache_dir).meta(item["study_id"]) or {}).get("key") or key
        name = part_name(item["entry"], plan.model_version, plan.scoring_key, key)
        return stream_row(item, action="score", part=name, status="pending", input_key=key,
                          model_version=plan.model_version)
    except Exception as exc:  # noqa: BLE001 - e.g. the parts folder is not writable: still one row
        return stream_row(item, action="error", status="error", error=hash_uids(f"unexpected {exc!r}"))


class Scorer:
    """Stage 2: holds the model (prepared once for the kind and the device) and scores prepared items."""

    def __init__(self, plan: dict | ScoringPlan, model, device: str = "cpu"):
        from . import get_kind

        self.plan = plan if isinstance(plan, ScoringPlan) else ScoringPlan(**plan)
        self.kind = get_kind(self.plan.kind)
        self.device = device
        self.predictor = self.kind.prepare(model, device)
        self.op = self.plan.op()

    def __call__(self, item: dict) -> dict:
        from ..cache import StudyCache

        if item["action"] != "score":
            return item
        sid = item["study_id"]
        row = score_row(self.predictor, self.kind, sid, item["path"], lambda: StudyCache(self.plan.cache_dir).load(sid),
                        self.plan.settings, self.plan.maps_dir, self.op, model_uri=self.plan.model_uri,
                        device=self.device, write_outputs=self.plan.write_outputs)
        row.update(model_version=self.plan.model_version, input_key=item["input_key"],
                   scoring_key=self.plan.scoring_key, error=hash_uids(row.get("error") or ""))
        write_part(self.plan.parts_dir, item["part"], row)
        pa = row.get("predicted_abnormal")
        return {**item, "status": row["status"], "error": row["error"], "predicted_abnormal": "" if pa is None else
                str(bool(pa)), "abnormal_volume_cm3": "" if row.get("abnormal_volume_cm3") is None else
                f"{row['abnormal_volume_cm3']:.3f}"}


# -------------------------------------------------------------------------------------- compaction
def compact_results(results_dir, entries: list[dict], outcomes: dict[str, dict]) -> pd.DataFrame:
    """``results.parquet``: exactly one row per entry, from its part (written atomically).

    An entry without a readable part (which the stages should never leave) gets an error row, so no study is
    ever missing; parts written by an older version may lack newer columns (they are added, empty)."""
    results_dir = Path(results_dir)
    frames = []
    for e in entries:
        o = outcomes.get(e["entry"])
        part = results_dir / PARTS / o["part"] if o and o.get("part") else None
        df = None
        if part is not None and part.exists():
            try:
                df = pd.read_parquet(part)
            except Exception:  # noqa: BLE001
                df = None
        if df is None or df.empty:
            reason = (o or {}).get("error") or "the job lost this study (no result part); it is retried next run"
            df = pd.DataFrame([{"study_id": e["study_id"], "path": e["path"], "status": "error", "error": reason,
                                "scored_at": now()}])
        frames.append(df.reindex(columns=SCREEN_COLUMNS).assign(_key=(o or {}).get("part") or f"missing:{e['entry']}"))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*SCREEN_COLUMNS, "_key"])
    df = typed(df.drop_duplicates("_key", keep="last").drop(columns="_key").reset_index(drop=True))  # entry order
    results_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(df, results_dir / RESULTS_FILE)
    return df


def entries_of_rows(rows: list[dict]) -> list[dict]:
    """Manifest rows as run entries (a duplicate id keeps its own entry, told apart by its row number)."""
    out, seen = [], set()
    for i, r in enumerate(rows):
        sid = str(r["study_id"])
        mask = r.get("abs_mask_path") or r.get("mask_path") or ""
        out.append({"entry": f"{sid}#row{i}" if sid in seen else sid, "study_id": sid,
                    "path": str(r.get("abs_path") or r.get("path")), "mask_path": str(mask),
                    "error": r.get("manifest_error") or ""})
        seen.add(sid)
    return out


def score_locally(entries: list[dict], plan: ScoringPlan, model, device: str = "cpu",
                  on_row: Callable[[int, dict], None] | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The sequential path (CLI, experiments): both stages in this process, then compaction.
    Returns ``(results, outcomes by entry)``."""
    scorer = None
    outcomes: dict[str, dict] = {}
    for i, e in enumerate(entries, 1):
        item = prepare_item(e, plan)
        if item["action"] == "score":
            scorer = scorer or Scorer(plan, model, device)
            item = scorer(item)
        outcomes[e["entry"]] = item
        if on_row:
            on_row(i, item)
    return compact_results(plan.results_dir, entries, outcomes), outcomes
