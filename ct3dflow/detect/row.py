"""One study → one results row (DESIGN §3) and its outputs: the function every path calls.

The CLI (``ct3dflow score-local``), the Ray tune and evaluate jobs, the nightly screening actors and the
experiments all score through :func:`score_row`: the kind's predictor over the study's windows, its score
stored per study (so that tuning never reruns the model), and with an operating point the map, the
abnormal volume, the decision and the NIfTI map + PNG preview. It never raises: a study that cannot be
scored is an ``error`` row with a reason a person can act on.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..pipeline import error_reason
from .decision import is_abnormal
from .kind import MapKind
from .operating_point import OperatingPoint
from .outputs import write_map_nifti, write_preview_png
from .search import ScoredStudy

RESULT_COLUMNS = [
    "study_id", "path", "status", "error", "model", "map_kind", "n_patches", "abnormal_volume_cm3",
    "predicted_abnormal", "threshold_cm3", "log_p_min", "log_p_mean", "map_path", "preview_path", "score_path",
    "scored_at",
]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def result_row(study_id: str, path, **values) -> dict:
    out = dict.fromkeys(RESULT_COLUMNS)
    out.update(study_id=str(study_id), path=str(path), scored_at=now(), **values)
    return out


def resolve_settings(kind: MapKind, scoring: dict | None, patch_size: int, op: OperatingPoint | None = None) -> dict:
    """The kind's scoring settings from a ``scoring`` section; an operating point's own ``scoring`` wins, so
    that a study is mapped the way the point was chosen."""
    if op is not None and op.map != kind.name:
        raise ValueError(f"the operating point is for the {op.map} map, not the {kind.name} map")
    merged = {**(scoring or {}), **({**kind.point_defaults, **op.scoring} if op is not None else {})}
    settings = kind.settings(merged, int(merged.get("patch_size") or patch_size))
    if settings["patch_size"] != int(patch_size):
        raise ValueError(f"the operating point was chosen on {settings['patch_size']}³ windows but the model scores "
                         f"{patch_size}³ patches: tune it for this model")
    return settings


def score_row(predictor, kind: MapKind, study_id: str, path, study, settings: dict, out_dir,
              op: OperatingPoint | None = None, model_uri: str = "", device="cpu", write_outputs: bool = True) -> dict:
    """Score one preprocessed study (``study`` or a callable returning it); see the module docstring."""
    sid = str(study_id)
    out = result_row(sid, path, model=model_uri, map_kind=kind.name)
    try:
        st = study() if callable(study) else study
        score = kind.score(predictor, st, settings, device)
        d = Path(out_dir) / sid
        d.mkdir(parents=True, exist_ok=True)
        out.update(status="ok", error="", score_path=str(kind.save_score(score, d / kind.score_file)),
                   **kind.summary(score))
        if op is not None:
            vol, ab, atyp = kind.decide(score, st.permissive, st.spacing, op)
            flagged = is_abnormal(vol, op.threshold_cm3)
            out.update(abnormal_volume_cm3=vol, predicted_abnormal=flagged, threshold_cm3=op.threshold_cm3)
            if write_outputs:
                out.update(write_outputs_of(sid, st, kind, op, atyp, ab, vol, flagged, d))
    except Exception as exc:  # noqa: BLE001 - one broken study becomes one error row
        out.update(status="error", error=error_reason(exc))
    return out


def write_outputs_of(sid, study, kind: MapKind, op: OperatingPoint, atypicality, abnormal, vol, flagged, d) -> dict:
    """The map as NIfTI on the study's grid and the PNG preview beside it; their paths as result columns."""
    ref = (study.spacing, study.origin, study.direction)
    nifti = write_map_nifti(atypicality, ref, Path(d) / kind.map_file, fill_value=kind.nifti_fill(atypicality))
    title = f"{sid}: {vol:.1f} cm3 {'ABNORMAL' if flagged else 'normal'} ({kind.name} map)"
    png = write_preview_png(study.volume, atypicality, abnormal, Path(d) / "preview.png", title=title,
                            level=kind.level(op.params, op.reference))
    return {"map_path": str(nifti), "preview_path": str(png)}


def load_scored_studies(kind: MapKind, rows: list[dict], results: pd.DataFrame, cache_dir) -> list[ScoredStudy]:
    """The labelled ``rows`` whose result is ``ok`` with a stored score of this kind, for a search or an
    evaluation (masks memory-mapped from the cache, no volumes)."""
    from ..cache import StudyCache

    if "map_kind" in results.columns and results["map_kind"].notna().any():
        kinds = set(results.loc[results["status"] == "ok", "map_kind"].dropna())
        if kinds and kinds != {kind.name}:
            raise ValueError(f"these results hold {sorted(kinds)} scores, not {kind.name} scores: score the split "
                             f"with the {kind.name} map (score-local --map {kind.name}, or scoring.map)")
    ok = results[(results["status"] == "ok") & results["score_path"].notna()].set_index("study_id")
    cache = StudyCache(cache_dir)
    out = []
    for r in rows:
        sid = r["study_id"]
        # a duplicate id's second row would take the first row's score under its own label
        if sid not in ok.index or r.get("label") is None or r.get("manifest_error"):
            continue
        s = cache.load(sid, mmap=True)
        pathology = r.get("pathology")
        out.append(ScoredStudy(sid, int(r["label"]), pathology if isinstance(pathology, str) else None,
                               np.asarray(s.permissive), tuple(s.spacing), kind.load_score(ok.loc[sid, "score_path"])))
    return out
